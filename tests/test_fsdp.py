"""Step 6, fsdp.py: sharded training that learns, sharded snapshots that survive kills, resume on
another number of processes, refuse what they cannot use, and need storage every node shares.

Real torchrun processes on CPU with gloo; the final states are compared whole, gathered from
every rank's shards: bit for bit on the same number of processes, to float rounding (as Adam
amplifies it) across numbers.
"""

import hashlib
import os
import pickle
import re
import shutil
import signal
import uuid
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from support import snapshots
from conftest import (
    REPO,
    Job,
    assert_close_to_scale,
    epochs,
    free_port,
    multinode_cmd,
    no_traceback_from,
    python_cmd,
    run,
    stop_with_sigusr1,
    stopped_cleanly,
    torchrun_cmd,
)
from test_bad_input import RunsCode

ARGS = ("20", "5")  # 20 epochs, a snapshot every 5: every interrupted run must end as this one does
SNAPSHOT = "snapshot.dcp"


def full_state(folder: Path, scratch: Path) -> dict:
    """A sharded snapshot gathered whole (every rank's shards), as torch.save would hold it."""
    pointer = torch.load(folder / snapshots.POINTER, weights_only=True)  # the folder's name and the small values
    dcp_to_torch_save(folder / pointer["FOLDER"], scratch / "whole.pt")
    return {**pointer, **torch.load(scratch / "whole.pt", weights_only=True)}


def tensors(state: dict) -> dict[str, torch.Tensor]:
    found = {f"model.{k}": v for k, v in state["MODEL_STATE"].items()}
    for name, values in state["OPTIMIZER_STATE"]["state"].items():
        found.update({f"optim.{name}.{k}": v for k, v in values.items() if torch.is_tensor(v)})
    return found


def assert_bit_identical(folder: Path, reference: dict, scratch: Path) -> None:
    state = full_state(folder, scratch)
    assert state["EPOCHS_RUN"] == reference["EPOCHS_RUN"]
    a, b = tensors(state), tensors(reference)
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a), a.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs from the uninterrupted run"


def resumed_from(output: str) -> int:
    """Epochs done in the snapshot the run resumed from; checks no epoch after it was repeated or skipped."""
    marker = f"Resuming training from {SNAPSHOT}: "
    assert marker in output, output[-3000:]
    done = int(output.split(marker)[-1].split()[0])
    assert done % 5 == 0 and done > 0, done
    assert [n for n, _ in epochs(output.split(marker)[-1])] == list(range(done + 1, int(ARGS[0]) + 1))
    return done


@pytest.fixture(scope="session")
def fsdp_reference(tmp_path_factory) -> tuple[str, dict, Path]:
    """An uninterrupted 2-rank `fsdp.py 20 5`: its output, its final state gathered whole, its snapshot folder."""
    folder = tmp_path_factory.mktemp("fsdp_reference")
    result = run(torchrun_cmd("fsdp.py", *ARGS), folder)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, full_state(folder / SNAPSHOT, folder), folder / SNAPSHOT


def test_fsdp_learns_and_saves_one_shard_per_rank(fsdp_reference, tmp_path):
    output, state, _ = fsdp_reference
    losses = epochs(output)
    assert [n for n, _ in losses] == list(range(1, 21))
    assert losses[-1][1] < 0.01 * losses[0][1], losses  # as multinode.py's: from about 19 to 1e-4
    assert "Batchsize: 32 x 2 ranks | Steps: 32" in output and "compute+comm" in output  # FSDP's communication is not timed apart
    assert [f"Epoch {n} | Training snapshot saved" in output for n in (5, 10, 15, 20)] == [True] * 4
    assert state["EPOCHS_RUN"] == 20 and state["WORLD_SIZE"] == 2 and state["BATCH_SIZE"] == 32
    assert state["OPTIMIZER_STATE"]["state"]["weight"]["momentum_buffer"].shape == (1, 20)


def test_killed_workers_are_restarted_and_end_bit_identical(tmp_path, jobs, fsdp_reference):
    job = jobs(torchrun_cmd("fsdp.py", *ARGS, max_restarts=3), tmp_path)
    job.wait_for(r"Epoch 8/20")
    os.kill(job.worker(local_rank=1), signal.SIGKILL)  # a crash
    first = int(job.wait_for(rf"Resuming training from {SNAPSHOT}: (\d+) epochs done")[1])
    # A preemption once the restart has trained on: the worker leaves cleanly, through its `finally`.
    job.wait_for(rf"Epoch {first + 6}/20")  # the crash came before epoch 15's snapshot: 7 epochs after epoch 8 began
    os.kill(job.worker(local_rank=0), signal.SIGTERM)
    assert job.wait() == 0, job.output()[-3000:]
    output = job.output()
    assert stopped_cleanly(output) and no_traceback_from("fsdp.py", output), output[-3000:]
    # Each restart resumed from the newest snapshot saved before its interruption, whenever that came
    # (or the one after it, if the interruption cut off its line).
    attempts = output.split("Resuming training from")
    assert len(attempts) == 3, output[-3000:]
    second = resumed_from(output)  # and trained each epoch after it once
    for attempt, resumed in zip(attempts, (first, second)):
        saved = max(int(n) for n in re.findall(r"Epoch (\d+) \| Training snapshot saved", attempt))
        assert saved <= resumed <= saved + 5, f"resumed from {resumed} epochs; the newest snapshot saved before had {saved}"
    assert first < second
    assert_bit_identical(tmp_path / SNAPSHOT, fsdp_reference[1], tmp_path)
    assert sorted(os.listdir(tmp_path / SNAPSHOT)) == ["epoch-0020", snapshots.POINTER]  # older folders removed, no markers left


def damage(snapshot: Path, kind: str) -> None:
    folder = snapshot / torch.load(snapshot / snapshots.POINTER, weights_only=True)["FOLDER"]
    if kind == "truncated shard":
        shard = folder / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # a planted .metadata
        (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(str(snapshot.parent / "CODE_RAN"))))


# The truncated shard on the 2 ranks that saved it (one line, though both read it); the planted file on 1 (it reads both shards).
@pytest.mark.parametrize(
    "kind, says, nproc",
    [("truncated shard", "is not a readable snapshot of this model", 2), ("planted pickle", "could run code when loaded, so it was not loaded", 1)],
)
def test_unusable_snapshot_is_refused_in_one_line_and_left_untouched(tmp_path, fsdp_reference, kind, says, nproc):
    shutil.copytree(fsdp_reference[2], tmp_path / SNAPSHOT)
    damage(tmp_path / SNAPSHOT, kind)
    digests = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (tmp_path / SNAPSHOT).rglob("*") if path.is_file()}
    result = run(torchrun_cmd("fsdp.py", "30", "5", nproc=nproc), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0] and "move snapshot.dcp away" in errors[0], output[-3000:]
    assert no_traceback_from("fsdp.py", output) and epochs(output) == []
    assert not (tmp_path / "CODE_RAN").exists(), "loading the snapshot ran code"
    after = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (tmp_path / SNAPSHOT).rglob("*") if path.is_file()}
    assert after == digests, "the snapshot folder was modified"


# Saves three sharded snapshots as fsdp.py does (two ranks, 4 MB each, every value = the save's number);
# the second with $SNAPSHOT_PAUSE_AT as the test sets it, so that one rank stops at that point of the save.
WRITER = f"""
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
sys.path.insert(0, {str(REPO)!r})
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from support import snapshots
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
snapshots.check_shared_folder(sys.argv[1])
pause = os.environ.pop(snapshots.PAUSE_AT)
for n in (1, 2, 3):
    if n == 2:
        os.environ[snapshots.PAUSE_AT] = pause
    snapshot = {{"MODEL_STATE": {{"w": DTensor.from_local(torch.full((1_000_000,), float(n)), mesh, [Shard(0)])}}, "EPOCHS_RUN": n}}
    with snapshots.published_when_complete(sys.argv[1], f"epoch-{{n:04d}}", snapshot) as folder:
        dcp.save({{"MODEL_STATE": snapshot["MODEL_STATE"]}}, checkpoint_id=folder)
"""


@pytest.mark.parametrize(
    "point, rank, pointed",
    [("shards-written", 0, 1), ("shards-written", 1, 1), ("pointer-replaced", 0, 2)],
    ids=["rank0-before-pointer", "rank1-before-pointer", "rank0-before-cleanup"],
)
def test_sigkill_during_a_save_leaves_the_pointer_on_a_complete_snapshot(tmp_path, point, rank, pointed):
    # Rank 0 publishes the pointer and removes the older folders; any rank may die while it writes its shards.
    script, path = tmp_path / "writer.py", tmp_path / SNAPSHOT
    script.write_text(WRITER)
    job = Job(torchrun_cmd(str(script), str(path)), tmp_path, name="writer", env={snapshots.PAUSE_AT: f"{point}@{rank}"})
    try:
        job.wait_for("paused at", timeout=120)  # the second save, at that point, on that rank
        os.kill(job.worker(local_rank=rank), signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        job.stop()
    state = full_state(path, tmp_path)  # the snapshot the pointer names: whole, both shards, one save's values
    weights = state["MODEL_STATE"]["w"]
    assert state["EPOCHS_RUN"] == pointed and weights.shape == (2_000_000,) and bool((weights == pointed).all()), "not one whole save"
    assert sorted(name for name in os.listdir(path) if name.startswith("epoch-")) == ["epoch-0001", "epoch-0002"]  # the next save removes the other


def test_nodes_that_do_not_share_the_snapshot_folder_are_refused_in_one_line(tmp_path, jobs):
    port, rdzv_id = free_port(), uuid.uuid4().hex[:8]
    nodes = []
    for name in ("node0", "node1"):  # two agents, each in its own folder: snapshot.dcp is not the same folder
        (tmp_path / name).mkdir()
        nodes.append(jobs(multinode_cmd(port, rdzv_id, "3", "1", max_restarts=0, script="fsdp.py"), tmp_path / name, name="agent"))
    for node in nodes:
        assert node.wait(timeout=120) != 0
    output = "".join(node.output() for node in nodes)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-4000:]
    assert re.search(r"snapshot.dcp is not shared: rank 0 on node \S+ does not see the files of rank 1", errors[0])
    assert "put --snapshot_path on storage every node mounts" in errors[0]
    assert epochs(output) == [] and no_traceback_from("fsdp.py", output)


# fsdp.py's own _evaluate on a held-out set of 9 samples, batches of 2: rank 0 has 5 samples in
# 3 batches, rank 1 has 4 in 2. Every rank must still run as many (collective) forwards.
EVALUATOR = f"""
import sys, types, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
import datautils, fsdp
dist.init_process_group("gloo")
torch.manual_seed(0)
model, val_set = torch.nn.Linear(datautils.IN_FEATURES, 1), datautils.MyTrainDataset(9, seed=1)
whole = datautils.metrics(datautils.evaluate(model, [val_set[range(9)]], "cpu"))
fsdp.shard_model(model, "cpu", types.SimpleNamespace(sync_bn=False, workload="toy"))
loader = fsdp.prepare_dataloader(val_set, 2, 0, False, train=False)
trainer = types.SimpleNamespace(model=model, val_data=loader, device="cpu")
sharded = fsdp.Trainer._evaluate(trainer)
print(f"rank {{dist.get_rank()}}: {{len(loader)}} batches, {{sharded}} vs {{whole}}", flush=True)
assert abs(sharded["val loss"] - whole["val loss"]) < 1e-6 * whole["val loss"]
fsdp.launch.end_process_group_left_up()  # as fsdp.py's workers exit: destroys the group, frees what DTensor keeps of it
"""


def test_evaluation_on_unequal_shards_runs_equal_forwards_and_counts_every_sample_once(tmp_path):
    script = tmp_path / "evaluator.py"
    script.write_text(EVALUATOR)
    result = run(torchrun_cmd(str(script)), tmp_path, timeout=60)  # a rank that ran fewer forwards would hang the other
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "rank 0: 3 batches" in result.stdout and "rank 1: 2 batches" in result.stdout


# ---------------------------------------------------------------- the capstone with trainer_config.strategy=fsdp

# No dropout (its draws start afresh on another process count) and a global batch: 2 processes x 16 = 1 x 2 x 16.
# 12,000 characters x 0.1: 1,064 training windows, 33 steps of 32 an epoch.
GPT_FSDP = [
    "trainer_config.strategy=fsdp", "trainer_config.snapshot_path=gpt.dcp", "data_config.truncate=0.1",
    "trainer_config.max_epochs=3", "trainer_config.save_every=1", "trainer_config.log_every=10", "optimizer_config.warmup_steps=10",
    "gpt_config.dropout=0.0", "trainer_config.global_batch_size=32", "trainer_config.best_snapshot_path=gpt_best.dcp",
]  # fmt: skip


@pytest.fixture(scope="module")
def gpt_fsdp_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process capstone run with the model sharded, 3 epochs of 33 steps, keeping its best model."""
    from test_mingpt import make_corpus

    folder = tmp_path_factory.mktemp("gpt_fsdp")
    (folder / "corpus.txt").write_text(make_corpus(12_000))
    result = run(gpt_cmd(folder), folder)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "stdout.txt").write_text(result.stdout)
    return folder


@pytest.fixture(scope="module")
def gpt_fsdp_stopped(tmp_path_factory, gpt_fsdp_run) -> Path:
    """The same run stopped by SIGUSR1 in the middle of epoch 2, its sharded snapshot saved at that step."""
    folder = tmp_path_factory.mktemp("gpt_fsdp_stopped")
    shutil.copy(gpt_fsdp_run / "corpus.txt", folder / "corpus.txt")
    stop_with_sigusr1(gpt_cmd(folder), folder, r"epoch 2 \| step 15/", "gpt.dcp", local_rank=1)
    return folder


def gpt_cmd(folder: Path, *overrides: str, nproc: int = 2) -> list[str]:
    from test_mingpt import TINY_MODEL

    return torchrun_cmd("mingpt/main.py", f"data_config.path={folder / 'corpus.txt'}", *TINY_MODEL, *GPT_FSDP, *overrides, nproc=nproc)


def test_mingpt_sharded_learns_with_one_shard_file_per_rank(gpt_fsdp_run):
    output = (gpt_fsdp_run / "stdout.txt").read_text()
    first_loss = float(re.search(r"epoch 1 \| step \d+/\d+ \| loss ([0-9.]+)", output).group(1))
    test_losses = [float(loss) for loss in re.findall(r"Epoch \d+/\d+ \| test loss ([0-9.]+)", output)]
    # The first loss is about chance, ln(vocabulary); 99 steps bring the test loss well below it (seen: 3.06 -> 2.55).
    assert len(test_losses) == 3 and test_losses == sorted(test_losses, reverse=True) and test_losses[-1] < 0.9 * first_loss, (
        first_loss,
        test_losses,
    )
    folder = gpt_fsdp_run / "gpt.dcp" / torch.load(gpt_fsdp_run / "gpt.dcp" / snapshots.POINTER, weights_only=True)["FOLDER"]
    assert sorted(path.name for path in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def resumed(stopped: Path, folder: Path, nproc: int) -> str:
    """The stopped run's folder copied to `folder` and trained to the end on `nproc` processes; its output."""
    shutil.copytree(stopped, folder)
    result = run(gpt_cmd(folder, nproc=nproc), folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Resuming training from gpt.dcp: 1 epoch \+ [1-9][\d,]* windows done", result.stdout), result.stdout[-2000:]
    return result.stdout


def test_mingpt_sharded_stopped_mid_epoch_resumes_bit_identical(tmp_path, gpt_fsdp_run, gpt_fsdp_stopped):
    resumed(gpt_fsdp_stopped, tmp_path / "run", nproc=2)
    a, b = (full_state(folder / "gpt.dcp", folder) for folder in (tmp_path / "run", gpt_fsdp_run))
    assert a["GLOBAL_STEP"] == b["GLOBAL_STEP"]
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs from the uninterrupted run"


def test_mingpt_sharded_resumes_on_another_number_of_processes(tmp_path, gpt_fsdp_run, gpt_fsdp_stopped):
    output = resumed(gpt_fsdp_stopped, tmp_path / "run", nproc=1)
    assert "Note: saved by 2 processes, resumed by 1" in output
    # One process read both ranks' shards of every weight and of AdamW's state, and went on as 2 never stopped
    # would have: a half read, or a state lost, would train other weights. To 1e-3 of each tensor's scale, not
    # rounding's 1e-7: Adam turns the rounding noise of a gradient that is 0 in exact arithmetic (the keys'
    # bias: softmax ignores a constant) into steps of the learning rate's size (seen: 7e-5 of qkv.bias).
    a, b = (full_state(folder / "gpt.dcp", folder) for folder in (tmp_path / "run", gpt_fsdp_run))
    assert a["GLOBAL_STEP"] == b["GLOBAL_STEP"] == 99
    assert any(name.endswith("exp_avg_sq") for name in tensors(b))
    largest = assert_close_to_scale(tensors(a), tensors(b), rtol=1e-3, what=" from the run never stopped")
    print(f"largest difference: {largest:.1e} of its tensor's largest value")


def test_sharded_best_made_one_file_predicts_its_loss(gpt_fsdp_run):
    from test_use import evaluations, predict

    best_step, best_loss = min(evaluations(gpt_fsdp_run), key=lambda evaluation: evaluation[1])
    assert f"New best test loss {best_loss:.4f} at step {best_step}: saved at gpt_best.dcp" in (gpt_fsdp_run / "stdout.txt").read_text()
    converted = run(python_cmd("tools/convert_dcp.py", "gpt_best.dcp", "best.pt"), gpt_fsdp_run)
    assert converted.returncode == 0, converted.stderr[-3000:]
    best = torch.load(gpt_fsdp_run / "best.pt", weights_only=True)
    assert (best["GLOBAL_STEP"], best["BEST_LOSS"]) == (best_step, best_loss) and "VOCAB" in best and "CONFIG" in best
    assert "OPTIMIZER_STATE" not in best
    assert predict("best.pt", cwd=gpt_fsdp_run) == {"best.pt": f"{best_loss:.4f}"}  # the GPT rebuilt from the VOCAB and CONFIG the file carries
