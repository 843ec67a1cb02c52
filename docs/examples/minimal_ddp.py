"""The smallest correct DDP training script.  Run: torchrun --standalone --nproc_per_node=2 docs/examples/minimal_ddp.py"""

import os

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before init_process_group: imported later, by DDP, it holds the group, and a run may abort at exit)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def train(device: torch.device) -> None:
    torch.manual_seed(0)  # the same data on every rank: the sampler, not the seed, splits it
    inputs = torch.randn(1024, 4)
    dataset = TensorDataset(inputs, inputs @ torch.tensor([[2.0], [-1.0], [0.5], [3.0]]) + 1.0)  # y = w.x + b, to be learned
    sampler = DistributedSampler(dataset)  # rank r takes samples r, r+N, r+2N, ... of one shuffled order
    loader = DataLoader(dataset, batch_size=32, sampler=sampler)
    model = DDP(torch.nn.Linear(4, 1).to(device))  # copies rank 0's weights to every rank, once
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(5):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for x, y in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x.to(device)), y.to(device))
            loss.backward()  # averages the gradients across ranks: every rank takes the same step
            optimizer.step()
        loss = loss.detach()
        dist.all_reduce(loss)  # the last batch's loss, summed over the ranks; a collective: every rank must call it
        if dist.get_rank() == 0:
            print(f"epoch {epoch} | loss {loss.item() / dist.get_world_size():.6f}", flush=True)
    if dist.get_rank() == 0:  # the same weights on every rank: one saves them, the model inside DDP
        torch.save(model.module.state_dict(), "model.pt")


if __name__ == "__main__":
    local_rank = int(os.environ["LOCAL_RANK"])  # torchrun sets LOCAL_RANK, RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init: NCCL then uses this process's GPU only
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    train(device)
    dist.destroy_process_group()  # after train() returned, so that DDP no longer holds the group
