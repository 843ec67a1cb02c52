"""Step 6: FSDP2: each rank keeps a shard of the model, its gradients and its optimizer state; sharded snapshots.

Run the same command on every node (HOST: an address of the first node that the others reach):
    torchrun --nnodes=2 --nproc_per_node=gpu --rdzv_id=456 --rdzv_backend=c10d --rdzv_endpoint=HOST:29603 fsdp.py
"""

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed import destroy_process_group, init_process_group
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import datautils
from datautils import load_train_objs, loss_fn
from support import cli, launch, snapshots
from support.report import Report

USAGE = "torchrun --nnodes=2 --nproc_per_node=gpu --rdzv_id=456 --rdzv_backend=c10d --rdzv_endpoint=HOST:29603 fsdp.py"


def ddp_setup(device: str, timeout: datetime.timedelta | None) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device == "cuda" else None  # torchrun sets LOCAL_RANK, RANK, ...
    if gpu:
        torch.cuda.set_device(gpu)  # before init: NCCL and this process use this GPU only
    init_process_group(backend="nccl" if gpu else "gloo", timeout=timeout, device_id=gpu)  # rank, world size: from torchrun


def shard_model(model: torch.nn.Module, device: str, workload: str) -> None:
    """FSDP2: every rank keeps 1/WORLD_SIZE of each parameter, and so of its gradient and its momentum."""
    mesh = init_device_mesh(device, (dist.get_world_size(),))  # all ranks share the one model, on this device type
    # One unit per block: its full weights are all-gathered just before its forward (and again for its
    # backward), and freed after, so that one block at a time is whole. The toy is one Linear: no blocks.
    for block in [model.layer1, model.layer2, model.layer3, model.layer4] if workload == "images" else []:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: the rest (ResNet's first convolution and last layer; the toy's Linear)


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
        self.local_rank = int(os.environ["LOCAL_RANK"])  # this process on its node: picks the GPU
        self.global_rank = int(os.environ["RANK"])  # this process in the whole job: rank 0 speaks
        self.device = f"cuda:{self.local_rank}" if device == "cuda" else device
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.faults = faults
        self.epochs_run = 0
        snapshots.check_shared_folder(snapshot_path)  # every rank writes its shards there and may read any other's
        self._load_snapshot(snapshot_path)
        self.report = Report(self.model, optimizer, self.device, tensorboard_dir)  # the epoch line, where the step time went, TensorBoard

    def _load_snapshot(self, snapshot_path: str) -> None:
        # latest.pt names the newest complete snapshot folder, and holds the rest of it (epochs, batch).
        snapshot = snapshots.read_pointer(snapshot_path)
        if snapshot is None:  # no save has finished yet
            return
        folder = os.path.join(snapshot_path, snapshot["FOLDER"])
        # Every rank reads the pieces of the shards it holds now, whichever ranks wrote them: the process count may change.
        shards = {"MODEL_STATE": get_model_state_dict(self.model), "OPTIMIZER_STATE": get_optimizer_state_dict(self.model, self.optimizer)}
        with snapshots.checked_dcp_load(folder, snapshot_path) as planner:  # .metadata checked first; tensors only
            dcp.load(shards, checkpoint_id=folder, planner=planner)
        with snapshots.mismatch_reported(snapshot_path):  # another model's snapshot: one line, not a traceback
            set_state_dict(self.model, self.optimizer, model_state_dict=shards["MODEL_STATE"], optim_state_dict=shards["OPTIMIZER_STATE"])
        self.epochs_run = snapshot["EPOCHS_RUN"]
        if self.global_rank == 0:
            print(f"Resuming training from {snapshot_path}: {self.epochs_run} epochs done", flush=True)
            snapshots.note_global_batch(snapshot, self.train_data.batch_size)  # a line if the global batch changed

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.model(source), targets)
        loss.backward()  # FSDP reduce-scatters (averages) the gradients here: each rank gets those of its shard
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
        # FSDP shards parameters, not buffers: each rank's BatchNorm statistics come from its own batches.
        for buffer in self.model.buffers():  # rank 0's for all, as with DDP: one model is evaluated, and saved
            dist.broadcast(buffer, src=0)
        # FSDP's forward is collective (each block all-gathers its weights): a rank with fewer batches runs empty ones.
        forwards = torch.full((), len(self.val_data), device=self.device)  # made on the device: no copy from the host
        dist.all_reduce(forwards, op=dist.ReduceOp.MAX)
        sums = datautils.evaluate(self.model, self.val_data, self.device, forwards=int(forwards))
        dist.all_reduce(sums)  # the sums of all shards: every held-out sample counted exactly once
        return datautils.metrics(sums)

    def _save_snapshot(self, epoch: int) -> None:
        snapshot = {
            "MODEL_STATE": get_model_state_dict(self.model),  # this rank's shards (DTensors), by parameter name
            "OPTIMIZER_STATE": get_optimizer_state_dict(self.model, self.optimizer),  # SGD's momentum, sharded too
            "EPOCHS_RUN": epoch + 1,  # epochs completed: a resume starts at this epoch index, and repeats none
            "WORLD_SIZE": dist.get_world_size(),  # with BATCH_SIZE: the global batch these epochs had
            "BATCH_SIZE": self.train_data.batch_size,
        }
        # Every rank writes its shards into a new folder; once all have, rank 0 points latest.pt at it (atomically).
        with snapshots.published_when_complete(self.snapshot_path, f"epoch-{epoch + 1:04d}", snapshot) as folder:
            dcp.save({"MODEL_STATE": snapshot["MODEL_STATE"], "OPTIMIZER_STATE": snapshot["OPTIMIZER_STATE"]}, checkpoint_id=folder)
        if self.global_rank == 0:
            print(f"Epoch {epoch + 1} | Training snapshot saved at {self.snapshot_path}", flush=True)

    def train(self, max_epochs: int) -> None:
        if self.epochs_run >= max_epochs and self.global_rank == 0:
            print(f"Nothing to train: the snapshot has {self.epochs_run} of {max_epochs} epochs done", flush=True)
        for epoch in range(self.epochs_run, max_epochs):
            self.faults.at_epoch_start(epoch)  # --simulate_failure_at, --simulate_hang
            loss = self._run_epoch(epoch)
            val = self._evaluate()
            if self.global_rank == 0:  # every rank holds the same weights: rank 0 alone speaks...
                self.report.epoch(epoch, max_epochs, self.train_data.batch_size, loss, val)
            if (epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs:  # every rank saves its own shards
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
    shard_model(model, device, args.workload)
    optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)  # made again: fully_shard replaced each parameter by its shard
    train_data = prepare_dataloader(train_set, args.batch_size, args.num_workers, device == "cuda")
    val_data = prepare_dataloader(val_set, 4 * args.batch_size, args.num_workers, device == "cuda", train=False)  # no gradients: bigger batches fit
    faults = launch.Faults(args.simulate_failure_at, args.simulate_hang)
    trainer = Trainer(model, train_data, val_data, optimizer, device, args.save_every, args.tensorboard_dir, args.snapshot_path, faults)
    trainer.train(args.total_epochs)
    destroy_process_group()


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_training_args(parser)
    cli.add_fault_tolerance_args(parser, snapshot_help="snapshot folder all nodes share (default: snapshot.dcp)", snapshot_default="snapshot.dcp")
    args = parser.parse_args()

    device = cli.resolve_device(args)
    launch.torchrun_worker(device, USAGE, args.snapshot_path)  # started by torchrun? one line for a stop or a hang; dies with torchrun
    main(device, args)
