"""Step 2: the same Trainer under DistributedDataParallel, one process per device.

    python multigpu.py 50 10                  # every visible GPU, or 2 CPU processes without one
    python multigpu.py 50 10 --world_size 4

New in this step: `torch.multiprocessing.spawn` starts the processes, each joins a process
group, `DistributedSampler` gives each a different shard of the data, and DDP averages the
gradients across processes in every backward pass.
"""

import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import datautils
from datautils import load_train_objs, loss_fn

CHECKPOINT_PATH = "checkpoint.pt"


def ddp_setup(rank: int, world_size: int, device: str) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes."""
    if device == "cuda":
        torch.cuda.set_device(rank)  # before init, so NCCL and this process use GPU `rank` only
    else:
        # torchrun sets one thread per process; mp.spawn does not, so share the cores here.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        train_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        rank: int,
        device: str,
        save_every: int,
    ) -> None:
        self.rank = rank
        self.device = f"cuda:{rank}" if device == "cuda" else device
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, one copy in memory instead of two.
        self.model = DDP(model.to(self.device), device_ids=[rank] if device == "cuda" else None, gradient_as_bucket_view=True)
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        output = self.model(source)
        loss = loss_fn(output, targets)
        loss.backward()  # DDP all-reduces (averages) the gradients here, overlapped with backward
        self.optimizer.step()
        return loss.detach(), datautils.count_correct(output, targets)

    def _run_epoch(self, epoch: int, max_epochs: int) -> None:
        start = time.perf_counter()
        self.train_data.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        loss_sum = torch.zeros((), device=self.device)  # these stay on the device: no host sync per step
        correct = torch.zeros((), device=self.device)
        samples = 0
        for source, targets in self.train_data:
            source = source.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, batch_correct = self._run_batch(source, targets)
            loss_sum += loss * len(source)
            correct += batch_correct
            samples += len(source)
        # One all-reduce per epoch turns each rank's sums into the mean loss and accuracy over all ranks.
        totals = torch.stack([loss_sum, correct, torch.tensor(float(samples), device=self.device)])
        dist.all_reduce(totals)
        mean_loss, accuracy = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        if self.rank == 0:
            accuracy_text = f" | accuracy {accuracy:.1%}" if targets.dtype == torch.long else ""  # class labels
            print(
                f"[{self.device}] Epoch {epoch + 1}/{max_epochs} | steps {len(self.train_data)} | "
                f"batch {self.train_data.batch_size} x {dist.get_world_size()} ranks | loss {mean_loss:.6f}{accuracy_text} | "
                f"{time.perf_counter() - start:.3f}s",
                flush=True,
            )

    def _save_checkpoint(self, epoch: int) -> None:
        # .module is the model inside DDP: the checkpoint loads without DDP too.
        datautils.atomic_save(self.model.module.state_dict(), CHECKPOINT_PATH)
        print(f"Epoch {epoch + 1} | checkpoint saved at {CHECKPOINT_PATH}", flush=True)

    def train(self, max_epochs: int) -> None:
        for epoch in range(max_epochs):
            self._run_epoch(epoch, max_epochs)
            # Every rank holds the same weights; rank 0 alone writes them.
            if self.rank == 0 and ((epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_checkpoint(epoch)


def prepare_dataloader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=torch.cuda.is_available(),
        shuffle=False,  # the sampler shuffles
        sampler=DistributedSampler(dataset),
    )


def main(rank: int, world_size: int, device: str, total_epochs: int, save_every: int, batch_size: int, workload: str, data_dir: str) -> None:
    ddp_setup(rank, world_size, device)
    try:
        train_set, model, optimizer = load_train_objs(workload, data_dir)
        train_data = prepare_dataloader(train_set, batch_size)
        trainer = Trainer(model, train_data, optimizer, rank, device, save_every)
        trainer.train(total_epochs)
    finally:
        # Drop DDP, and the model and optimizer whose tensors it shares, before the process group
        # it uses: otherwise the process may abort at exit ("terminate called without an active exception").
        trainer = model = optimizer = None
        gc.collect()
        destroy_process_group()


def free_port() -> str:
    """A TCP port that is free now, so two jobs on one host do not collide on a fixed port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


if __name__ == "__main__":
    parser = datautils.ArgumentParser(description="Step 2: DDP on one machine, processes started by mp.spawn.")
    parser.add_argument("total_epochs", type=datautils.positive_int, help="how many epochs to train")
    parser.add_argument("save_every", type=datautils.positive_int, help="save a checkpoint every this many epochs (and after the last)")
    parser.add_argument("--batch_size", default=32, type=datautils.positive_int, help="input batch size on each process (default: 32)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="where to train; auto picks CUDA when a GPU is visible, else CPU (default: auto)",
    )
    parser.add_argument(
        "--world_size",
        type=datautils.positive_int,
        help="how many processes; default: every visible GPU, or 2 on CPU",
    )
    datautils.add_workload_args(parser)
    args = parser.parse_args()

    device = datautils.resolve_device(args.device)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    world_size = args.world_size or gpus or 2
    if device == "cuda" and world_size > gpus:
        datautils.fail(f"--world_size {world_size} needs {world_size} GPUs but {gpus} are visible; use --world_size {gpus} or fewer")
    datautils.check_writable_folder(CHECKPOINT_PATH)
    # The spawned processes meet at MASTER_ADDR:MASTER_PORT; keep them if the caller set them.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", free_port())
    try:
        mp.spawn(
            main,
            args=(world_size, device, args.total_epochs, args.save_every, args.batch_size, args.workload, args.data_dir),
            nprocs=world_size,
        )
    except mp.ProcessExitedException as err:
        if err.exit_code > 0:  # an error the processes have already reported
            raise SystemExit(err.exit_code) from None
        datautils.fail(f"process {err.error_index} was killed by signal {-err.exit_code}")
