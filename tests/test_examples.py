"""The cheat-sheet and the pictures in docs/: the cheat-sheet really learns, and the pictures are current and legible.

The three mistakes' scripts run on docs/cheatsheet.md, whose test (tests/test_readme.py) checks every
line they print, mistake and fix; the cheat-sheet runs there too, but only here is its learning checked."""

import importlib.util
import itertools
import re
from pathlib import Path

import matplotlib
import pytest
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from conftest import REPO, python_cmd, run, torchrun_cmd

EXAMPLES = "docs/examples"
DRAW = "docs/figures/draw_ddp.py"
PICTURES = ("ddp.png", "ddp_two_nodes.png")


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
