"""The Kaggle and Colab notebook runs top to bottom in Jupyter's own executor (nbclient, a real
python3 kernel), on CPU, in its quick mode, in a fresh copy of the repository: every step, the
mp.spawn lesson, the capstone and the scaling table. A cell that raises fails the test, and so
does a `!` command that fails (the notebook's stop_if_failed raises then)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import EPOCH_LINE, REPO

NOTEBOOK = REPO / "notebooks" / "ddp_on_kaggle_and_colab.ipynb"
SHARED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # the capstone's text, where CI keeps it
CELL_TIMEOUT_S = 300
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks
SPAWN_ERROR = "AttributeError: Can't get attribute 'worker' on <module '__main__' (built-in)>"
CLEAR_OUTPUTS = (
    "python -c \"import nbformat as n; p='notebooks/ddp_on_kaggle_and_colab.ipynb'; b=n.read(p, 4); "
    "[c.update(outputs=[], execution_count=None, metadata={}) for c in b.cells if c.cell_type == 'code']; n.write(b, p)\""
)


def copy_of_repository(folder: Path) -> Path:
    """The repository's files as a learner's clone has them (untracked new files too, ignored ones not)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[nbformat.NotebookNode, str | None]:
    """The notebook after running it top to bottom, and the error that stopped it (None: none)."""
    checkout = copy_of_repository(tmp_path_factory.mktemp("notebook") / "repo")
    notebook = nbformat.read(checkout / NOTEBOOK.relative_to(REPO), as_version=4)
    environment = {
        "DDP_NOTEBOOK_QUICK": "1",
        "DDP_NOTEBOOK_TEXT": str(SHARED_TEXT),  # where it is absent, the capstone's cell says so and trains nothing
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `!python`, `!torchrun`: this Python's
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # one thread per process: 2 processes share the 2 cores fairly
    }
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(checkout)}})
    with pytest.MonkeyPatch.context() as patch:  # the kernel, and every command it runs, inherit this environment
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            client.execute()
        except CellExecutionError as err:
            return notebook, ANSI_COLOUR.sub("", str(err))
    return notebook, None


def output_of(notebook: nbformat.NotebookNode, cell_id: str) -> str:
    """Everything a cell showed: its streams, its results and displays as text, its error. A cell the
    run never reached skips the test: the test of the whole run fails, and says where it stopped."""
    [cell] = [cell for cell in notebook.cells if cell.get("id") == cell_id]
    if cell.execution_count is None:
        pytest.skip(f"cell {cell_id!r} never ran: the notebook stopped before it")
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            data = output.get("data", {})
            parts.append(data.get("text/markdown") or data.get("text/plain", ""))
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}")
    return "".join(parts)


def epoch_numbers(text: str) -> list[int]:
    return [int(match.group(1)) for match in EPOCH_LINE.finditer(text)]


def test_committed_notebook_is_valid_and_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    ids = [cell.get("id") for cell in notebook.cells]
    assert len(set(ids)) == len(ids) and all(ids), "every cell needs its own id: the tests find cells by it"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id!r} has outputs; clear them: {CLEAR_OUTPUTS}"
            assert not cell.metadata, f"cell {cell.id!r} has metadata {dict(cell.metadata)}; clear it: {CLEAR_OUTPUTS}"


def sizes_on(gpus: int, quick: str | None) -> dict:
    """What the notebook's sizes cell sets on a machine with this many GPUs (it is plain Python)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = next(cell.source for cell in notebook.cells if cell.id == "sizes")
    environ = {name: value for name, value in os.environ.items() if not name.startswith("DDP_NOTEBOOK_")}
    if quick is not None:
        environ["DDP_NOTEBOOK_QUICK"] = quick
    namespace = {"os": SimpleNamespace(environ=environ), "GPUS": gpus, "print": lambda *args: None}
    exec(source, namespace)
    return namespace


@pytest.mark.parametrize("gpus", [1, 2])
def test_gpu_sizes_are_settings_the_capstone_accepts(gpus):
    """The sizes a GPU run gets, which no test here can run: fp16 (a T4 has no bf16), and the same
    global batch of 256 windows on Colab's one T4 and on Kaggle's two."""
    from mingpt.config import DEFAULT_CONFIG, load_config
    from mingpt.model import GPT
    from mingpt.trainer import batch_plan

    sizes = sizes_on(gpus, quick=None)
    assert sizes["QUICK"] is False and sizes["STEP"] == "50 10"
    configs = load_config(DEFAULT_CONFIG, sizes["GPT"].split())
    assert configs.trainer.precision == "fp16" and configs.trainer.max_epochs == 1
    assert batch_plan(configs.trainer, gpus) == (256, 128, 3 - gpus), "one micro-batch per step on two T4s, two on one"
    configs.gpt.vocab_size, configs.gpt.block_size = 65, configs.data.block_size  # Tiny Shakespeare's 65 characters
    parameters = sum(p.numel() for p in GPT(configs.gpt).parameters())
    explained = next(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.id == "sizes-md")
    assert f"{parameters / 1e6:.1f}M-parameter GPT" in explained


def test_quick_mode_is_the_default_without_a_gpu_and_can_be_asked_for_on_one():
    assert sizes_on(0, quick=None)["QUICK"] is True and "precision=fp32" in sizes_on(0, quick=None)["GPT"]
    assert sizes_on(1, quick="1")["QUICK"] is True and "precision=fp16" in sizes_on(1, quick="1")["GPT"]
    assert sizes_on(0, quick="0")["QUICK"] is False


def test_notebook_runs_top_to_bottom_without_a_cell_error(executed):
    notebook, error = executed
    if error is not None:
        pytest.fail(f"a cell failed:\n{error[-6000:]}", pytrace=False)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "not every cell ran"
    assert "QUICK=True" in output_of(notebook, "sizes")
    assert not (REPO / "hello_ddp.py").exists(), "the notebook wrote into the repository, not into its copy"


def test_steps_print_their_epoch_lines(executed):
    notebook, _ = executed
    single, spawned, torchrun = (output_of(notebook, cell) for cell in ("step1", "step2", "step3"))
    assert epoch_numbers(single) == [1, 2] and "[cpu] Epoch 2/2 | Batchsize: 32 | Steps: 64 |" in single, single[-3000:]
    assert "checkpoint saved at checkpoint.pt" in single
    for output in (spawned, torchrun):
        assert epoch_numbers(output) == [1, 2] and "Batchsize: 32 x 2 ranks" in output, output[-3000:]
    assert "Training snapshot saved at snapshot.pt" in torchrun


def test_crash_is_restarted_from_the_snapshot(executed):
    notebook, _ = executed
    output = output_of(notebook, "crash")
    assert "simulated crash at the start of epoch 3" in output, output[-3000:]
    resumed = output.split("Resuming training from snapshot.pt: 2 epochs done")
    assert len(resumed) == 2, output[-3000:]
    assert epoch_numbers(resumed[0]) == [1, 2] and epoch_numbers(resumed[1]) == [3, 4], output[-3000:]


def test_mp_spawn_of_a_cell_function_fails_with_the_error_the_notebook_shows(executed):
    notebook, _ = executed
    output = output_of(notebook, "spawn-fails")
    assert re.search(r"mp.spawn raised ProcessExitedException: process \d terminated with exit code 1", output), output[-3000:]
    assert f"the children died of: {SPAWN_ERROR}" in output, output[-3000:]
    explained = next(cell.source for cell in notebook.cells if cell.id == "spawn-md")
    assert SPAWN_ERROR in explained, "the markdown quotes the error this machine gives"


def test_a_function_in_a_file_runs_under_torchrun_and_mp_spawn(executed):
    notebook, _ = executed
    for cell in ("hello-torchrun", "hello-spawn"):
        output = output_of(notebook, cell)
        for rank in (0, 1):
            assert f"rank {rank} of 2: sum of ranks 1" in output, f"{cell}:\n{output[-3000:]}"


def test_capstone_trains(executed):
    notebook, _ = executed
    output = output_of(notebook, "capstone")
    if not SHARED_TEXT.exists():
        assert f"capstone skipped: no Tiny Shakespeare at {SHARED_TEXT}" in output, output[-3000:]
        pytest.skip("needs the Tiny Shakespeare text: put it at ../shared/data/tinyshakespeare.txt")
    assert "2 ranks on cpu" in output and "2 processes x 1 micro-batch of 16" in output, output[-3000:]
    assert re.search(r"Epoch 1/1 \| test loss \d", output), output[-3000:]
    assert "Training snapshot saved at gpt_snapshot.pt" in output


def test_ends_with_the_scaling_table_of_this_machine(executed):
    notebook, _ = executed
    printed, shown = output_of(notebook, "scaling"), output_of(notebook, "scaling-table")
    header = "| workload | single process | DDP x1 | DDP x2 | speedup x2 | efficiency x2 | DDP overhead at 1 rank |"
    for output in (printed, shown):
        assert header in output and re.search(r"\| toy \(samples/s\) \| [\d,]+ \| [\d,]+ \| [\d,]+ \|", output), output[-3000:]
    assert "CPU, " in shown and "median of 1 runs" in shown, "the table of the machine it ran on, just measured"
    assert notebook.cells[-1].cell_type == "markdown" and notebook.cells[-2].id == "scaling-table", "the notebook ends with the table"
