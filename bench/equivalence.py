"""Do N processes train the model one does? The largest weight difference after the same steps,
one process against 2 and 4, at the same global batch of 64.

    python bench/equivalence.py                  # toy: 5 epochs; images: 1 epoch of generated images, and one gradient
    python bench/equivalence.py --device cuda --nprocs 2 4    # the same on GPUs, one per process (4 at least)

The toy differs only by float rounding. ResNet-18 does not: BatchNorm normalises each process's
part of the batch with that part's own statistics, so 2 x 32 trains another model than 1 x 64
(--sync_bn, on GPUs, computes them over the whole batch instead). Runs multigpu_torchrun.py under
torchrun, on CPU (gloo, one thread per process) unless --device cuda (NCCL, a GPU per process);
writes bench/results/equivalence_cpu.md, or equivalence_<GPU name>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mingpt_throughput import device_slug

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GLOBAL_BATCH = 64
CASES = {"toy": ["5", "5"], "images": ["1", "1", "--workload", "images", "--data_dir", "fake"]}


def device_problem(device: str, nprocs: list[int], gpus: int) -> str | None:
    """Why these process counts cannot run on `device` with this many GPUs, in one line; None if they can."""
    if device == "cpu":
        return None
    if gpus == 0:
        return "--device cuda: no CUDA GPU is visible; use --device cpu"
    if max(nprocs) > gpus:
        fix = f"pass --nprocs with counts from 2 to {gpus}" if gpus >= 2 else "compare on CPU (--device cpu)"
        return (
            f"--device cuda gives each process its own GPU: --nprocs {' '.join(map(str, nprocs))} needs {max(nprocs)}, this machine has {gpus}; {fix}"
        )
    return None


def described(device: str, gpu: str | None) -> tuple[str, str]:
    """How the table's heading names where it ran, and its file name's part for that: GPU results
    are not CPU results, and each card gets a file of its own."""
    return ("CPU, gloo", "cpu") if device == "cpu" else (f"{gpu}, a GPU per process, NCCL", device_slug(gpu))


def train(workload: str, nproc: int, folder: Path, device: str) -> dict[str, torch.Tensor]:
    """The final weights of one run of multigpu_torchrun.py on `nproc` processes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "multigpu_torchrun.py"), *CASES[workload], "--batch_size", str(GLOBAL_BATCH // nproc), "--device", device,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    result = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {workload} on {nproc} processes failed:\n{result.stderr[-2000:]}")
    return torch.load(folder / "snapshot.pt", map_location="cpu", weights_only=True)["MODEL_STATE"]


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], statistics: bool) -> tuple[float, str]:
    """The largest absolute difference between two state dicts' weights (or BatchNorm running
    statistics), and where; (0, "-") when there are none."""
    names = [name for name in a if a[name].is_floating_point() and ("running_" in name) == statistics]
    return max(((float((a[name] - b[name]).abs().max()), name) for name in names), default=(0.0, "-"))


def first_gradient_difference(batch_norm: bool) -> float:
    """ResNet-18's gradient of one batch of 64 against the mean of its two halves' gradients (what
    DDP computes on 2 processes), relative to its size: BatchNorm alone makes them differ."""
    import torchvision

    torch.manual_seed(0)
    norm = {} if batch_norm else {"norm_layer": lambda channels: torch.nn.Identity()}
    model = torchvision.models.resnet18(num_classes=10, **norm)
    source, targets = torch.randn(GLOBAL_BATCH, 3, 32, 32), torch.randint(0, 10, (GLOBAL_BATCH,))
    gradients = []
    for parts in (1, 2):
        model.zero_grad()
        for part_source, part_targets in zip(source.chunk(parts), targets.chunk(parts)):
            (torch.nn.functional.cross_entropy(model(part_source), part_targets) / parts).backward()
        gradients.append(torch.cat([param.grad.flatten() for param in model.parameters()]))
    return float((gradients[0] - gradients[1]).norm() / gradients[0].norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(CASES), choices=list(CASES), help="what to compare (default: both)")
    parser.add_argument("--nprocs", nargs="+", type=int, default=[2, 4], help="process counts to compare with one (default: 2 4)")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cpu (gloo), where only float rounding differs, or cuda (NCCL) (default: cpu)"
    )
    args = parser.parse_args()
    problem = device_problem(args.device, args.nprocs, torch.cuda.device_count())
    if problem:
        sys.exit(f"error: {problem}")

    where, slug = described(args.device, torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    lines = [
        f"Largest weight difference against 1 x {GLOBAL_BATCH}, same global batch; {where}, torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}",
        "",
        "| workload | processes x batch | largest weight difference | in | largest weight | largest BatchNorm statistics difference |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for workload in args.workloads:
        with tempfile.TemporaryDirectory() as scratch:
            folders = {n: Path(scratch, str(n)) for n in [1, *args.nprocs]}
            for folder in folders.values():
                folder.mkdir()
            one = train(workload, 1, folders[1], args.device)
            scale = max(float(t.abs().max()) for name, t in one.items() if t.is_floating_point() and "running_" not in name)
            for nproc in args.nprocs:
                other = train(workload, nproc, folders[nproc], args.device)
                difference, name = largest_difference(one, other, statistics=False)
                statistics, _ = largest_difference(one, other, statistics=True)
                shown = f"{statistics:.2e}" if workload == "images" else "none"
                lines.append(f"| {workload} | {nproc} x {GLOBAL_BATCH // nproc} | {difference:.2e} | {name} | {scale:.2f} | {shown} |")
                print(lines[-1], flush=True)
    if "images" in args.workloads:
        lines += ["", "The first gradient of ResNet-18, 1 x 64 against 2 x 32 (relative difference; in one process, on CPU):", ""]
        lines += [f"- with BatchNorm: {first_gradient_difference(True):.1e}", f"- without normalisation: {first_gradient_difference(False):.1e}"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"equivalence_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
