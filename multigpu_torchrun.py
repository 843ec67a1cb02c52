"""Step 3: torchrun starts the processes; snapshots let restarted workers resume.

Run: torchrun --standalone --nproc_per_node=gpu multigpu_torchrun.py [total_epochs save_every]
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import datautils
from datautils import load_train_objs, loss_fn
from support import cli, launch, snapshots
from support.report import Report

USAGE = "torchrun --standalone --nproc_per_node=gpu multigpu_torchrun.py (on a machine without GPUs: --nproc_per_node=2)"


def ddp_setup(device: str, timeout: datetime.timedelta | None) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device == "cuda" else None  # torchrun sets LOCAL_RANK, RANK, ...
    if gpu:
        torch.cuda.set_device(gpu)  # before init: NCCL and this process use this GPU only
    init_process_group(backend="nccl" if gpu else "gloo", timeout=timeout, device_id=gpu)  # rank, world size: from torchrun


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        train_data: DataLoader,
        val_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        device: str,
        save_every: int,
        tensorboard_dir: str | None,
        snapshot_path: str,
        faults: launch.Faults,
    ) -> None:
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.device = f"cuda:{self.local_rank}" if device == "cuda" else device
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.faults = faults
        self.epochs_run = 0
        if os.path.exists(snapshot_path):
            self._load_snapshot(snapshot_path)
        self.model = DDP(self.model, device_ids=[self.device] if device == "cuda" else None)  # rank 0's weights sent to every rank, now
        self.report = Report(self.model, optimizer, self.device, tensorboard_dir)  # the epoch line, where the step time went, TensorBoard

    def _load_snapshot(self, snapshot_path: str) -> None:
        snapshot = snapshots.read(snapshot_path, map_location=self.device)  # torch.load(..., weights_only=True), checked
        with snapshots.mismatch_reported(snapshot_path):  # another model's snapshot: one line, not a traceback
            self.model.load_state_dict(snapshot["MODEL_STATE"])
            self.optimizer.load_state_dict(snapshot["OPTIMIZER_STATE"])
        self.epochs_run = snapshot["EPOCHS_RUN"]
        if self.local_rank == 0:
            print(f"Resuming training from {snapshot_path}: {self.epochs_run} epochs done", flush=True)
            snapshots.note_global_batch(snapshot, self.train_data.batch_size)  # a line if the global batch changed

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(source), targets)
        loss.backward()  # DDP all-reduces (averages) the gradients here, bucket by bucket, while backward runs
        self.optimizer.step()
        return loss.detach()

    def _run_epoch(self, epoch: int) -> float:
        self.train_data.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        self.train_data.dataset.set_augmentation_epoch(epoch)  # images: new random crops and flips each epoch, the same in every run
        loss_sum = torch.zeros((), device=self.device)  # stays on the device: no wait for the GPU per step
        samples = 0
        for source, targets in self.report.timed(self.train_data):  # times each wait for a batch
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss_sum += self._run_batch(source, targets) * len(source)
            samples += len(source)
        totals = torch.stack([loss_sum, torch.tensor(float(samples), device=self.device)])  # one read of the device, at the end
        dist.all_reduce(totals)  # one all-reduce per epoch: the sums over all ranks give the job's mean loss
        return (totals[0] / totals[1]).item()

    def _evaluate(self) -> dict[str, float]:
        sums = datautils.evaluate(self.model.module, self.val_data, self.device)  # .module: not DDP's forward, a collective with buffers
        dist.all_reduce(sums)  # the sums of all shards: every held-out sample counted exactly once
        return datautils.metrics(sums)

    def _save_snapshot(self, epoch: int) -> None:
        snapshot = {
            "MODEL_STATE": self.model.module.state_dict(),
            "OPTIMIZER_STATE": self.optimizer.state_dict(),  # SGD's momentum: without it a resumed run trains differently
            "EPOCHS_RUN": epoch + 1,  # epochs completed: a resume starts at this epoch index, and repeats none
            "WORLD_SIZE": dist.get_world_size(),  # with BATCH_SIZE: the global batch these epochs had
            "BATCH_SIZE": self.train_data.batch_size,
        }
        snapshots.atomic_save(snapshot, self.snapshot_path)  # torch.save to a temporary file, then a rename: never half-written
        print(f"Epoch {epoch + 1} | Training snapshot saved at {self.snapshot_path}", flush=True)

    def train(self, max_epochs: int) -> None:
        if self.epochs_run >= max_epochs and self.local_rank == 0:
            print(f"Nothing to train: the snapshot has {self.epochs_run} of {max_epochs} epochs done", flush=True)
        for epoch in range(self.epochs_run, max_epochs):
            self.faults.at_epoch_start(epoch)  # --simulate_failure_at, --simulate_hang
            loss = self._run_epoch(epoch)
            val = self._evaluate()
            if self.local_rank == 0:  # every rank holds the same weights: rank 0 alone speaks...
                self.report.epoch(epoch, max_epochs, self.train_data.batch_size, loss, val)
            if self.local_rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):  # ...and saves
                self._save_snapshot(epoch)


def prepare_dataloader(dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool, train: bool = True) -> DataLoader:
    # Training: a new shuffled shard per rank each epoch. Evaluation: every world_size-th sample, none padded in.
    sampler = DistributedSampler(dataset) if train else range(dist.get_rank(), len(dataset), dist.get_world_size())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=pin_memory,
        shuffle=False,  # the sampler shuffles
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=datautils.collate,  # takes the toy's batches whole
    )


def main(device: str, args: argparse.Namespace) -> None:
    ddp_setup(device, args.timeout)
    train_set, val_set, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(train_set, args.batch_size, args.num_workers, device == "cuda")
    val_data = prepare_dataloader(val_set, 4 * args.batch_size, args.num_workers, device == "cuda", train=False)  # no gradients: bigger batches fit
    faults = launch.Faults(args.simulate_failure_at, args.simulate_hang)
    trainer = Trainer(model, train_data, val_data, optimizer, device, args.save_every, args.tensorboard_dir, args.snapshot_path, faults)
    trainer.train(args.total_epochs)
    destroy_process_group()


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_training_args(parser)
    cli.add_fault_tolerance_args(parser, snapshot_help="snapshot file to resume from and save to (default: snapshot.pt)")
    args = parser.parse_args()

    device = cli.resolve_device(args)
    launch.torchrun_worker(device, USAGE, args.snapshot_path)  # started by torchrun? one line for a stop or a hang; dies with torchrun
    main(device, args)
