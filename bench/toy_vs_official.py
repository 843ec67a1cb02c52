"""Step 1's toy against the official series' step 1, side by side: whole runs of `single_gpu.py 50 10`.

    git clone https://github.com/pytorch/examples /tmp/examples          # the official series
    python bench/toy_vs_official.py --official /tmp/examples/distributed/ddp-tutorial-series

The official script trains on `cuda:0` only; this copies its single_gpu.py and datautils.py into
a scratch folder and changes one line (`device = 0` becomes `device = "cpu"`), so that both run
on the CPU. Runs alternate (ours, official, bare import), one thread each (OMP_NUM_THREADS=1),
and each figure is the median wall time of --repeats runs. No code of the official series is
kept in this project. Writes bench/results/toy_vs_official.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
OFFICIAL_DEVICE_LINE = "device = 0  # shorthand for cuda:0"


def wall_time(cmd: list[str], cwd: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def official_on_cpu(official: Path, folder: Path) -> None:
    """The official step 1 in `folder`, with its one CUDA line changed to the CPU."""
    for name in ("single_gpu.py", "datautils.py"):
        shutil.copy(official / name, folder / name)
    script = (folder / "single_gpu.py").read_text()
    if OFFICIAL_DEVICE_LINE not in script:
        sys.exit(f"error: {official / 'single_gpu.py'} has no line {OFFICIAL_DEVICE_LINE!r} to point at the CPU; is it the official step 1?")
    (folder / "single_gpu.py").write_text(script.replace(OFFICIAL_DEVICE_LINE, 'device = "cpu"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--official", required=True, type=Path, help="the official series' folder (distributed/ddp-tutorial-series)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each; the median is reported (default: 5)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as official_dir:
        official_on_cpu(args.official, Path(official_dir))
        commands = {
            "ours: python single_gpu.py 50 10 --device cpu": ([sys.executable, str(REPO / "single_gpu.py"), "50", "10", "--device", "cpu"], ours_dir),
            "official, on the CPU: python single_gpu.py 50 10": ([sys.executable, "single_gpu.py", "50", "10"], official_dir),
            'python -c "import torch"': ([sys.executable, "-c", "import torch"], ours_dir),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, (cmd, cwd) in commands.items():
                times[name].append(wall_time(cmd, cwd))
    header = (
        f"Toy step 1 against the official step 1 on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, OMP_NUM_THREADS=1, {datetime.date.today().isoformat()}; median of {args.repeats} alternating runs"
    )
    base = statistics.median(times['python -c "import torch"'])
    lines = [header, "", "| command | median wall time | after the import | all runs |", "| --- | ---: | ---: | --- |"]
    for name, runs in times.items():
        median = statistics.median(runs)
        lines.append(f"| `{name}` | {median:.2f} s | {median - base:.2f} s | {', '.join(f'{t:.2f}' for t in runs)} |")
    ours, official = (statistics.median(times[name]) for name in list(commands)[:2])
    lines += ["", f"Ours takes {ours / official:.2f} x the official script's time; after the import, {(ours - base) / (official - base):.2f} x."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "toy_vs_official.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
