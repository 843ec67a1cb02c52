"""The cheat-sheet, the three mistakes and the pictures in docs/: each runs for real and says what the README says it says."""

import importlib.util
import itertools
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import pytest
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from torch.utils.data.distributed import DistributedSampler

from conftest import REPO, no_traceback_from, python_cmd, run, torchrun_cmd

EXAMPLES = "docs/examples"
DRAW = "docs/figures/draw_ddp.py"
PICTURES = ("ddp.png", "ddp_two_nodes.png")
REDUCTION_ERROR = "RuntimeError: Expected to have finished reduction in the prior iteration before starting a new one."
UNUSED_ERROR = "error: unused.weight, unused.bias got no gradient; fix: find_unused_parameters=True (--find_unused_parameters), or remove them"


def run_side_by_side(cmds: list[list[str]], folder: Path) -> list[subprocess.CompletedProcess]:
    """Run the commands at once, each in a folder of its own, so that one's start-up waits overlap another's work."""
    folders = [folder / str(i) for i in range(len(cmds))]
    for path in folders:
        path.mkdir()
    with ThreadPoolExecutor(len(cmds)) as pool:
        return list(pool.map(run, cmds, folders))


def test_minimal_ddp_learns_and_saves_weights_a_plain_model_loads(tmp_path):
    result = run(torchrun_cmd(f"{EXAMPLES}/minimal_ddp.py"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [(int(epoch), float(loss)) for epoch, loss in re.findall(r"^epoch (\d+) \| loss ([0-9.]+)$", result.stdout, re.M)]
    assert [epoch for epoch, _ in losses] == list(range(5)), result.stdout  # one line per epoch: rank 0 alone prints
    assert losses[-1][1] < 0.01 * losses[0][1], losses
    plain = torch.nn.Linear(4, 1)
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict: no "module." prefix
    # It learned the line the data was made from: y = (2, -1, 0.5, 3) . x + 1.
    assert torch.allclose(plain.weight, torch.tensor([[2.0, -1.0, 0.5, 3.0]]), atol=0.01), plain.weight
    assert torch.allclose(plain.bias, torch.tensor([1.0]), atol=0.01), plain.bias


def test_unused_parameter_stops_the_second_step_and_find_unused_parameters_fixes_it(tmp_path):
    script = f"{EXAMPLES}/mistake_unused_parameter.py"
    mistake, fixed = run_side_by_side([torchrun_cmd(script), torchrun_cmd(script, "--find_unused_parameters")], tmp_path)
    assert mistake.returncode != 0
    # The second step fails. Rank 0 alone prints the line to recognise and names the parameters, first; no traceback of ours.
    assert mistake.stdout == "step 1 done\n", mistake.stdout + mistake.stderr[-3000:]
    assert mistake.stderr.splitlines()[:2] == [REDUCTION_ERROR, UNUSED_ERROR], mistake.stderr[-3000:]
    assert mistake.stderr.count(REDUCTION_ERROR) == 1, mistake.stderr[-3000:]
    assert no_traceback_from("mistake_unused_parameter.py", mistake.stderr), mistake.stderr[-3000:]
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "step 5 done" in fixed.stdout and REDUCTION_ERROR not in fixed.stderr
    assert "no gradient, so no update, for: unused.weight, unused.bias" in fixed.stdout


def test_module_prefix_is_refused_by_a_plain_model_and_either_fix_loads(tmp_path):
    script = f"{EXAMPLES}/mistake_module_prefix.py"
    cmds = [python_cmd(script), python_cmd(script, "--save_module"), python_cmd(script, "--strip_prefix")]
    mistake, save_module, strip_prefix = run_side_by_side(cmds, tmp_path)
    assert mistake.returncode == 1, mistake.stderr[-3000:]
    assert mistake.stdout == "saved keys: module.weight, module.bias\n", mistake.stdout
    assert mistake.stderr.splitlines() == [
        "RuntimeError: Error(s) in loading state_dict for Linear:",
        '  Missing key(s) in state_dict: "weight", "bias".',
        '  Unexpected key(s) in state_dict: "module.weight", "module.bias".',
        'error: the keys carry DDP\'s "module." prefix; fix: save model.module.state_dict() (--save_module), or strip it (--strip_prefix)',
    ], mistake.stderr
    for fix, keys in ((save_module, "saved keys: weight, bias"), (strip_prefix, "keys without the prefix: weight, bias")):
        assert fix.returncode == 0 and fix.stderr == "", fix.stdout + fix.stderr[-3000:]
        assert keys in fix.stdout and fix.stdout.endswith("loaded into a plain torch.nn.Linear\n"), fix.stdout


def dealt(output: str) -> list[list[list[int]]]:
    """For each epoch line, the indices of rank 0 and of rank 1."""
    lines = re.findall(r"^epoch \d+ \| rank 0: \[([\d, ]+)\] \| rank 1: \[([\d, ]+)\]$", output, re.M)
    return [[[int(i) for i in shard.split(", ")] for shard in line] for line in lines]


def sampler_order(rank: int, epoch: int | None) -> list[int]:
    """What DistributedSampler deals rank `rank` of 2, told the epoch or never told."""
    sampler = DistributedSampler(range(16), num_replicas=2, rank=rank)
    if epoch is not None:
        sampler.set_epoch(epoch)
    return list(sampler)


def test_no_set_epoch_repeats_the_order_every_epoch_and_set_epoch_reshuffles(tmp_path):
    script = f"{EXAMPLES}/mistake_no_set_epoch.py"
    mistake, fixed = run_side_by_side([torchrun_cmd(script), torchrun_cmd(script, "--set_epoch")], tmp_path)
    for result in (mistake, fixed):
        assert result.returncode == 0, result.stderr[-3000:]
        epochs = dealt(result.stdout)
        assert len(epochs) == 3, result.stdout
        for rank0, rank1 in epochs:  # either way, the ranks split the data: every sample once per epoch
            assert sorted(rank0 + rank1) == list(range(16)), (rank0, rank1)
    assert dealt(mistake.stdout) == [[sampler_order(0, None), sampler_order(1, None)]] * 3
    assert "every epoch repeats epoch 0's order" in mistake.stdout
    assert dealt(fixed.stdout) == [[sampler_order(0, epoch), sampler_order(1, epoch)] for epoch in range(3)]
    assert len({tuple(rank0) for rank0, _ in dealt(fixed.stdout)}) == 3, "each epoch a new order"
    assert "each epoch deals a new order" in fixed.stdout


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    """The folder that the drawing script, run from the repository root, wrote its PNGs into."""
    folder = tmp_path_factory.mktemp("figures")
    result = run(python_cmd(DRAW, str(folder)), REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_draw_ddp_writes_pngs_of_readme_width(drawn):
    from PIL import Image  # matplotlib's own dependency

    for name in PICTURES:
        assert (drawn / name).is_file(), f"{name} was not written"
        with Image.open(drawn / name) as picture:
            assert picture.format == "PNG" and 900 <= picture.width <= 1200, (name, picture.format, picture.size)


def pinned_matplotlib() -> str:
    return re.search(r"^matplotlib==(\S+)", (REPO / "constraints.txt").read_text(), re.M)[1]


@pytest.mark.skipif(matplotlib.__version__ != pinned_matplotlib(), reason="another matplotlib draws other bytes; CI's pinned one is compared")
def test_the_committed_pictures_are_what_the_script_draws(drawn):
    for name in PICTURES:
        committed = REPO / "docs" / "figures" / name
        assert (drawn / name).read_bytes() == committed.read_bytes(), f"{name} is out of date: run python {DRAW}"


def test_no_text_in_the_pictures_overlaps_text_a_box_edge_or_an_arrow():
    spec = importlib.util.spec_from_file_location("draw_ddp", REPO / DRAW)
    draw_ddp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(draw_ddp)
    for figure in (draw_ddp.draw_step(), draw_ddp.draw_two_nodes()):
        renderer = figure.canvas.get_renderer()
        axes = figure.axes[0]
        texts = [(text.get_text(), text.get_window_extent(renderer)) for text in axes.texts]
        for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
            assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
        for patch in axes.patches:
            extent = patch.get_window_extent(renderer)
            for name, box in texts:
                inside = extent.x0 <= box.x0 and box.x1 <= extent.x1 and extent.y0 <= box.y0 and box.y1 <= extent.y1
                if isinstance(patch, FancyBboxPatch):
                    assert inside or not box.overlaps(extent), f"{name!r} crosses the edge of a box"
                if isinstance(patch, FancyArrowPatch):
                    assert not box.overlaps(extent), f"{name!r} lies on an arrow"
        width, height = figure.canvas.get_width_height()
        assert all(0 < box.x0 and box.x1 < width and 0 < box.y0 and box.y1 < height for _, box in texts), "text outside the picture"
