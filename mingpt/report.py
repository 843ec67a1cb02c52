"""Rank 0's account of a minGPT run, kept out of the Trainer.

Every `log_every` steps: the loss, tokens/s, MFU on known GPUs, and where the step time went
(waiting for data, compute, communication left exposed; see report.py at the top level). On a
terminal they show as a tqdm progress bar; in a log file or under Slurm, as plain lines. The same
figures go to a JSON-lines file and, when asked for, to TensorBoard.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from mingpt.config import TrainerConfig
from support.report import StepTimer, TensorBoard, advice, describe, shares

# Dense bf16 peak FLOP/s of the cards we measure MFU against.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class RunReport:
    def __init__(self, config: TrainerConfig, device: torch.device, flops_per_token: int, tokens_per_step: int):
        self.speaks = dist.get_rank() == 0
        self.device = device
        self.max_epochs = config.max_epochs
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peak_flops = next((flops for card, flops in PEAK_BF16_FLOPS.items() if card in name), None)
        self.metrics = open(config.metrics_path, "a") if self.speaks else None
        self.tensorboard_dir = config.tensorboard_dir if self.speaks else None
        self.tensorboard = TensorBoard(None)
        self.bar: tqdm | None = None
        self.timer: StepTimer | None = None
        self.epoch_start = time.perf_counter()
        self.intervals = 0  # logged so far in this run: the first one warms up, so advice waits for the second
        self.advised = False

    def watch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, global_step: int) -> None:
        """Time the steps of `model` (the DDP model) and `optimizer` from optimizer step `global_step` on."""
        self.timer = StepTimer(model, optimizer, self.device)
        self.tensorboard = TensorBoard(self.tensorboard_dir, first_step=global_step + 1)

    def timed(self, batches: Iterable) -> Iterator[Any]:
        self.epoch_start = time.perf_counter()
        return self.timer.timed(batches)

    def log(self, line: str) -> None:
        if self.speaks:
            (tqdm.write if self.bar is not None else print)(line, file=sys.stdout)
            sys.stdout.flush()

    def step(self, epoch: int, step: int, steps: int, global_step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """The steps since the last call (collective-free; call it on every rank, each times its own)."""
        split = self.timer.split()
        self.intervals += 1
        if not self.speaks:
            return
        loss_value, grad_norm_value = loss.item(), grad_norm.item()  # the loop's only wait for the GPU
        tokens_per_s = split["steps"] * self.tokens_per_step / split["total"]
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        figures = f"loss {loss_value:.4f} | {tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
        if sys.stdout.isatty():  # a progress bar, redrawn in place
            if self.bar is None:
                self.bar = tqdm(total=steps, initial=step - split["steps"], desc=f"epoch {epoch + 1}", file=sys.stdout, dynamic_ncols=True)
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"{figures} | {describe(split)}")
        else:
            print(f"epoch {epoch + 1} | step {step}/{steps} | {figures} | {describe(split)}", flush=True)
        line = advice(
            split, data_fix="the batches are gathered from one tensor, so look for a slow disk or CPU", batch_setting="trainer_config.batch_size"
        )
        if line and not self.advised and self.intervals > 1:
            self.log(line)
            self.advised = True
        record = {"epoch": epoch + 1, "step": step, "global_step": global_step, "loss": loss_value, "grad_norm": grad_norm_value,
                  "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu, **{f"time_{part}": share for part, share in shares(split).items()},
                  "peak_memory_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None}  # fmt: skip
        self._write(record)
        self.tensorboard.scalars(global_step, {"loss/train": loss_value, "lr": lr, "throughput/tokens_per_s": tokens_per_s,
                                               **{f"step_time/{part}": share for part, share in shares(split).items()}})  # fmt: skip

    def epoch(self, epoch: int, global_step: int, test_loss: float) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.log(f"Epoch {epoch + 1}/{self.max_epochs} | test loss {test_loss:.4f} | {time.perf_counter() - self.epoch_start:.1f}s")
        self._write({"epoch": epoch + 1, "global_step": global_step, "test_loss": test_loss})
        self.tensorboard.scalars(global_step, {"loss/test": test_loss})

    def evaluation(self, epoch: int, step: int, steps: int, global_step: int, test_loss: float) -> None:
        """A test loss within an epoch (trainer_config.eval_every). Call it on every rank: each restarts its step timer."""
        self.timer.split()  # an evaluation is no training step: the next tokens/s start after it
        self.log(f"epoch {epoch + 1} | step {step}/{steps} | test loss {test_loss:.4f}")
        self._write({"epoch": epoch + 1, "step": step, "global_step": global_step, "test_loss": test_loss})
        self.tensorboard.scalars(global_step, {"loss/test": test_loss})

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps({"time": time.time(), **record}) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        self.tensorboard.close()
