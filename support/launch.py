"""The guards around the training processes, which are no part of the lesson: one call per step.

Step 1 runs one process (`single_process`); step 2 starts its processes with `mp.spawn`
(`spawn_guarded`, `spawned_worker`); torchrun starts those of steps 3, 4 and 6, the capstone, the
pre-flight check and the hang lab (`torchrun_worker`). Either way: a process that cannot work says
so in one line before it trains; a killed process is named; no worker outlives the process that
started it; SIGTERM unwinds a worker cleanly; Ctrl-C ends the job with one line saying what is
kept; a collective that hangs ends with one line saying where every rank was; and a destroyed
process group is freed, so that a run that went well cannot abort as it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import operator
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp

# Before any process group exists, so that destroy_process_group can free it. torch.distributed.nn
# takes `group=group.WORLD` as a default argument: imported after init_process_group (torch._dynamo
# imports it when a process makes its first optimizer), it holds on to the process group for good.
# Gloo's threads then outlive destroy_process_group, and one still letting go of a finished
# collective's tensor as Python shuts down aborts the process: "terminate called without an
# active exception", SIGABRT, after a run that went well.
import torch.distributed.nn  # noqa: F401

from support import cli, snapshots

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STORE_VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
REPO = Path(__file__).resolve().parents[1]  # the repository root
SIGTERM_GRACE_S = 20  # for a worker to stop cleanly on SIGTERM (a step, a snapshot), below torchrun's 30
ROLL_CALL_S = 3  # after a timeout, how long the ranks that timed out take to find each other
LOST_PEER = re.compile(r"Connection (closed|reset) by peer")  # gloo, when the other end of a collective is gone
WAITED = re.compile(r"[Tt]imed out waiting (\d+)ms")  # gloo's timeout, in its error
INTERRUPTED = threading.Event()  # Ctrl-C (SIGINT) came: whatever error follows, the line says so


def free_port() -> str:
    """A TCP port that is free now, so two jobs on one host do not collide on a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def world_size(asked: int | None, device: str) -> int:
    """Step 2's process count: as asked, else one per visible GPU, else 2 CPU processes."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and (asked or 0) > gpus:
        cli.fail(f"--world_size {asked} needs {asked} GPUs but {gpus} are visible; use --world_size {gpus} or fewer")
    return asked or gpus or 2


def single_process(keeps: str) -> None:
    """Step 1's guards: a folder that cannot hold `keeps` fails now; Ctrl-C ends in one line."""
    snapshots.check_writable_folder(keeps)
    end_in_one_line(keeps)


@contextlib.contextmanager
def spawn_guarded(keeps: str) -> Iterator[None]:
    """Around mp.spawn: a folder that cannot hold `keeps` fails first; a process that failed has
    reported why; one that was killed is named here; Ctrl-C ends in one line saying what is kept."""
    snapshots.check_writable_folder(keeps)
    try:
        yield
    except mp.ProcessExitedException as err:
        if err.exit_code > 0:  # an error the processes have already reported
            raise SystemExit(err.exit_code) from None
        if err.exit_code == -signal.SIGINT:  # Ctrl-C reached the processes first
            stopped_by_ctrl_c(keeps)
        cli.fail(f"process {err.error_index} was killed by signal {-err.exit_code}")
    except KeyboardInterrupt:  # the processes stop with it (mp.spawn's workers exit quietly on Ctrl-C)
        stopped_by_ctrl_c(keeps)


def stopped_by_ctrl_c(keeps: str | None) -> NoReturn:
    """The one line a job stopped by Ctrl-C prints (rank 0): what `keeps` holds, and how to go on. Exit 130, as the shell's."""
    if cli.is_rank_zero():
        cli.say(f"Stopped by Ctrl-C{f': {snapshots.kept(keeps)}' if keeps else ''}")
    raise SystemExit(128 + signal.SIGINT)


def end_in_one_line(keeps: str | None) -> None:
    """An exception that would end this process with a traceback ends it with one line where we know
    what it means: Ctrl-C says what `keeps` holds; a collective that timed out, or that the ranks
    called differently, says where every rank was. Any other error keeps its traceback.

    It runs as sys.excepthook: after the exception has left `main`, before the interpreter shuts
    down, so the process group is still up for the roll call (the exit hook then destroys it).
    """
    default = sys.excepthook

    def on_sigint(signum: int, frame: Any) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    def hook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        for stop in (signal.SIGINT, signal.SIGTERM):  # torchrun repeats Ctrl-C, or follows it with SIGTERM: finish the line first
            signal.signal(stop, lambda signum, frame: None)  # not SIG_IGN: the SIGTERM watchdog still sees it
        try:  # to the real stderr: init_process_group's own hook, around this one, would prefix our line with [rankN]:
            with contextlib.redirect_stderr(sys.__stderr__):
                if INTERRUPTED.is_set():
                    stopped_by_ctrl_c(keeps)
                explain_collective_failure(error)
        except SystemExit:
            return
        default(kind, error, tb)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored, as in a script's background job: left so
        signal.signal(signal.SIGINT, on_sigint)
    sys.excepthook = hook


def spawned_worker(world_size: int) -> None:
    """What a process started by mp.spawn needs first: the worker guards, and its share of the CPU
    cores (torchrun gives each of its workers one thread; mp.spawn leaves every one all of them)."""
    guard_worker()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def guard_worker() -> None:
    """A worker ends when it is told to or orphaned, even while stuck in C++ code, and cleanly."""
    exit_with_parent()
    end_on_sigterm_when_stuck()
    atexit.register(end_process_group_left_up)


def end_process_group_left_up() -> None:
    """At exit, destroy a process group that an error left up (a step destroys its own in `finally`),
    and free the groups that DTensor's caches still hold (FSDP's, after destroy_process_group).

    A process that exits with a group still alive can abort on the way out ("terminate called
    without an active exception"), and then reports a crash instead of its result or its error.
    """
    if dist.is_initialized():
        gc.collect()  # first whatever still uses the group
        dist.destroy_process_group()
    forget_device_meshes()
    gc.collect()  # frees the groups, which waits for gloo's threads while Python still runs


def forget_device_meshes() -> None:
    """Empty the caches in which DTensor keeps every device mesh it has planned for, each mesh with
    its process groups (torch 2.14; a cache that a torch version lacks is skipped)."""
    if "torch.distributed.tensor" not in sys.modules:  # no FSDP, no DTensor: nothing to forget
        return
    for module, clear in (
        ("debug", "_clear_sharding_prop_cache"),
        ("_redistribute", "clear_redistribute_planner_cache"),
        ("_redistribute", "_gen_transform_infos.cache_clear"),
        ("_collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
    ):
        try:
            operator.attrgetter(clear)(importlib.import_module(f"torch.distributed.tensor.{module}"))()
        except (ImportError, AttributeError):
            continue


def end_on_sigterm_when_stuck() -> None:
    """Make SIGTERM end this process even while its main thread is blocked in C++.

    Python runs a signal handler (the steps turn SIGTERM into SystemExit, so `finally` blocks run)
    only when the main thread gets back to Python code; blocked in a store wait or a collective,
    it never does, and torchrun waits 30 s before it sends SIGKILL. So a thread watches the
    signals arriving (signal.set_wakeup_fd) and ends the process SIGTERM_GRACE_S after a SIGTERM,
    if the handler has not ended it by then. Before the process group exists there is no step or
    snapshot to finish (a rank waiting to meet a peer that already failed): one second is enough.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        while signal.SIGTERM not in os.read(read_end, 64):
            pass
        time.sleep(SIGTERM_GRACE_S if dist.is_initialized() else 1)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="end-on-sigterm", daemon=True).start()


def exit_with_parent() -> None:
    """Die with the process that started this one (torchrun's agent, or mp.spawn's parent).

    Otherwise a worker whose agent was killed trains on as an orphan, holding its GPU, and may
    write the same snapshot as the job started to replace it. The kernel sends SIGKILL the
    moment the parent dies (Linux's PR_SET_PDEATHSIG), which works even while this process is
    blocked inside C++ code where a Python signal handler never runs. Other systems: no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): keep running, as before
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def torchrun_worker(device: str, usage: str, keeps: str | None = None) -> None:
    """The guards of a process torchrun started. Checks: it was (else `usage`, the command to use, is
    shown), its node has a GPU for every process, a folder that cannot hold `keeps` fails now, and a
    restart will not hang. Then: it dies with torchrun, SIGTERM (torchrun's and Slurm's way to stop
    workers) unwinds it as SystemExit, so that a snapshot being written is finished or discarded
    whole, and Ctrl-C or a hung collective ends the job in one line."""
    if "LOCAL_RANK" not in os.environ:
        cli.fail(f"this is launched by torchrun, not python: {usage}")
    guard_worker()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    end_in_one_line(keeps)
    per_node, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
    if device == "cuda" and per_node > gpus:
        cli.fail(f"--nproc_per_node={per_node} needs {per_node} GPUs on this node, {gpus} are visible; lower it, or use gpu", scope="node")
    if keeps is not None:
        snapshots.check_writable_folder(keeps)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and first_attempt and os.environ.get(STORE_VARIABLE) != "1" and cli.is_rank_zero():
        cli.say(
            f"warning: with --max-restarts, restarted workers can hang on torchrun's shared rendezvous store "
            f"(pytorch/pytorch#135712); start torchrun with: export {STORE_VARIABLE}=1"
        )


class Faults:
    """--simulate_failure_at and --simulate_hang, to watch fault tolerance happen.

    At the start of the chosen epoch the last rank crashes (os._exit: no clean-up, like a lost
    GPU or an out-of-memory kill), or stalls and never joins another collective, like a rank stuck
    in a deadlock. Only on torchrun's first attempt, so that its restart succeeds.
    """

    def __init__(self, failure_at: int | None, hang_at: int | None):
        self.failure_at = failure_at
        self.hang_at = hang_at

    def at_epoch_start(self, epoch: int) -> None:
        if epoch + 1 not in (self.failure_at, self.hang_at):
            return
        dist.barrier()  # rank 0 has printed the previous epoch's line: this one comes after it
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or rank != world_size - 1:
            return
        if epoch + 1 == self.failure_at:
            print(f"Rank {rank}: simulated crash at the start of epoch {epoch + 1} (--simulate_failure_at)", flush=True)
            os._exit(1)
        print(f"Rank {rank}: simulated hang at the start of epoch {epoch + 1} (--simulate_hang): it joins no more collectives", flush=True)
        while True:  # until torchrun stops it (SIGTERM)
            time.sleep(1)


def explain_collective_failure(err: BaseException) -> None:
    """A collective that timed out, or that torch found mismatched, ends the job with one line:
    where each rank was, and which ranks never came. Any other error: nothing, it is not ours to explain.

    Every rank that failed so posts where it was in the job's store and waits a moment for the
    others; the lowest of them reports. The ranks that posted nothing are stuck elsewhere. A
    timeout reaches each rank after --timeout; a mismatch (found by TORCH_DISTRIBUTED_DEBUG=DETAIL)
    at once. (With NCCL, torch's watchdog reports a timeout itself and ends the process.)
    """
    if not isinstance(err, RuntimeError) or not dist.is_initialized():
        return
    text = " ".join(str(err).split())
    mismatch = "Detected mismatch between collectives" in text
    if LOST_PEER.search(text):
        lost_a_peer(err, text)
    if not (mismatch or "timed out" in text.lower()):
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    place = where_in_our_code(err)
    call = re.search(rf"Rank {rank} is running collective: CollectiveFingerPrint\(SequenceNumber=(\d+), OpType=(\w+), TensorShape=\[([^\]]*)\]", text)
    if call:  # this rank's own collective, as DETAIL fingerprints it
        place = f"{call[2]} #{call[1]} of shape [{call[3]}] at {place}"
    store = c10d._get_default_store()
    store.set(f"failed_at/{rank}", place)
    time.sleep(ROLL_CALL_S)
    posted = [r for r in range(world_size) if store.check([f"failed_at/{r}"])]
    stuck = [r for r in range(world_size) if r not in posted]
    places = "; ".join(f"rank {r} in {store.get(f'failed_at/{r}').decode()}" for r in posted)
    waited = f"{int(WAITED.search(text)[1]) / 1000:g} s" if WAITED.search(text) else "the process group's timeout"
    if stuck:
        who = f"rank{'s' * (len(stuck) > 1)} {', '.join(map(str, stuck))}"
        what = "called a different collective" if mismatch else f"waited {waited}"
        message = f"{places} {what}: {who} never joined; py-spy dump --pid PID shows where a stuck process is"
    elif mismatch:
        message = f"ranks called different collectives: {places}; every rank must run the same collectives in the same order"
    else:
        message = f"every rank waited {waited}, each in another collective: {places}; every rank must run the same collectives in the same order (TORCH_DISTRIBUTED_DEBUG=DETAIL names them)"
    cli.fail(message, reporter=rank == min(posted))


def lost_a_peer(err: RuntimeError, text: str) -> NoReturn:
    """A peer process ended (crashed, killed, or stopped by torchrun) in the middle of a collective:
    one line, from the first rank that says so; torchrun's report names the rank that ended."""
    try:  # the job's store lives in rank 0's process or torchrun's agent, and may be gone with it
        first = c10d._get_default_store().add("lost_peer_reported", 1) == 1
    except Exception:
        first = True
    if not first:
        raise SystemExit(1)
    cli.fail(
        f"rank {dist.get_rank()} lost a peer in {where_in_our_code(err)} ({LOST_PEER.search(text).group(0)}): another rank "
        "ended first, and torchrun's report below says which and why; with --max-restarts the job restarts",
        reporter=True,
    )


def where_in_our_code(err: BaseException) -> str:
    """The innermost line of this repository's code in the traceback: the collective's call site."""
    ours = [frame for frame in traceback.extract_tb(err.__traceback__) if REPO in Path(frame.filename).resolve().parents]
    if not ours:
        return "a collective"
    frame = ours[-1]
    return f"`{frame.line.split('  #')[0]}` ({frame.name}, {Path(frame.filename).name}:{frame.lineno})"
