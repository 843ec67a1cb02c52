"""Predict DDP scaling efficiency beyond this machine, from step time and gradient bytes.

    python bench/scaling_model.py

A ring all-reduce moves 2(N-1)/N of the gradient bytes through each rank's link, so one step's
communication takes  t_comm = 2(N-1)/N * bytes / bandwidth + 2(N-1) * latency.  Without overlap
a step takes t_compute + t_comm; DDP overlaps the all-reduce with the backward pass (about 2/3
of the compute), so only what does not fit under it shows:  t_compute + max(0, t_comm - t_backward).
Efficiency is t_compute / step time. The inputs below say which figures are measured and which
are assumed; docs/scaling.md explains the results.
"""

from __future__ import annotations

# name: (gradient bytes per step, compute time per step in seconds, where the time comes from)
WORKLOADS = {
    "toy (Linear 20->1, batch 32)": (21 * 4, 0.31e-3, "measured here: CPU, 1 thread (2048 samples in 0.020 s)"),
    "images (ResNet-18, batch 32, fp32 grads)": (11_181_642 * 4, 5e-3, "assumed: one H100, launch-bound at 32x32 pixels"),
    "minGPT default (25.3M params, 216x128 tokens)": (25_318_912 * 4, 19e-3, "the target: 1.45M tokens/s on one H200"),
    # 628.6M training FLOPs per token (GPT.flops_per_token() of this shape) at 45% of 989 TFLOP/s.
    "GPT-2 small shape (85.9M params, 16x1024 tokens)": (85_892_352 * 4, 16 * 1024 * 628.6e6 / (989e12 * 0.45), "the target: 45% MFU on an H100"),
}
# name: (ranks, bandwidth in bytes/s through each rank's link, latency per message in seconds)
NETWORKS = {
    "8 GPUs, NVLink (~350 GB/s NCCL bus bandwidth)": (8, 350e9, 5e-6),
    "2 nodes, 25 Gb/s": (2, 25e9 / 8, 20e-6),
    "4 nodes, 25 Gb/s": (4, 25e9 / 8, 20e-6),
    "16 nodes, 25 Gb/s": (16, 25e9 / 8, 20e-6),
    "2 nodes, 100 Gb/s": (2, 100e9 / 8, 10e-6),
    "4 nodes, 100 Gb/s": (4, 100e9 / 8, 10e-6),
    "16 nodes, 100 Gb/s": (16, 100e9 / 8, 10e-6),
}
BACKWARD_SHARE = 2 / 3  # of the compute: the part the all-reduce can hide under


def efficiency(grad_bytes: float, t_compute: float, ranks: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """(efficiency without overlap, with overlap) for one step."""
    t_comm = 2 * (ranks - 1) / ranks * grad_bytes / bandwidth + 2 * (ranks - 1) * latency
    hidden = min(t_comm, BACKWARD_SHARE * t_compute)
    return t_compute / (t_compute + t_comm), t_compute / (t_compute + t_comm - hidden)


def main() -> None:
    print("| workload | step time (source) | " + " | ".join(NETWORKS) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in NETWORKS) + " |")
    for name, (grad_bytes, t_compute, source) in WORKLOADS.items():
        cells = []
        for ranks, bandwidth, latency in NETWORKS.values():
            plain, overlapped = efficiency(grad_bytes, t_compute, ranks, bandwidth, latency)
            cells.append(f"{plain:.2f} / {overlapped:.2f}")
        print(f"| {name} | {t_compute * 1e3:.2f} ms ({source}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
