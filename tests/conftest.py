"""Helpers for tests that run the real scripts: real processes, real torchrun, real files.

Nothing here mocks torch.distributed. Every process a test starts gets a timeout, runs in
its own process session, and is killed with that whole session when the test ends.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EPOCH_LINE = re.compile(r"Epoch (\d+)/(\d+) \| Batchsize: (\d+)(?: x \d+ ranks?)? \| Steps: (\d+) \| loss ([0-9.]+)")


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank: 2 ranks share this machine's 2 cores fairly
    # torchrun's shared rendezvous store makes restarted workers hang or fail on loopback
    # (pytorch/pytorch#135712); the README asks users to set this too for --max-restarts.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def python_cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


def torchrun_cmd(script: str, *args: str, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", str(REPO / script), *args,
    ]  # fmt: skip


def multinode_cmd(port: int, rdzv_id: str, *args: str, max_restarts: int = 3, script: str = "multinode.py") -> list[str]:
    """One node's torchrun agent of a two-node job (one process per node) meeting at 127.0.0.1."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        f"--max-restarts={max_restarts}", f"--rdzv_id={rdzv_id}", "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}", str(REPO / script), *args,
    ]  # fmt: skip


def run(cmd: list[str], cwd: Path, timeout: float = 180, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Run to completion, with `env` added to the environment (None removes a variable); stdout and stderr are kept apart."""
    merged = {name: value for name, value in {**script_env(), **(env or {})}.items() if value is not None}
    return subprocess.run(cmd, cwd=cwd, env=merged, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def epochs(output: str) -> list[tuple[int, float]]:
    """(epoch number, mean loss) for every epoch line, in order."""
    return [(int(m.group(1)), float(m.group(5))) for m in EPOCH_LINE.finditer(output)]


def children(pid: int) -> list[int]:
    """Direct children of a process, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of a process session."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def default_sigint() -> None:
    """In a child before it runs its command: SIGINT at its default, as in a terminal, whatever the test runner set."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Job:
    """A command running in the background, its output going to a log file."""

    def __init__(self, cmd: list[str], cwd: Path, name: str = "job", env: dict[str, str] | None = None):
        self.log_path = cwd / f"{name}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env={**script_env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=default_sigint,
            )  # fmt: skip

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not seen (exit {self.proc.poll()}); output:\n{self.output()[-4000:]}")

    def worker(self, local_rank: int) -> int:
        """PID of the torchrun worker with this LOCAL_RANK (a child of the agent)."""
        for pid in children(self.proc.pid):
            try:
                if process_env(pid).get("LOCAL_RANK") == str(local_rank):
                    return pid
            except OSError:
                continue
        raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under {self.proc.pid}")

    def wait(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if session_members(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def jobs():
    """Start background jobs with `jobs(cmd, cwd, name)`; every one is killed after the test."""
    started: list[Job] = []

    def start(cmd: list[str], cwd: Path, name: str = "job", env: dict[str, str] | None = None) -> Job:
        started.append(Job(cmd, cwd, name, env))
        return started[-1]

    yield start
    for job in started:
        job.stop()


def snapshot_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a snapshot's model and optimizer states, flattened by name."""
    snapshot = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {f"model.{k}": v for k, v in snapshot["MODEL_STATE"].items()}
    for index, state in snapshot["OPTIMIZER_STATE"]["state"].items():
        tensors.update({f"optim.{index}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return tensors


def assert_bit_identical(path_a: Path, path_b: Path) -> None:
    a, b = snapshot_tensors(path_a), snapshot_tensors(path_b)
    assert a.keys() == b.keys()
    assert any(k.startswith("optim.") for k in a), "the optimizer state has no momentum buffers"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between {path_a} and {path_b}"


def no_traceback_from(script: str, output: str) -> bool:
    """True unless our script raised: torchrun prints its own summary, but never our frames."""
    return f'{script}", line' not in output and "terminate called" not in output


# The run every fault-tolerance test must reproduce bit for bit, however it was interrupted.
RESUME_ARGS = ("60", "10")


def resumed_epochs(output: str, snapshot: str = "snapshot.pt") -> int:
    """Epochs done in the snapshot a RESUME_ARGS run resumed from; checks nothing was repeated or skipped after it."""
    marker = f"Resuming training from {snapshot}: "
    assert marker in output, output[-3000:]
    done = int(output.split(marker)[-1].split()[0])
    assert done % 10 == 0 and done >= 20, f"resumed from epoch {done}, not a snapshot saved every 10 epochs"
    after_resume = [n for n, _ in epochs(output.split(marker)[-1])]
    assert after_resume == list(range(done + 1, 61)), after_resume
    return done


def assert_close_to_scale(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, what: str = "") -> float:
    """Each tensor of `a` within `rtol` of the largest value of `b`'s, its own scale: weights are about 1 where
    Adam's second moments are 1e-8, and any absolute tolerance would be too tight for one or pass anything in the other.
    Returns the largest difference found, as a fraction of its tensor's scale."""
    assert a.keys() == b.keys(), f"{sorted(a.keys() ^ b.keys())} are not in both{what}"
    worst = 0.0
    for name in a:
        difference, scale = float((a[name].double() - b[name].double()).abs().max()), float(b[name].abs().max())
        assert difference <= rtol * scale, f"{name} differs by {difference:.2e}, {difference / scale:.1e} of its largest value {scale:.2e}{what}"
        worst = max(worst, difference / scale if scale else 0.0)
    return worst


# ---------------------------------------------------------------- the capstone's stops at a step

STEP_LINE = re.compile(r"^epoch (\d+) \| step (\d+)/(\d+) \|", re.MULTILINE)
EVERY_STEP = "trainer_config.log_every=1"  # the capstone prints every step: the step a signal came at is known


def steps(output: str) -> list[int]:
    """The optimizer steps, counted from the start of training, of the capstone's step lines in `output`."""
    return [(int(epoch) - 1) * int(per_epoch) + int(step) for epoch, step, per_epoch in STEP_LINE.findall(output)]


def signal_at_a_step(job: Job, at: str, signum: int, local_rank: int = 0) -> tuple[int, int]:
    """Once the output of a capstone run printing every step matches `at`, send `signum` to one worker.

    Returns the last step printed before the signal was sent, and the last printed after. A stop
    must save at the first, or at most 2 steps past the second, however fast the machine: rank 0 had
    not printed the next step when the signal came, so every rank was in it at most (2nd + 1), and a
    signal that lands inside that step's agreement (an all-reduce) is agreed on in the step after (2nd + 2).
    """
    job.wait_for(at)
    before = steps(job.output())[-1]
    os.kill(job.worker(local_rank=local_rank), signum)
    return before, steps(job.output())[-1]


def saved_step(snapshot: Path) -> int:
    """GLOBAL_STEP of a capstone snapshot: a file (ddp), or the pointer of a folder of sharded ones (fsdp)."""
    from support import snapshots

    return torch.load(snapshot / snapshots.POINTER if snapshot.is_dir() else snapshot, weights_only=True)["GLOBAL_STEP"]


def stop_with_sigusr1(cmd: list[str], folder: Path, at: str, snapshot: str, local_rank: int = 0, env: dict[str, str] | None = None) -> str:
    """Start a capstone run printing every step, SIGUSR1 one worker once the output matches `at`, wait
    for the clean stop, and check that `snapshot` was saved at the step the signal came (see
    signal_at_a_step). Returns the output."""
    job = Job([*cmd, EVERY_STEP], folder, name=f"stopped{len(list(folder.glob('stopped*.log')))}", env=env)
    try:
        before, after = signal_at_a_step(job, at, signal.SIGUSR1, local_rank)
        assert job.wait(timeout=120) == 0, job.output()[-3000:]
    finally:
        job.stop()
    assert "Stopping on SIGUSR1" in job.output(), job.output()[-3000:]
    saved = saved_step(folder / snapshot)
    assert before <= saved <= after + 2, f"SIGUSR1 came after step {before}, by step {after + 1}; the snapshot was saved at step {saved}"
    return job.output()


def stopped_cleanly(output: str) -> bool:
    """torchrun's line for a restarted job whose rank 0 got SIGTERM: it names the first failure it saw, either
    rank 0 leaving through SystemExit (143) or rank 1 ending on the lost peer first (1); a worker killed
    by the signal itself, its handler gone, shows -15."""
    return re.search(r"failed \(exitcode: (143|1)\) local_rank: [01] ", output) is not None


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder that every pytest-xdist worker of this session shares, filled by `make` once: the first test
    that asks makes it while the others wait, so a reference run costs one run per session, not one per
    worker. Tests only read it. A `make` that failed leaves nothing, and the next test to ask tries again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, above each worker's own
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


def uninterrupted_run(folder: Path) -> None:
    result = run(torchrun_cmd("multigpu_torchrun.py", *RESUME_ARGS), folder)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [n for n, _ in epochs(result.stdout)] == list(range(1, 61))


@pytest.fixture(scope="session")
def reference_snapshot(tmp_path_factory) -> Path:
    """Final snapshot of an uninterrupted 2-rank `multigpu_torchrun.py 60 10` run, made once per session."""
    return made_once(tmp_path_factory, "reference", uninterrupted_run) / "snapshot.pt"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real two-node Slurm cluster for the whole session (see slurm_cluster.py).

    Where it cannot start (not root, packages missing), its tests skip, except in CI
    (CI=true), where that is a failure.
    """
    from slurm_cluster import SlurmCluster, SlurmUnavailable  # it imports this module

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            cluster.start()
        except SlurmUnavailable as err:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI needs a local Slurm cluster: {err}")
            pytest.skip(f"no local Slurm cluster: {err}")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """The session's Slurm cluster, its queue emptied after each test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


# What xdist hands out first (pytest.ini keeps this order: --no-loadscope-reorder): the longest units, so that
# short ones fill the end. Measured with --durations: README.md's page (4 minutes), the notebook, then the files
# whose tests take longest together (2 to 6 minutes each; each file is one unit). Started last, README.md's page
# ran alone while the other worker had finished; so did test_use.py's tests.
LONGEST_FIRST = (
    "test_page_commands_run_and_print_what_the_page_shows[README.md]", "test_notebook", "test_fsdp", "test_bad_input",
    "test_equivalence", "test_use", "test_steps", "test_mingpt", "slurm", "test_failures",
)  # fmt: skip


def unit(item: pytest.Item) -> str | None:
    """The xdist group an item runs in: its file, or "slurm" for the tests that share the cluster; None for a
    page's test, which shares nothing and goes to whichever worker is free."""
    if "slurm" in item.fixturenames:
        return "slurm"
    return None if item.module.__name__ == "test_readme" else item.module.__name__


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (pytest.ini: -n 2 --dist loadgroup), each file's tests run on one worker, in
    order, sharing its module fixtures; every test that uses the Slurm cluster runs on the same worker,
    as there is one cluster per session. Without xdist the mark does nothing. The longest units come
    first (LONGEST_FIRST)."""
    for item in items:
        if unit(item):
            item.add_marker(pytest.mark.xdist_group(unit(item)))
    items.sort(key=lambda item: next((i for i, name in enumerate(LONGEST_FIRST) if name in (unit(item) or item.nodeid)), len(LONGEST_FIRST)))
