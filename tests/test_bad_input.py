"""Bad input gets one clear line, a non-zero exit, no traceback, and leaves files alone."""

import hashlib
import io
import os
import random

import pytest
import torch

import datautils
from conftest import epochs, free_port, no_traceback_from, python_cmd, run, torchrun_cmd

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize(
    "script, args, says",
    [
        ("single_gpu.py", ["0", "10"], "total_epochs: must be greater than 0"),
        ("single_gpu.py", ["10", "-1"], "save_every: must be greater than 0"),
        ("single_gpu.py", ["ten", "10"], "expected a whole number, got 'ten'"),
        ("single_gpu.py", ["10", "10", "--batch_size", "0"], "--batch_size: must be greater than 0"),
        ("single_gpu.py", ["10", "10", "--num_workers", "-1"], "--num_workers: must be 0 or more, got -1"),
        ("single_gpu.py", ["5", "5", "--device", "tpu"], "invalid choice: 'tpu'"),
        ("multigpu.py", ["5", "5", "--world_size", "0"], "--world_size: must be greater than 0"),
        ("multigpu.py", ["5", "5", "--batch_size", "x"], "expected a whole number, got 'x'"),
        ("multigpu_torchrun.py", ["5", "5"], "launched by torchrun, not python: torchrun --standalone --nproc_per_node=gpu multigpu_torchrun.py"),
        ("multinode.py", ["5", "5"], "launched by torchrun, not python: torchrun --nnodes=2 --nproc_per_node=gpu"),
        ("multigpu.py", ["5", "5", "--sync_bn"], "--sync_bn needs --workload images"),
        pytest.param(
            "multigpu.py", ["5", "5", "--device", "cuda"], "no CUDA GPU is visible", marks=pytest.mark.skipif(not NO_GPU, reason="a GPU is present")
        ),
    ],
)
def test_bad_arguments_get_one_line(tmp_path, script, args, says):
    result = run(python_cmd(script, *args), tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


@pytest.mark.parametrize("script", ["single_gpu.py", "multigpu.py"])
def test_missing_cifar10_without_network_says_how_to_get_it(tmp_path, script):
    env = {"https_proxy": f"http://127.0.0.1:{free_port()}", "http_proxy": f"http://127.0.0.1:{free_port()}"}  # offline
    result = run(python_cmd(script, "1", "1", "--workload", "images", "--data_dir", str(tmp_path / "cifar")), tmp_path, env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "could not get CIFAR-10 into" in errors[0] and "--data_dir fake" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


TORCHRUN_CASES = [
    (["0", "5"], "total_epochs: must be greater than 0"),
    (["5", "5", "--snapshot_path", "no/such/folder/snapshot.pt"], "does not exist"),
    (["5", "5", "--snapshot_path", "/sys/snapshot.pt"], "is not writable"),
    (["5", "5", "--simulate_failure_at", "6"], "--simulate_failure_at: epoch 6 never comes in 5 epochs"),
]


@pytest.fixture(scope="module")
def late_rank_zero(tmp_path_factory) -> dict[str, str]:
    """An environment in which rank 0 starts `LATE_RANK_ZERO` env seconds late, as on a loaded machine.

    Every rank finds the same mistake; the one that finds it first must not end the job before
    rank 0 has said what it is (torchrun stops the other workers as soon as one exits)."""
    folder = tmp_path_factory.mktemp("late")
    (folder / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep(float(os.environ.get('LATE_RANK_ZERO', '2')))\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def assert_reported_once(result, script: str, says: str) -> None:
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(says) == 1, output[-3000:]
    assert no_traceback_from(script, output)


# Each mistake once, on either script: the checks are shared (cli, snapshots); the stress test runs them all on both.
@pytest.mark.parametrize("script, args, says", [(("multigpu_torchrun.py", "multinode.py")[i % 2], *case) for i, case in enumerate(TORCHRUN_CASES)])
def test_bad_arguments_under_torchrun_are_reported_once_even_if_rank_0_starts_late(tmp_path, late_rank_zero, script, args, says):
    assert_reported_once(run(torchrun_cmd(script, *args), tmp_path, env=late_rank_zero), script, says)


@pytest.mark.stress
@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("args, says", TORCHRUN_CASES)
@pytest.mark.parametrize("script", ["multigpu_torchrun.py", "multinode.py"])
def test_stress_every_bad_argument_line_arrives_once(tmp_path, late_rank_zero, script, args, says, nproc):
    """python -m pytest -m stress: 20 runs of each case, rank 0 starting 0 to 3 s late."""
    rng = random.Random(f"{script}{args}{nproc}")
    for attempt in range(20):
        env = {**late_rank_zero, "LATE_RANK_ZERO": f"{rng.uniform(0, 3):.2f}"}
        assert_reported_once(run(torchrun_cmd(script, *args, nproc=nproc), tmp_path, env=env), script, says)


def real_snapshot_bytes(model: torch.nn.Module | None = None) -> bytes:
    *_, default_model, optimizer = datautils.load_train_objs()
    model = model or default_model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, model.in_features)).sum().backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"MODEL_STATE": model.state_dict(), "OPTIMIZER_STATE": optimizer.state_dict(), "EPOCHS_RUN": 3}, buffer)
    return buffer.getvalue()


class RunsCode:
    """A pickle that would create a file when loaded by an unsafe torch.load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def planted_file(kind: str, folder) -> bytes:
    if kind == "corrupt":
        return os.urandom(4096)
    if kind == "truncated":
        data = real_snapshot_bytes()
        return data[: len(data) // 2]
    if kind == "not a snapshot":
        buffer = io.BytesIO()
        torch.save({"weights": torch.ones(3)}, buffer)
        return buffer.getvalue()
    if kind == "different model":
        return real_snapshot_bytes(torch.nn.Linear(5, 1))
    buffer = io.BytesIO()  # malicious
    torch.save({"MODEL_STATE": RunsCode(str(folder / "CODE_RAN")), "OPTIMIZER_STATE": {}, "EPOCHS_RUN": 1}, buffer)
    return buffer.getvalue()


SNAPSHOT_CASES = {
    "corrupt": "is not a readable snapshot",
    "truncated": "is not a readable snapshot",
    "not a snapshot": "is not a snapshot of this program",
    "different model": "was saved from a different model",
    "malicious": "could run code when loaded, so it was not loaded",
}


# Each kind once, on either script; on two ranks where each script meets its first kind (both ranks find the
# damage, one line reports it), on one for the others: the check, support/snapshots.py, is the same for all.
@pytest.mark.parametrize(
    "script, kind, nproc",
    [(("multinode.py", "multigpu_torchrun.py")[i % 2], kind, 2 if i < 2 else 1) for i, kind in enumerate(SNAPSHOT_CASES)],
)
def test_unusable_snapshot_is_refused_and_left_untouched(tmp_path, script, kind, nproc):
    path = tmp_path / "snapshot.pt"
    path.write_bytes(planted_file(kind, tmp_path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run(torchrun_cmd(script, "3", "1", nproc=nproc), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    error_lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, output[-3000:]
    assert "snapshot.pt" in error_lines[0] and SNAPSHOT_CASES[kind] in error_lines[0]
    assert "move snapshot.pt away" in error_lines[0]  # and what to do about it
    assert no_traceback_from(script, output)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the snapshot was modified"
    assert not (tmp_path / "CODE_RAN").exists(), "loading the snapshot ran code"
    assert epochs(output) == []
