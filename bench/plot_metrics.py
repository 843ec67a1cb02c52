"""Plot a minGPT run from its gpt_metrics.jsonl: the loss (train and test) and the throughput
(tokens/s) against the global step.

    python bench/plot_metrics.py gpt_metrics.jsonl                  # writes gpt_metrics.png beside it
    python bench/plot_metrics.py gpt_metrics.jsonl --out bench/results/mingpt_metrics_cpu.png

mingpt/main.py appends to the file, across restarts and runs. As in TensorBoard, a run that logs a
step it has logged before (a resume from an older snapshot, or a new run) replaces everything from
that step on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
from pathlib import Path
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("metrics", type=Path, help="the gpt_metrics.jsonl a minGPT run wrote")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: the metrics file with .png)")
    parser.add_argument("--title", help="a line above the plots, e.g. the run's command (default: the file's path)")
    return parser.parse_args()


def read(path: Path) -> list[dict[str, Any]]:
    """The records of the latest run, in order: step records (loss, tokens_per_s) and epoch ones (test_loss)."""
    kept: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        last_step = max((r["global_step"] for r in kept if "loss" in r), default=0)
        if "loss" in record and record["global_step"] <= last_step:  # this step again: a new run or a resume
            kept = [r for r in kept if r["global_step"] < record["global_step"]]
        kept.append(record)
    return kept


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    tests = [r for r in records if "test_loss" in r]
    if not steps:
        raise SystemExit(f"error: no step records (with a loss) in {title}")
    fig, (loss, speed) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x = [r["global_step"] for r in steps]
    loss.plot(x, [r["loss"] for r in steps], label="train (mean over the logged steps' batches)", linewidth=1)
    loss.plot([r["global_step"] for r in tests], [r["test_loss"] for r in tests], "o-", label="test (end of each epoch)")
    loss.set_ylabel("loss (cross-entropy, nats)")
    loss.legend(fontsize=8)
    rates = [r["tokens_per_s"] for r in steps]
    speed.plot(x, rates, linewidth=1, color="C2")
    median = statistics.median(rates[1:] or rates)  # the first interval warms up
    speed.axhline(median, color="grey", linestyle="--", linewidth=1, label=f"median after the first interval: {median:,.0f} tokens/s")
    speed.set_ylim(bottom=0)
    speed.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    speed.set_ylabel("tokens/s, all ranks")
    speed.set_xlabel("global step (optimizer steps)")
    speed.legend(fontsize=8, loc="lower right")
    for ax in (loss, speed):
        ax.grid(alpha=0.3)
        for test in tests[:-1]:  # where each epoch ends
            ax.axvline(test["global_step"], color="grey", linestyle=":", linewidth=1)
    loss.set_title(textwrap.fill(title, 110), fontsize=8, loc="left")  # long titles wrap, not cut off
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    out = args.out or args.metrics.with_suffix(".png")
    plot(read(args.metrics), out, args.title or str(args.metrics))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
