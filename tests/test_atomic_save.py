"""A snapshot writer killed at any moment leaves the old snapshot or the new one, never a broken one."""

import random
import signal
import sys
import time

from support import snapshots
from conftest import REPO, Job

# Writes two alternating 8 MB snapshots to the same path as fast as it can.
WRITER = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from support import snapshots
versions = [{{"MODEL_STATE": {{"w": torch.full((2_000_000,), float(i))}}, "OPTIMIZER_STATE": {{}}, "EPOCHS_RUN": i}} for i in (1, 2)]
snapshots.atomic_save(versions[0], sys.argv[1])
print("writing", flush=True)
for n in range(10**9):
    snapshots.atomic_save(versions[n % 2], sys.argv[1])
"""


def test_sigkill_during_saves_never_leaves_a_broken_snapshot(tmp_path):
    path = tmp_path / "snapshot.pt"
    rng = random.Random(0)
    for _ in range(3):
        job = Job([sys.executable, "-c", WRITER, str(path)], tmp_path, name="writer")
        try:
            job.wait_for("writing", timeout=60)
            time.sleep(rng.uniform(0.05, 0.5))
            job.proc.send_signal(signal.SIGKILL)
            job.wait(timeout=30)
        finally:
            job.stop()
        snapshot = snapshots.read(str(path), "cpu")
        weights = snapshot["MODEL_STATE"]["w"]
        assert snapshot["EPOCHS_RUN"] in (1, 2)
        assert bool((weights == snapshot["EPOCHS_RUN"]).all()), "a snapshot mixed two versions"
    # Each kill may leave one temporary file; the next save clears it.
    snapshots.atomic_save(snapshot, str(path))
    assert [p.name for p in tmp_path.glob("snapshot.pt*")] == ["snapshot.pt"]
