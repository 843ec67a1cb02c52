"""Rank 0's account of a minGPT run, kept out of the Trainer.

Every `log_every` steps: the loss, tokens/s of the whole job, the MFU of each GPU (on GPUs whose
peak is on record), and where the step time went (waiting for data, compute, communication left
exposed; see support/report.py). On a terminal they show as a tqdm progress bar; in a log file or
under Slurm, as plain lines. The same figures go to a JSON-lines file and, when asked for, to
TensorBoard.
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

# Dense peak TFLOP/s of one GPU for matmuls in (bf16, fp16, tf32, fp32), by the exact name that
# torch.cuda.get_device_name gives: a substring would give an H100 PCIe the SXM's figure. NVIDIA's
# datasheets print tensor-core figures "with sparsity"; those are halved here, as training's matmuls
# are dense. None: the card has no such unit (no bf16 or TF32 before Ampere). Sources:
# "NVIDIA H100 Tensor Core GPU" (SXM, PCIe and NVL columns), "NVIDIA H200 Tensor Core GPU" (SXM, NVL),
# "NVIDIA A100 Tensor Core GPU" (the same figures for 40/80 GB, SXM and PCIe), "NVIDIA A10 Tensor
# Core GPU", "NVIDIA L4 Tensor Core GPU", "NVIDIA T4 Tensor Core GPU" (fp16: "mixed precision"),
# "NVIDIA V100 Tensor Core GPU" (SXM2, PCIe; fp16: "tensor performance"), "NVIDIA Tesla P100" (PCIe 16 GB).
# AWS's A10G has no NVIDIA datasheet, so it is not listed.
PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
A100, V100_SXM2, V100_PCIE = (312, 312, 156, 19.5), (None, 125, None, 15.7), (None, 112, None, 14)
PEAK_TFLOPS: dict[str, tuple[float | None, ...]] = {
    "NVIDIA H100 80GB HBM3": (989.5, 989.5, 494.5, 67),  # H100 SXM
    "NVIDIA H100 PCIe": (756.5, 756.5, 378, 51),
    "NVIDIA H100 NVL": (835.5, 835.5, 417.5, 60),
    "NVIDIA H200": (989.5, 989.5, 494.5, 67),  # H200 SXM
    "NVIDIA H200 NVL": (835.5, 835.5, 417.5, 60),
    "NVIDIA A100-SXM4-40GB": A100,
    "NVIDIA A100-SXM4-80GB": A100,
    "NVIDIA A100-PCIE-40GB": A100,
    "NVIDIA A100 80GB PCIe": A100,
    "NVIDIA A10": (125, 125, 62.5, 31.2),
    "NVIDIA L4": (121, 121, 60, 30.3),
    "Tesla T4": (None, 65, None, 8.1),
    "Tesla V100-SXM2-16GB": V100_SXM2,
    "Tesla V100-SXM2-32GB": V100_SXM2,
    "Tesla V100-PCIE-16GB": V100_PCIE,
    "Tesla V100-PCIE-32GB": V100_PCIE,
    "Tesla P100-PCIE-16GB": (None, 18.7, None, 9.3),  # no tensor cores: fp16 at twice fp32
}


def peak_flops(gpu: str, precision: str, tf32: bool) -> float | None:
    """Dense peak FLOP/s of one `gpu` (its exact name) for matmuls in `precision` (bf16, fp16, fp32);
    fp32 counts as TF32 where `tf32` allows it and the card has TF32. None when not on record."""
    peaks = dict(zip(PRECISIONS, PEAK_TFLOPS.get(gpu, ())))
    tflops = (peaks.get("tf32") if precision == "fp32" and tf32 else None) or peaks.get(precision)
    return tflops * 1e12 if tflops else None


def model_flops_utilization(flops_per_token: int, tokens_per_s: float, world_size: int, peak: float | None) -> float | None:
    """MFU of one GPU: the FLOPs of its share of the job's tokens/s over that GPU's peak (None without one)."""
    return flops_per_token * tokens_per_s / world_size / peak if peak else None


class RunReport:
    def __init__(
        self, config: TrainerConfig, device: torch.device, flops_per_token: int, tokens_per_step: int, precision: str, gpu: str | None = None
    ):
        """tokens_per_step: of the whole job (its global batch); precision: what the matmuls run in (bf16,
        fp16 or fp32); gpu: the GPU's name as torch.cuda.get_device_name gives it, by default `device`'s."""
        self.speaks = dist.get_rank() == 0
        self.world_size = dist.get_world_size()
        self.device = device
        self.max_epochs = config.max_epochs
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        if gpu is None and device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
        self.peak_flops = peak_flops(gpu, precision, tf32=torch.backends.cuda.matmul.allow_tf32) if gpu else None
        self.metrics = open(config.metrics_path, "a") if self.speaks else None
        self.tensorboard_dir = config.tensorboard_dir if self.speaks else None
        self.tensorboard = TensorBoard(None)
        self.bar: tqdm | None = None
        self.timer: StepTimer | None = None
        self.epoch_start = time.perf_counter()
        self.intervals = 0  # logged so far in this run: the first one warms up, so advice waits for the second
        self.advised = False
        if gpu and self.peak_flops is None:
            self.log(f"No MFU: mingpt/report.py has no {precision} peak for {gpu!r} (add its dense figure from NVIDIA's datasheet to PEAK_TFLOPS)")

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
        tokens_per_s, mfu = self.throughput(split)
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

    def throughput(self, split: dict[str, float]) -> tuple[float, float | None]:
        """Tokens/s of the whole job over the steps of `split` (as StepTimer.split gives), and the MFU of one GPU."""
        tokens_per_s = split["steps"] * self.tokens_per_step / split["total"]
        return tokens_per_s, model_flops_utilization(self.flops_per_token, tokens_per_s, self.world_size, self.peak_flops)

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
