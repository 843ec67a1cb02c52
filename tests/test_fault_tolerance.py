"""Real kills of real workers: every interrupted run must end bit-identical to an uninterrupted one."""

import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest


import snapshots
from conftest import (
    RESUME_ARGS,
    assert_bit_identical,
    epochs,
    free_port,
    multinode_cmd,
    no_traceback_from,
    resumed_epochs,
    run,
    session_members,
    torchrun_cmd,
)


def test_sigkilled_worker_is_restarted_and_ends_bit_identical(tmp_path, jobs, reference_snapshot):
    job = jobs(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS, max_restarts=3), tmp_path)
    job.wait_for(r"Epoch 25/60")
    os.kill(job.worker(local_rank=1), signal.SIGKILL)
    assert job.wait() == 0, job.output()[-3000:]
    resumed_epochs(job.output())
    assert_bit_identical(tmp_path / "snapshot.pt", reference_snapshot)


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag, as TensorBoard shows it: what a restarted run rewrote is purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_simulated_failure_crashes_once_and_the_restart_ends_bit_identical(tmp_path, reference_snapshot):
    cmd = torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS, "--simulate_failure_at", "35", "--tensorboard_dir", "tb", max_restarts=3)
    result = run(cmd, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The last rank crashed once, at the start of epoch 35; the restarted workers did not crash again.
    assert result.stdout.count("simulated crash") == 1
    assert "Rank 1: simulated crash at the start of epoch 35" in result.stdout
    assert resumed_epochs(result.stdout) == 30
    assert_bit_identical(tmp_path / "snapshot.pt", reference_snapshot)
    # TensorBoard: one curve through the crash, every epoch once; the epochs 31-34 written before the
    # crash were replaced by those of the restart, which printed the same losses.
    printed = epochs(result.stdout.split("Resuming from")[-1])
    for tag in ("loss/train", "val/loss", "throughput/samples_per_s", "step_time/comm"):
        steps = [step for step, _ in tensorboard_scalars(tmp_path / "tb", tag)]
        assert steps == list(range(1, 61)), f"{tag}: {steps}"
    logged = dict(tensorboard_scalars(tmp_path / "tb", "loss/train"))
    assert all(logged[n] == pytest.approx(loss, rel=1e-4, abs=1e-6) for n, loss in printed)


def test_simulated_failure_without_restarts_fails_the_job_and_keeps_the_snapshot(tmp_path):
    result = run(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS, "--simulate_failure_at", "35"), tmp_path)
    assert result.returncode != 0
    assert [n for n, _ in epochs(result.stdout)] == list(range(1, 35))
    assert snapshots.read(str(tmp_path / "snapshot.pt"), "cpu")["EPOCHS_RUN"] == 30


def test_sigterm_ends_a_worker_cleanly_and_keeps_the_snapshot(tmp_path, jobs, reference_snapshot):
    job = jobs(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS), tmp_path)
    job.wait_for(r"Epoch 25/60")
    os.kill(job.worker(local_rank=1), signal.SIGTERM)
    assert job.wait(timeout=60) != 0
    output = job.output()
    # The worker left through SystemExit(128 + SIGTERM): its `finally` destroyed the process group.
    assert "exitcode  : 143" in output, output[-3000:]
    assert no_traceback_from("multigpu_torchrun.py", output)
    snapshot = snapshots.read(str(tmp_path / "snapshot.pt"), "cpu")  # intact and loadable
    assert snapshot["EPOCHS_RUN"] % 10 == 0 and snapshot["EPOCHS_RUN"] >= 20
    # The same command again resumes from it and ends where an uninterrupted run ends.
    again = run(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert resumed_epochs(again.stdout) == snapshot["EPOCHS_RUN"]
    assert_bit_identical(tmp_path / "snapshot.pt", reference_snapshot)


def test_sigterm_to_torchrun_stops_the_whole_job_promptly(tmp_path, jobs):
    job = jobs(torchrun_cmd("multigpu_torchrun.py", "100000", "10"), tmp_path)
    job.wait_for(r"Epoch 15/100000")
    start = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    job.wait(timeout=60)
    # torchrun forwards SIGTERM and only SIGKILLs what is still alive after 30 s.
    assert time.monotonic() - start < 15
    assert session_members(job.proc.pid) == [], "worker processes outlived the job"
    assert no_traceback_from("multigpu_torchrun.py", job.output())
    assert snapshots.read(str(tmp_path / "snapshot.pt"), "cpu")["EPOCHS_RUN"] >= 10


def test_multinode_without_shared_files_recovers_from_a_killed_worker(tmp_path, jobs, reference_snapshot):
    port, rdzv_id = free_port(), uuid.uuid4().hex[:8]
    folders = [tmp_path / "node0", tmp_path / "node1"]
    nodes = []
    for folder in folders:
        folder.mkdir()
        nodes.append(jobs(multinode_cmd(port, rdzv_id, *RESUME_ARGS), folder, name="agent"))
    # Global rank 0 prints; which agent hosts it is decided at the rendezvous.
    deadline = time.monotonic() + 120
    while not any("Epoch 25/60" in node.output() for node in nodes):
        assert time.monotonic() < deadline and all(n.proc.poll() is None for n in nodes), nodes[0].output()
        time.sleep(0.05)
    head = 0 if "Epoch 25/60" in nodes[0].output() else 1
    other = 1 - head
    os.kill(nodes[other].worker(local_rank=0), signal.SIGKILL)
    for node in nodes:
        assert node.wait() == 0, node.output()[-3000:]
    resumed_epochs(nodes[head].output())
    # Each node saved its own copy, in its own folder; both are the training of one process pair:
    # two nodes of one process each train exactly as two processes on one node.
    for folder in folders:
        assert_bit_identical(folder / "snapshot.pt", reference_snapshot)


def test_sigusr1_to_one_worker_stops_all_ranks_after_one_epoch_with_a_snapshot(tmp_path, jobs, reference_snapshot):
    args = (RESUME_ARGS[0], "1000")  # no periodic snapshot before the last epoch: only SIGUSR1 saves one
    job = jobs(torchrun_cmd("multinode.py", *args), tmp_path)
    job.wait_for(r"Epoch 5/60")
    os.kill(job.worker(local_rank=1), signal.SIGUSR1)  # one rank only: the all-reduce tells the other
    assert job.wait(timeout=60) == 0, job.output()[-3000:]
    output = job.output()
    stopped = int(re.search(r"Stopped after epoch (\d+) on SIGUSR1", output).group(1))
    assert [n for n, _ in epochs(output)] == list(range(1, stopped + 1))
    assert f"Epoch {stopped} | snapshot saved" in output
    assert snapshots.read(str(tmp_path / "snapshot.pt"), "cpu")["EPOCHS_RUN"] == stopped < 60
    again = run(torchrun_cmd("multinode.py", *args), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming from snapshot.pt: {stopped} epochs done" in again.stdout
    assert [n for n, _ in epochs(again.stdout)] == list(range(stopped + 1, 61))
    assert_bit_identical(tmp_path / "snapshot.pt", reference_snapshot)
