"""Does DDP make training faster? Throughput of each workload on 1 process and on DDP at 1..N ranks.

    python bench/scaling.py                     # all workloads, up to the cores (CPU) or GPUs present
    python bench/scaling.py --workloads images --repeats 5

Workloads: `toy` (the synthetic regression: all overhead, it cannot scale), `images` (ResNet-18
on CIFAR-10-shaped FakeData) and `mingpt` (the capstone at ~3M parameters). The single-process
baseline is `single_gpu.py` for toy and images, and the 1-rank run for minGPT (which always
runs under DDP). On CPU every process gets one thread, so N ranks use N cores. Every figure is
the median of `--repeats` runs, all measured in this one invocation, side by side.

Writes bench/results/scaling_<device>.md (the table) and .png (the plot; needs matplotlib). A
workload that cannot run (minGPT without its text, say) is one error line; the others are kept.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from mingpt_throughput import REPO, RESULTS, device_slug, last_line, run_mingpt

sys.path.insert(0, str(REPO))  # run as a script: the repository root holds mingpt/
from mingpt.config import TINY_SHAKESPEARE_URL  # noqa: E402

EPOCH_LINE = re.compile(r"Epoch (\d+)/\d+ \| Batchsize: (\d+)(?: x (\d+) ranks?)? \| Steps: (\d+) .*\| ([0-9.]+)s: ", re.M)
MINGPT_SMALL = [
    "gpt_config.n_layer=4", "gpt_config.n_head=4", "gpt_config.n_embd=256", "gpt_config.dropout=0.0",
    "data_config.block_size=64", "data_config.truncate=0.002", "trainer_config.batch_size=16", "trainer_config.max_epochs=1",
    "trainer_config.log_every=5",
]  # fmt: skip
# Images at 128 per rank: at the default 32 a step computes too briefly to hide a 45 MB all-reduce
# on 2 cores (docs/scaling.md has the measurements).
STEP_ARGS = {
    "toy": ["30", "1000", "--workload", "toy"],
    "images": ["4", "1000", "--workload", "images", "--data_dir", "fake", "--batch_size", "128"],
}


class WorkloadFailed(Exception):
    """A workload could not be measured; the message says why in one line."""


def env() -> dict[str, str]:
    variables = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    if not torch.cuda.is_available():
        variables["OMP_NUM_THREADS"] = "1"  # one core per rank; the single process gets one too
    return variables


def run(cmd: list[str], folder: str) -> str:
    result = subprocess.run(cmd, cwd=folder, env=env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise WorkloadFailed(last_line(result.stderr))
    return result.stdout


def step_throughput(workload: str, ranks: int | None) -> float:
    """Samples/s over all ranks, from the epoch lines after the first (warm-up) epoch."""
    with tempfile.TemporaryDirectory() as folder:
        if ranks is None:
            cmd = [sys.executable, str(REPO / "single_gpu.py"), *STEP_ARGS[workload]]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   str(REPO / "multigpu_torchrun.py"), *STEP_ARGS[workload]]  # fmt: skip
        output = run(cmd, folder)
    rates = [int(steps) * int(batch) * int(ranks or 1) / float(seconds) for _, batch, ranks, steps, seconds in EPOCH_LINE.findall(output)[1:]]
    return statistics.median(rates)


def mingpt_throughput(ranks: int, corpus: str) -> float:
    """Tokens/s over all ranks, from the logged intervals after the first."""
    row = run_mingpt(MINGPT_SMALL, corpus, ranks)
    if "error" in row:
        raise WorkloadFailed(row["error"])
    return row["tokens_per_s"]


def measure(workload: str, ranks: int | None, repeats: int, corpus: str) -> float:
    """Median throughput of `repeats` runs; ranks None is the plain single-process trainer."""
    if workload == "mingpt" and not Path(corpus).is_file():
        raise WorkloadFailed(f"no text at {corpus}; download Tiny Shakespeare there ({TINY_SHAKESPEARE_URL}) or pass --corpus FILE")
    if workload == "mingpt":
        return statistics.median(mingpt_throughput(ranks or 1, corpus) for _ in range(repeats))
    return statistics.median(step_throughput(workload, ranks) for _ in range(repeats))


def plot(table: dict[str, dict], ranks: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, ranks, "k--", label="ideal")
    for workload, row in table.items():
        ax.plot(ranks, [row[n] / row["single"] for n in ranks], "o-", label=workload)
    ax.set(xlabel="DDP ranks", ylabel="speedup over one process", xticks=ranks)
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads", nargs="+", default=["toy", "images", "mingpt"], choices=["toy", "images", "mingpt"], help="what to measure (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported (default: 3)")
    parser.add_argument("--max_ranks", type=int, help="largest DDP size (default: GPUs present, else CPU cores)")
    parser.add_argument(
        "--corpus",
        default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
        help="text for minGPT (default: ../shared/data/tinyshakespeare.txt)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the table and plot go (default: bench/results)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    ranks = list(range(1, (args.max_ranks or (torch.cuda.device_count() if on_gpu else os.cpu_count() or 1)) + 1))
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU, {os.cpu_count()} cores, gloo, 1 thread per rank"
    title = f"{device}, torch {torch.__version__}, {datetime.date.today().isoformat()}"
    print(title, flush=True)
    table = {}
    for workload in args.workloads:
        try:
            row = {"single": measure(workload, None, args.repeats, args.corpus)}
            for n in ranks:
                row[n] = measure(workload, n, args.repeats, args.corpus)
        except WorkloadFailed as failure:
            print(f"error: {workload} not measured: {failure}", file=sys.stderr, flush=True)
            continue
        table[workload] = row
        print(workload, {k: round(v, 1) for k, v in row.items()}, flush=True)
    if not table:
        return 1

    unit = {"toy": "samples/s", "images": "samples/s", "mingpt": "tokens/s"}
    lines = [f"Scaling on {title}; median of {args.repeats} runs each.", ""]
    lines += [
        "| workload | single process | "
        + " | ".join(f"DDP x{n}" for n in ranks)
        + " | speedup x"
        + str(ranks[-1])
        + " | efficiency x"
        + str(ranks[-1])
        + " | DDP overhead at 1 rank |"
    ]
    lines += ["| --- | ---: | " + " | ".join("---:" for _ in ranks) + " | ---: | ---: | ---: |"]
    for workload, row in table.items():
        speedup = row[ranks[-1]] / row["single"]
        # minGPT always runs under DDP: its baseline is the 1-rank run, so it has no overhead to show.
        overhead = "n/a" if workload == "mingpt" else f"{1 - row[1] / row['single']:.1%}"
        cells = " | ".join(f"{row[n]:,.0f}" for n in ranks)
        lines.append(f"| {workload} ({unit[workload]}) | {row['single']:,.0f} | {cells} | {speedup:.2f} | {speedup / ranks[-1]:.2f} | {overhead} |")
    args.results.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if not on_gpu else device_slug(device)
    (args.results / f"scaling_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, ranks, args.results / f"scaling_{slug}.png", title)
    print(f"written to {args.results / f'scaling_{slug}'}.md and .png")
    return int(len(table) < len(args.workloads))  # a workload left out is a failure, however good the others


if __name__ == "__main__":
    raise SystemExit(main())
