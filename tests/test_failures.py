"""Failures a cluster really throws: a rank that hangs, a node lost with its disk, an agent killed,
restarts on torchrun's shared store. Real torchrun agents and real kills, on CPU."""

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from conftest import (
    RESUME_ARGS,
    assert_bit_identical,
    epochs,
    free_port,
    multinode_cmd,
    resumed_epochs,
    run,
    session_members,
    torchrun_cmd,
)


def test_a_hung_rank_is_named_in_seconds_and_the_restart_resumes_bit_identical(tmp_path, jobs, reference_snapshot):
    timeout = 5
    job = jobs(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS, "--timeout", str(timeout), "--simulate_hang", "35", max_restarts=3), tmp_path)
    job.wait_for("Rank 1: simulated hang at the start of epoch 35")
    hung = time.monotonic()
    # Named once the collective has waited --timeout (and the ranks' roll call, 3 s): in seconds, not gloo's default 30 minutes.
    job.wait_for(r"error: .* never joined", timeout=timeout + 30)
    named = time.monotonic() - hung
    assert named >= timeout, f"named {named:.1f} s after the hang began: it did not wait the {timeout} s timeout"
    assert job.wait() == 0, job.output()[-3000:]
    output = job.output()
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: rank 0 in `loss.backward()` (_run_batch, multigpu_torchrun.py:")
    assert f"waited {timeout} s: rank 1 never joined" in errors[0]
    assert resumed_epochs(output) == 30
    assert_bit_identical(tmp_path / "snapshot.pt", reference_snapshot)


def run_nodes(jobs, folders, total_epochs: str) -> list[str]:
    """Both "nodes" (an agent each, in its own folder: nothing shared) to `total_epochs`; their outputs."""
    port, rdzv_id = free_port(), uuid.uuid4().hex[:8]
    nodes = [jobs(multinode_cmd(port, rdzv_id, total_epochs, RESUME_ARGS[1]), folder, name=f"agent{total_epochs}") for folder in folders]
    for node in nodes:
        assert node.wait() == 0, node.output()[-3000:]
    return [node.output() for node in nodes]


def test_a_node_lost_with_its_disk_loses_nothing(tmp_path, jobs, reference_snapshot):
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for folder in folders:
        folder.mkdir()
    run_nodes(jobs, folders, "20")
    # Each node wrote its own copy, with no shared storage.
    assert all((folder / "snapshot.pt").exists() for folder in folders)
    # Node 0 is lost with its disk; the job goes on on node 1 alone (two processes keep the global batch).
    older = tmp_path / "node0-copy.pt"
    shutil.move(folders[0] / "snapshot.pt", older)
    alone = run(torchrun_cmd("multinode.py", "40", RESUME_ARGS[1]), folders[1])
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "Resuming training from snapshot.pt: 20 epochs done" in alone.stdout
    # Node 0 comes back with its old disk: the copies are 20 and 40 epochs old, and the newer wins.
    shutil.move(older, folders[0] / "snapshot.pt")
    outputs = run_nodes(jobs, folders, RESUME_ARGS[0])
    head = next(output for output in outputs if "Resuming training from" in output)
    assert resumed_epochs(head) == 40
    for folder in folders:
        assert_bit_identical(folder / "snapshot.pt", reference_snapshot)


def test_restarts_on_the_shared_store_get_one_warning_and_the_run_goes_on(tmp_path):
    result = run(torchrun_cmd("multigpu_torchrun.py", "3", "3", max_restarts=1), tmp_path, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": None})
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: with --max-restarts, restarted workers can hang on torchrun's shared rendezvous store "
        "(pytorch/pytorch#135712); start torchrun with: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    ]
    assert [n for n, _ in epochs(result.stdout)] == [1, 2, 3]


@pytest.mark.parametrize("state", ["training", "hung in a collective"])
def test_no_worker_outlives_its_killed_agent(tmp_path, jobs, state):
    args = ("100000", "10") if state == "training" else ("100000", "10", "--simulate_hang", "2")
    job = jobs(torchrun_cmd("multigpu_torchrun.py", *args, max_restarts=3), tmp_path)
    job.wait_for(r"Epoch 3/100000" if state == "training" else r"simulated hang at the start of epoch 2")
    workers = [job.worker(local_rank=0), job.worker(local_rank=1)]
    os.kill(job.proc.pid, signal.SIGKILL)  # the agent; its workers are not told
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their agent by 5 s"
        time.sleep(0.05)
    assert session_members(job.proc.pid) == []


def alive(pid: int) -> bool:
    """Running, not a zombie: a process reaped between two reads of /proc is gone, not an error."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
