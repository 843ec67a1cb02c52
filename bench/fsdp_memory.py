"""Memory per rank, DDP against FSDP, for the images workload (ResNet-18, SGD with momentum).

    python bench/fsdp_memory.py                 # 1, 2 and 4 processes; CUDA when a GPU is visible
    python bench/fsdp_memory.py --procs 1 2     # (on GPUs: at most one process per GPU)

Each process count is one real torchrun job: every rank builds the model as multinode.py (DDP,
gradient_as_bucket_view) and as fsdp.py (shard_model: fully_shard per block and the root) do,
takes one training step, and counts what it holds: the bytes of its parameters, gradients and
optimizer state (the local shards of FSDP's DTensors, padding included; each storage once). On
GPUs the peak of torch.cuda.max_memory_allocated over the step is measured as well; it also
holds the activations and, under FSDP, the all-gathered weights of the block being computed.
Prints the table and writes it to bench/results/fsdp_memory_{cpu,cuda}.md.
"""

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIB = 2**20
PARTS = ("params", "grads", "optimizer")


def held_bytes(tensors) -> int:
    """Bytes of the storages behind `tensors` (a DTensor's local shard), each storage counted once."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(kind: str, device: str) -> dict[str, float]:
    """One training step of ResNet-18 as `kind` ("DDP" or "FSDP") wraps it; what this rank holds, in bytes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import datautils
    import fsdp

    local = torch.device(device, int(os.environ["LOCAL_RANK"])) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(local)
    *_, model, optimizer = datautils.load_train_objs(datautils.Workload("images", "fake"))
    if kind == "FSDP":  # as fsdp.py does: shard, then make the optimizer for the shards
        fsdp.shard_model(model, device, "images")
        optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)
    model = model.to(local)
    if kind == "DDP":
        model = DDP(model, device_ids=[local.index] if device == "cuda" else None, gradient_as_bucket_view=True)
    generator = torch.Generator().manual_seed(dist.get_rank())
    source, targets = torch.randn(16, 3, 32, 32, generator=generator).to(local), torch.randint(0, 10, (16,), generator=generator).to(local)
    optimizer.zero_grad(set_to_none=True)
    datautils.loss_fn(model(source), targets).backward()
    optimizer.step()
    held = {
        "params": held_bytes(model.parameters()),
        "grads": held_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": held_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)),
    }
    if device == "cuda":
        torch.cuda.synchronize(local)
        held["peak"] = torch.cuda.max_memory_allocated(local)
    del model, optimizer
    gc.collect()
    return held


def worker(out: str, device: str) -> None:
    """One rank of a torchrun job: DDP, then FSDP; rank 0 writes every rank's counts to `out`."""
    import torch.distributed as dist

    from support import launch  # noqa: F401  before the process group exists, so that it can be freed: see launch.py

    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    mine = {kind: measure(kind, device) for kind in ("DDP", "FSDP")}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(everyone))
    dist.barrier()
    launch.end_process_group_left_up()  # destroys the group and frees what DTensor's caches keep of it


def table(results: dict[int, list[dict]], device: str) -> str:
    extra = ("peak",) if device == "cuda" else ()
    columns = [f"{kind} {part}" for kind in ("DDP", "FSDP") for part in (*PARTS, "total", *extra)]
    lines = ["| processes | rank | " + " | ".join(columns) + " | FSDP / DDP total |", "| ---: | ---: |" + " ---: |" * (len(columns) + 1)]
    for procs, ranks in results.items():
        for rank, held in enumerate(ranks):
            cells = []
            for kind in ("DDP", "FSDP"):
                values = [held[kind][part] for part in PARTS]
                cells += [f"{value / MIB:.2f}" for value in (*values, sum(values))]
                cells += [f"{held[kind][part] / MIB:.0f}" for part in extra]
            ratio = sum(held["FSDP"][p] for p in PARTS) / sum(held["DDP"][p] for p in PARTS)
            lines.append(f"| {procs} | {rank} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="process counts to measure (default: 1 2 4)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when a GPU is visible (default)")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)  # set by this script for its torchrun workers
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.worker:
        return worker(args.worker, device)
    if device == "cuda" and max(args.procs) > torch.cuda.device_count():
        parser.error(f"--procs {max(args.procs)} needs as many GPUs; {torch.cuda.device_count()} are visible")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for procs in args.procs:
            out = os.path.join(scratch, f"{procs}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", __file__, "--device", device, "--worker", out]  # fmt: skip
            subprocess.run(cmd, env=env, check=True, cwd=scratch, stdout=subprocess.DEVNULL)
            results[procs] = json.loads(Path(out).read_text())
    versions = f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ", gloo")
    text = (
        f"Memory per rank in MiB, ResNet-18 (images workload), SGD with momentum, one training step, {device}, {versions}, "
        f"{datetime.date.today()}; `python bench/fsdp_memory.py`.\n\n{table(results, device)}\n\n"
        "params, grads, optimizer: the bytes each rank holds after the step (FSDP: its shards, padding included). "
        "DDP holds everything on every rank, whatever the count; FSDP holds about 1/processes of it.\n"
    )
    print(text)
    (REPO / "bench" / "results" / f"fsdp_memory_{device}.md").write_text(text)


if __name__ == "__main__":
    main()
