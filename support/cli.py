"""The command line of every step, and how errors reach the user.

A mistake gets one line on stderr, shown once per job, a non-zero exit and no traceback.
"Once per job" needs care under torchrun: every rank parses the same arguments and finds the
same mistake, and torchrun stops the other workers as soon as the first one exits. So the rank
that speaks for the job (global rank 0) prints, and every other rank that found the same mistake
waits for it to end the job, however late rank 0 started; see `fail`.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# The oldest torch this series is tested on: requirements.txt asks for it (tests/test_setup.py
# checks they agree), and every step script names an older one in one line, first (check_torch).
OLDEST_TORCH = (2, 11)

# How long a rank that found a mistake waits for the rank that speaks for it to report it and
# end the job (torchrun then stops this rank). Only if that never happens does it print itself.
REPORTING_RANK_GRACE_S = 60
# In the job's store: a reporting rank has printed its error. torchrun's store outlives a restart
# of the workers, so each attempt has a key of its own.
REPORTED_KEY = f"cli.fail/reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def rank_in(scope: str) -> int:
    """This process's rank in the job ("job") or on its node ("node"); 0 outside torchrun."""
    if scope == "job" and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK" if scope == "job" else "LOCAL_RANK", "0"))


def is_rank_zero() -> bool:
    """True in the process that speaks for the job (always, in a single process)."""
    return rank_in("job") == 0


def fail(message: str, scope: str = "job", reporter: bool | None = None) -> NoReturn:
    """Exit with `error: message` on stderr, printed once.

    scope "job": every rank finds this mistake alike (an argument, a setting, a file all read);
    global rank 0 reports it. scope "node": every rank of one node finds it (its GPUs, its disk);
    that node's local rank 0 reports it. `reporter` overrides who does. The other ranks wait, up
    to REPORTING_RANK_GRACE_S, for the reporter to end the job: if they exited first, torchrun
    would stop the reporting rank before it printed, and the line would be lost. Once a process
    group exists, the reporter also says in the job's store that it has printed, and the others
    then leave quietly: a reporter on another node ends only its own node's processes.

    Raising SystemExit (rather than calling os._exit) lets `finally` blocks run, so the
    process group is still destroyed on this path.
    """
    if not (rank_in(scope) == 0 if reporter is None else reporter) and reported_elsewhere():
        raise SystemExit(1)
    say(f"error: {message}")
    if dist.is_initialized():
        try:
            c10d._get_default_store().set(REPORTED_KEY, "1")
        except Exception:  # the store went with the node that held it: its processes are ending anyway
            pass
    raise SystemExit(1)


def reported_elsewhere() -> bool:
    """Wait up to REPORTING_RANK_GRACE_S for a reporting rank to print its error (torchrun or
    mp.spawn normally stops this process first); False if none did, and this one must print."""
    if not dist.is_initialized():
        time.sleep(REPORTING_RANK_GRACE_S)
        return False
    try:
        c10d._get_default_store().wait([REPORTED_KEY], datetime.timedelta(seconds=REPORTING_RANK_GRACE_S))
    except Exception as err:  # timed out; or the store went with the process or node that held it, as the job ends
        return "timeout" not in str(err).lower()
    return True


def plural(count: int, noun: str, nouns: str = "") -> str:
    """`count` and its noun, in words: 1 epoch, 2 epochs; 1 process, 2 processes (`nouns`: the plural, if not noun + s)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def say(line: str) -> None:
    """One line on stderr, in one write: torchrun runs workers unbuffered, and a line written in two
    pieces (print writes the newline apart) can be cut by another process's output."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def brief(err: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, short enough for a one-line error."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, once per job, and exits 2.

    `checks` are run on the parsed arguments: each returns the message for a bad combination, or None.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # a docstring as it is written
        super().__init__(*args, **kwargs)
        self.checks: list[Callable[[argparse.Namespace], str | None]] = []

    def parse_args(self, *args: Any, **kwargs: Any) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(*args, **kwargs)
        for message in filter(None, (check(parsed) for check in self.checks)):
            self.error(message)
        if os.environ.get("CLI_PARSE_ONLY") == "1":  # tests/test_readme.py: the arguments a page shows, read as they would be
            raise SystemExit(0)
        return parsed

    def error(self, message: str) -> NoReturn:
        if rank_in("job") != 0:
            time.sleep(REPORTING_RANK_GRACE_S)  # as in `fail`: rank 0 reports it
        say(f"{self.prog}: error: {message} (see --help)")
        raise SystemExit(2)


def whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {'greater than 0' if minimum == 1 else f'{minimum} or more'}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number greater than zero."""
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number, zero or more."""
    return whole_number(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a number greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def seconds(text: str) -> datetime.timedelta:
    """argparse type: a positive number of seconds, as the timedelta init_process_group takes."""
    return datetime.timedelta(seconds=positive_float(text))


def add_one_process_device(parser: argparse.ArgumentParser, what: str) -> None:
    """--device for a tool that runs one process (no process group), where MPS is allowed too."""
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "mps", "cpu"],
        help=f"{what}; auto picks CUDA when a GPU is visible, else Apple's MPS, else CPU (default: auto)",
    )
    parser.set_defaults(distributed=False)  # for resolve_device: one process, MPS allowed


def add_training_args(parser: argparse.ArgumentParser, launcher: str = "torchrun") -> None:
    """The arguments every step takes the same way. `launcher`: how the step starts its processes:
    "python" (step 1: one process, MPS allowed), "mp.spawn" (step 2: and --world_size) or "torchrun"
    (steps 3 on); every step with several processes takes --timeout and --sync_bn, and has no MPS."""
    distributed = launcher != "python"
    parser.add_argument("total_epochs", nargs="?", default=50, type=positive_int, help="how many epochs to train (default: 50)")
    parser.add_argument("save_every", nargs="?", default=10, type=positive_int, help="save every this many epochs, and after the last (default: 10)")
    per = "on each process" if distributed else "on the device"
    parser.add_argument("--batch_size", default=32, type=positive_int, help=f"input batch size {per} (default: 32)")
    parser.add_argument(
        "--workload",
        default="toy",
        choices=["toy", "images"],
        help="toy: a linear regression on synthetic data, done in seconds; images: ResNet-18 on CIFAR-10, "
        "heavy enough for DDP's speedup to show (default: toy)",
    )
    parser.add_argument(
        "--data_dir",
        default="./data",
        help="images: where CIFAR-10 is downloaded, or 'fake' for generated images of its shape, offline (default: ./data)",
    )
    parser.add_argument(
        "--num_workers",
        default=0,
        type=non_negative_int,
        metavar="N",
        help="data loading processes per training process; 0 loads in the training process (default: 0)",
    )
    parser.add_argument(
        "--tensorboard_dir",
        metavar="DIR",
        help="write loss, validation metrics, throughput and the step-time split for TensorBoard here "
        "(global rank 0; a resumed run continues the same curves)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"] if distributed else ["auto", "cuda", "mps", "cpu"],
        help="where to train; auto picks CUDA when a GPU is visible, "
        + ("else CPU (DDP has no MPS backend)" if distributed else "else Apple's MPS, else CPU")
        + " (default: auto)",
    )
    parser.set_defaults(distributed=distributed)
    if launcher == "mp.spawn":
        parser.add_argument("--world_size", type=positive_int, help="how many processes; default: every visible GPU, or 2 on CPU")
    if distributed:
        parser.add_argument(
            "--sync_bn",
            action="store_true",
            help="images: BatchNorm statistics over the batch of all processes (SyncBatchNorm; CUDA only)",
        )
        parser.add_argument(
            "--timeout",
            type=seconds,
            metavar="SECONDS",
            help="how long a collective waits for a missing rank before the job fails (default: torch's, 10 minutes with NCCL, 30 with gloo)",
        )


def add_fault_tolerance_args(parser: ArgumentParser, snapshot_help: str, snapshot_default: str = "snapshot.pt") -> None:
    """--snapshot_path, and the flags that simulate a crash or a hang (steps 3, 4 and 6)."""
    parser.add_argument("--snapshot_path", default=snapshot_default, help=snapshot_help)
    parser.add_argument(
        "--simulate_failure_at",
        type=positive_int,
        metavar="EPOCH",
        help="to watch fault tolerance: the last rank crashes when this epoch starts, on torchrun's first attempt "
        "only; with --max-restarts, torchrun restarts the workers and they resume from the snapshot",
    )
    parser.add_argument(
        "--simulate_hang",
        type=positive_int,
        metavar="EPOCH",
        help="to watch a hang end: the last rank stops joining collectives when this epoch starts (first attempt "
        "only); the others time out after --timeout, and with --max-restarts torchrun restarts the job",
    )

    def epochs_come(args: argparse.Namespace) -> str | None:
        for flag in ("simulate_failure_at", "simulate_hang"):
            epoch = getattr(args, flag)
            if epoch is not None and epoch > args.total_epochs:
                return f"argument --{flag}: epoch {epoch} never comes in {args.total_epochs} epochs"
        return None

    parser.checks.append(epochs_come)


def resolve_device(args: argparse.Namespace) -> str:
    """Turn --device {auto,cuda,mps,cpu} into a device type this machine really has.

    auto: CUDA when a GPU is visible, else Apple's MPS in step 1 (DDP has no MPS backend), else CPU.
    """
    choice = args.device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "mps" if not args.distributed and torch.backends.mps.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    if choice == "mps" and not torch.backends.mps.is_available():
        fail("--device mps was asked for, but MPS is not available; use --device cpu")
    if getattr(args, "sync_bn", False) and (choice != "cuda" or args.workload != "images"):
        fail("--sync_bn needs --workload images (the toy has no BatchNorm) on CUDA: torch's SyncBatchNorm does not run on CPUs")
    return choice


def torch_release(version: str) -> tuple[int, int]:
    """The major and minor numbers of a torch version: "2.5.1+cu124" -> (2, 5), "2.11.0a0+git1234" -> (2, 11)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a torch version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch(version: str) -> None:
    """One `warning:` line, before anything runs, if this torch is older than the series is tested on.

    Every step script and mingpt/main.py import this module first among ours, so someone who
    skipped `pip install -r requirements.txt` reads why, before any AttributeError a later line
    might raise. A warning, not an error: an older torch may well run a step (steps 1-3 and minGPT
    ran on torch 2.5.1), it is only not tested. Printed once per machine: by local rank 0 (each
    node has its own torch), and not again by the processes mp.spawn starts (named SpawnProcess-N
    while they import the script, and so this module, again).
    """
    if torch_release(version) < OLDEST_TORCH and rank_in("node") == 0 and multiprocessing.current_process().name == "MainProcess":
        oldest = ".".join(map(str, OLDEST_TORCH))
        say(f"warning: this series is tested on torch {oldest} or newer, not {version}; if something fails, pip install -r requirements.txt")


check_torch(torch.__version__)
