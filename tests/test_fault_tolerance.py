"""Real kills of real workers: every interrupted run must end bit-identical to an uninterrupted one."""

import os
import re
import signal
import time
from pathlib import Path

import pytest


from support import snapshots
from conftest import (
    RESUME_ARGS,
    assert_bit_identical,
    epochs,
    no_traceback_from,
    resumed_epochs,
    run,
    session_members,
    torchrun_cmd,
)


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag, as TensorBoard shows it: what a restarted run rewrote is purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_sigkilled_worker_is_restarted_and_ends_bit_identical(tmp_path, jobs, reference_snapshot):
    job = jobs(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS, "--tensorboard_dir", "tb", max_restarts=3), tmp_path)
    job.wait_for(r"Epoch 25/60")
    os.kill(job.worker(local_rank=1), signal.SIGKILL)
    assert job.wait() == 0, job.output()[-3000:]
    output = job.output()
    resumed_epochs(output)
    assert_bit_identical(tmp_path / "snapshot.pt", reference_snapshot)
    # TensorBoard: one curve through the kill, every epoch once; the epochs written after the last
    # snapshot and before the kill were replaced by those of the restart, which printed the same losses.
    printed = epochs(output.split("Resuming from")[-1])
    for tag in ("loss/train", "val/loss", "throughput/samples_per_s", "step_time/comm"):
        steps = [step for step, _ in tensorboard_scalars(tmp_path / "tb", tag)]
        assert steps == list(range(1, 61)), f"{tag}: {steps}"
    logged = dict(tensorboard_scalars(tmp_path / "tb", "loss/train"))
    assert all(logged[n] == pytest.approx(loss, rel=1e-4, abs=1e-6) for n, loss in printed)


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
