"""minGPT capstone: causality, data, config, download, and real 2-rank training and resume.

Tests make their own corpus and serve it from a local HTTP server: no network, no ../shared.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import random
import signal
import threading
from pathlib import Path

import pytest
import torch

from conftest import EVERY_STEP, REPO, free_port, python_cmd, run, signal_at_a_step, snapshot_tensors, steps, torchrun_cmd
from test_fault_tolerance import tensorboard_scalars

from mingpt import char_dataset
from mingpt.char_dataset import DataError
from mingpt.config import ConfigError, DataConfig, GPTConfig, load_config
from mingpt.model import GPT

TINY_MODEL = [
    "gpt_config.n_layer=1", "gpt_config.n_head=2", "gpt_config.n_embd=32", "gpt_config.dropout=0.1",
    "data_config.block_size=16", "trainer_config.batch_size=16", "trainer_config.log_every=20",
]  # fmt: skip


def make_corpus(chars: int, seed: int = 0) -> str:
    """Sentences from a small grammar: structured enough to learn, made here, byte-for-byte repeatable."""
    rng = random.Random(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my king", "the queen"], ["sees", "loves", "fears"], ["the moon.", "a crown.", "the sea."]
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words += [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
    return (" ".join(words) + "\n")[:chars]


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a folder; yields (folder, base URL)."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus(8_000))  # 225 steps of 32 windows an epoch
    return path


def train(corpus: Path, *overrides: str, max_restarts: int = 0, nproc: int = 2) -> list[str]:
    """The torchrun command for a tiny run on `corpus` (2 ranks unless `nproc` says otherwise)."""
    return torchrun_cmd("mingpt/main.py", f"data_config.path={corpus}", *TINY_MODEL, *overrides, max_restarts=max_restarts, nproc=nproc)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "gpt_metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- model and data, in-process


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.0, vocab_size=11, block_size=12)).eval()
    idx = torch.randint(0, 11, (3, 12))
    logits, loss = model(idx)
    assert logits.shape == (3, 12, 11) and loss is None
    for t in range(1, 12):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 11
        new_logits, _ = model(changed)
        assert torch.equal(new_logits[:, :t], logits[:, :t]), f"position < {t} saw the future"
        assert not torch.allclose(new_logits[:, t:], logits[:, t:]), "the change must matter where it is visible"


def test_corpus_is_encoded_once_and_split_at_one_point():
    text = make_corpus(3000)
    chars = char_dataset.vocabulary(text)
    data = char_dataset.encode(text, chars)
    assert char_dataset.decode(data.tolist(), chars) == text
    train_set, test_set = char_dataset.split_datasets(text, chars, DataConfig(block_size=8, train_split=0.9))
    split = int(len(text) * 0.9)
    assert torch.equal(torch.cat([train_set.data, test_set.data]), data)
    assert len(train_set.data) == split  # train is the text before one point, test all after it
    source, targets = train_set[[0, 5]]
    assert torch.equal(source[1], data[5:13]) and torch.equal(targets[1], data[6:14])
    with pytest.raises(DataError, match="vocabulary lacks"):
        char_dataset.encode("zebra!", chars)


# ---------------------------------------------------------------- configuration


def test_overrides_are_typed_and_applied():
    configs = load_config(
        REPO / "mingpt/gpt2_train_cfg.yaml", ["trainer_config.max_epochs=5", "optimizer_config.learning_rate=1e-3", "data_config.sha256="]
    )
    assert configs.trainer.max_epochs == 5
    assert configs.optimizer.learning_rate == 1e-3
    assert configs.data.sha256 == ""
    assert configs.gpt.n_layer == 8 and configs.trainer.batch_size == 216  # the defaults of the YAML file


@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer_config.max_epoch=5", "unknown key trainer_config.max_epoch; valid keys: max_epochs, batch_size"),
        ("model.n_layer=2", "unknown section 'model'; valid sections: data_config, gpt_config"),
        ("gpt_config.n_layer=two", "gpt_config.n_layer must be int, got 'two'"),
        ("trainer_config.max_epochs", "malformed override 'trainer_config.max_epochs'"),
        ("gpt_config.n_head=3", "must be a multiple of gpt_config.n_head"),
        ("trainer_config.batch_size=0", "trainer_config.batch_size must be greater than 0"),
        ("gpt_config.vocab_size=5", "unknown key gpt_config.vocab_size"),
    ],
)
def test_bad_config_says_what_is_valid(override, says):
    with pytest.raises(ConfigError) as raised:
        load_config(REPO / "mingpt/gpt2_train_cfg.yaml", [override])
    assert says in str(raised.value)


def test_bad_config_is_one_line_on_the_command_line(tmp_path):
    result = run(python_cmd("mingpt/main.py", "trainer_config.max_epoch=5"), tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: unknown key trainer_config.max_epoch; valid keys: max_epochs, batch_size" in result.stderr


def test_unreadable_config_file_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("trainer_config: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "bad.yaml", [])


# ---------------------------------------------------------------- download, from a real local server


def test_download_checks_the_checksum_and_caches(tmp_path, http_server):
    folder, base = http_server
    (folder / "good.txt").write_text("to be or not to be\n")
    good_sha = hashlib.sha256(b"to be or not to be\n").hexdigest()
    config = DataConfig(path=f"{base}/good.txt", sha256=good_sha, cache_dir=str(tmp_path / "cache"))
    assert char_dataset.download(config).read_text() == "to be or not to be\n"
    (folder / "good.txt").unlink()  # the cached copy is used from now on
    assert char_dataset.read_text(config) == "to be or not to be\n"

    wrong = DataConfig(path=f"{base}/other.txt", sha256="0" * 64, cache_dir=str(tmp_path / "cache"))
    (folder / "other.txt").write_text("tampered\n")
    with pytest.raises(DataError, match="does not match data_config.sha256"):
        char_dataset.download(wrong)
    assert not char_dataset.cached_path(wrong).exists(), "a mismatched download must not be cached"


def test_download_from_a_server_that_is_down_says_how_to_fix_it(tmp_path):
    config = DataConfig(path=f"http://127.0.0.1:{free_port()}/input.txt", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"could not download .* pass data_config.path=/path/to/file"):
        char_dataset.download(config)


# ---------------------------------------------------------------- real training on 2 ranks


# A snapshot every epoch, a line every step: what the resume tests compare with.
RESUME = ["trainer_config.max_epochs=3", "trainer_config.save_every=1", EVERY_STEP]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, http_server, corpus) -> Path:
    """A 2-rank run of 3 epochs that downloads its corpus from the local server, with its checksum; the
    run that the resume tests below, reading the same text from a file, must end identical to."""
    served, base = http_server
    (served / "corpus.txt").write_bytes(corpus.read_bytes())
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    folder = tmp_path_factory.mktemp("trained")
    cmd = train(corpus, f"data_config.path={base}/corpus.txt", f"data_config.sha256={sha}", *RESUME)
    result = run(cmd, folder)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (folder / "stdout.txt").write_text(result.stdout)
    return folder


def test_two_ranks_learn_and_print_a_sample(trained):
    steps = [m for m in metrics(trained) if "loss" in m]
    tests = [m["test_loss"] for m in metrics(trained) if "test_loss" in m]
    assert len(tests) == 3 and tests[-1] < tests[0], tests
    assert steps[-1]["loss"] < 0.6 * steps[0]["loss"], (steps[0], steps[-1])
    assert all(m["tokens_per_s"] > 0 for m in steps)
    output = (trained / "stdout.txt").read_text()
    assert "Sample:\n" in output and len(output.split("Sample:\n")[1]) >= 200


def test_test_loss_is_the_mean_over_the_whole_test_set_across_ranks(trained, corpus):
    snapshot = torch.load(trained / "gpt_snapshot.pt", weights_only=True)
    config = DataConfig(**snapshot["CONFIG"]["data_config"])
    config.path = str(corpus)
    _, test_set = char_dataset.split_datasets(char_dataset.read_text(config), snapshot["VOCAB"], config)
    gpt = GPTConfig(**snapshot["CONFIG"]["gpt_config"])
    model = GPT(gpt)
    model.load_state_dict(snapshot["MODEL_STATE"])
    model.eval()
    with torch.no_grad():
        total = sum(model(*test_set[batch])[1] * len(batch) for batch in torch.arange(len(test_set)).split(256))
    single_process = float(total / len(test_set))
    reported = [m["test_loss"] for m in metrics(trained) if "test_loss" in m][-1]
    assert reported == pytest.approx(single_process, rel=1e-5)


def test_fp16_clips_the_unscaled_gradient_norm(tmp_path, corpus):
    first_norms = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path / precision
        folder.mkdir()
        cmd = train(corpus, "trainer_config.max_epochs=1", "gpt_config.dropout=0.0", "trainer_config.log_every=1", "data_config.truncate=0.1",
                    f"trainer_config.precision={precision}", "trainer_config.grad_norm_clip=0.5", nproc=1)  # fmt: skip
        result = run(cmd, folder)
        assert result.returncode == 0, result.stderr[-3000:]
        first_norms[precision] = metrics(folder)[0]["grad_norm"]
    # Without unscale_ before clipping, the fp16 norm would be the loss scale (65536) times larger.
    assert first_norms["fp16"] == pytest.approx(first_norms["fp32"], rel=0.02)


# ---------------------------------------------------------------- exact resume after real kills


@pytest.fixture(scope="module")
def uninterrupted(trained) -> Path:
    return trained / "gpt_snapshot.pt"


def assert_same_training(path_a: Path, path_b: Path) -> None:
    a, b = snapshot_tensors(path_a), snapshot_tensors(path_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_sigterm_mid_epoch_saves_at_that_step_and_resumes_bit_identical(tmp_path, jobs, corpus, uninterrupted):
    job = jobs(train(corpus, *RESUME, "trainer_config.tensorboard_dir=tb", max_restarts=3), tmp_path)
    job.wait_for(r"Training snapshot saved at gpt_snapshot.pt: 1 epoch")
    before, after = signal_at_a_step(job, r"epoch 2 \| step 100/", signal.SIGTERM, local_rank=1)
    assert job.wait(timeout=240) == 0, job.output()[-4000:]
    output = job.output()
    # The worker finished its step, saved exactly there, and the restart resumed from that step.
    stopped, restarted = output.split("Stopping on SIGTERM")
    assert "Resuming training from gpt_snapshot.pt: 1 epoch + " in restarted
    resumed_at = steps(restarted.split("Resuming training from")[1])[0] - 1
    assert before <= resumed_at <= after + 2, f"SIGTERM came after step {before}, by step {after + 1}; the restart resumed from step {resumed_at}"
    assert resumed_at == steps(stopped)[-1], "the snapshot is not of the step the stop finished"
    assert_same_training(tmp_path / "gpt_snapshot.pt", uninterrupted)
    # TensorBoard shows one curve through the restart: the global steps of a run never interrupted, each once.
    expected = [m["global_step"] for m in metrics(uninterrupted.parent) if "loss" in m]
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tb", "loss/train")] == expected


@pytest.mark.parametrize("problem", ["damaged snapshot", "missing data file", "server down"])
def test_unusable_files_get_one_error_line(tmp_path, corpus, problem):
    overrides, nproc = ["trainer_config.max_epochs=1"], 2  # 2 ranks: both read the snapshot, one waits for the other's download
    if problem == "damaged snapshot":
        (tmp_path / "gpt_snapshot.pt").write_bytes(b"not a snapshot at all")
        says = "gpt_snapshot.pt is not a readable snapshot"
    elif problem == "missing data file":
        overrides.append(f"data_config.path={tmp_path / 'nowhere.txt'}")
        says, nproc = "nowhere.txt not found; pass data_config.path=", 1  # one rank: the cases above and below show the once
    else:
        overrides.append(f"data_config.path=http://127.0.0.1:{free_port()}/input.txt")
        says = "Connection refused); download it yourself and pass data_config.path="
    result = run(train(corpus, *overrides, nproc=nproc), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], output[-3000:]
    assert 'main.py", line' not in output
