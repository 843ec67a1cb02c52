"""See inside DDP: a timeline of ResNet-18 training steps on 2 CPU processes (gloo), with and
without the all-reduce overlapping backward, and report.StepTimer checked against torch.profiler.

    python bench/timeline.py                                      # about 40 s on 2 idle cores
    python bench/timeline.py --steps 2 --batch_size 8 --out /tmp/timeline    # a quick look

It starts its processes with torchrun (one thread each). Every process records its steps with
torch.profiler: forward, backward, each gradient bucket's all-reduce (the `gloo:all_reduce` spans
that gloo's own threads record) and the optimizer step. Two runs, drawn one above the other:

- overlapped: DDP as it comes (25 MB buckets): a bucket is all-reduced as soon as backward has
  produced all of its gradients, while backward goes on computing the others;
- not overlapped: DDP with one bucket for all of the gradients (bucket_cap_mb=1000; they take
  43 MB), so their all-reduce can only start once backward has ended.

Every other step runs under `model.no_sync()`, which skips the all-reduce, so the cost of
communication can also be read as (synced step - no_sync step). report.StepTimer times the same
steps; the tables set its exposed communication beside the profiler's.

Writes OUT.png (the timelines) and OUT.md (the tables); OUT is bench/results/timeline_cpu by default.
MB are DDP's (2**20 bytes), as in bucket_cap_mb.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repository root holds datautils.py and support/

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import datautils  # noqa: E402
from support import launch  # noqa: E402, F401  (imported before the process group exists, so that it can be freed: see launch.py)
from support.report import StepTimer  # noqa: E402

# DDP's bucket_cap_mb for each run. None: DDP's default, 25 MB. 1000 MB holds all of ResNet-18's 43 MB.
RUNS = {"overlapped (DDP's 25 MB buckets)": None, "not overlapped (one bucket, bucket_cap_mb=1000)": 1000}
ALL_REDUCE = {"gloo:all_reduce", "nccl:all_reduce"}  # what the process group records for each bucket
BROADCAST = {"gloo:broadcast", "nccl:broadcast"}  # DDP's forward sends rank 0's BatchNorm buffers
BACKWARD_OP = "autograd::engine::evaluate_function: "
# Runs last for each gradient and calls DDP's hook, which marks the gradient ready in its bucket and
# hands a bucket whose gradients are all ready to the all-reduce: DDP's bookkeeping, not computation.
HANDS_OVER = BACKWARD_OP + "torch::autograd::AccumulateGrad"
COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "exposed": "#C44E52", "optimizer": "#55A868", "all-reduce": "#8172B3", "broadcast": "#999999"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="profiled steps per run, every other one under no_sync (default: 20)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the profiled ones; DDP orders its buckets in the first (default: 2)")
    parser.add_argument("--batch_size", type=int, default=32, help="images per process and step (default: 32)")
    parser.add_argument("--nproc", type=int, default=2, help="processes, one CPU thread each (default: 2)")
    default_out = REPO / "bench" / "results" / "timeline_cpu"
    parser.add_argument("--out", type=Path, default=default_out, help="writes OUT.png and OUT.md (default: bench/results/timeline_cpu)")
    args = parser.parse_args()
    if args.steps < 2 or args.warmup < 2:
        parser.error("--steps and --warmup must be 2 or more: a synced and a no_sync step; DDP's buckets are final after the first step")
    return args


# ---- in each process -------------------------------------------------------------------------


def stepper(bucket_cap_mb: float | None, batch_size: int) -> Callable[[bool], dict[str, float]]:
    """A DDP ResNet-18 and a function that trains it one step, synced or not, and returns
    StepTimer's split of that step (ms)."""
    train_set, _, model, optimizer = datautils.load_train_objs(datautils.Workload("images", "fake"))  # seeded: the same weights on every rank
    source, targets = next(iter(torch.utils.data.DataLoader(train_set, batch_size=batch_size)))  # one batch, reused: no data loading in the picture
    model = DDP(model, bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True)  # one copy of the gradients: the buckets
    timer = StepTimer(model, optimizer, "cpu")

    def step(sync: bool) -> dict[str, float]:
        for _ in timer.timed([None]):  # a stretch of one step
            optimizer.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if sync else model.no_sync():  # no_sync: backward all-reduces nothing
                with record_function("forward"):
                    loss = datautils.loss_fn(model(source), targets)
                with record_function("backward"):
                    loss.backward()  # returns once DDP has every bucket's all-reduce back
            with record_function("optimizer"):
                optimizer.step()
        return {part: seconds * 1e3 for part, seconds in timer.split().items() if part != "steps"}

    return step


def profile_runs(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Each run's steps under the profiler: per step, its spans (ms) and StepTimer's split.

    The runs take turns step by step, so that other work that comes and goes on the machine
    slows them alike. Every step starts on all ranks together, after a barrier: no rank carries
    a wait for another over from the step before (a no_sync step would leave it to the next)."""
    steppers = {name: stepper(cap, args.batch_size) for name, cap in RUNS.items()}
    for _ in range(args.warmup):
        for step in steppers.values():
            step(True)
    splits: dict[str, list[dict[str, float]]] = {name: [] for name in RUNS}
    # record_shapes: each bucket's size. acc_events: one cycle, so nothing to clear (torch 2.11 warns without it).
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, acc_events=True) as prof:
        dist.barrier()
        with record_function("zero"):  # each rank's times count from here
            pass
        for i in range(args.steps):
            for name, step in steppers.items():
                dist.barrier()  # the ranks leave it together
                with record_function(f"{name} step {i}"):
                    splits[name].append(step(sync=i % 2 == 0))
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return {name: spans(events, name, splits[name]) for name in RUNS}


def spans(events: list[Any], run: str, splits: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Each step's spans in ms from the barrier, read from the profiler's events (sorted by start)."""
    starts = [e.time_range.start for e in events]
    zero = next(e for e in events if e.name == "zero").time_range.start

    def ms(t: float) -> float:
        return (t - zero) / 1e3

    steps = []
    for i, split in enumerate(splits):
        window = next(e.time_range for e in events if e.name == f"{run} step {i}")
        candidates = events[bisect.bisect_left(starts, window.start) : bisect.bisect_right(starts, window.end)]
        inside = [e for e in candidates if e.time_range.end <= window.end]
        first = {e.name: e for e in reversed(inside)}  # this step's forward, backward, optimizer
        forward, backward, optimizer = first["forward"], first["backward"], first["optimizer"]
        computed = [e for e in inside if e.name.startswith(BACKWARD_OP) and e.name != HANDS_OVER and e.thread == backward.thread]
        grads_done = max(e.time_range.end for e in computed)  # the last gradient computed
        comm = [
            (ms(e.time_range.start), ms(e.time_range.end), e.name in ALL_REDUCE, 4 * sum(map(math.prod, e.input_shapes)) / 2**20)
            for e in inside
            if e.name in ALL_REDUCE | BROADCAST
        ]  # (start, end, is an all-reduce, MB of float32)
        if i % 2 == 0 and not any(is_reduce for _, _, is_reduce, _ in comm):
            names = sorted({e.name for e in inside if "reduce" in e.name.lower()})
            raise RuntimeError(f"no {' or '.join(sorted(ALL_REDUCE))} span in a synced step; this torch records {names}")
        steps.append({
            "sync": i % 2 == 0,
            "forward": (ms(forward.time_range.start), ms(forward.time_range.end)),
            "backward": (ms(backward.time_range.start), ms(grads_done)),
            "exposed": (ms(grads_done), ms(optimizer.time_range.start)),  # backward has returned when the optimizer starts
            "optimizer": (ms(optimizer.time_range.start), ms(optimizer.time_range.end)),
            "comm": sorted(comm),
            "step_ms": (window.end - window.start) / 1e3,
            "timer": split,
        })  # fmt: skip
    return steps


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one core per process, as torchrun's default
    dist.init_process_group("gloo")
    runs = profile_runs(args)
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(runs, gathered)  # rank 0 draws every rank's steps
    if dist.get_rank() == 0:
        by_run = {name: [ranks[name] for ranks in gathered] for name in RUNS}  # run -> rank -> steps
        table = summary(by_run, args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table)
        print(table)
        caption = f"DDP, ResNet-18, batch {args.batch_size} per rank, {args.nproc} CPU processes x 1 thread, gloo, torch {torch.__version__}"
        draw(by_run, args.out.with_suffix(".png"), caption)
        print(f"written to {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    dist.destroy_process_group()


# ---- the table and the picture, on rank 0 ----------------------------------------------------


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as disjoint ones: gloo all-reduces two buckets at once on its two threads."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def covered(intervals: list[tuple[float, float]], start: float = float("-inf"), end: float = float("inf")) -> float:
    """How long at least one of the intervals lasts between start and end."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in merged(intervals))


def all_reduces(step: dict[str, Any]) -> list[tuple[float, float]]:
    return [(a, b) for a, b, is_reduce, _ in step["comm"] if is_reduce]


LOAD_AT_START = os.getloadavg()[0]  # of the machine, over the last minute


def summary(by_run: dict[str, list[list[dict]]], args: argparse.Namespace) -> str:
    """Two tables of medians over the synced (or no_sync) steps of every rank: where the
    all-reduce runs, and what it costs a step measured three ways."""
    where = [
        "| run | buckets (MB) | all-reduce busy | of it under backward | backward: synced / no_sync step |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    cost = [
        "| run | synced step | no_sync step | synced - no_sync | exposed comm: profiler | exposed comm: StepTimer | StepTimer / profiler | most apart |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, ranks in by_run.items():
        synced = [s for steps in ranks for s in steps if s["sync"]]
        # Each synced step with the no_sync step after it: a pair runs under the same load from
        # other work on the machine, so their difference is steadier than a difference of medians.
        pairs = [(a, b) for steps in ranks for a, b in zip(steps[::2], steps[1::2])]
        # The job's step takes as long as its slowest rank's (a no_sync step waits for no other rank).
        slowest = [max(steps[i]["timer"]["total"] for steps in ranks) for i in range(len(ranks[0]))]
        job_pairs = list(zip(slowest[::2], slowest[1::2]))
        buckets = " + ".join(f"{mb:.1f}" for *_, is_reduce, mb in synced[0]["comm"] if is_reduce)
        busy = med(covered(all_reduces(s)) for s in synced)
        hidden = med(covered(all_reduces(s), *s["backward"]) / covered(all_reduces(s)) for s in synced)
        backward = med((a["backward"][1] - a["backward"][0]) / (b["backward"][1] - b["backward"][0]) for a, b in pairs)
        where.append(f"| {name} | {buckets} | {busy:.0f} ms | {hidden:.0%} | {backward:.2f} |")

        step, no_sync = med(a for a, _ in job_pairs), med(b for _, b in job_pairs)
        extra = med(a - b for a, b in job_pairs)
        profiler = [s["exposed"][1] - s["exposed"][0] for s in synced]
        timer = [s["timer"]["comm"] for s in synced]
        ratio = med(t / p for t, p in zip(timer, profiler))  # step by step: both timed the same steps
        apart = max(abs(t - p) for t, p in zip(timer, profiler))
        shares = " | ".join(f"{ms:.0f} ms ({ms / step:.0%})" for ms in (extra, med(profiler), med(timer)))
        cost.append(f"| {name} | {step:.0f} ms | {no_sync:.0f} ms | {shares} | {ratio:.2f} | {apart:.2f} ms |")
    header = (
        f"DDP timeline, ResNet-18, batch {args.batch_size} per process, {args.nproc} processes x 1 thread, gloo, "
        f"{platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, {datetime.date.today().isoformat()}; "
        f"medians of {(args.steps + 1) // 2} synced and {args.steps // 2} no_sync steps on each of the {args.nproc} ranks, "
        f"all from one run; load average {LOAD_AT_START:.1f} as it started, {os.getloadavg()[0]:.1f} as it ended "
        "(other work on the machine slows steps unevenly)."
    )
    return "\n".join([
        header,
        "",
        "Where the gradient all-reduce runs:",
        "",
        *where,
        "",
        "- all-reduce busy: time in which at least one bucket is being all-reduced (gloo runs two at once; a",
        "  rank's span starts when it hands the bucket over, so it includes waiting for the other rank to);",
        "  under backward: the share of it before the last gradient is computed, i.e. overlapped.",
        "- backward: its computation (from its start to the last gradient computed) in a synced step over the",
        "  no_sync step after it.",
        "",
        "What it costs a step, three ways (in brackets: share of the synced step):",
        "",
        *cost,
        "",
        "- synced step, no_sync step: the slowest rank's (StepTimer's total), as the job waits for it.",
        "- synced - no_sync: all that the all-reduce costs, hidden or not (no_sync skips it); the median of the",
        "  differences between each synced step and the no_sync step after it.",
        "- exposed comm, profiler: from the end of the last backward op that computes a gradient to the start of",
        "  the optimizer step, read from torch.profiler's trace. On each rank, so it also counts the wait for",
        "  a rank whose backward ended later.",
        "- exposed comm, StepTimer: report.StepTimer's figure for the same steps: from DDP handing the last bucket",
        "  to the all-reduce (a communication hook) to the optimizer step (a pre-hook). The ratio is the median of",
        "  the per-step ratios; most apart: the largest difference between the two in any step.",
    ]) + "\n"  # fmt: skip


def med(values: Any) -> float:
    return statistics.median(list(values))


def rows(comm: list[tuple[float, float, bool, float]]) -> list[int]:
    """A row for each span such that spans in one row do not overlap (gloo runs two at once)."""
    ends: list[float] = []
    out = []
    for a, b, *_ in comm:
        row = next((i for i, end in enumerate(ends) if end <= a), len(ends))
        ends[row : row + 1] = [b]
        out.append(row)
    return out


def draw(by_run: dict[str, list[list[dict]]], path: Path, caption: str) -> None:
    """One panel per run, two lanes per rank (its main thread, its gloo threads); one synced step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = len(next(iter(by_run.values())))
    fig, axes = plt.subplots(len(by_run), 1, figsize=(11, 1.8 + 1.2 * ranks * len(by_run)), sharex=True)
    drawn = {}  # run -> the synced step of median length on rank 0, drawn for every rank
    for name, per_rank in by_run.items():
        synced = sorted((s["step_ms"], i) for i, s in enumerate(per_rank[0]) if s["sync"])
        drawn[name] = synced[len(synced) // 2][1]

    def extent(name: str) -> tuple[float, float]:
        """When the drawn step starts on its first rank and ends on its last."""
        steps = [per_rank[drawn[name]] for per_rank in by_run[name]]
        return min(s["forward"][0] for s in steps), max(s["optimizer"][1] for s in steps)

    width = max(end - start for start, end in map(extent, by_run))
    for ax, (name, per_rank) in zip(axes, by_run.items()):
        index = drawn[name]
        origin = extent(name)[0]
        ticks = []
        for rank, steps in enumerate(per_rank):
            s = steps[index]
            main, comm = 2 * (ranks - rank) - 1, 2 * (ranks - rank) - 2  # rank 0 on top
            ticks += [(main, f"rank {rank}\nmain thread"), (comm, f"rank {rank}\ngloo threads")]
            for kind in ("forward", "backward", "exposed", "optimizer"):
                a, b = s[kind]
                ax.broken_barh([(a - origin, b - a)], (main - 0.35, 0.7), color=COLOURS[kind])
            packed = rows(s["comm"])
            height = 0.7 / (max(packed) + 1)
            for (a, b, is_reduce, mb), row in zip(s["comm"], packed):
                bottom = comm + 0.35 - (row + 1) * height
                colour = COLOURS["all-reduce" if is_reduce else "broadcast"]
                ax.broken_barh([(a - origin, b - a)], (bottom, height), color=colour, edgecolor="white", linewidth=0.5)
                if is_reduce and b - a > 0.04 * width:  # a label that fits in its bar
                    ax.text((a + b) / 2 - origin, bottom + height / 2, f"{mb:.0f} MB", ha="center", va="center", color="white", fontsize=7)
        ax.set_yticks([y for y, _ in ticks], [text for _, text in ticks], fontsize=8)
        ax.set_ylim(-0.6, 2 * ranks - 0.4)
        step = med(steps[index]["timer"]["total"] for steps in per_rank)
        exposed = med(steps[index]["timer"]["comm"] for steps in per_rank)
        title = f"{name}: this step {step:.0f} ms, {exposed:.0f} ms of it waiting for the all-reduce (StepTimer, median of the ranks)"
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlim(0, width * 1.02)
    axes[-1].set_xlabel("ms since the step started (the ranks leave a barrier together before each step)")
    legend = {
        "forward": "forward", "backward": "backward, computing gradients", "exposed": "waiting for the all-reduce (exposed)",
        "optimizer": "optimizer step", "all-reduce": "all-reduce of a gradient bucket", "broadcast": "broadcast of BatchNorm buffers (as forward starts)",
    }  # fmt: skip
    fig.legend(handles=[Patch(color=COLOURS[k], label=v) for k, v in legend.items()], loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)


# ---- the launcher ----------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if "LOCAL_RANK" in os.environ:  # one of the processes torchrun started
        worker(args)
        return
    # Started with python: run torchrun here, which starts this script in each process. One thread
    # per process (torchrun's default too, but it warns), and the profiler's own library quiet.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", f"--nproc_per_node={args.nproc}", __file__, *sys.argv[1:]])


if __name__ == "__main__":
    main()
