"""Draws the README's pictures of DDP.  Run: python docs/figures/draw_ddp.py [OUT_DIR]

ddp.png: one training step on 2 processes: each its own shard of the data, the same model copy,
gradients averaged bucket by bucket while backward runs, the same optimizer step.
ddp_two_nodes.png: 2 nodes x 2 GPUs: RANK across the job, LOCAL_RANK on each node.
The PNGs go next to this script unless OUT_DIR is given; the same matplotlib draws the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window: runs on a server or in a test

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
DPI = 100  # one drawing unit is one pixel of the PNG
INK = "#222222"
GREY = "#6b6b6b"
RANK_COLORS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7"]  # Okabe-Ito: tell apart with any colour vision
RANK_FILLS = ["#DCEBF7", "#FBEBCB", "#D3F0E6", "#F5E1EC"]
COMM = "#7A5195"  # communication: the all-reduce and the broadcast
COMM_FILL = "#E9DFF0"
FONT = 11


def canvas(width: int, height: int) -> tuple[Figure, Axes]:
    """A figure whose axes are its pixels, y pointing down, so the layout reads like a page."""
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    return fig, ax


def box(ax: Axes, x: float, y: float, w: float, h: float, fill: str, edge: str = INK, text: str = "", **font) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=6", facecolor=fill, edgecolor=edge, linewidth=1.2))
    if text:
        write(ax, x + w / 2, y + h / 2, text, **font)


def write(ax: Axes, x: float, y: float, text: str, size: float = FONT, color: str = INK, ha: str = "center", weight: str = "normal") -> None:
    ax.text(x, y, text, fontsize=size, color=color, ha=ha, va="center", fontweight=weight, linespacing=1.3)


def arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], color: str = INK, both: bool = False, width: float = 1.6) -> None:
    style = "<|-|>" if both else "-|>"
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, color=color, linewidth=width, shrinkA=0, shrinkB=0))


# ddp.png: where each part sits, in pixels
STEP_W, STEP_H = 1160, 600
LANE_Y = (176, 384)  # top of rank 0's lane and of rank 1's
LANE_H = 150
SHUFFLED = [5, 2, 7, 0, 3, 6, 1, 4]  # an example of one shuffled order of 8 samples
SHARD_X, MODEL_X, FORWARD_X, ROWS_X, TIMELINE_X, STEP_X = 130, 372, 518, 690, 702, 1010
TICK = 52  # the width of one layer's backward on the timeline
BACKWARD = [("L4", 0), ("L3", 1), ("L2", 2), ("L1", 3)]  # backward runs from the last layer to the first
BUCKETS = [("bucket 1\nL4 L3", 2, 3.5), ("bucket 2\nL2 L1", 4, 5.5)]  # start and end, in ticks: bucket 1 overlaps L2 and L1


def draw_step() -> Figure:
    fig, ax = canvas(STEP_W, STEP_H)
    draw_sampler(ax)
    headers = [(SHARD_X + 110, "its shard"), (MODEL_X + 70, "model copy"), (FORWARD_X + 50, "forward"),
               (TIMELINE_X + 140, "backward   (time \u2192)"), (STEP_X + 65, "optimizer.step()")]  # fmt: skip
    for x, text in headers:
        write(ax, x, LANE_Y[0] - 22, text, weight="bold")
    for rank, top in enumerate(LANE_Y):
        draw_lane(ax, rank, top)
    draw_between_lanes(ax)
    write(ax, STEP_W / 2, STEP_H - 28, "A bucket is averaged as soon as its gradients are ready, while backward goes on: "
          "communication overlaps computation.", color=GREY)  # fmt: skip
    return fig


def draw_sampler(ax: Axes) -> None:
    """The shuffled order at the top, each sample coloured by the rank that takes it: rank r takes positions r, r+2, ..."""
    write(ax, 20, 30, "DistributedSampler: one shuffled order of the dataset, the same on every rank", ha="left", weight="bold")
    for position, sample in enumerate(SHUFFLED):
        rank = position % 2
        box(ax, 20 + position * 44, 56, 38, 34, RANK_FILLS[rank], RANK_COLORS[rank], str(sample), size=12)
        write(ax, 20 + position * 44 + 19, 106, str(position), color=GREY, size=10)
    write(ax, 20 + 8 * 44 + 4, 106, "position", ha="left", color=GREY, size=10)
    write(ax, 400, 73, "rank r takes positions r, r+2, r+4, ...", ha="left")
    write(ax, 700, 73, "set_epoch(epoch): a new order each epoch", ha="left", color=GREY)


def draw_lane(ax: Axes, rank: int, top: int) -> None:
    color, fill = RANK_COLORS[rank], RANK_FILLS[rank]
    middle = top + LANE_H / 2
    box(ax, 10, top, STEP_W - 20, LANE_H, "white", color)
    write(ax, 64, middle, f"rank {rank}\ncuda:{rank}", weight="bold", color=color, size=12)
    for i, sample in enumerate(SHUFFLED[rank::2]):
        box(ax, SHARD_X + i * 52, middle - 20, 44, 40, fill, color, str(sample), size=12)
    arrow(ax, (SHARD_X + 4 * 52 + 4, middle), (MODEL_X - 4, middle))
    draw_model(ax, MODEL_X, middle - 45)
    arrow(ax, (MODEL_X + 144, middle), (FORWARD_X + 92, middle))
    write(ax, FORWARD_X + 50, middle - 14, "loss", size=10, color=GREY)
    draw_backward(ax, rank, top)
    box(ax, STEP_X, middle - 26, 130, 52, fill, color, "same step")


def draw_model(ax: Axes, x: float, y: float) -> None:
    """A model of 4 layers, drawn the same in every lane: the copies hold the same weights."""
    box(ax, x, y, 140, 90, "#F4F4F4")
    for i, layer in enumerate(["L1", "L2", "L3", "L4"]):
        box(ax, x + 9 + i * 31, y + 12, 29, 66, "white", GREY, layer, size=10)


def draw_backward(ax: Axes, rank: int, top: int) -> None:
    """Two rows on one time axis: backward computing each layer's gradients, and the buckets' all-reduce.

    Rank 1's rows are mirrored (all-reduce on top), so that both ranks' all-reduce rows face each other across the gap.
    """
    compute_y, comm_y = (top + 18, top + 86) if rank == 0 else (top + 86, top + 18)
    write(ax, ROWS_X, compute_y + 23, "compute", size=10, color=GREY, ha="right")
    write(ax, ROWS_X, comm_y + 23, "all-reduce", size=10, color=COMM, ha="right")
    for layer, start in BACKWARD:
        box(ax, TIMELINE_X + start * TICK, compute_y, TICK - 4, 46, RANK_FILLS[rank], RANK_COLORS[rank], layer, size=10)
    for name, start, end in BUCKETS:
        box(ax, TIMELINE_X + start * TICK, comm_y, (end - start) * TICK - 4, 46, COMM_FILL, COMM, name, size=10)
    arrow(ax, (TIMELINE_X + 5.5 * TICK + 2, top + LANE_H / 2), (STEP_X - 4, top + LANE_H / 2))


def draw_between_lanes(ax: Axes) -> None:
    """What joins the ranks: the broadcast at DDP(model), the buckets' all-reduce, and the identical result."""
    gap_top, gap_bottom = LANE_Y[0] + LANE_H, LANE_Y[1]
    gap_middle = (gap_top + gap_bottom) / 2
    arrow(ax, (MODEL_X + 30, gap_top - 12), (MODEL_X + 30, gap_bottom + 12), color=COMM, width=2.2)
    write(ax, MODEL_X + 42, gap_middle, "DDP(model): rank 0's\nweights, copied once", ha="left", color=COMM, size=10)
    for _, start, end in BUCKETS:
        middle = TIMELINE_X + (start + end) / 2 * TICK - 2
        arrow(ax, (middle, gap_top - 18), (middle, gap_bottom + 18), color=COMM, both=True, width=2.2)
        write(ax, middle - 8, gap_middle, "average", ha="right", color=COMM, size=10)
    write(ax, STEP_X + 65, gap_middle, "same update:\ncopies stay identical", size=10)


# ddp_two_nodes.png
NODES_W, NODES_H = 1180, 470
NODE_W, NODES_GAP = 530, 80


def draw_two_nodes() -> Figure:
    fig, ax = canvas(NODES_W, NODES_H)
    write(ax, NODES_W / 2, 26, "2 nodes x 2 GPUs: RANK numbers the processes of the whole job, LOCAL_RANK those of one node", weight="bold")
    for node in range(2):
        draw_node(ax, node, 20 + node * (NODE_W + NODES_GAP))
    gap_x = 20 + NODE_W
    arrow(ax, (gap_x + 6, 236), (gap_x + NODES_GAP - 6, 236), color=COMM, both=True, width=2.2)
    write(ax, gap_x + NODES_GAP / 2, 208, "all-\nreduce", color=COMM, size=10)
    write(ax, NODES_W / 2, NODES_H - 24, "torchrun starts 2 processes on each node; gradients are averaged over all 4.", color=GREY)
    return fig


def draw_node(ax: Axes, node: int, x: float) -> None:
    box(ax, x, 56, NODE_W, 360, "#FAFAFA")
    write(ax, x + 16, 80, f"node {node}", ha="left", weight="bold", size=12)
    for local_rank in range(2):
        draw_process(ax, node * 2 + local_rank, local_rank, x + 16 + local_rank * 258, 104)
    box(ax, x + 16, 350, 240, 46, "white", GREY, f"node {node}'s disk: snapshot.pt", size=10)
    arrow(ax, (x + 136, 314), (x + 136, 350))


def draw_process(ax: Axes, rank: int, local_rank: int, x: float, y: float) -> None:
    """One process: its two numbers, its GPU, and the jobs they give it, each at the same height in every box."""
    color, fill = RANK_COLORS[rank], RANK_FILLS[rank]
    box(ax, x, y, 240, 210, fill, color)
    write(ax, x + 120, y + 28, f"RANK {rank}", weight="bold", size=14, color=color)
    write(ax, x + 120, y + 60, f"LOCAL_RANK {local_rank}", size=12)
    write(ax, x + 120, y + 86, f"uses cuda:{local_rank}", size=11, color=GREY)
    if rank == 0:
        write(ax, x + 120, y + 132, "prints the log\n(RANK 0)", size=10)
    if local_rank == 0:
        write(ax, x + 120, y + 182, "writes this node's snapshot\n(LOCAL_RANK 0)", size=10)


def save(fig: Figure, path: Path) -> None:
    # No "Software" entry: the file does not change with matplotlib's version string alone.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save(draw_step(), out_dir / "ddp.png")
    save(draw_two_nodes(), out_dir / "ddp_two_nodes.png")
    print(f"wrote {out_dir / 'ddp.png'} and {out_dir / 'ddp_two_nodes.png'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=HERE, help="where to write the PNGs (default: next to this script)")
    main(parser.parse_args().out_dir)
