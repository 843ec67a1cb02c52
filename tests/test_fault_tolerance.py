"""Real kills of real workers: every interrupted run must end bit-identical to an uninterrupted one."""

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import (
    RESUME_ARGS,
    assert_bit_identical,
    epochs,
    no_traceback_from,
    python_cmd,
    resumed_epochs,
    session_members,
    stopped_cleanly,
    torchrun_cmd,
)
from support import snapshots


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag, as TensorBoard shows it: what a restarted run rewrote is purged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), purge_orphaned_data=True)
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_killed_and_terminated_workers_are_restarted_and_end_bit_identical(tmp_path, jobs, reference_snapshot):
    job = jobs(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS, "--tensorboard_dir", "tb", max_restarts=3), tmp_path)
    job.wait_for(r"Epoch 25/60")
    os.kill(job.worker(local_rank=1), signal.SIGKILL)  # a crash
    first = int(job.wait_for(r"Resuming training from snapshot.pt: (\d+) epochs done")[1])
    # A preemption once the restart has trained on: the worker leaves through SystemExit(128 + SIGTERM),
    # its `finally` destroying the process group.
    job.wait_for(rf"Epoch {first + 15}/60")
    os.kill(job.worker(local_rank=0), signal.SIGTERM)
    assert job.wait() == 0, job.output()[-3000:]
    output = job.output()
    assert stopped_cleanly(output) and no_traceback_from("multigpu_torchrun.py", output), output[-3000:]
    assert len(output.split("Resuming training from")) == 3, output[-3000:]
    resumed_epochs(output)  # the last restart trained each epoch after its snapshot once
    assert_bit_identical(tmp_path / "snapshot.pt", reference_snapshot)
    # TensorBoard: one curve through both restarts, every epoch once; the epochs written after the last
    # snapshot and before each stop were replaced by those of the restart, which printed the same losses.
    printed = epochs(output.split("Resuming training from")[-1])
    for tag in ("loss/train", "val/loss", "throughput/samples_per_s", "step_time/comm"):
        steps = [step for step, _ in tensorboard_scalars(tmp_path / "tb", tag)]
        assert steps == list(range(1, 61)), f"{tag}: {steps}"
    logged = dict(tensorboard_scalars(tmp_path / "tb", "loss/train"))
    assert all(logged[n] == pytest.approx(loss, rel=1e-4, abs=1e-6) for n, loss in printed)


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


@pytest.mark.parametrize(
    "cmd", [python_cmd("multigpu.py", "100000", "10"), torchrun_cmd("multigpu_torchrun.py", "100000", "10")], ids=["step2", "step3"]
)
def test_ctrl_c_ends_the_job_with_one_line_saying_what_is_kept_and_leaves_no_process(tmp_path, jobs, cmd):
    script = Path(cmd[-3]).name
    job = jobs(cmd, tmp_path)
    job.wait_for(r"Epoch 12/100000")  # after the first save
    os.killpg(job.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to every process of the job
    assert job.wait(timeout=60) != 0
    time.sleep(1)  # for the kernel to reap the last worker
    assert session_members(job.proc.pid) == [], "a process outlived the job"
    output = job.output()
    assert output.count("Stopped by Ctrl-C") == 1, output[-3000:]
    if script == "multigpu.py":  # steps 1 and 2 keep the weights only
        assert "Stopped by Ctrl-C: checkpoint.pt keeps the weights saved last (its line is above); this step does not resume, step 3 does\n" in output
    else:  # what the line says the snapshot keeps is what it keeps
        kept = snapshots.read(str(tmp_path / "snapshot.pt"), "cpu")["EPOCHS_RUN"]
        assert f"Stopped by Ctrl-C: snapshot.pt keeps {kept} epochs; the same command resumes from there\n" in output
    assert no_traceback_from(script, output), output[-3000:]
