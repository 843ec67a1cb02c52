"""What the four step scripts share.

The training objects for two workloads (`--workload`): `toy`, a learnable synthetic regression
that runs in seconds, and `images`, ResNet-18 on CIFAR-10, heavy enough to show DDP's speedup;
plus the small careful pieces every step needs the same way: choosing a device, checking
arguments, and writing and reading snapshot files safely. The step scripts keep the
distributed logic itself, so that `diff -u` between two steps shows only the new idea.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import sys
import tempfile
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset

IN_FEATURES = 20
SNAPSHOT_KEYS = ("MODEL_STATE", "OPTIMIZER_STATE", "EPOCHS_RUN")


class MyTrainDataset(Dataset):
    """Synthetic regression data that a linear model can really learn.

    Targets are a fixed linear function of the inputs plus small noise, all drawn from a
    fixed seed: every rank builds identical data, so `DistributedSampler` can shard it
    by index. The data is kept as two tensors; an item is a pair of views into them.
    """

    def __init__(self, size: int, noise: float = 0.01, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(size, IN_FEATURES, generator=generator)
        true_weight = torch.randn(IN_FEATURES, 1, generator=generator)
        true_bias = torch.randn(1, generator=generator)
        noise_term = noise * torch.randn(size, 1, generator=generator)
        self.targets = self.inputs @ true_weight + true_bias + noise_term

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def cifar10(data_dir: str) -> Dataset:
    """CIFAR-10's 50,000 training images, downloaded into `data_dir` once per node.

    `data_dir` "fake": torchvision's FakeData with CIFAR-10's shapes (3x32x32, 10 classes) and a
    fixed seed, for running offline. It holds 2048 random images: it measures speed, not learning.
    """
    from torchvision import datasets, transforms  # only this workload needs torchvision

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    if data_dir == "fake":
        return datasets.FakeData(size=2048, image_size=(3, 32, 32), num_classes=10, transform=to_tensor, random_offset=0)
    error = on_local_rank_zero_first(lambda: datasets.CIFAR10(data_dir, train=True, download=True))
    if error:
        fail(f"could not get CIFAR-10 into {data_dir} ({error}); download it there by hand, or use --data_dir fake to train on generated images")
    return datasets.CIFAR10(data_dir, train=True, transform=to_tensor)


def load_train_objs(workload: str = "toy", data_dir: str = "./data") -> tuple[Dataset, torch.nn.Module, torch.optim.Optimizer]:
    """The dataset, model and optimizer. Seeded, so every run starts from the same weights."""
    torch.manual_seed(0)
    if workload == "images":
        from torchvision.models import resnet18

        model = resnet18(num_classes=10)
        return cifar10(data_dir), model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_set = MyTrainDataset(2048)
    model = torch.nn.Linear(IN_FEATURES, 1)
    # Momentum gives the optimizer real state: a resume that lost it would train differently.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    return train_set, model, optimizer


def loss_fn(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class labels (images); mean squared error for real-valued targets (toy)."""
    if targets.dtype == torch.long:
        return F.cross_entropy(output, targets)
    return F.mse_loss(output, targets)


def count_correct(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many predictions in a batch hit their class label (0 for a regression); stays on the device."""
    if targets.dtype != torch.long:
        return torch.zeros((), device=output.device)
    return (output.argmax(dim=1) == targets).sum().float()


def on_local_rank_zero_first(work: Callable[[], Any]) -> str | None:
    """Run `work` (a download) on one process per node while the others wait; return the error, if any.

    Collective when a process group exists: every rank learns whether any node failed, so none
    waits forever. Outside a process group (step 1) it just runs `work`.
    """
    error = None
    if not dist.is_initialized() or int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        try:
            work()
        except Exception as err:  # network, disk, checksum: reported in one line by the caller
            error = brief(err, limit=400)
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        failed = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            error = "another node could not get it"
    return error


# ---------------------------------------------------------------- command line and errors


def is_rank_zero() -> bool:
    """True in the process that speaks for the job: rank 0 of the process group once there is one,
    else what torchrun set in RANK (always true in a single process)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> NoReturn:
    """Exit with a one-line error on stderr, printed once per job (by rank 0).

    Raising SystemExit (rather than calling os._exit) lets `finally` blocks run, so the
    process group is still destroyed on this path.
    """
    if is_rank_zero():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, once per job, and exits 2."""

    def error(self, message: str) -> NoReturn:
        if is_rank_zero():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """--workload and --data_dir, the same in every step."""
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


def positive_int(text: str) -> int:
    """argparse type: a whole number greater than zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def resolve_device(choice: str, allow_mps: bool = False) -> str:
    """Turn --device {auto,cuda,mps,cpu} into a device type this machine really has.

    auto: CUDA when a GPU is visible, else Apple's MPS where `allow_mps` (step 1 only:
    DDP has no MPS backend), else CPU.
    """
    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if allow_mps and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    if choice == "mps" and not torch.backends.mps.is_available():
        fail("--device mps was asked for, but MPS is not available; use --device cpu")
    return choice


def check_writable_folder(path: str) -> None:
    """Fail now, before any training, if `path` could not be written later."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(f"cannot save {path}: folder {folder} does not exist; create it or choose another path")
    try:  # a real write: os.access says yes to root even on a read-only file system
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        fail(f"cannot save {path}: folder {folder} is not writable ({err.strerror}); choose another path")


# ---------------------------------------------------------------- snapshot files


class SnapshotError(Exception):
    """A snapshot file that cannot be used; the message says which file and what to do."""


def atomic_save(obj: Any, path: str) -> None:
    """torch.save `obj` to `path` so that a crash at any moment leaves the old file or the new one.

    Write a temporary file in the same folder (same file system, so the rename is atomic),
    flush it to disk, then rename it over the old file and sync the folder entry. One process
    writes each path, so temporary files of this path are leftovers of a writer that was killed
    mid-save, and are removed first.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + "."
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        os.remove(stale)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            torch.save(obj, tmp_file)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_path, path)
    except BaseException:  # also on SIGTERM (SystemExit): never leave a half-written temp file
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_snapshot(path: str, map_location: str | torch.device, required_keys: tuple[str, ...] = SNAPSHOT_KEYS) -> dict[str, Any]:
    """Load a snapshot written by `atomic_save`, refusing anything else.

    `weights_only=True` unpickles tensors and plain containers only: a planted pickle that
    would run code on load is rejected instead of executed.
    """
    fix = f"move {path} away (or pass another --snapshot_path) to start from scratch"
    try:
        snapshot = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # the pickle names a function or class to call: refused
            raise SnapshotError(
                f"{path} holds Python objects other than tensors, which could run code when loaded, "
                f"so it was not loaded; {fix}"
            ) from None
        raise SnapshotError(f"{path} is not a readable snapshot (damaged, or not written by torch.save); {fix}") from None
    except Exception as err:  # corrupt, truncated or not a torch file at all
        raise SnapshotError(f"{path} is not a readable snapshot ({brief(err)}); {fix}") from None
    if not isinstance(snapshot, dict) or not all(key in snapshot for key in required_keys):
        raise SnapshotError(f"{path} is not a snapshot of this program (expected keys {', '.join(required_keys)}); {fix}")
    return snapshot


def brief(err: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, short enough for a one-line error."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_snapshot(snapshot: dict[str, Any], path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Copy a snapshot's states into `model` and `optimizer`; return the number of epochs it had run."""
    try:
        model.load_state_dict(snapshot["MODEL_STATE"])
        optimizer.load_state_dict(snapshot["OPTIMIZER_STATE"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise SnapshotError(
            f"{path} was saved from a different model or optimizer ({brief(err)}); "
            f"move {path} away (or pass another --snapshot_path) to start from scratch"
        ) from None
    return int(snapshot["EPOCHS_RUN"])
