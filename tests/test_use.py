"""Use what you trained: predict from any step's file on one device, an FSDP snapshot made one file,
the GPT sampled without training, the best model kept and every rank stopped together.

Real runs (python, torchrun) on CPU with gloo; the tools run as a learner runs them, in new processes without a process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import datautils
from conftest import Job, python_cmd, run, snapshot_tensors, torchrun_cmd
from support import snapshots
from test_bad_input import RunsCode


def predict(*files: str, cwd: Path) -> dict[str, str]:
    """Run tools/predict.py on `files`; the loss it printed for each (val loss, minGPT's test loss), as printed."""
    result = run(python_cmd("tools/predict.py", *files), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(re.findall(r"^(\S+): (?:val|test) loss ([0-9.]+) on", result.stdout, re.M))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def one_error_line(result, says: str) -> str:
    """The one `error:` line of a failed tool run, checked to say `says`, with no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return errors[0]


# ---------------------------------------------------------------- the capstone's corpus and settings

PATIENCE = 6  # evaluations: the stop comes 20 steps after the first snapshot that follows the best, time to kill the run in
GPT = [
    "gpt_config.n_layer=1", "gpt_config.n_head=2", "gpt_config.n_embd=32", "gpt_config.dropout=0.1", "data_config.block_size=16",
    "trainer_config.batch_size=64", "trainer_config.log_every=100", "trainer_config.max_epochs=20", "trainer_config.save_every=1",
    "trainer_config.eval_every=4", f"trainer_config.patience={PATIENCE}", "trainer_config.best_snapshot_path=gpt_best.pt",
    "optimizer_config.learning_rate=0.01", "optimizer_config.warmup_steps=5",
]  # fmt: skip
STEPS_PER_EPOCH = 8  # 1,028 training windows in global batches of 128 (2 processes x 64)


def grammar(chars: int, subjects: list[str], objects: list[str], seed: int) -> str:
    rng, verbs, words = random.Random(seed), ["sees", "loves", "fears"], []
    while sum(len(word) + 1 for word in words) < chars:
        words += [rng.choice(subjects), rng.choice(verbs), rng.choice(objects) + "."]
    return (" ".join(words) + " ")[:chars]


def shifted_corpus(path: Path) -> None:
    """1,044 characters to train on, 116 to test on (data_config.train_split 0.9) of another grammar over the same
    words: people see things, then things see people. The test loss falls while the model learns the words, then
    rises as it learns the training text's order of them: early stopping has something to stop."""
    people, things = ["the cat", "a dog", "my king", "the queen"], ["the moon", "a crown", "the sea"]
    path.write_text(grammar(1044, people, things, seed=0) + grammar(116, things, people, seed=1))


def gpt_cmd(folder: Path, *overrides: str, max_restarts: int = 0) -> list[str]:
    return torchrun_cmd("mingpt/main.py", f"data_config.path={folder / 'corpus.txt'}", *GPT, *overrides, max_restarts=max_restarts)


def evaluations(folder: Path) -> list[tuple[int, float]]:
    """(global step, test loss) of every evaluation, in order, from the run's metrics file."""
    records = [json.loads(line) for line in (folder / "gpt_metrics.jsonl").read_text().splitlines()]
    return [(record["global_step"], record["test_loss"]) for record in records if "test_loss" in record]




# ---------------------------------------------------------------- every training run, at once


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every training run the tests read, all started at once so that their processes overlap their waits; the folder
    and the output of each. One epoch of each kind of file the steps save: step 1's bare state_dict (step 2 saves its
    model's the same way), step 3's snapshot (step 4's too, each node a copy), step 6's shards; and minGPT that stops
    early, each rank logging the windows it trains (sharded, it keeps its best in tests/test_fsdp.py)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "gpt").mkdir()
    shifted_corpus(root / "gpt" / "corpus.txt")
    (root / "gpt" / "windows").mkdir()
    commands = {
        "single": python_cmd("single_gpu.py", "1", "1"),
        "torchrun": torchrun_cmd("multigpu_torchrun.py", "1", "1"),
        "fsdp": torchrun_cmd("fsdp.py", "1", "1"),
        "gpt": gpt_cmd(root / "gpt"),
    }
    jobs = {}
    try:
        for name, command in commands.items():
            (root / name).mkdir(exist_ok=True)
            env = {"MINGPT_WINDOW_LOG": str(root / name / "windows")} if name == "gpt" else None
            jobs[name] = Job(command, root / name, name=name, env=env)
        for name, job in jobs.items():
            assert job.wait(timeout=600) == 0, f"{name}:\n{job.output()[-3000:]}"
    finally:
        for job in jobs.values():
            job.stop()
    return {name: (root / name, job.output()) for name, job in jobs.items()}


# ---------------------------------------------------------------- steps 1-4 and 6

VAL_LOSS = re.compile(r"\| val loss ([0-9.]+) \|")


def last_val_loss(output: str) -> str:
    """The validation loss on a run's last epoch line, as printed: the loss of the weights it saved then."""
    losses = VAL_LOSS.findall(output)
    assert losses, output[-2000:]
    assert float(losses[-1]) > 0.01, "too few digits printed to compare closely: train fewer epochs"
    return losses[-1]


def wrapped(weights_path: Path, folder: Path) -> list[Path]:
    """The toy model with these weights, saved as a learner's script might: through torch.compile and a
    data-parallel wrapper (DataParallel adds DDP's `module.`, and needs no process group), in both orders."""
    model = torch.nn.Linear(datautils.IN_FEATURES, 1)
    model.load_state_dict(torch.load(weights_path, weights_only=True)["MODEL_STATE"])
    files = {"compiled_ddp.pt": torch.compile(torch.nn.DataParallel(model)), "ddp_compiled.pt": torch.nn.DataParallel(torch.compile(model))}
    for name, wrapper in files.items():
        torch.save(wrapper.state_dict(), folder / name)
    assert [next(iter(torch.load(folder / name, weights_only=True))) for name in files] == ["_orig_mod.module.weight", "module._orig_mod.weight"]
    return [folder / name for name in files]


def test_predict_prints_the_validation_loss_each_step_printed_for_its_file(runs, tmp_path):
    files = {
        "single/checkpoint.pt": "single",  # step 1: a bare state_dict (step 2: the model inside DDP's, bare)
        "torchrun/snapshot.pt": "torchrun",  # step 3: a snapshot (step 4: each node's copy of one)
    }
    root = runs["single"][0].parent
    extra = wrapped(root / "torchrun/snapshot.pt", tmp_path)
    result = run(python_cmd("tools/predict.py", *files, *map(str, extra)), root)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(re.findall(r"^(\S+): val loss ([0-9.]+) on 1000 held-out samples$", result.stdout, re.M))
    for path, run_name in files.items():
        assert printed.get(path) == last_val_loss(runs[run_name][1]), (path, result.stdout)
    for path in extra:
        assert printed.get(str(path)) == last_val_loss(runs["torchrun"][1]), (path, result.stdout)
    # Each file's lines of predictions: its model's outputs beside the held-out set's true targets.
    val_set = datautils.MyTrainDataset(datautils.TOY_VAL_SIZE, seed=1)
    model = torch.nn.Linear(datautils.IN_FEATURES, 1)
    model.load_state_dict(torch.load(root / "single/checkpoint.pt", weights_only=True))
    with torch.no_grad():
        expected = [
            f"  predicted {output.item():.6f}, target {target.item():.6f}" for output, target in zip(model(val_set.inputs[:3]), val_set.targets)
        ]
    assert result.stdout.split("single/checkpoint.pt: ")[1].splitlines()[1:4] == expected


def test_fsdp_snapshot_made_one_file_predicts_the_loss_fsdp_printed(runs, tmp_path):
    folder, output = runs["fsdp"]
    result = run(python_cmd("tools/convert_dcp.py", str(folder / "snapshot.dcp"), "model.pt"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"snapshot.dcp/epoch-0001 -> model.pt: the model, 2 tensors of 21 numbers", result.stdout), result.stdout
    converted = torch.load(tmp_path / "model.pt", weights_only=True)
    assert converted.keys() == {"MODEL_STATE", "EPOCHS_RUN", "WORLD_SIZE", "BATCH_SIZE"} and converted["EPOCHS_RUN"] == 1
    assert predict("model.pt", cwd=tmp_path) == {"model.pt": last_val_loss(output)}
    digest = hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()
    again = run(python_cmd("tools/convert_dcp.py", str(folder / "snapshot.dcp"), "model.pt"), tmp_path)
    assert "model.pt exists; pass a new file name" in again.stderr and again.returncode == 2
    assert hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest() == digest


def planted_dcp(folder: Path) -> None:
    """A sharded snapshot whose optimizer settings are a pickle that runs code when unpickled unrestricted."""
    planted = {
        "MODEL_STATE": {"weight": torch.zeros(1, datautils.IN_FEATURES)},
        "OPTIMIZER_STATE": {"param_groups": RunsCode(str(folder / "CODE_RAN"))},
    }
    with warnings.catch_warnings():  # without a process group: "assuming the intent is to save in a single process", as it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(planted, checkpoint_id=folder / "snapshot.dcp" / "epoch-0001")
    torch.save({"FOLDER": "epoch-0001", "EPOCHS_RUN": 1}, folder / "snapshot.dcp" / snapshots.POINTER)


def foreign_file(kind: str, folder: Path) -> str:
    """A file predict must refuse; returns its name."""
    if kind == "fsdp folder":
        planted_dcp(folder)
        return "snapshot.dcp"
    path = folder / "checkpoint.pt"
    if kind == "truncated":
        torch.save(torch.nn.Linear(datautils.IN_FEATURES, 1).state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "no weights":
        torch.save({"EPOCHS_RUN": 3, "notes": "no model here"}, path)
    elif kind == "another model":
        torch.save(torch.nn.Linear(5, 1).state_dict(), path)
    else:  # malicious
        torch.save({"weight": RunsCode(str(folder / "CODE_RAN"))}, path)
    return path.name


@pytest.mark.parametrize(
    "kind, says",
    [
        ("truncated", "checkpoint.pt is not a readable snapshot"),
        ("no weights", "checkpoint.pt holds no model weights: neither a state_dict nor a snapshot with MODEL_STATE"),
        ("another model", "checkpoint.pt was not saved from the --workload toy model"),
        ("malicious", "could run code when loaded, so it was not loaded"),
        (
            "fsdp folder",
            "snapshot.dcp is a folder of sharded (FSDP) snapshots; make it one file first: python tools/convert_dcp.py snapshot.dcp model.pt",
        ),
    ],
)
def test_predict_refuses_what_it_cannot_use_in_one_line(tmp_path, kind, says):
    name = foreign_file(kind, tmp_path)
    line = one_error_line(run(python_cmd("tools/predict.py", name), tmp_path), says)
    assert "--snapshot_path" not in line, "a resume's advice, not a user's of the file"
    assert not (tmp_path / "CODE_RAN").exists(), "reading the file ran code"


def test_convert_refuses_a_planted_pickle_and_leaves_the_folder_untouched(tmp_path):
    planted_dcp(tmp_path)
    before = {path: path.read_bytes() for path in (tmp_path / "snapshot.dcp").rglob("*") if path.is_file()}
    result = run(python_cmd("tools/convert_dcp.py", "snapshot.dcp", "model.pt"), tmp_path)
    one_error_line(result, "holds OPTIMIZER_STATE.param_groups, a pickle that could run code when loaded, so it was not converted")
    assert not (tmp_path / "CODE_RAN").exists(), "converting ran code"
    assert not (tmp_path / "model.pt").exists()
    assert before == {path: path.read_bytes() for path in (tmp_path / "snapshot.dcp").rglob("*") if path.is_file()}


# ---------------------------------------------------------------- the capstone: best model, early stop, sampling


def test_early_stop_ends_every_rank_at_the_same_step_and_the_best_snapshot_holds_the_best_weights(runs):
    folder, output = runs["gpt"]
    evals = evaluations(folder)
    best = min(range(len(evals)), key=lambda index: evals[index][1])  # the first of equals: only a lower loss is better
    assert len(evals) == best + 1 + PATIENCE, f"not stopped {PATIENCE} evaluations after the best: {evals}"
    stop_step = evals[-1][0]
    assert stop_step < 20 * STEPS_PER_EPOCH and stop_step % STEPS_PER_EPOCH, "the stop must come early, and within an epoch (eval_every)"
    assert f"Stopping early at step {stop_step}: {PATIENCE} evaluations without a test loss below {evals[best][1]:.4f}" in output
    # Every rank trained the same steps, and none after the stop.
    logs = [(folder / "windows" / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == stop_step
    best_file = torch.load(folder / "gpt_best.pt", weights_only=True)
    assert (best_file["GLOBAL_STEP"], best_file["BEST_LOSS"]) == evals[best]
    assert "OPTIMIZER_STATE" not in best_file and best_file["VOCAB"] and best_file["CONFIG"]
    latest = torch.load(folder / "gpt_snapshot.pt", weights_only=True)
    assert (latest["GLOBAL_STEP"], latest["BEST_LOSS"], latest["EVALS_SINCE_BEST"]) == (stop_step, evals[best][1], PATIENCE)
    # Predict reads both, on one process, and prints the losses the training printed for their weights.
    printed = predict("gpt_best.pt", "gpt_snapshot.pt", cwd=folder)
    assert printed == {"gpt_best.pt": f"{evals[best][1]:.4f}", "gpt_snapshot.pt": f"{evals[-1][1]:.4f}"}, (printed, evals)


def test_sample_prints_the_same_text_for_the_same_seed(runs):
    def sample(*args: str):
        return run(
            python_cmd("mingpt/sample.py", "gpt_best.pt", "--prompt", "the queen", "--max_new_tokens", "60", "--top_k", "5", *args), runs["gpt"][0]
        )

    first, again, other = sample(), sample(), sample("--seed", "7")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == again.stdout and first.stdout != other.stdout
    assert first.stdout.startswith("the queen") and len(first.stdout) == len("the queen") + 60 + 1  # and a new line
    one_error_line(sample("--prompt", "O God, O God!"), "--prompt has characters '!,GO' that gpt_best.pt's vocabulary lacks")


def test_killed_after_the_best_and_restarted_it_keeps_the_same_best_and_stops_at_the_same_step(tmp_path, runs):
    reference = runs["gpt"][0]
    evals = evaluations(reference)
    best_step = min(evals, key=lambda evaluation: evaluation[1])[0]
    after_best = -(-best_step // STEPS_PER_EPOCH)  # the first epoch's end at or after the best: its snapshot holds the best's state
    assert evals[-1][0] > after_best * STEPS_PER_EPOCH + 2, "no time between that snapshot and the stop to kill the run in"
    shifted_corpus(tmp_path / "corpus.txt")
    job = Job(gpt_cmd(tmp_path, max_restarts=1), tmp_path)
    try:
        job.wait_for(rf"Training snapshot saved at gpt_snapshot.pt: {after_best} epochs? \+ 0 windows")
        os.kill(job.worker(local_rank=1), signal.SIGKILL)
        assert job.wait(timeout=300) == 0, job.output()[-4000:]
    finally:
        job.stop()
    output = job.output()
    resumed = int(re.search(r"Resuming training from gpt_snapshot.pt: (\d+) epochs?", output).group(1))
    assert after_best <= resumed and resumed * STEPS_PER_EPOCH < evals[-1][0], "the restart must resume after the best, before the stop"
    assert f"Stopping early at step {evals[-1][0]}:" in output
    best, uninterrupted = (torch.load(folder / "gpt_best.pt", weights_only=True) for folder in (tmp_path, reference))
    assert (best["GLOBAL_STEP"], best["BEST_LOSS"]) == (uninterrupted["GLOBAL_STEP"], uninterrupted["BEST_LOSS"])
    assert same_tensors(best["MODEL_STATE"], uninterrupted["MODEL_STATE"]), "the best snapshot differs from the uninterrupted run's"
    assert same_tensors(snapshot_tensors(tmp_path / "gpt_snapshot.pt"), snapshot_tensors(reference / "gpt_snapshot.pt"))
    # Requeued once more, the job that stopped trains nothing, and leaves its files as they are.
    files = {name: (tmp_path / name).read_bytes() for name in ("gpt_best.pt", "gpt_snapshot.pt")}
    again = run(gpt_cmd(tmp_path), tmp_path)
    assert again.returncode == 0 and "Nothing to train: this run stopped early" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert files == {name: (tmp_path / name).read_bytes() for name in files}
