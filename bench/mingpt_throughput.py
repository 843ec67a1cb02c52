"""Throughput and MFU of the minGPT trainer, measured through the real `mingpt/main.py`.

    python bench/mingpt_throughput.py --data ../shared/data/tinyshakespeare.txt            # GPU: default + GPT-2 small
    python bench/mingpt_throughput.py --data ../shared/data/tinyshakespeare.txt --cases cpu-small

Each case is one torchrun job; tokens/s (of the whole job) and MFU (of each GPU) are the medians
of its logged intervals after the first (warm-up, compilation). The table goes to stdout and to
bench/results/mingpt_<device>.md (or --out). bench/gpu_check.sh runs the GPU cases in parts.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repository root holds support/
from mingpt.config import TINY_SHAKESPEARE_URL  # noqa: E402
from support import cli  # noqa: E402

RESULTS = REPO / "bench" / "results"

EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]: )?((?:\w+\.)*\w+(?:Error|Exception): \S.*)")  # not torchrun's empty ChildFailedError
# name -> config overrides. Each case trains a bounded number of steps.
CASES = {
    "default": ["trainer_config.max_epochs=1", "data_config.truncate=0.3", "trainer_config.log_every=20"],
    "default+compile": ["trainer_config.max_epochs=1", "data_config.truncate=0.3", "trainer_config.log_every=20", "trainer_config.compile=true"],
    "default+fsdp": [
        "trainer_config.max_epochs=1", "data_config.truncate=0.3", "trainer_config.log_every=20",
        "trainer_config.strategy=fsdp", "trainer_config.snapshot_path=gpt.dcp",
    ],
    # ~3,100 steps of 16 x 1024 tokens on one GPU: with its compilation, one part of gpu_check.sh
    "gpt2-small+compile": [
        "gpt_config.n_layer=12", "gpt_config.n_head=12", "gpt_config.n_embd=768", "data_config.block_size=1024",
        "trainer_config.batch_size=16", "trainer_config.max_epochs=1", "data_config.truncate=0.05",
        "trainer_config.log_every=10", "trainer_config.compile=true", "gpt_config.dropout=0.0",
    ],
    "cpu-small": [
        "gpt_config.n_layer=2", "gpt_config.n_head=4", "gpt_config.n_embd=128", "data_config.block_size=64",
        "trainer_config.batch_size=32", "trainer_config.max_epochs=1", "data_config.truncate=0.02", "trainer_config.log_every=10",
    ],
}  # fmt: skip


def run_mingpt(overrides: list[str], data: str, nproc: int) -> dict:
    """One torchrun job of mingpt/main.py in a scratch folder: median tokens/s and MFU after the first (warm-up) interval."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "mingpt" / "main.py"), f"data_config.path={Path(data).resolve()}", *overrides,
        ]  # fmt: skip
        env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        if not torch.cuda.is_available():
            env["OMP_NUM_THREADS"] = "1"  # one core per rank
        result = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return {"error": last_line(result.stderr)}
        records = [json.loads(line) for line in Path(folder, "gpt_metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r][1:]  # drop the warm-up interval
    mfus = [r["mfu"] for r in steps if r["mfu"] is not None]
    memory = [r["peak_memory_gb"] for r in steps if r.get("peak_memory_gb") is not None]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else float("nan"),
        "mfu": statistics.median(mfus) if mfus else None,
        "intervals": len(steps),
        "peak_memory_gb": max(memory) if memory else None,
    }


def last_line(stderr: str) -> str:
    """The line that says why a run failed: our scripts' one error line (without "error: "), else a
    worker's exception (torchrun prefixes it with [rankN]), else the last line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    ours = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    raised = [match.group(1) for match in map(EXCEPTION_LINE.match, lines) if match]
    return (ours or raised or lines or ["no output"])[-1]


def device_slug(device: str) -> str:
    """A file-name form of a device's name."""
    return "".join(c if c.isalnum() else "-" for c in device.split("(")[0].strip().lower())


def main() -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a local text file to train on (e.g. Tiny Shakespeare)")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES),
        help="which cases to run (default: default, default+compile, default+fsdp, gpt2-small+compile on GPU; cpu-small otherwise)",
    )
    parser.add_argument("--nproc", type=int, help="processes (default: every GPU, else 2)")
    parser.add_argument("--out", type=Path, help="the table's file (default: bench/results/mingpt_<device>.md)")
    parser.add_argument(
        "--extra", nargs="+", default=[], metavar="section.key=value", help="overrides added to every case, last (e.g. tiny shapes for a smoke run)"
    )
    args = parser.parse_args()
    if not Path(args.data).is_file():
        cli.fail(f"--data {args.data}: no such file; download Tiny Shakespeare ({TINY_SHAKESPEARE_URL}) there, or pass another text")

    on_gpu = torch.cuda.is_available()
    cases = args.cases or (["default", "default+compile", "default+fsdp", "gpt2-small+compile"] if on_gpu else ["cpu-small"])
    nproc = args.nproc or (torch.cuda.device_count() if on_gpu else 2)
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    header = (
        f"minGPT throughput on {device}, {nproc} process(es), torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}, data {Path(args.data).name}"
    )
    lines = [
        header,
        "",
        "| case | tokens/s (all ranks) | MFU (per GPU) | peak GPU memory (rank 0) | intervals |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    print(header, flush=True)
    failed = False
    for name in cases:
        row = run_mingpt(CASES[name] + args.extra, args.data, nproc)
        failed = failed or "error" in row
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | |")
        else:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            memory = f"{row['peak_memory_gb']:.1f} GiB" if row["peak_memory_gb"] is not None else "n/a"
            lines.append(f"| {name} | {row['tokens_per_s']:,.0f} | {mfu} | {memory} | {row['intervals']} |")
        print(lines[-1], flush=True)
    out = args.out or RESULTS / f"mingpt_{device_slug(device)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
