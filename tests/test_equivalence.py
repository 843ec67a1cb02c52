"""Same model, N times faster: N processes train the same weights as one, evaluate exactly, and
resume exactly on another number of processes. Real torchrun runs on CPU, 1 to 3 processes."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from torch.utils.data import DataLoader

import datautils
from conftest import RESUME_ARGS, assert_close_to_scale, epochs, run, snapshot_tensors, stop_with_sigusr1, torchrun_cmd
from mingpt.config import TrainerConfig
from mingpt.trainer import batch_plan
from test_mingpt import TINY_MODEL


def assert_close_training(path_a: Path, path_b: Path, rtol: float, optimizer_rtol: float | None = None) -> float:
    """Model and optimizer states equal within `rtol` (`optimizer_rtol` for the optimizer's) of each tensor's largest
    value; returns the largest difference, so measured.

    Not to float rounding everywhere: a momentum buffer near convergence is a sum of gradients that cancel
    (one ulp of the weights moves it by 1e-6, 2.5e-4 of its size, seen in step 4), and Adam turns the rounding
    noise of a gradient that is 0 in exact arithmetic (the attention keys' bias: softmax ignores a constant)
    into steps of the learning rate's size (1e-4 of qkv.bias, seen in minGPT)."""
    a, b = snapshot_tensors(path_a), snapshot_tensors(path_b)
    assert any(k.startswith("optim.") for k in a)
    largest = 0.0
    for part, tolerance in (("model.", rtol), ("optim.", optimizer_rtol or rtol)):
        mine, theirs = ({k: v for k, v in tensors.items() if k.startswith(part)} for tensors in (a, b))
        largest = max(largest, assert_close_to_scale(mine, theirs, tolerance, f" between {path_a} and {path_b}"))
    print(f"largest difference between {path_a.parent.name} and {path_b.parent.name}: {largest:.1e} of its tensor's largest value")
    return largest


# ---------------------------------------------------------------- steps 2 and 4: 1 x 64 = 2 x 32 = 4 x 16


# Step 2 on 1 x 64 against 4 x 16: the README's "Same model, N times faster" runs and asserts it.


def test_step4_resumed_on_another_process_count_trains_the_weights_of_one(tmp_path, reference_snapshot):
    half = (str(int(RESUME_ARGS[0]) // 2), RESUME_ARGS[1])
    first = run(torchrun_cmd("multinode.py", *half, "--batch_size", "64", nproc=1), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(torchrun_cmd("multinode.py", *RESUME_ARGS, "--batch_size", "32", nproc=2), tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming training from snapshot.pt: {half[0]} epochs done" in second.stdout
    assert "global batch changed" not in second.stdout  # 1 x 64 and 2 x 32 are the same global batch
    assert [n for n, _ in epochs(second.stdout)] == list(range(int(half[0]) + 1, int(RESUME_ARGS[0]) + 1))
    assert_close_training(tmp_path / "snapshot.pt", reference_snapshot, rtol=1e-5, optimizer_rtol=1e-3)


# ---------------------------------------------------------------- exact evaluation


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict[int, dict]:
    """The same weights evaluated by 1 and 3 processes (3 does not divide the 1000 held-out samples; on 2,
    which does, every 2-rank run of test_steps.py prints the losses of one process); the one process is
    this one, without a process group."""
    _, val_set, model, _ = datautils.load_train_objs()
    whole = datautils.metrics(datautils.evaluate(model, DataLoader(val_set, 128, collate_fn=datautils.collate), "cpu"))
    result = run(torchrun_cmd("tests/evaluate_shards.py", nproc=3), tmp_path_factory.mktemp("eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {1: {"exact": whole, "padded": whole}, 3: json.loads(result.stdout.strip().splitlines()[-1])}


def test_every_held_out_sample_counts_once_on_any_number_of_processes(evaluations):
    assert evaluations[3]["exact"]["val loss"] == pytest.approx(evaluations[1]["exact"]["val loss"], rel=1e-6)


def test_a_padding_sampler_would_count_some_samples_twice(evaluations):
    # DistributedSampler pads 1000 samples to 1002 for 3 ranks: two are counted twice.
    assert evaluations[3]["padded"]["val loss"] != pytest.approx(evaluations[1]["exact"]["val loss"], rel=1e-4)


# ---------------------------------------------------------------- minGPT: a global batch on any number of processes

GLOBAL = 48  # windows per optimizer step: 1 x 4 x 12, 2 x 2 x 12, 3 x 1 x 16, 4 x 1 x 12 (processes x micro-batches x windows)
EQUIVALENCE = [
    *TINY_MODEL, "gpt_config.dropout=0.0", "trainer_config.batch_size=12", f"trainer_config.global_batch_size={GLOBAL}",
    "trainer_config.max_epochs=3", "trainer_config.log_every=5", "trainer_config.save_every=1",
    "optimizer_config.warmup_steps=10", "data_config.train_split=0.4",
]  # fmt: skip
# 4840 characters: the first 40% (1936) hold 1920 windows of 16 + 1, 40 global batches of 48 per epoch.
CORPUS_CHARS = 4840


@pytest.fixture(scope="module")
def equal_corpus(tmp_path_factory) -> Path:
    from test_mingpt import make_corpus

    path = tmp_path_factory.mktemp("equal") / "corpus.txt"
    path.write_text(make_corpus(CORPUS_CHARS, seed=1))
    return path


def gpt_cmd(corpus: Path, nproc: int, *overrides: str) -> list[str]:
    return torchrun_cmd("mingpt/main.py", f"data_config.path={corpus}", *EQUIVALENCE, *overrides, nproc=nproc)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, equal_corpus) -> Path:
    folder = tmp_path_factory.mktemp("gpt2x2")
    result = run(gpt_cmd(equal_corpus, 2), folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Global batch {GLOBAL} windows = 2 processes x 2 micro-batches of 12; 40 steps per epoch" in result.stdout
    return folder / "gpt_snapshot.pt"


def test_mingpt_on_1_process_accumulating_4_micro_batches_trains_the_weights_of_2(tmp_path, equal_corpus, two_process_run):
    # More processes than 2: the run resumed on 3 below trains the same weights too.
    result = run(gpt_cmd(equal_corpus, 1), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "= 1 process x 4 micro-batches of 12" in result.stdout
    assert_close_training(tmp_path / "gpt_snapshot.pt", two_process_run, rtol=1e-3)


def test_mingpt_global_batch_refuses_a_process_count_that_cannot_share_it(capsys):
    assert batch_plan(TrainerConfig(global_batch_size=48, batch_size=12), 3) == (48, 8, 2)  # 16 windows each: 2 x 8
    with pytest.raises(SystemExit):
        batch_plan(TrainerConfig(global_batch_size=45, batch_size=9), 2)
    assert (
        capsys.readouterr().err
        == "error: trainer_config.global_batch_size=45 cannot be shared by 2 processes; run on 1, 3, 5, 9, 15, 45 processes, or change it\n"
    )


def test_mingpt_resumed_mid_epoch_on_2_then_1_then_3_processes_trains_each_window_once(tmp_path, equal_corpus, two_process_run):
    record = tmp_path / "windows"
    record.mkdir()
    env = {"MINGPT_WINDOW_LOG": str(record)}
    stop_with_sigusr1(gpt_cmd(equal_corpus, 2), tmp_path, r"epoch 1 \| step 15/40", "gpt_snapshot.pt", env=env)
    second = stop_with_sigusr1(gpt_cmd(equal_corpus, 1), tmp_path, r"epoch 2 \| step 15/40", "gpt_snapshot.pt", env=env)
    assert "Note: saved by 2 processes, resumed by 1" in second
    last = run(gpt_cmd(equal_corpus, 3), tmp_path, env=env)
    assert last.returncode == 0, last.stderr[-3000:]
    assert re.search(r"Resuming training from gpt_snapshot.pt: 1 epoch \+ [1-9][\d,]* windows done", last.stdout), last.stdout
    # Each epoch trained each of its 1920 windows exactly once, across the three runs and all their ranks.
    trained: dict[int, Counter] = {}
    for rank_file in record.iterdir():
        for line in rank_file.read_text().splitlines():
            epoch, *windows = map(int, line.split())
            trained.setdefault(epoch, Counter()).update(windows)
    assert sorted(trained) == [0, 1, 2]
    for epoch, counts in trained.items():
        assert sorted(counts) == list(range(1920)) and set(counts.values()) == {1}, f"epoch {epoch + 1}"
    assert_close_training(tmp_path / "gpt_snapshot.pt", two_process_run, rtol=1e-3)
