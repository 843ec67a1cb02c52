"""Train a GPT with DDP: a global batch on any number of processes, mixed precision, gradient
accumulation, a learning-rate schedule, and exact snapshots.

Each epoch trains on one shuffled order of all training windows, the same whatever the number
of processes. An optimizer step takes the next `global batch` windows of that order; each process
takes its share of them, in micro-batches. So a step sees the same windows on 1, 2 or 4
processes, and the snapshot records the position as windows of the order done: a resume on any
number of processes continues with exactly the windows not yet trained. With the same number of
processes it also restores every rank's random state, and on CPU ends bit-identical to a run
that was never interrupted.

Each evaluation of the test loss (at each epoch's end, and every `eval_every` steps) may keep the
model as the best (`best_snapshot_path`) and may stop the job early (`patience`). Every rank holds
the same all-reduced loss, so all decide alike and stop at the same step; the best loss and the
evaluations since are in the snapshot, so a resumed job decides as one never interrupted.
"""

from __future__ import annotations

import math
import os
import signal
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from support import cli, launch, snapshots
from mingpt.char_dataset import CharDataset
from mingpt.config import OptimizerConfig, TrainerConfig
from mingpt.model import GPT
from mingpt.report import RunReport

WINDOW_LOG = os.environ.get("MINGPT_WINDOW_LOG")  # a folder: each rank records the windows it trains (for tests)
SNAPSHOT_KEYS = (
    "MODEL_STATE", "OPTIMIZER_STATE", "SCALER_STATE", "SCHEDULER_STATE", "EPOCHS_RUN", "WINDOWS_DONE",
    "GLOBAL_STEP", "RNG_STATES", "VOCAB", "CONFIG", "BEST_LOSS", "EVALS_SINCE_BEST",
)  # fmt: skip
SMALL_KEYS = tuple(key for key in SNAPSHOT_KEYS if key not in snapshots.SHARDED_KEYS)  # fsdp: in the pointer file


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # the autocast dtype; None: plain fp32


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    """The GPU's compute capability (major, minor); None on CPU."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def chosen_precision(precision: str, strategy: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """What a run trains in (bf16, fp16 or fp32) for trainer_config.precision, and for auto on a GPU
    without bf16 units a line saying why. `capability`: the GPU's compute capability, None on CPU.

    Not torch.cuda.is_bf16_supported(): by default it also answers True where bf16 is only emulated
    (compute capability below 8.0: T4, V100), without the tensor cores that fp16 uses there.
    """
    if precision != "auto":
        return precision, ""
    if capability is None:
        return "fp32", ""
    if capability >= (8, 0):
        return "bf16", ""
    why = f"precision auto: this GPU (compute capability {capability[0]}.{capability[1]}) has no bf16 units, so"
    if strategy == "fsdp":
        return "fp32", f"{why} fp32: fp16 would need a loss scaler that FSDP's sharded gradients do not have here"
    return "fp16", f"{why} fp16 with loss scaling (GradScaler)"


def loss_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling (its gradients underflow); bf16 has fp32's range and does not."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


def batch_plan(config: TrainerConfig, world_size: int) -> tuple[int, int, int]:
    """(global batch, micro-batch, accumulation steps) for this many processes.

    With trainer_config.global_batch_size, each process takes global / world_size windows per
    step, in as few micro-batches of at most batch_size as divide that share evenly.
    """
    if not config.global_batch_size:
        return config.batch_size * world_size * config.grad_accum_steps, config.batch_size, config.grad_accum_steps
    share, remainder = divmod(config.global_batch_size, world_size)
    if remainder:
        counts = [n for n in range(1, config.global_batch_size + 1) if config.global_batch_size % n == 0]
        cli.fail(
            f"trainer_config.global_batch_size={config.global_batch_size} cannot be shared by {world_size} processes; "
            f"run on {', '.join(map(str, counts[:12]))}{' ...' if len(counts) > 12 else ''} processes, or change it"
        )
    accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= config.batch_size)
    return config.global_batch_size, share // accum, accum


def shard(model: GPT, precision: str, device: torch.device) -> None:
    """trainer_config.strategy=fsdp: FSDP2 on each Transformer block, then on the root (embeddings, final
    LayerNorm, head). Each rank keeps 1/N of every parameter, gradient and optimizer state, and a
    unit's full weights are all-gathered only while it computes. Mixed precision is FSDP's policy:
    weights gathered in bf16 for the compute, gradients reduced in fp32. Before the optimizer is made."""
    dtype = DTYPES[chosen_precision(precision, "fsdp", compute_capability(device))[0]]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def saved_snapshot(config: TrainerConfig) -> dict[str, Any] | None:
    """Collective: the snapshot to resume from, before the model exists (it needs the vocabulary).

    ddp: each node may hold a copy (or none, or an older one); all ranks get the newest. fsdp: one
    sharded snapshot in a folder all nodes share; this is its small part, and the Trainer reads
    the shards into the sharded model and optimizer.
    """
    if config.strategy == "fsdp":
        snapshots.check_shared_folder(config.snapshot_path)
        return snapshots.read_pointer(config.snapshot_path, required_keys=SMALL_KEYS)
    return snapshots.newest_copy(config.snapshot_path, progress=lambda copy: (copy["EPOCHS_RUN"], copy["WINDOWS_DONE"]), required_keys=SNAPSHOT_KEYS)


def lr_schedule(config: OptimizerConfig, total_steps: int):
    """The factor of the peak learning rate at each optimizer step: linear warm-up from 0, then a
    cosine decay to min_lr at the last step (as in nanoGPT)."""
    floor = config.min_lr / config.learning_rate

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class StopRequest:
    """Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (Slurm's time-limit warning) asks the job to stop after the
    current step, with a snapshot.

    Ranks may receive the signal at different steps, so after every step they agree through a
    one-number all-reduce: the largest signal number asked for, 0 for none. It runs on the CPU
    (gloo), so it never waits for the GPU.
    """

    def __init__(self) -> None:
        self.signum = torch.zeros(1)
        self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            if signal.getsignal(stop) is not signal.SIG_IGN:  # SIGINT ignored, as in a script's background job: left so
                signal.signal(stop, self._request)

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
        optimizer_config: OptimizerConfig,
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
        self.global_batch, self.micro_batch, self.accum = batch_plan(config, self.world_size)
        self.steps_per_epoch = len(train_set) // self.global_batch  # whole steps only: the rest of the order waits for the next epoch
        if self.steps_per_epoch == 0:
            cli.fail(f"{len(train_set):,} training windows cannot fill one global batch of {self.global_batch:,}; use more text or smaller batches")
        factor = lr_schedule(optimizer_config, config.max_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.fsdp = config.strategy == "fsdp"
        self.precision, precision_note = chosen_precision(config.precision, config.strategy, compute_capability(device))
        dtype = DTYPES[self.precision]
        # fsdp: FSDP's mixed-precision policy casts the weights (see `shard`), not autocast.
        self.autocast = torch.autocast(self.device_type, dtype=dtype) if dtype and not self.fsdp else nullcontext()
        self.scaler = loss_scaler(self.precision, self.device_type)
        self.epochs_run = 0
        self.windows_done = 0  # of the current epoch's order, by all processes
        self.global_step = 0  # optimizer steps since the start of training
        # The lowest test loss so far, and the evaluations since: in the snapshot, so a resumed job decides as one never stopped.
        self.best_loss = math.inf
        self.evals_since_best = 0
        # ddp: each node's local rank 0 writes the node's copy (of the best model too); fsdp: every rank writes its shards.
        self.writes_snapshot = self.fsdp or self.local_rank == 0
        if config.best_snapshot_path and self.fsdp:
            snapshots.check_shared_folder(config.best_snapshot_path)
        self.report = RunReport(config, device, model.flops_per_token(), self.global_batch * train_set.block_size, self.precision)
        if precision_note:
            self.report.log(precision_note)
        if snapshot is not None:
            self._load_snapshot(snapshot)
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, one copy in memory instead of two.
        ddp = lambda: DDP(self.raw_model, device_ids=[self.local_rank] if self.device_type == "cuda" else None, gradient_as_bucket_view=True)
        self.model = self.raw_model if self.fsdp else ddp()  # fsdp: already sharded (`shard`), no wrapper
        self.report.watch(self.model, optimizer, self.global_step)
        if config.compile:
            self.model = torch.compile(self.model)
        self.stop = StopRequest()

    # ------------------------------------------------------------------ snapshots

    def _load_snapshot(self, snapshot: dict[str, Any]) -> None:
        path = self.config.snapshot_path
        if self.fsdp:  # the shards too, read into this rank's (any number of processes may have written them), as fsdp.py does
            folder = os.path.join(path, snapshot["FOLDER"])
            shards = {
                "MODEL_STATE": get_model_state_dict(self.raw_model),
                "OPTIMIZER_STATE": get_optimizer_state_dict(self.raw_model, self.optimizer),
            }
            with snapshots.checked_dcp_load(folder, path) as planner:
                dcp.load(shards, checkpoint_id=folder, planner=planner)
            with snapshots.mismatch_reported(path):
                set_state_dict(self.raw_model, self.optimizer, model_state_dict=shards["MODEL_STATE"], optim_state_dict=shards["OPTIMIZER_STATE"])
        else:
            with snapshots.mismatch_reported(path):
                self.raw_model.load_state_dict(snapshot["MODEL_STATE"])
                self.optimizer.load_state_dict(snapshot["OPTIMIZER_STATE"])
        self.scaler.load_state_dict(snapshot["SCALER_STATE"])
        self.scheduler.load_state_dict(snapshot["SCHEDULER_STATE"])
        self.epochs_run, self.windows_done, self.global_step = snapshot["EPOCHS_RUN"], snapshot["WINDOWS_DONE"], snapshot["GLOBAL_STEP"]
        self.best_loss, self.evals_since_best = snapshot["BEST_LOSS"], snapshot["EVALS_SINCE_BEST"]
        rng_states = snapshot["RNG_STATES"]
        self.report.log(f"Resuming training from {path}: {self.progress()} done")
        if self.windows_done % self.global_batch:
            cli.fail(
                f"{path} stopped {self.windows_done:,} windows into its epoch, which is no whole number of global batches "
                f"of {self.global_batch:,}; resume it with trainer_config.global_batch_size set as when it was saved"
            )
        if len(rng_states) == self.world_size:  # same world size: continue each rank's random stream
            torch.set_rng_state(rng_states[self.global_rank]["cpu"])
            if self.device_type == "cuda" and rng_states[self.global_rank]["cuda"] is not None:
                torch.cuda.set_rng_state(rng_states[self.global_rank]["cuda"])
        else:
            self.report.log(
                f"Note: saved by {len(rng_states)} processes, resumed by {self.world_size}: the data go on exactly where they "
                "stopped, but the random draws (dropout) start afresh from the seed"
            )

    def _save_snapshot(self) -> None:
        """Collective: every rank sends its random state to the writers of the snapshot's copies (one per node)."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if self.device_type == "cuda" else None}
        rng_states: list[Any] = [None] * self.world_size
        dist.all_gather_object(rng_states, rng)
        if not self.writes_snapshot:
            return
        snapshot = {
            "MODEL_STATE": get_model_state_dict(self.raw_model) if self.fsdp else self.raw_model.state_dict(),  # fsdp: this rank's shards
            "OPTIMIZER_STATE": get_optimizer_state_dict(self.raw_model, self.optimizer) if self.fsdp else self.optimizer.state_dict(),
            "SCALER_STATE": self.scaler.state_dict(),
            "SCHEDULER_STATE": self.scheduler.state_dict(),
            "EPOCHS_RUN": self.epochs_run,  # completed epochs
            "WINDOWS_DONE": self.windows_done,  # of the next epoch's order, by all processes together
            "GLOBAL_STEP": self.global_step,
            "RNG_STATES": rng_states,
            "BEST_LOSS": self.best_loss,
            "EVALS_SINCE_BEST": self.evals_since_best,
            **self.extra_state,
        }
        self._write(snapshot, self.config.snapshot_path)
        self.report.log(f"Training snapshot saved at {self.config.snapshot_path}: {self.progress()} done")

    def _write(self, snapshot: dict[str, Any], path: str) -> None:
        """ddp: atomically, by each node's local rank 0 (a copy per node); fsdp, collective: every rank writes
        its shards into a new folder, then rank 0 points the folder's latest.pt to it (as fsdp.py does)."""
        if self.fsdp:
            with snapshots.published_when_complete(path, f"step-{self.global_step:08d}", snapshot) as folder:
                dcp.save({key: snapshot[key] for key in snapshots.SHARDED_KEYS if key in snapshot}, checkpoint_id=folder)
        elif self.writes_snapshot:
            snapshots.atomic_save(snapshot, path)

    def progress(self) -> str:
        """Epochs and windows done, as the snapshot lines say it."""
        return f"{cli.plural(self.epochs_run, 'epoch')} + {self.windows_done:,} windows"

    def _save_best(self) -> None:
        """Collective with fsdp: the model of the lowest test loss, atomically, beside the latest snapshot.

        The model alone, with what sampling needs (VOCAB, CONFIG) and its loss: it is for use, not for
        resuming, so it has no optimizer state. ddp: each node's local rank 0 writes a copy, as for the
        latest snapshot; fsdp: every rank writes its shards into a new folder, then rank 0 points to it.
        """
        path = self.config.best_snapshot_path
        best = {
            "MODEL_STATE": get_model_state_dict(self.raw_model) if self.fsdp else self.raw_model.state_dict(),
            "BEST_LOSS": self.best_loss,
            "GLOBAL_STEP": self.global_step,
            "EPOCHS_RUN": self.epochs_run,
            "WINDOWS_DONE": self.windows_done,
            **self.extra_state,
        }
        self._write(best, path)
        self.report.log(f"New best test loss {self.best_loss:.4f} at step {self.global_step}: saved at {path}")

    def _judge(self, test_loss: float) -> bool:
        """After each evaluation: keep the best model; True when the job should stop early.

        `test_loss` is the mean over the whole test set, from the sums all ranks all-reduced: every rank
        holds the same number, so every rank takes the same decision here without another collective,
        and all stop at the same step. A decision from a rank's own share of the test set, or taken on
        rank 0 alone, would leave the other ranks waiting in the next step's all-reduce.
        """
        if test_loss < self.best_loss:
            self.best_loss, self.evals_since_best = test_loss, 0
            if self.config.best_snapshot_path:
                self._save_best()
        else:
            self.evals_since_best += 1
        return self._out_of_patience()

    def _out_of_patience(self) -> bool:
        return self.config.patience > 0 and self.evals_since_best >= self.config.patience

    def _stop_early(self) -> None:
        """Save where the job stopped (a new run of it then trains nothing), and say why."""
        self._save_snapshot()
        self.report.log(
            f"Stopping early at step {self.global_step}: {self.evals_since_best} evaluations without a test loss "
            f"below {self.best_loss:.4f} (trainer_config.patience={self.config.patience})"
        )

    # ------------------------------------------------------------------ training

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """All training windows in this epoch's shuffled order: the same on every rank and for any world size."""
        generator = torch.Generator().manual_seed(self.config.seed + epoch)
        return torch.randperm(len(self.train_set), generator=generator)

    def _micro_batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's micro-batches (window start indices) for the rest of `epoch`: of each step's global batch, its share."""
        order = self._epoch_order(epoch)
        share = self.global_batch // self.world_size
        micro_batches = []
        for start in range(self.windows_done, self.steps_per_epoch * self.global_batch, self.global_batch):
            mine = order[start + self.global_rank * share : start + (self.global_rank + 1) * share]
            micro_batches += list(mine.split(self.micro_batch))
        return micro_batches

    def _loader(self, micro_batches: list[torch.Tensor]) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=None,  # the dataset gathers a whole micro-batch of windows per index list
            sampler=micro_batches,
            pin_memory=self.device_type == "cuda",
            generator=torch.Generator(),  # keeps the DataLoader from drawing on the global RNG
        )

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are averaged over the ranks only when `sync`."""
        # no_sync covers forward and backward: DDP decides in forward whether backward communicates.
        # FSDP is told instead, and keeps the unreduced gradients of this rank until a step syncs.
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
        with self.model.no_sync() if not sync and not self.fsdp else nullcontext():
            with self.autocast:
                _, loss = self.model(source, targets)
            self.scaler.scale(loss / self.accum).backward()
        return loss.detach()

    def _optimizer_step(self) -> torch.Tensor:
        """Clip and apply the accumulated gradients; return their norm before clipping."""
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.config.grad_norm_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _record_windows(self, epoch: int, micro_batches: list[torch.Tensor]) -> None:
        """Debugging: append the windows this rank trained in one step to $MINGPT_WINDOW_LOG/rank<N>.txt."""
        with open(os.path.join(WINDOW_LOG, f"rank{self.global_rank}.txt"), "a") as record:
            record.write(f"{epoch} " + " ".join(str(i) for i in torch.cat(micro_batches).tolist()) + "\n")

    def _run_epoch(self, epoch: int) -> bool:
        """Train the rest of `epoch`; True if an evaluation within it (trainer_config.eval_every) stopped the job early."""
        micro_batches = self._micro_batches(epoch)
        step_loss = torch.zeros((), device=self.device)  # mean over the step's micro-batches, on the device
        for micro_step, (source, targets) in enumerate(self.report.timed(self._loader(micro_batches)), start=1):
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            step_loss += self._run_batch(source, targets, sync=micro_step % self.accum == 0) / self.accum
            if micro_step % self.accum:
                continue
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self._optimizer_step()
            if WINDOW_LOG:
                self._record_windows(epoch, micro_batches[micro_step - self.accum : micro_step])
            self.windows_done += self.global_batch
            self.global_step += 1
            step = self.windows_done // self.global_batch
            if step % self.config.log_every == 0 or step == self.steps_per_epoch:
                self.report.step(epoch, step, self.steps_per_epoch, self.global_step, step_loss, grad_norm, lr)
            step_loss.zero_()
            # Evaluated before a stop request is heeded: a job resumed after this step has had this evaluation.
            # Not at the epoch's last step: the epoch's own evaluation follows.
            if self.config.eval_every and self.global_step % self.config.eval_every == 0 and step < self.steps_per_epoch:
                test_loss = self._evaluate()
                self.report.evaluation(epoch, step, self.steps_per_epoch, self.global_step, test_loss)
                if self._judge(test_loss):
                    self._stop_early()
                    return True
            signum = self.stop.agreed()
            if signum:
                self._save_snapshot()
                if signum == signal.SIGINT:  # one line: what the snapshot keeps, and how to go on
                    launch.stopped_by_ctrl_c(self.config.snapshot_path)
                self.report.log(f"Stopping on {signal.Signals(signum).name}")
                # A warning (SIGUSR1) ends the job: exit 0. SIGTERM is a failure, which torchrun may restart.
                raise SystemExit(0 if signum == signal.SIGUSR1 else 128 + signum)
        return False

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean test loss over the whole test set, each rank taking every world_size-th window.

        With fsdp a forward is collective (each block all-gathers its weights): every rank runs as
        many as the rank with the most batches, past its own on an empty batch, which counts nothing.
        """
        self.raw_model.eval()
        totals = torch.zeros(2, device=self.device)
        batches = list(torch.arange(self.global_rank, len(self.test_set), self.world_size).split(self.config.batch_size))
        # torch.full, not torch.tensor: made on the device, no copy from the host that waits for the GPU
        forwards = torch.full((1,), len(batches), device=self.device)
        dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
        for index in range(int(forwards)):
            batch = batches[index] if index < len(batches) else torch.zeros(0, dtype=torch.long)
            source, targets = (t.to(self.device, non_blocking=True) for t in self.test_set[batch])
            with self.autocast:
                _, loss = self.raw_model(source, targets if len(batch) else None)
            if len(batch):
                totals += torch.stack([loss.float() * len(batch), torch.full((), float(len(batch)), device=self.device)])
        dist.all_reduce(totals)
        self.raw_model.train()
        return (totals[0] / totals[1]).item()

    def train(self) -> None:
        self.report.log(
            f"Global batch {self.global_batch} windows = {cli.plural(self.world_size, 'process', 'processes')} x "
            f"{cli.plural(self.accum, 'micro-batch', 'micro-batches')} of {self.micro_batch}; {self.steps_per_epoch} steps per epoch"
        )
        if self._out_of_patience():  # resumed from the snapshot of an early stop
            self.report.log(f"Nothing to train: this run stopped early; a larger trainer_config.patience than {self.config.patience} continues it")
            self.report.close()
            return
        for epoch in range(self.epochs_run, self.config.max_epochs):
            if self._run_epoch(epoch):
                break
            test_loss = self._evaluate()
            self.epochs_run, self.windows_done = epoch + 1, 0
            self.report.epoch(epoch, self.global_step, test_loss)
            if self._judge(test_loss):
                self._stop_early()
                break
            if self.epochs_run % self.config.save_every == 0 or self.epochs_run == self.config.max_epochs:
                self._save_snapshot()
        self.report.close()
