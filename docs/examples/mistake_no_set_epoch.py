"""Mistake: no sampler.set_epoch.  Run: torchrun --standalone --nproc_per_node=2 docs/examples/mistake_no_set_epoch.py

DistributedSampler shuffles with its seed plus the epoch number it was last given. Never given
one, it deals the same order every epoch: each rank gets the same shard, in the same order, and
the data is shuffled once instead of every epoch. --set_epoch calls sampler.set_epoch(epoch) at the
start of each epoch, as every training loop should: a new order each epoch, the same on every rank.
"""

import argparse

import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

EPOCHS = 3
SAMPLES = 16


def shards(set_epoch: bool) -> list[list[list[int]]]:
    """For each epoch, the sample indices each rank gets, in the order it gets them."""
    sampler = DistributedSampler(range(SAMPLES))  # shuffle=True, seed=0; the rank and world size come from the process group
    dealt = []
    for epoch in range(EPOCHS):
        if set_epoch:
            sampler.set_epoch(epoch)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, list(sampler))  # rank 0 prints them all
        dealt.append(everyone)
    return dealt


def report(dealt: list[list[list[int]]]) -> None:
    for epoch, everyone in enumerate(dealt):
        print(f"epoch {epoch} | " + " | ".join(f"rank {rank}: {indices}" for rank, indices in enumerate(everyone)), flush=True)
    if all(everyone == dealt[0] for everyone in dealt):
        print("every epoch repeats epoch 0's order: call sampler.set_epoch(epoch) at the start of each epoch", flush=True)
    else:
        print("each epoch deals a new order", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set_epoch", action="store_true", help="the fix: sampler.set_epoch(epoch) at the start of each epoch")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # the sampler needs only the rank and the world size: gloo is enough, even with GPUs
    dealt = shards(args.set_epoch)
    if dist.get_rank() == 0:
        report(dealt)
    dist.destroy_process_group()
