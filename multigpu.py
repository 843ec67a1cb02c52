"""Step 2: DDP, one process per device, started by mp.spawn.

Run: python multigpu.py [total_epochs save_every]
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import datautils
from datautils import load_train_objs, loss_fn
from support import cli, launch, snapshots
from support.report import Report

CHECKPOINT_PATH = "checkpoint.pt"


def ddp_setup(rank: int, world_size: int, device: str, timeout: datetime.timedelta | None) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    launch.spawned_worker(world_size)  # dies with its parent; takes its share of the CPU cores
    gpu = torch.device("cuda", rank) if device == "cuda" else None
    if gpu:
        torch.cuda.set_device(gpu)  # before init: NCCL and this process use this GPU only
    init_process_group(backend="nccl" if gpu else "gloo", rank=rank, world_size=world_size, timeout=timeout, device_id=gpu)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        train_data: DataLoader,
        val_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        rank: int,
        device: str,
        save_every: int,
        tensorboard_dir: str | None,
    ) -> None:
        self.rank = rank
        self.device = f"cuda:{rank}" if device == "cuda" else device
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.model = DDP(self.model, device_ids=[self.device] if device == "cuda" else None)  # rank 0's weights sent to every rank, now
        self.report = Report(self.model, optimizer, self.device, tensorboard_dir)  # the epoch line, where the step time went, TensorBoard

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

    def _save_checkpoint(self, epoch: int) -> None:
        ckp = self.model.module.state_dict()  # .module: the model inside DDP, which loads without DDP
        snapshots.atomic_save(ckp, CHECKPOINT_PATH)  # torch.save to a temporary file, then a rename: never half-written
        print(f"Epoch {epoch + 1} | Training checkpoint saved at {CHECKPOINT_PATH}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(max_epochs):
            loss = self._run_epoch(epoch)
            val = self._evaluate()
            if self.rank == 0:  # every rank holds the same weights: rank 0 alone speaks...
                self.report.epoch(epoch, max_epochs, self.train_data.batch_size, loss, val)
            if self.rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):  # ...and saves
                self._save_checkpoint(epoch)


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


def main(rank: int, world_size: int, device: str, args: argparse.Namespace) -> None:
    ddp_setup(rank, world_size, device, args.timeout)
    train_set, val_set, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(train_set, args.batch_size, args.num_workers, device == "cuda")
    val_data = prepare_dataloader(val_set, 4 * args.batch_size, args.num_workers, device == "cuda", train=False)  # no gradients: bigger batches fit
    trainer = Trainer(model, train_data, val_data, optimizer, rank, device, args.save_every, args.tensorboard_dir)
    trainer.train(args.total_epochs)
    destroy_process_group()


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_training_args(parser, launcher="mp.spawn")  # with --world_size
    args = parser.parse_args()

    device = cli.resolve_device(args)
    world_size = launch.world_size(args.world_size, device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # where the processes meet, unless the caller set it
    os.environ.setdefault("MASTER_PORT", launch.free_port())
    with launch.spawn_guarded(CHECKPOINT_PATH):  # a folder it cannot write fails now; a killed process or Ctrl-C is one line
        mp.spawn(main, args=(world_size, device, args), nprocs=world_size)
