"""Mistake: DDP's state_dict loaded into a plain model.  Run: python docs/examples/mistake_module_prefix.py

DDP keeps the model as its attribute `module`, so DDP's state_dict names every tensor
"module.<name>": "module.weight", not "weight". A plain model refuses those keys. Two fixes:
--save_module saves model.module.state_dict(), the model inside DDP (what the steps do);
--strip_prefix removes the prefix from a file already saved with it.
"""

import argparse
import sys

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before init_process_group: imported later, by DDP, it holds the group, and a run may abort at exit)
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.parallel import DistributedDataParallel as DDP

HINT = 'error: the keys carry DDP\'s "module." prefix; fix: save model.module.state_dict() (--save_module), or strip it (--strip_prefix)'


def saved_state(save_module: bool) -> dict[str, torch.Tensor]:
    """What a training script would save: DDP's state_dict, or with the fix, its model's."""
    model = DDP(torch.nn.Linear(4, 1))
    return model.module.state_dict() if save_module else model.state_dict()


def load_into_plain_model(state: dict[str, torch.Tensor]) -> bool:
    """Load as an evaluation script would, into the model without DDP; False, with torch's lines, if it fails."""
    try:
        torch.nn.Linear(4, 1).load_state_dict(state)
    except RuntimeError as err:
        # Spaces for torch's tabs: pasted into a README, the lines stay the same.
        torch_lines = [line.rstrip().replace("\t", "  ") for line in f"RuntimeError: {err}".splitlines()]
        print("\n".join(torch_lines), file=sys.stderr, flush=True)
        print(HINT, file=sys.stderr, flush=True)
        return False
    print("loaded into a plain torch.nn.Linear", flush=True)
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fixes = parser.add_mutually_exclusive_group()
    fixes.add_argument("--save_module", action="store_true", help="fix 1: save model.module.state_dict()")
    fixes.add_argument("--strip_prefix", action="store_true", help='fix 2: remove "module." with consume_prefix_in_state_dict_if_present')
    args = parser.parse_args()
    # DDP needs a process group; one process is enough here. HashStore: the process meets only itself, no port needed.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    state = saved_state(args.save_module)
    dist.destroy_process_group()
    print(f"saved keys: {', '.join(state)}", flush=True)
    if args.strip_prefix:
        consume_prefix_in_state_dict_if_present(state, "module.")  # in place, from every key that starts with it
        print(f"keys without the prefix: {', '.join(state)}", flush=True)
    sys.exit(0 if load_into_plain_model(state) else 1)
