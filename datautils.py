"""What the steps train on, as in the official series: the data, the model, the optimizer, the loss.

Two workloads (`--workload`): `toy`, a learnable synthetic regression that runs in seconds, and
`images`, ResNet-18 on CIFAR-10, heavy enough to show DDP's speedup. Each has a training set
and a held-out validation set.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from support import cli

IN_FEATURES = 20
TOY_VAL_SIZE = 1000  # not a multiple of 3: three ranks get shards of different sizes
FAKE_TRAIN_SIZE = 2048  # --data_dir fake: enough to measure speed, not to learn
FAKE_VAL_SIZE = 1000  # CIFAR-10 has 10,000 test images; generated ones only measure speed, and slowly
CIFAR_MEAN, CIFAR_STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


class MyTrainDataset(Dataset):
    """Synthetic regression data that a linear model can really learn.

    Targets are one fixed linear function of the inputs plus small noise. The function comes from
    seed 0 and the inputs from `seed`: a validation set (another seed) tests the same function on
    new inputs. Every rank builds identical data, so `DistributedSampler` can shard it by index.
    The data is two tensors, and `__getitems__` (which DataLoader calls, when it exists, instead of
    one `__getitem__` per sample) gathers a whole batch in one indexing operation.
    """

    def __init__(self, size: int, noise: float = 0.01, seed: int = 0):
        function = torch.Generator().manual_seed(0)
        true_weight = torch.randn(IN_FEATURES, 1, generator=function)
        true_bias = torch.randn(1, generator=function)
        generator = torch.Generator().manual_seed(1 + seed)
        self.inputs = torch.randn(size, IN_FEATURES, generator=generator)
        self.targets = self.inputs @ true_weight + true_bias + noise * torch.randn(size, 1, generator=generator)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> "Batch":
        batch = torch.tensor(indices)
        return Batch((self.inputs.index_select(0, batch), self.targets.index_select(0, batch)))

    def set_augmentation_epoch(self, epoch: int) -> None:
        """Nothing to draw again each epoch: the toy has no augmentation."""


class Batch(tuple):
    """A batch already gathered whole, which `collate` passes on as it is."""


def collate(samples: Any) -> Any:
    """DataLoader's collate_fn: a `Batch` as it is; a list of samples stacked, as by default."""
    return tuple(samples) if isinstance(samples, Batch) else default_collate(samples)


class AugmentedImages(Dataset):
    """Training images with a random crop (4 pixels of padding) and a random horizontal flip.

    Each image's draw is seeded by (seed, epoch, index): it differs from image to image and from
    epoch to epoch, so no two ranks or loader workers repeat each other's draws, and it is the
    same in every run, on any number of processes or workers, and after a resume.
    `set_augmentation_epoch` picks the epoch (as `DistributedSampler.set_epoch` does for the shuffle).
    """

    def __init__(self, images: Dataset, seed: int = 0):
        self.images = images
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_augmentation_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self, index: int) -> tuple[int, int, bool]:
        """This image's crop offsets (0..8 each, 4 is the centre) and flip, this epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + index)
        dx, dy, flip = torch.randint(0, 9, (3,), generator=generator).tolist()
        return dx, dy, flip % 2 == 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        dx, dy, flip = self.draw(index)
        image = F.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
        return (image.flip(-1) if flip else image), label


def cifar10(data_dir: str) -> tuple[Dataset, Dataset]:
    """CIFAR-10's 50,000 training images (augmented) and its 10,000 test images, downloaded
    into `data_dir` once per node.

    `data_dir` "fake": torchvision's FakeData with CIFAR-10's shapes (3x32x32, 10 classes), for
    running offline: it measures speed, not learning.
    """
    from torchvision import datasets, transforms  # only this workload needs torchvision

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    if data_dir == "fake":
        train = datasets.FakeData(FAKE_TRAIN_SIZE, (3, 32, 32), 10, transform=to_tensor, random_offset=0)
        test = datasets.FakeData(FAKE_VAL_SIZE, (3, 32, 32), 10, transform=to_tensor, random_offset=FAKE_TRAIN_SIZE)
        return AugmentedImages(train), test
    error = on_local_rank_zero_first(lambda: datasets.CIFAR10(data_dir, train=True, download=True))
    if error:
        cli.fail(f"could not get CIFAR-10 into {data_dir} ({error}); download it there by hand, or use --data_dir fake to train on generated images")
    train = datasets.CIFAR10(data_dir, train=True, transform=to_tensor)
    return AugmentedImages(train), datasets.CIFAR10(data_dir, train=False, transform=to_tensor)


@dataclasses.dataclass
class Workload:
    """What `load_train_objs` builds, as the steps' --workload, --data_dir and --sync_bn say."""

    workload: str = "toy"
    data_dir: str = "./data"
    sync_bn: bool = False


def load_train_objs(args: Any = Workload()) -> tuple[Dataset, Dataset, torch.nn.Module, torch.optim.Optimizer]:
    """The training set, the validation set, the model and the optimizer, for the parsed command line
    `args` (or a `Workload`). Seeded, so every run starts from the same weights."""
    torch.manual_seed(0)
    if args.workload == "images":
        from torchvision.models import resnet18

        model = resnet18(num_classes=10)
        if getattr(args, "sync_bn", False):  # BatchNorm statistics over the batch of all ranks, not each rank's own part
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return *cifar10(args.data_dir), model, optimizer
    model = torch.nn.Linear(IN_FEATURES, 1)
    # Momentum gives the optimizer real state: a resume that lost it would train differently.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    return MyTrainDataset(2048), MyTrainDataset(TOY_VAL_SIZE, seed=1), model, optimizer


def loss_fn(output: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for class labels (images); mean squared error for real-valued targets (toy)."""
    if targets.dtype == torch.long:
        return F.cross_entropy(output, targets, reduction=reduction)
    return F.mse_loss(output, targets, reduction=reduction)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, device: str, forwards: int | None = None) -> torch.Tensor:
    """Sums over `data`: [loss, samples] for a regression, [loss, samples, correct] for class labels.

    Sums, not means, so that processes that each evaluated a shard can add theirs up exactly.
    `forwards`: run the model this many times, however many batches `data` has (FSDP, whose forward
    is a collective that every rank must join as often as the others). The runs past the last batch
    get an empty batch (of `data.dataset`'s shapes), which adds nothing to the sums.
    """
    was_training = model.training
    model.eval()
    sums = None
    batches = iter(data)
    for step in range(len(data) if forwards is None else forwards):
        source, targets = next(batches) if step < len(data) else [part[:0] for part in data.collate_fn([data.dataset[0]])]
        source = source.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        output = model(source)
        # torch.full, not torch.tensor: made on the device, no copy from the host that waits for the GPU
        batch = [loss_fn(output, targets, reduction="sum"), torch.full((), len(targets), device=device)]
        if targets.dtype == torch.long:
            batch.append((output.argmax(dim=1) == targets).sum())
        # float64 keeps the sums exact enough to add across processes; Apple's MPS has none, so float32 there
        exact = torch.float32 if torch.device(device).type == "mps" else torch.float64
        sums = torch.stack([value.to(exact) for value in batch]) + (0 if sums is None else sums)
    model.train(was_training)
    return sums


def metrics(sums: torch.Tensor) -> dict[str, float]:
    """The validation loss (and accuracy, for class labels) from the sums `evaluate` returns."""
    loss, samples, *correct = sums.tolist()
    return {"val loss": loss / samples, **({"val accuracy": correct[0] / samples} if correct else {})}


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
            error = cli.brief(err, limit=400)
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        failed = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            error = "another node could not get it"
    return error
