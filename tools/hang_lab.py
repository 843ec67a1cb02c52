"""The hang lab: two classic ways to hang a DDP job, reproduced on CPU in seconds, and their fixes.

    torchrun --standalone --nproc_per_node=2 tools/hang_lab.py uneven_batches            # hangs until --timeout
    torchrun --standalone --nproc_per_node=2 tools/hang_lab.py uneven_batches --fixed    # does not
    TORCH_DISTRIBUTED_DEBUG=DETAIL torchrun --standalone --nproc_per_node=2 tools/hang_lab.py rank0_evaluation

Every rank must run the same collectives in the same order. uneven_batches: the ranks get shards
of different sizes, so one runs a training step more, and its gradient all-reduce waits for ranks
that have moved on. rank0_evaluation: only rank 0 evaluates, and the evaluation all-reduces its
sums, which the other ranks never join. Either way the job waits until the process group's
timeout (short here: --timeout), then one line says where each rank was.

The gradients are averaged here by hand, one all-reduce per parameter (what DDP does in
buckets, overlapped with backward): with DDP, TORCH_DISTRIBUTED_DEBUG=DETAIL crashed DDP's
constructor on CPU in torch 2.14.1, and this lab shows what DETAIL reports.
"""

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root holds datautils.py and support/
import datautils  # noqa: E402
from datautils import MyTrainDataset, loss_fn  # noqa: E402
from support import cli, launch  # noqa: E402

SAMPLES = 101  # an odd number: 2 ranks get 51 and 50 samples unless the sampler evens them out
BATCH = 10


def prepare_dataloader(dataset: Dataset, uneven: bool) -> DataLoader:
    """uneven: every world_size-th sample, as evaluation rightly does, wrongly used for training."""
    sampler = range(dist.get_rank(), len(dataset), dist.get_world_size()) if uneven else DistributedSampler(dataset)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=datautils.collate)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(source), targets)
    loss.backward()
    for param in model.parameters():  # average the gradients over the ranks, one all-reduce each
        dist.all_reduce(param.grad)
        param.grad /= dist.get_world_size()
    optimizer.step()
    return loss.detach()


def evaluate(model: torch.nn.Module, data: DataLoader) -> float:
    """The mean loss over every rank's shard: a collective, so every rank must call it."""
    sums = torch.zeros(2)
    with torch.no_grad():
        for source, targets in data:
            sums += torch.stack([loss_fn(model(source), targets, reduction="sum"), torch.tensor(float(len(targets)))])
    dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def main(case: str, fixed: bool, epochs: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train_data = prepare_dataloader(MyTrainDataset(SAMPLES), uneven=case == "uneven_batches" and not fixed)
    val_data = prepare_dataloader(MyTrainDataset(SAMPLES, seed=1), uneven=True)  # evaluation: each sample once
    rank = dist.get_rank()
    for epoch in range(epochs):
        steps = 0
        for source, targets in train_data:
            train_step(model, optimizer, source, targets)
            steps += 1
        if case == "rank0_evaluation" and not fixed:
            if rank == 0:  # the mistake: the other ranks never join evaluate's all-reduce
                print(f"epoch {epoch + 1}: {steps} steps on rank 0 | val loss {evaluate(model, val_data):.4f}", flush=True)
            continue
        val_loss = evaluate(model, val_data)  # every rank evaluates its shard
        if rank == 0:
            print(f"epoch {epoch + 1}: {steps} steps on rank 0 | val loss {val_loss:.4f}", flush=True)


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("case", choices=["uneven_batches", "rank0_evaluation"], help="which hang to reproduce")
    parser.add_argument("--fixed", action="store_true", help="run the fix instead: it does not hang")
    parser.add_argument("--epochs", type=cli.positive_int, default=2, help="epochs of training (default: 2)")
    parser.add_argument(
        "--timeout", type=cli.seconds, default=datetime.timedelta(seconds=5), metavar="SECONDS", help="how long a collective waits (default: 5)"
    )
    args = parser.parse_args()
    # Also: a collective that times out, or that the ranks call differently, ends in one line saying where each rank was.
    launch.torchrun_worker("cpu", "torchrun --standalone --nproc_per_node=2 tools/hang_lab.py uneven_batches")
    dist.init_process_group("gloo", timeout=args.timeout)
    main(args.case, args.fixed, args.epochs)
    dist.destroy_process_group()
