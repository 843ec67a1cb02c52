"""bench/'s pictures: timeline.py in a quick mode (real processes, real profiler), and how
plot_metrics.py reads a metrics file that several runs appended to."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO, python_cmd, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tables(markdown: str) -> dict[str, dict[str, str]]:
    """The rows of every markdown table, by their first cell, each a dict from column name to cell."""
    rows: dict[str, dict[str, str]] = {}
    for block in markdown.split("\n\n"):
        lines = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("|")]
        if lines:
            header = [cell.strip() for cell in lines[0]]
            for line in lines[2:]:
                row = dict(zip(header, (cell.strip() for cell in line)))
                rows.setdefault(row[header[0]], {}).update(row)
    return rows


def test_timeline_shows_the_all_reduce_overlapping_backward_only_with_buckets(tmp_path):
    out = tmp_path / "timeline"
    result = run(python_cmd("bench/timeline.py", "--steps", "2", "--batch_size", "4", "--out", str(out)), tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    rows = tables(out.with_suffix(".md").read_text())
    overlapped, one_bucket = (next(row for name, row in rows.items() if name.startswith(start)) for start in ("overlapped", "not overlapped"))
    # All-reduce time spent while backward still computes: some with DDP's buckets, none with one bucket.
    assert int(overlapped["of it under backward"].rstrip("%")) > 0, overlapped
    assert one_bucket["of it under backward"] == "0%", one_bucket
    assert len(overlapped["buckets (MB)"].split("+")) > 1 and "+" not in one_bucket["buckets (MB)"]


def test_plot_metrics_keeps_the_latest_run_from_each_step_on(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "bench" / "plot_metrics.py")
    plot_metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_metrics)

    def step(global_step: int, loss: float) -> dict:
        return {"epoch": 1, "step": global_step, "global_step": global_step, "loss": loss, "tokens_per_s": 1000.0}

    records = [step(5, 4.0), step(10, 3.0), {"epoch": 1, "global_step": 10, "test_loss": 3.1}, step(15, 2.9),
               step(15, 2.5), step(20, 2.4), {"epoch": 2, "global_step": 20, "test_loss": 2.6}]  # fmt: skip  # resumed at step 10
    path = tmp_path / "gpt_metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = plot_metrics.read(path)
    assert [(r["global_step"], r.get("loss", r.get("test_loss"))) for r in kept] == [(5, 4.0), (10, 3.0), (10, 3.1), (15, 2.5), (20, 2.4), (20, 2.6)]
    plot_metrics.plot(kept, tmp_path / "metrics.png", "test")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE
