"""Step 4: the same training on several machines (nodes).

    # on every node, with the same --rdzv_id and --rdzv_endpoint (an address of the first node):
    torchrun --nnodes=2 --nproc_per_node=gpu --max-restarts=3 --rdzv_id=456 \
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29603 multinode.py 50 10

New in this step: two ranks. LOCAL_RANK numbers the processes on one node and picks the GPU;
RANK numbers them across the whole job and decides who prints and saves. Nodes need not share
a file system: only global rank 0 reads and writes the snapshot, and it broadcasts what it
read so that every rank resumes from the same epoch and state. SIGUSR1 (Slurm's warning before a
time limit, passed on by slurm/sbatch_run.sh) stops every rank after the same epoch, with a snapshot.
"""

import gc
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import datautils
from datautils import load_train_objs, loss_fn

STOP_REQUESTED = threading.Event()  # set by SIGUSR1: stop after this epoch, with a snapshot


def ddp_setup(device: str) -> None:
    """Join the process group; torchrun has set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT."""
    if device == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            datautils.fail(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower --nproc_per_node")
        torch.cuda.set_device(local_rank)  # before init, so NCCL and this process use this GPU only
    init_process_group(backend="nccl" if device == "cuda" else "gloo")


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        train_data: DataLoader,
        optimizer: torch.optim.Optimizer,
        device: str,
        save_every: int,
        snapshot_path: str,
        simulate_failure_at: int | None = None,
    ) -> None:
        self.local_rank = int(os.environ["LOCAL_RANK"])  # this process on this node: picks the GPU
        self.global_rank = int(os.environ["RANK"])  # this process in the whole job: decides who saves
        self.device = f"cuda:{self.local_rank}" if device == "cuda" else device
        self.model = model.to(self.device)
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.snapshot_path = snapshot_path
        self.simulate_failure_at = simulate_failure_at
        self.epochs_run = 0
        self._load_snapshot(snapshot_path)
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, one copy in memory instead of two.
        self.model = DDP(self.model, device_ids=[self.local_rank] if device == "cuda" else None, gradient_as_bucket_view=True)

    def _load_snapshot(self, snapshot_path: str) -> None:
        # Only the node of global rank 0 is sure to have the file (no shared file system), so
        # rank 0 reads it and broadcasts it: a snapshot, None (no file) or an error message,
        # so that no rank is left waiting and all agree on the epochs left.
        message = [None]
        if self.global_rank == 0 and os.path.exists(snapshot_path):
            try:  # onto the CPU: a tensor broadcast as an object would arrive on rank 0's GPU
                message[0] = datautils.read_snapshot(snapshot_path, map_location="cpu")
            except datautils.SnapshotError as err:
                message[0] = str(err)
        dist.broadcast_object_list(message, src=0)
        snapshot = message[0]
        if isinstance(snapshot, str):
            raise datautils.SnapshotError(snapshot)
        if snapshot is None:
            return
        self.epochs_run = datautils.restore_snapshot(snapshot, snapshot_path, self.model, self.optimizer)
        if self.global_rank == 0:
            print(f"Resuming from {snapshot_path}: {self.epochs_run} epochs done", flush=True)

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        output = self.model(source)
        loss = loss_fn(output, targets)
        loss.backward()  # DDP all-reduces (averages) the gradients here, overlapped with backward
        self.optimizer.step()
        return loss.detach(), datautils.count_correct(output, targets)

    def _run_epoch(self, epoch: int, max_epochs: int) -> bool:
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
        # One all-reduce per epoch turns each rank's sums into the mean loss and accuracy over all ranks,
        # and counts the ranks asked to stop: any one of them, and all stop after this same epoch.
        stop = torch.tensor(float(STOP_REQUESTED.is_set()), device=self.device)
        totals = torch.stack([loss_sum, correct, torch.tensor(float(samples), device=self.device), stop])
        dist.all_reduce(totals)
        mean_loss, accuracy = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        if self.global_rank == 0:
            accuracy_text = f" | accuracy {accuracy:.1%}" if targets.dtype == torch.long else ""  # class labels
            print(
                f"[{self.device}] Epoch {epoch + 1}/{max_epochs} | steps {len(self.train_data)} | "
                f"batch {self.train_data.batch_size} x {dist.get_world_size()} ranks | loss {mean_loss:.6f}{accuracy_text} | "
                f"{time.perf_counter() - start:.3f}s",
                flush=True,
            )
        return bool(totals[3] > 0)

    def _save_snapshot(self, epoch: int) -> None:
        snapshot = {
            "MODEL_STATE": self.model.module.state_dict(),
            "OPTIMIZER_STATE": self.optimizer.state_dict(),
            "EPOCHS_RUN": epoch + 1,  # epochs completed: a resume starts at this epoch index
        }
        datautils.atomic_save(snapshot, self.snapshot_path)
        print(f"Epoch {epoch + 1} | snapshot saved at {self.snapshot_path}", flush=True)

    def _simulate_failure(self, epoch: int) -> None:
        # --simulate_failure_at: the last rank dies at the start of that epoch, like a crashed GPU
        # or an OOM kill (no cleanup), but only on torchrun's first attempt, so the restart succeeds.
        dist.barrier()  # rank 0 has printed the previous epoch's line: the crash report comes after it
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 and rank == world_size - 1:
            print(f"Rank {rank}: simulated crash at the start of epoch {epoch + 1} (--simulate_failure_at)", flush=True)
            os._exit(1)

    def train(self, max_epochs: int) -> None:
        if self.epochs_run >= max_epochs and self.global_rank == 0:
            print(f"Nothing to train: the snapshot has {self.epochs_run} of {max_epochs} epochs done", flush=True)
        for epoch in range(self.epochs_run, max_epochs):
            if epoch + 1 == self.simulate_failure_at:
                self._simulate_failure(epoch)
            stop = self._run_epoch(epoch, max_epochs)
            # Every rank holds the same weights; global rank 0 alone writes them, on its node.
            if self.global_rank == 0 and (stop or (epoch + 1) % self.save_every == 0 or epoch + 1 == max_epochs):
                self._save_snapshot(epoch)
            if stop:
                if self.global_rank == 0:
                    print(f"Stopped after epoch {epoch + 1} on SIGUSR1; a new run resumes from the snapshot", flush=True)
                return


def prepare_dataloader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=torch.cuda.is_available(),
        shuffle=False,  # the sampler shuffles
        sampler=DistributedSampler(dataset),
    )


def main(
    device: str,
    total_epochs: int,
    save_every: int,
    batch_size: int,
    snapshot_path: str,
    workload: str,
    data_dir: str,
    simulate_failure_at: int | None,
) -> None:
    # torchrun and Slurm stop workers with SIGTERM. As SystemExit it unwinds through `finally`:
    # the process group is destroyed, and a snapshot being written is finished or discarded whole.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # SIGUSR1 asks for a stop without losing work: the ranks agree on it at the end of an epoch.
    signal.signal(signal.SIGUSR1, lambda signum, frame: STOP_REQUESTED.set())
    ddp_setup(device)
    try:
        train_set, model, optimizer = load_train_objs(workload, data_dir)
        train_data = prepare_dataloader(train_set, batch_size)
        trainer = Trainer(model, train_data, optimizer, device, save_every, snapshot_path, simulate_failure_at)
        trainer.train(total_epochs)
    except datautils.SnapshotError as err:
        datautils.fail(str(err))
    finally:
        # Drop DDP, and the model and optimizer whose tensors it shares, before the process group
        # it uses: otherwise the process may abort at exit ("terminate called without an active exception").
        trainer = model = optimizer = None
        gc.collect()
        destroy_process_group()


if __name__ == "__main__":
    parser = datautils.ArgumentParser(description="Step 4: DDP on several nodes, launched by torchrun on each.")
    parser.add_argument("total_epochs", type=datautils.positive_int, help="how many epochs to train")
    parser.add_argument("save_every", type=datautils.positive_int, help="save a snapshot every this many epochs (and after the last)")
    parser.add_argument("--batch_size", default=32, type=datautils.positive_int, help="input batch size on each process (default: 32)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cuda", "cpu"],
        help="where to train; auto picks CUDA when a GPU is visible, else CPU (default: auto)",
    )
    parser.add_argument(
        "--snapshot_path",
        default="snapshot.pt",
        help="snapshot file on the node of global rank 0, to resume from and save to; its folder must exist there (default: snapshot.pt)",
    )
    parser.add_argument(
        "--simulate_failure_at",
        type=datautils.positive_int,
        metavar="EPOCH",
        help="to watch fault tolerance: the last rank crashes when this epoch starts, on torchrun's first attempt "
        "only; with --max-restarts, torchrun restarts the workers and they resume from the snapshot",
    )
    datautils.add_workload_args(parser)
    args = parser.parse_args()
    if args.simulate_failure_at is not None and args.simulate_failure_at > args.total_epochs:
        parser.error(f"argument --simulate_failure_at: epoch {args.simulate_failure_at} never comes in {args.total_epochs} epochs")

    if "LOCAL_RANK" not in os.environ:
        datautils.fail(
            "this step is launched by torchrun on every node, not python: torchrun --nnodes=2 "
            "--nproc_per_node=gpu --rdzv_id=456 --rdzv_backend=c10d --rdzv_endpoint=HOST:29603 multinode.py 50 10"
        )
    device = datautils.resolve_device(args.device)
    if datautils.is_rank_zero():  # the other nodes never write the snapshot, nor need its folder
        datautils.check_writable_folder(args.snapshot_path)
    main(
        device,
        args.total_epochs,
        args.save_every,
        args.batch_size,
        args.snapshot_path,
        args.workload,
        args.data_dir,
        args.simulate_failure_at,
    )
