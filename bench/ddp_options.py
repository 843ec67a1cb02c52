"""Time ResNet-18 training steps under DDP options, on synthetic tensors (no data loading).

    torchrun --standalone --nproc_per_node=1 bench/ddp_options.py --no_ddp        # the plain model
    torchrun --standalone --nproc_per_node=2 bench/ddp_options.py --bucket_cap_mb 100 --batch_size 128

Prints rank 0's mean step time and the samples/s of all ranks. docs/scaling.md reports what it
measured on this project's 2-core CPU machine (OMP_NUM_THREADS=1, torchrun's default).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import launch  # noqa: E402, F401  (before the process group exists, so that it can be freed: see launch.py)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--no_ddp", action="store_true", help="train the plain model (the baseline)")
parser.add_argument("--gradient_as_bucket_view", action="store_true", help="DDP's gradient_as_bucket_view=True")
parser.add_argument("--bucket_cap_mb", type=float, default=25, help="DDP's bucket size in MB (default: 25, DDP's own)")
parser.add_argument("--bf16_hook", action="store_true", help="all-reduce gradients in bf16 (a DDP communication hook)")
parser.add_argument("--batch_size", type=int, default=32, help="per rank (default: 32)")
parser.add_argument("--steps", type=int, default=15, help="timed steps, after 3 warm-up steps (default: 15)")
args = parser.parse_args()

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
if not args.no_ddp:
    model = DDP(model, gradient_as_bucket_view=args.gradient_as_bucket_view, bucket_cap_mb=args.bucket_cap_mb)
    if args.bf16_hook:
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
source, targets = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))


def step() -> None:
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(source), targets).backward()
    optimizer.step()


for _ in range(3):
    step()
dist.barrier()
start = time.perf_counter()
for _ in range(args.steps):
    step()
dist.barrier()
seconds = (time.perf_counter() - start) / args.steps
if dist.get_rank() == 0:
    print(f"{dist.get_world_size()} rank(s): {seconds * 1e3:.1f} ms/step, {args.batch_size * dist.get_world_size() / seconds:.1f} samples/s")
dist.destroy_process_group()
