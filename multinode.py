"""Step 4: several machines (nodes).  Run the same command on every node (HOST: the first node):
    torchrun --nnodes=2 --nproc_per_node=gpu --max-restarts=3 --rdzv_id=456 --rdzv_backend=c10d --rdzv_endpoint=HOST:29603 multinode.py

New: LOCAL_RANK numbers the processes of one node and picks the GPU; RANK numbers them in the whole
job and decides who speaks. Nodes share no files: each keeps its own copy of the snapshot, and at
start all ranks resume from the newest copy any node has. SIGUSR1 (Slurm's warning before a time
limit) stops every rank after the same epoch, with a snapshot.
"""

import argparse
import datetime
import gc
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from support import cli
import datautils
from support import launch
from support import snapshots
from datautils import load_train_objs, loss_fn
from support.report import Report

USAGE = "torchrun --nnodes=2 --nproc_per_node=gpu --rdzv_id=456 --rdzv_backend=c10d --rdzv_endpoint=HOST:29603 multinode.py"
STOP_REQUESTED = threading.Event()  # set by SIGUSR1: stop after this epoch, with a snapshot


def ddp_setup(device: str, timeout: datetime.timedelta | None) -> None:
    """Join the process group; torchrun has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before init, so NCCL and this process use this GPU only
    init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=timeout)


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
        self.local_rank = int(os.environ["LOCAL_RANK"])  # this process on this node: picks the GPU
        self.global_rank = int(os.environ["RANK"])  # this process in the whole job: decides who speaks
        self.device = f"cuda:{self.local_rank}" if device == "cuda" else device
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.faults = faults
        self.epochs_run = 0
        self.writes_snapshot = snapshots.writes_copy(snapshot_path)  # each node's local rank 0; one per shared folder
        self._load_snapshot(snapshot_path)
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, one copy in memory instead of two.
        self.model = DDP(self.model, device_ids=[self.local_rank] if device == "cuda" else None, gradient_as_bucket_view=True)
        self.report = Report(self.model, optimizer, self.device, tensorboard_dir)  # epoch lines, step-time split, TensorBoard

    def _load_snapshot(self, snapshot_path: str) -> None:
        # Each node may hold a copy (or none, or an older one): all ranks get the newest any node has.
        snapshot = snapshots.newest_copy(snapshot_path, progress=lambda copy: copy["EPOCHS_RUN"])
        if snapshot is None:
            return
        if self.global_rank == 0:
            print(f"Resuming from {snapshot_path}: {snapshot['EPOCHS_RUN']} epochs done", flush=True)
        self.epochs_run = snapshots.restore(snapshot, snapshot_path, self.model, self.optimizer, self.train_data.batch_size)

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(source), targets)
        loss.backward()  # DDP all-reduces (averages) the gradients here, overlapped with backward
        self.optimizer.step()
        return loss.detach()

    def _run_epoch(self, epoch: int) -> tuple[float, bool]:
        self.train_data.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        self.train_data.dataset.set_epoch(epoch)  # new random augmentations each epoch, the same in every run
        loss_sum = torch.zeros((), device=self.device)  # stays on the device: no wait for the GPU per step
        samples = 0
        for source, targets in self.report.timed(self.train_data):  # times each wait for a batch
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss_sum += self._run_batch(source, targets) * len(source)
            samples += len(source)
        # The epoch's all-reduce also counts the ranks asked to stop: any one, and all stop after this epoch.
        stop = torch.tensor(float(STOP_REQUESTED.is_set()), device=self.device)
        totals = torch.stack([loss_sum, torch.tensor(float(samples), device=self.device), stop])
        dist.all_reduce(totals)  # one all-reduce per epoch: the sums over all ranks give the job's mean loss
        return (totals[0] / totals[1]).item(), bool(totals[2] > 0)

    def _evaluate(self) -> dict[str, float]:
        # The model inside DDP: DDP's forward syncs each batch, and unequal shards would hang in it.
        sums = datautils.evaluate(self.model.module, self.val_data, self.device)  # loss, samples (and correct)
        dist.all_reduce(sums)  # the sums of all shards: every held-out sample counted exactly once
        return datautils.metrics(sums)

    def _save_snapshot(self, epoch: int) -> None:
        snapshot = {
            "MODEL_STATE": self.model.module.state_dict(),
            "OPTIMIZER_STATE": self.optimizer.state_dict(),
            "EPOCHS_RUN": epoch + 1,  # epochs completed: a resume starts at this epoch index
            "WORLD_SIZE": dist.get_world_size(),  # with BATCH_SIZE: the global batch these epochs had
            "BATCH_SIZE": self.train_data.batch_size,
        }
        snapshots.atomic_save(snapshot, self.snapshot_path)
        print(f"Epoch {epoch + 1} | snapshot saved at {self.snapshot_path}", flush=True)

    def train(self, max_epochs: int) -> None:
        if self.epochs_run >= max_epochs and self.global_rank == 0:
            print(f"Nothing to train: the snapshot has {self.epochs_run} of {max_epochs} epochs done", flush=True)
        for epoch in range(self.epochs_run, max_epochs):
            self.faults.at_epoch_start(epoch)  # --simulate_failure_at, --simulate_hang
            loss, stop = self._run_epoch(epoch)
            val = self._evaluate()
            if self.global_rank == 0:
                self.report.epoch(epoch, max_epochs, self.train_data.batch_size, loss, val)
            # Every rank holds the same weights; every node saves its own copy.
            if self.writes_snapshot and (stop or (epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_snapshot(epoch)
            if stop:
                if self.global_rank == 0:
                    print(f"Stopped after epoch {epoch + 1} on SIGUSR1; a new run resumes from the snapshot", flush=True)
                return


def prepare_dataloader(dataset: Dataset, batch_size: int, num_workers: int, train: bool = True) -> DataLoader:
    # Training: a new shuffled shard per rank each epoch. Evaluation: every world_size-th sample, none padded in.
    sampler = DistributedSampler(dataset) if train else range(dist.get_rank(), len(dataset), dist.get_world_size())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=torch.cuda.is_available(),
        shuffle=False,  # the sampler shuffles
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=datautils.collate,  # takes the toy's batches whole
    )


def main(device: str, args: argparse.Namespace) -> None:
    # SIGUSR1 asks for a stop without losing work: the ranks agree on it at the end of an epoch.
    signal.signal(signal.SIGUSR1, lambda signum, frame: STOP_REQUESTED.set())
    ddp_setup(device, args.timeout)
    # torchrun and Slurm stop workers with SIGTERM. As SystemExit it unwinds through `finally`:
    # the process group is destroyed, and a snapshot being written is finished or discarded whole.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    train_set, val_set, model, optimizer = load_train_objs(args.workload, args.data_dir)
    if args.sync_bn:  # BatchNorm statistics over the batch of all ranks, not each rank's own part
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_data = prepare_dataloader(train_set, args.batch_size, args.num_workers)
    val_data = prepare_dataloader(val_set, 4 * args.batch_size, args.num_workers, train=False)  # no gradients kept: larger batches fit
    faults = launch.Faults(args.simulate_failure_at, args.simulate_hang)
    trainer = Trainer(model, train_data, val_data, optimizer, device, args.save_every, args.tensorboard_dir, args.snapshot_path, faults)
    try:
        trainer.train(args.total_epochs)
    except RuntimeError as err:  # a collective timed out: one line says where, and which rank never came
        launch.explain_collective_failure(err, args.timeout)
    finally:
        trainer = model = optimizer = None  # release DDP before its process group, or the process may abort at exit
        gc.collect()
        destroy_process_group()


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_training_args(parser)
    cli.add_fault_tolerance_args(parser, snapshot_help="snapshot file on every node, to resume from and save to (default: snapshot.pt)")
    args = parser.parse_args()

    device = cli.resolve_device(args)
    launch.torchrun_worker(device, USAGE)  # launched by torchrun? its GPUs? dies with torchrun
    snapshots.check_writable_folder(args.snapshot_path)
    main(device, args)
