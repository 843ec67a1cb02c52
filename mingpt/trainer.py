"""Train a GPT with DDP: mixed precision, gradient accumulation, exact snapshots, logging.

Snapshots record the step inside the epoch and every rank's random state, so a resumed run
continues exactly where the snapshot was taken: on CPU it ends bit-identical to a run that
was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import datautils
from char_dataset import CharDataset

# Dense bf16 peak FLOP/s of the cards we measure MFU against.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    batch_size: int = 216  # per process and micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    grad_norm_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32), bf16, fp16 or fp32
    compile: bool = False  # torch.compile the model
    snapshot_path: str = "gpt_snapshot.pt"
    save_every: int = 3  # epochs
    log_every: int = 10  # optimizer steps
    metrics_path: str = "gpt_metrics.jsonl"  # one JSON object per log line, appended
    seed: int = 1337


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means plain fp32."""
    if precision == "auto":
        use_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class StopRequest:
    """SIGTERM or SIGUSR1 (Slurm's time-limit warning) asks the job to stop after the current step.

    Ranks may receive the signal at different steps, so after every step they agree through a
    one-number all-reduce: the largest signal number asked for, 0 for none. It runs on the CPU
    (gloo), so it never waits for the GPU.
    """

    def __init__(self) -> None:
        self.signum = torch.zeros(1)
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGUSR1, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self.signum[0] = max(float(signum), float(self.signum[0]))

    def agreed(self) -> int:
        signum = self.signum.clone()
        dist.all_reduce(signum, op=dist.ReduceOp.MAX, group=self.group)
        return int(signum[0])


class Trainer:
    def __init__(
        self,
        config: TrainerConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_set: CharDataset,
        test_set: CharDataset,
        snapshot: dict[str, Any] | None,
        extra_state: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.config = config
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.global_rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.device = device
        self.device_type = device.type
        self.raw_model = model.to(self.device)
        self.optimizer = optimizer
        self.train_set = train_set
        self.test_set = test_set
        self.extra_state = extra_state  # saved with every snapshot: vocabulary and config
        dtype = autocast_dtype(config.precision, self.device_type)
        self.autocast = torch.autocast(self.device_type, dtype=dtype) if dtype else nullcontext()
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)
        self.sampler = DistributedSampler(train_set, seed=config.seed)  # same shuffle on every rank
        self.epochs_run = 0
        self.step_in_epoch = 0  # optimizer steps done in the current epoch
        self.bar_open = False  # rank 0 has drawn a progress bar on the terminal's current line
        if snapshot is not None:
            self._load_snapshot(snapshot)
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, one copy in memory instead of two.
        self.model = DDP(self.raw_model, device_ids=[self.local_rank] if self.device_type == "cuda" else None, gradient_as_bucket_view=True)
        if config.compile:
            self.model = torch.compile(self.model)
        self.stop = StopRequest()
        self.metrics = open(config.metrics_path, "a") if self.global_rank == 0 else None
        self.flops_per_token = model.flops_per_token()
        name = torch.cuda.get_device_name(self.device) if self.device_type == "cuda" else ""
        self.peak_flops = next((flops for card, flops in PEAK_BF16_FLOPS.items() if card in name), None)

    # ------------------------------------------------------------------ snapshots

    def _load_snapshot(self, snapshot: dict[str, Any]) -> None:
        path = self.config.snapshot_path
        datautils.restore_snapshot(snapshot, path, self.raw_model, self.optimizer)
        self.scaler.load_state_dict(snapshot["SCALER_STATE"])
        self.epochs_run = snapshot["EPOCHS_RUN"]
        self.step_in_epoch = snapshot["STEP_IN_EPOCH"]
        rng_states = snapshot["RNG_STATES"]
        if len(rng_states) == self.world_size:  # same world size: continue each rank's random stream
            torch.set_rng_state(rng_states[self.global_rank]["cpu"])
            if self.device_type == "cuda" and rng_states[self.global_rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rng_states[self.global_rank]["cuda"])
        self._log(f"Resuming from {path}: {self.epochs_run} epochs + {self.step_in_epoch} steps done")

    def _save_snapshot(self) -> None:
        """Collective: every rank sends its random state to rank 0, which writes the file."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if self.device_type == "cuda" else None}
        rng_states = [None] * self.world_size if self.global_rank == 0 else None
        dist.gather_object(rng, rng_states, dst=0)
        if self.global_rank != 0:
            return
        snapshot = {
            "MODEL_STATE": self.raw_model.state_dict(),
            "OPTIMIZER_STATE": self.optimizer.state_dict(),
            "SCALER_STATE": self.scaler.state_dict(),
            "EPOCHS_RUN": self.epochs_run,  # completed epochs
            "STEP_IN_EPOCH": self.step_in_epoch,  # optimizer steps done in the epoch after those
            "RNG_STATES": rng_states,
            **self.extra_state,
        }
        datautils.atomic_save(snapshot, self.config.snapshot_path)
        self._log(f"Snapshot saved at {self.config.snapshot_path}: {self.epochs_run} epochs + {self.step_in_epoch} steps done")

    # ------------------------------------------------------------------ training

    def _batches(self, epoch: int) -> DataLoader:
        """This rank's micro-batches for `epoch`, from the current step on (all of them unless resuming)."""
        self.sampler.set_epoch(epoch)
        starts = list(BatchSampler(self.sampler, self.config.batch_size, drop_last=True))
        accum = self.config.grad_accum_steps
        usable = len(starts) // accum * accum  # whole optimizer steps only
        return DataLoader(
            self.train_set,
            batch_size=None,  # the dataset gathers a whole batch of windows per index list
            sampler=starts[self.step_in_epoch * accum : usable],
            pin_memory=self.device_type == "cuda",
            generator=torch.Generator(),  # keeps the DataLoader from drawing on the global RNG
        )

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are all-reduced only when `sync`."""
        # no_sync covers forward and backward: DDP decides in forward whether backward communicates.
        with self.model.no_sync() if not sync else nullcontext():
            with self.autocast:
                _, loss = self.model(source, targets)
            self.scaler.scale(loss / self.config.grad_accum_steps).backward()
        return loss.detach()

    def _optimizer_step(self) -> torch.Tensor:
        """Clip and apply the accumulated gradients; return their norm before clipping."""
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_norm_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _run_epoch(self, epoch: int) -> None:
        accum = self.config.grad_accum_steps
        batches = self._batches(epoch)
        steps_in_epoch = self.step_in_epoch + len(batches) // accum
        tokens_per_step = self.config.batch_size * accum * self.world_size * self.train_set.block_size
        last_log, steps_since_log = time.perf_counter(), 0
        step_loss = torch.zeros((), device=self.device)  # mean over the step's micro-batches, on the device
        for micro_step, (source, targets) in enumerate(batches, start=1):
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            step_loss += self._run_batch(source, targets, sync=micro_step % accum == 0) / accum
            if micro_step % accum:
                continue
            grad_norm = self._optimizer_step()
            self.step_in_epoch += 1
            steps_since_log += 1
            if self.step_in_epoch % self.config.log_every == 0 or self.step_in_epoch == steps_in_epoch:
                loss_value = step_loss.item()  # the loop's only wait for the GPU
                now = time.perf_counter()
                self._log_step(epoch, steps_in_epoch, loss_value, grad_norm.item(), steps_since_log * tokens_per_step / (now - last_log))
                last_log, steps_since_log = now, 0
            step_loss.zero_()
            signum = self.stop.agreed()
            if signum:
                self._save_snapshot()
                self._log(f"Stopping on {signal.Signals(signum).name}")
                # A warning (SIGUSR1) ends the job: exit 0. SIGTERM is a failure, which torchrun may restart.
                raise SystemExit(0 if signum == signal.SIGUSR1 else 128 + signum)

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean test loss over the whole test set, each rank taking every world_size-th window."""
        self.raw_model.eval()
        totals = torch.zeros(2, device=self.device)
        starts = torch.arange(self.global_rank, len(self.test_set), self.world_size)
        for batch in starts.split(self.config.batch_size):
            source, targets = (t.to(self.device, non_blocking=True) for t in self.test_set[batch])
            with self.autocast:
                _, loss = self.raw_model(source, targets)
            totals += torch.stack([loss.float() * len(batch), torch.tensor(float(len(batch)), device=self.device)])
        dist.all_reduce(totals)
        self.raw_model.train()
        return (totals[0] / totals[1]).item()

    def train(self) -> None:
        for epoch in range(self.epochs_run, self.config.max_epochs):
            start = time.perf_counter()
            self._run_epoch(epoch)
            test_loss = self._evaluate()
            self.epochs_run, self.step_in_epoch = epoch + 1, 0
            self._log(f"Epoch {epoch + 1}/{self.config.max_epochs} | test loss {test_loss:.4f} | {time.perf_counter() - start:.1f}s")
            self._write_metrics({"epoch": epoch + 1, "test_loss": test_loss})
            if self.epochs_run % self.config.save_every == 0 or self.epochs_run == self.config.max_epochs:
                self._save_snapshot()

    # ------------------------------------------------------------------ output (rank 0)

    def _log(self, line: str) -> None:
        if self.global_rank == 0:
            print(("\n" if self.bar_open else "") + line, flush=True)
            self.bar_open = False

    def _log_step(self, epoch: int, steps_in_epoch: int, loss: float, grad_norm: float, tokens_per_s: float) -> None:
        if self.global_rank != 0:
            return
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        line = (
            f"epoch {epoch + 1} | step {self.step_in_epoch}/{steps_in_epoch} | loss {loss:.4f} | "
            f"{tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
        )
        if sys.stdout.isatty():  # a progress bar redrawn in place; plain lines for logs and Slurm
            done = int(30 * self.step_in_epoch / steps_in_epoch)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {line}\033[K", end="", flush=True)  # K: clear the rest
            self.bar_open = True
        else:
            print(line, flush=True)
        self._write_metrics(
            {"epoch": epoch + 1, "step": self.step_in_epoch, "loss": loss, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu}
        )

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"time": time.time(), **record}) + "\n")
            self.metrics.flush()
