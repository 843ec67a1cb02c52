"""What a step shows of its training: one line per epoch, where the step time went, TensorBoard.

The split of the step time is measured, not modelled:

- waiting for data: the time spent in the data loader's `next()`;
- communication left exposed: DDP all-reduces gradient buckets while backward is still computing
  the others, so only what is left after the last gradient is ready costs time. It is measured
  from the moment DDP hands over the last bucket (a communication hook) to the moment
  `optimizer.step()` is called, i.e. when backward has returned with every gradient averaged;
- compute: the rest (copies to the device, forward, backward, optimizer step).

FSDP has no communication hook: there its all-gathers and reduce-scatters are counted with the
compute, and the split says "compute+comm".

On a GPU the marks are CUDA events on the compute stream, so they time the GPU's work, not the
host's queueing; they are read once per epoch.
"""

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from support import cli, snapshots

DOMINANT = 0.4  # data or communication above this share of the step time gets one line of advice


class StepTimer:
    """Splits the training time of a stretch of steps into data, compute and exposed communication."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.data: list[tuple[Any, Any]] = []  # (asked for a batch, got it)
        self.comm: list[tuple[Any, Any]] = []  # (last bucket handed to the all-reduce, optimizer step)
        self.last_bucket = None
        self.steps = 0  # optimizer steps
        self.start = self.end = None
        optimizer.register_step_pre_hook(self._before_optimizer_step)
        if isinstance(model, DDP):
            model.register_comm_hook(None, self._comm_hook)
        self.untimed_comm = snapshots.is_sharded(model)  # FSDP has no communication hook to mark it with

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def _comm_hook(self, process_group: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.last_bucket = self._mark()  # buckets are handed over in order: the last one comes last
        return default_hooks.allreduce_hook(process_group, bucket)  # what DDP does by default

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.last_bucket is not None:
            self.comm.append((self.last_bucket, self._mark()))
            self.last_bucket = None

    def timed(self, loader: Iterable) -> Iterator[Any]:
        """Iterate over `loader`, timing each wait for a batch; a new stretch starts here."""
        batches = iter(loader)
        self.data, self.comm, self.steps, self.end = [], [], 0, None
        self.start = self._mark()
        while True:
            asked = self._mark()
            try:
                batch = next(batches)
            except StopIteration:
                self.end = asked
                return
            self.data.append((asked, self._mark()))
            yield batch

    def split(self) -> dict[str, float]:
        """Seconds since the stretch began (or since the last split), up to the loader's end or now:
        total, data, compute, comm; and the optimizer steps taken. The next stretch starts there."""
        end = self.end if self.end is not None else self._mark()
        if self.cuda:
            torch.cuda.synchronize()
        total = self._seconds(self.start, end)
        data = sum(self._seconds(*pair) for pair in self.data)
        comm = sum(self._seconds(*pair) for pair in self.comm)
        split = {"total": total, "data": data, "compute": max(total - data - comm, 0.0), "comm": comm, "steps": self.steps}
        if self.untimed_comm:  # not 0: inside the compute, unmeasured
            split["compute+comm"] = split.pop("compute") + split.pop("comm")
        self.data, self.comm, self.steps, self.start = [], [], 0, end
        return split


def shares(split: dict[str, float]) -> dict[str, float]:
    """Each part's share of the total time."""
    parts = [part for part in ("data", "compute", "comm", "compute+comm") if part in split]
    return {part: split[part] / split["total"] if split["total"] > 0 else 0.0 for part in parts}


def describe(split: dict[str, float]) -> str:
    return ", ".join(f"{part} {share:.0%}" for part, share in shares(split).items())


def advice(split: dict[str, float], data_fix: str, batch_setting: str) -> str | None:
    """One line of what to do when data or communication takes most of the step time, else None."""
    part, share = max(((p, s) for p, s in shares(split).items() if p in ("data", "comm")), key=lambda item: item[1])
    if share <= DOMINANT:
        return None
    if part == "data":
        return f"data-bound: {share:.0%} of the step time waits for the data loader; {data_fix}"
    return (
        f"communication-bound: {share:.0%} of the step time waits for the gradient all-reduce; "
        f"a larger batch per process ({batch_setting}) computes longer for each all-reduce"
    )


def format_metrics(val: dict[str, float]) -> str:
    """Validation metrics as the epoch line shows them (tools/predict.py too): "val loss 0.047001 | val accuracy 61.2%"."""
    return " | ".join(f"{name} {value:.1%}" if "accuracy" in name else f"{name} {value:.6f}" for name, value in val.items())


class TensorBoard:
    """Scalars for TensorBoard, written by one process, one continuous curve per tag across restarts.

    The first write of a run opens the writer with purge_step: whatever an earlier attempt wrote
    from the step this run starts at (before it crashed and was resumed from an older snapshot)
    is dropped.
    """

    def __init__(self, log_dir: str | None, first_step: int | None = None):
        self.log_dir = log_dir
        self.first_step = first_step  # the first step this run writes, if not the first it is given
        self.writer = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.log_dir:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for: it is slow to import

            self.writer = SummaryWriter(self.log_dir, purge_step=self.first_step or step)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Report:
    """Rank 0's account of each epoch: a line with the step-time split, advice, and TensorBoard scalars."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str, tensorboard_dir: str | None = None):
        self.timer = StepTimer(model, optimizer, device)  # on every rank: each times its own steps
        self.device = device
        self.tensorboard = TensorBoard(tensorboard_dir)
        self.advised = False

    def timed(self, loader: Iterable) -> Iterator[Any]:
        return self.timer.timed(loader)

    def epoch(self, epoch: int, max_epochs: int, batch_size: int, loss: float, val: dict[str, float]) -> None:
        """Print the epoch's line, and advice the first time data or communication dominates."""
        split = self.timer.split()
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        batch = f"Batchsize: {batch_size}" + (f" x {cli.plural(ranks, 'rank')}" if dist.is_initialized() else "")
        values = format_metrics(val)
        print(
            f"[{self.device}] Epoch {epoch + 1}/{max_epochs} | {batch} | Steps: {split['steps']} | loss {loss:.6f} | {values} | "
            f"{split['total']:.3f}s: {describe(split)}",
            flush=True,
        )
        line = advice(split, data_fix="raise --num_workers", batch_setting="--batch_size")
        if line and not self.advised and (epoch > 0 or max_epochs == 1):  # the first epoch warms up
            print(line, flush=True)
            self.advised = True
        samples_per_s = split["steps"] * batch_size * ranks / split["total"]
        metrics = {"loss/train": loss, **{name.replace(" ", "/"): value for name, value in val.items()}, "throughput/samples_per_s": samples_per_s}
        self.tensorboard.scalars(epoch + 1, {**metrics, **{f"step_time/{part.replace('+', '_')}": share for part, share in shares(split).items()}})
