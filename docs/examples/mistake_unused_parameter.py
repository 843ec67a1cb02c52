"""Mistake: a parameter that gets no gradient.  Run: torchrun --standalone --nproc_per_node=2 docs/examples/mistake_unused_parameter.py

The model has a layer that forward never uses. In backward, DDP all-reduces each gradient once it
is ready and waits for all of them; the unused layer's never come, so that reduction never
finishes, and the next iteration stops with an error. --find_unused_parameters shows the fix:
DDP then looks for such parameters after each forward and stops waiting for them. Removing the
unused layer fixes it too, and costs nothing per step.
"""

import argparse
import os
import re
import sys

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before init_process_group: imported later, by DDP, it holds the group, and a run may abort at exit)
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 5


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(4, 1)
        self.unused = torch.nn.Linear(4, 1)  # say, a head for another task, left in the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def train(device: torch.device, find_unused_parameters: bool) -> bool:
    """Train STEPS steps; False if DDP stopped it, after rank 0 has said why."""
    model = DDP(TwoHeads().to(device), find_unused_parameters=find_unused_parameters)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        for step in range(1, STEPS + 1):
            optimizer.zero_grad()
            model(torch.randn(8, 4, device=device)).pow(2).mean().backward()
            optimizer.step()
            if dist.get_rank() == 0:
                print(f"step {step} done", flush=True)
    except RuntimeError as err:
        if "Expected to have finished reduction" not in str(err):
            raise  # not the mistake shown here
        if dist.get_rank() == 0:  # every rank fails the same way: rank 0 speaks
            explain(err, [name for name, _ in model.module.named_parameters()])
        return False
    if dist.get_rank() == 0:
        no_grad = ", ".join(name for name, p in model.module.named_parameters() if p.grad is None)
        print(f"trained {STEPS} steps with find_unused_parameters=True; no gradient, so no update, for: {no_grad}", flush=True)
    return True


def explain(err: RuntimeError, names: list[str]) -> None:
    """The error's first sentence, the line to recognise, then which parameters it means: torch gives their indices."""
    text = str(err)
    print(f"RuntimeError: {text.split('. ')[0]}.", file=sys.stderr, flush=True)
    unused = re.search(r"did not receive grad for rank \d+: ([\d ]+)", text)
    which = ", ".join(names[int(i)] for i in unused[1].split()) if unused else "some parameters"
    print(f"error: {which} got no gradient; fix: find_unused_parameters=True (--find_unused_parameters), or remove them", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--find_unused_parameters", action="store_true", help="the fix: DDP(model, find_unused_parameters=True)")
    args = parser.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    trained = train(device, args.find_unused_parameters)
    dist.barrier()  # no rank exits (and so has torchrun stop the others) before rank 0 has printed
    dist.destroy_process_group()
    sys.exit(0 if trained else 1)
