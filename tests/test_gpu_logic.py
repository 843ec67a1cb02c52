"""The CUDA paths' logic, run on CPU: MFU, peaks, precision, evaluation without host copies, FSDP's
logged gradient norm. Where a fact only a GPU has matters (its name, its compute capability), it is
passed in; the processes, process groups and collectives are real (torchrun, gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys

import pytest
import torch

from conftest import REPO, no_traceback_from, python_cmd, run, torchrun_cmd
from mingpt.report import peak_flops
from mingpt.trainer import DTYPES, chosen_precision, loss_scaler

H100_SXM = "NVIDIA H100 80GB HBM3"

# A RunReport on each rank of a real job, told it runs on an H100 SXM in bf16. Every rank trains
# 8 windows of 128 tokens per step, 100 steps in 2 s: the job's global batch grows with the ranks.
REPORTER = f"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
from mingpt.config import TrainerConfig
from mingpt.report import RunReport
dist.init_process_group("gloo")
config = TrainerConfig(metrics_path=sys.argv[1])
world = dist.get_world_size()
for gpu in ({H100_SXM!r}, "NVIDIA GeForce RTX 4090"):
    report = RunReport(config, torch.device("cpu"), flops_per_token=10**9, tokens_per_step=world * 8 * 128, precision="bf16", gpu=gpu)
    tokens_per_s, mfu = report.throughput({{"steps": 100, "total": 2.0}})
    report.close()
    if dist.get_rank() == 0:
        print(json.dumps({{"gpu": gpu, "tokens_per_s": tokens_per_s, "mfu": mfu}}), flush=True)
dist.destroy_process_group()
"""


def test_mfu_on_two_processes_is_that_of_one_gpu(tmp_path):
    script = tmp_path / "reporter.py"
    script.write_text(REPORTER)
    result = run(torchrun_cmd(str(script), str(tmp_path / "metrics.jsonl")), tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    known, unknown = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    per_gpu_tokens_per_s = 100 * 8 * 128 / 2.0
    assert known["tokens_per_s"] == pytest.approx(2 * per_gpu_tokens_per_s)  # the job's throughput: both ranks
    assert known["mfu"] == pytest.approx(10**9 * per_gpu_tokens_per_s / 989.5e12)  # one GPU's share over one GPU's peak
    assert unknown["mfu"] is None
    notes = [line for line in result.stdout.splitlines() if line.startswith("No MFU")]
    assert notes == [
        "No MFU: mingpt/report.py has no bf16 peak for 'NVIDIA GeForce RTX 4090' (add its dense figure from NVIDIA's datasheet to PEAK_TFLOPS)"
    ]


@pytest.mark.parametrize(
    "gpu, precision, tf32, tflops",
    [
        (H100_SXM, "bf16", True, 989.5),
        ("NVIDIA H100 PCIe", "bf16", True, 756.5),  # a substring match gave it the SXM's 989
        ("NVIDIA H100 NVL", "fp16", True, 835.5),
        (H100_SXM, "fp32", True, 494.5),  # fp32 matmuls run on TF32 tensor cores when allowed
        (H100_SXM, "fp32", False, 67),
        ("NVIDIA A100-SXM4-80GB", "bf16", True, 312),
        ("Tesla T4", "fp16", True, 65),
        ("Tesla T4", "fp32", True, 8.1),  # no TF32 before Ampere: allow_tf32 changes nothing
        ("Tesla T4", "bf16", True, None),  # emulated bf16 has no peak to compare with
        ("NVIDIA H100", "bf16", True, None),  # not a name torch gives: no guess
    ],
)
def test_peak_is_looked_up_by_exact_name_and_precision(gpu, precision, tf32, tflops):
    assert peak_flops(gpu, precision, tf32) == (tflops * 1e12 if tflops else None)


@pytest.mark.parametrize(
    "capability, strategy, chosen",
    [
        ((7, 5), "ddp", "fp16"),  # T4 (Kaggle, Colab)
        ((7, 0), "ddp", "fp16"),  # V100
        ((7, 5), "fsdp", "fp32"),  # fsdp takes no fp16
        ((8, 0), "ddp", "bf16"),  # A100
        ((9, 0), "fsdp", "bf16"),  # H100
        (None, "ddp", "fp32"),  # CPU
    ],
)
def test_auto_precision_follows_the_compute_capability(capability, strategy, chosen):
    precision, note = chosen_precision("auto", strategy, capability)
    assert precision == chosen
    assert bool(note) == (capability is not None and capability < (8, 0))
    assert loss_scaler(precision, "cpu").is_enabled() == (precision == "fp16")


def test_auto_precision_without_native_bf16_is_fp16_with_a_grad_scaler_and_says_why():
    precision, note = chosen_precision("auto", "ddp", (7, 5))
    assert DTYPES[precision] is torch.float16 and loss_scaler(precision, "cpu").is_enabled()
    assert note == "precision auto: this GPU (compute capability 7.5) has no bf16 units, so fp16 with loss scaling (GradScaler)"
    assert chosen_precision("auto", "fsdp", (7, 5))[1].endswith(
        "so fp32: fp16 would need a loss scaler that FSDP's sharded gradients do not have here"
    )
    assert chosen_precision("bf16", "ddp", (7, 5)) == ("bf16", "")  # asked for by name: as asked


# One real 2-rank job, two checks; each rank prints one JSON line.
# evaluations: both evaluations, the steps' (datautils.evaluate) and the capstone's (Trainer._evaluate),
# recording every tensor made from Python numbers (torch.tensor: aten.lift_fresh). On a GPU each such
# tensor is a copy from the host that waits for the GPU to finish its queue.
# norms: the same weights on both ranks, as a DDP copy and an FSDP copy; each rank one batch of its own.
# Trainer._optimizer_step clips each and returns the norm that RunReport.step logs with .item().
RANKS = f"""
import contextlib, copy, json, sys, types, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, {str(REPO)!r})
import datautils
from mingpt.char_dataset import CharDataset
from mingpt.config import GPTConfig, TrainerConfig
from mingpt.model import GPT
from mingpt.trainer import Trainer, loss_scaler, shard

class FromHost(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.made = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.made += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {{}}))

def evaluations(rank, world):
    torch.manual_seed(0)
    toy, val = torch.nn.Linear(datautils.IN_FEATURES, 1), datautils.MyTrainDataset(10, seed=1)
    batches = [val[range(0, 6)], val[range(6, 10)]]
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, dropout=0.0, vocab_size=11, block_size=8))
    test_set = CharDataset(torch.randint(0, 11, (100,)), 8)
    trainer = types.SimpleNamespace(raw_model=gpt, device=torch.device("cpu"), global_rank=rank, world_size=world, test_set=test_set,
                                    config=TrainerConfig(batch_size=16), autocast=contextlib.nullcontext())
    with FromHost() as recorded:
        sums = datautils.evaluate(toy, batches, "cpu")
        test_loss = Trainer._evaluate(trainer)
    with torch.no_grad():
        whole = float(gpt(*test_set[torch.arange(len(test_set))])[1])
    return {{"from_host": recorded.made, "samples": float(sums[1]), "test_loss": test_loss, "whole": whole}}

def norms(rank):
    torch.manual_seed(0)
    ddp_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, dropout=0.0, vocab_size=11, block_size=16))
    fsdp_model = copy.deepcopy(ddp_model)
    shard(fsdp_model, "fp32", torch.device("cpu"))
    batch = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(1 + rank))
    found = {{}}
    for name, model, raw in (("ddp", DDP(ddp_model), ddp_model), ("fsdp", fsdp_model, fsdp_model)):
        model(batch, batch)[1].backward()
        optimizer = torch.optim.SGD(raw.parameters(), lr=1.0)
        trainer = types.SimpleNamespace(raw_model=raw, optimizer=optimizer, scaler=loss_scaler("fp32", "cpu"), config=TrainerConfig(grad_norm_clip=0.1),
                                        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
        found[name] = Trainer._optimizer_step(trainer).item()
    found["weights_differ_by"] = max(float((a - b.full_tensor()).abs().max()) for a, b in zip(ddp_model.parameters(), fsdp_model.parameters()))
    return found

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
found = {{"rank": rank, "evaluations": evaluations(rank, world), "norms": norms(rank)}}
sys.stdout.write(json.dumps(found) + "\\n")  # one write: the two ranks' lines do not interleave
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """RANKS run as a script under torchrun on 2 processes; the JSON line each rank printed."""
    folder = tmp_path_factory.mktemp("ranks")
    script = folder / "ranks.py"
    script.write_text(RANKS)
    result = run(torchrun_cmd(str(script)), folder, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    found = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(found) == 2
    return found


def test_evaluation_counts_are_made_on_the_device_not_copied_from_the_host(ranks):
    for rank in (found["evaluations"] for found in ranks):
        assert rank["from_host"] == 0, rank  # torch.tensor(len(...), device=...) made one per batch
        assert rank["samples"] == 10  # and the counts are still right
        assert rank["test_loss"] == pytest.approx(rank["whole"], rel=1e-5)


def test_fsdp_logs_the_gradient_norm_that_ddp_logs_for_the_same_gradients(ranks):
    for rank in (found["norms"] for found in ranks):
        assert rank["ddp"] > 0.1  # above the clip: the clipping acts
        assert rank["fsdp"] == pytest.approx(rank["ddp"], rel=1e-5), rank  # the global norm, not this rank's shards'
        assert rank["weights_differ_by"] < 1e-6  # and both clipped alike


# ---------------------------------------------------------------- benchmarks: a failed workload is one line


def test_scaling_bench_without_the_text_says_where_to_put_it_and_keeps_the_other_figures(tmp_path):
    missing = tmp_path / "tinyshakespeare.txt"
    cmd = python_cmd("bench/scaling.py", "--workloads", "toy", "mingpt", "--repeats", "1", "--max_ranks", "1", "--corpus", str(missing))
    result = run([*cmd, "--results", str(tmp_path / "results")], tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr == (
        f"error: mingpt not measured: no text at {missing}; download Tiny Shakespeare there "
        "(https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt) or pass --corpus FILE\n"
    )
    table = (tmp_path / "results" / "scaling_cpu.md").read_text()
    assert "| toy (samples/s) |" in table and "mingpt" not in table
    assert (tmp_path / "results" / "scaling_cpu.png").exists()


def test_scaling_bench_reports_a_capstone_that_fails_to_start_in_one_line(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n" * 527)  # 10,013 characters: the bench trains on 0.2%, 90% of them train
    cmd = python_cmd("bench/scaling.py", "--workloads", "mingpt", "--repeats", "1", "--max_ranks", "1", "--corpus", str(short))
    result = run([*cmd, "--results", str(tmp_path / "results")], tmp_path, timeout=300)
    assert result.returncode == 1
    assert result.stderr == (
        "error: mingpt not measured: 18 characters cannot fill one window of block_size 64; use more text or a smaller block_size\n"
    ), result.stderr[-3000:]
    assert not (tmp_path / "results").exists()  # nothing measured, nothing written


def bench_module(name: str):
    """A bench/ script imported as a module (bench/ is on the path, as when it runs)."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "gpus, says",
    [
        (0, "--device cuda: no CUDA GPU is visible; use --device cpu"),
        (1, "--device cuda gives each process its own GPU: --nprocs 2 4 needs 4, this machine has 1; compare on CPU (--device cpu)"),
        (2, "--device cuda gives each process its own GPU: --nprocs 2 4 needs 4, this machine has 2; pass --nprocs with counts from 2 to 2"),
        (8, None),
    ],
)
def test_equivalence_bench_on_gpus_needs_a_gpu_per_process(gpus, says):
    assert bench_module("equivalence").device_problem("cuda", [2, 4], gpus) == says
    assert bench_module("equivalence").device_problem("cpu", [2, 4], gpus) is None


def test_equivalence_bench_asked_for_gpus_it_lacks_says_so_in_one_line(tmp_path):
    result = run(python_cmd("bench/equivalence.py", "--device", "cuda"), tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: --device cuda: no CUDA GPU is visible; use --device cpu\n"


def test_equivalence_bench_names_the_card_it_ran_on_in_heading_and_file():
    equivalence = bench_module("equivalence")
    assert equivalence.described("cuda", H100_SXM) == ("NVIDIA H100 80GB HBM3, a GPU per process, NCCL", "nvidia-h100-80gb-hbm3")
    assert equivalence.described("cpu", None) == ("CPU, gloo", "cpu")


# ---------------------------------------------------------------- preflight: a hung all-reduce is a problem line


def test_preflight_reports_a_rank_that_hangs_in_an_all_reduce_in_one_problem_line(tmp_path, jobs):
    # The path NCCL takes too, with TORCH_NCCL_BLOCKING_WAIT=1: the collective raises after --timeout.
    job = jobs(torchrun_cmd("tools/preflight.py", "--timeout", "5", "--repeats", "1000000"), tmp_path)
    job.wait_for(r"all-reduce\s+size")  # rank 0 starts the timed all-reduces; rank 1 is in them too
    hung = job.worker(local_rank=1)
    os.kill(hung, signal.SIGSTOP)  # it hangs: rank 0's all-reduce waits for it
    try:
        job.wait_for(r"preflight: 1 problem\n", timeout=60)
    finally:
        os.kill(hung, signal.SIGCONT)  # it finds rank 0 gone, and leaves
    assert job.wait(timeout=60) != 0
    output = job.output()
    problems = [line for line in output.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, output[-3000:]
    assert problems[0].startswith(
        "problem: connecting or an all-reduce over gloo took over 5 s (--timeout): a rank hangs, or cannot reach the others; "
        "check the interfaces above, and each node's output (["
    ), problems[0]
    assert no_traceback_from("preflight.py", output)


# ---------------------------------------------------------------- bench/gpu_check.sh, its parts on CPU


def gpu_check(tmp_path, *parts: str, **env: str):
    return run(["bash", str(REPO / "bench" / "gpu_check.sh"), *parts], tmp_path, timeout=600, env={"RESULTS": str(tmp_path / "results"), **env})


def test_gpu_check_compile_part_without_a_compiler_says_so_in_one_line(tmp_path):
    (tmp_path / "corpus.txt").write_text("a text that is never read: the part stops before it trains\n")
    result = gpu_check(tmp_path, "compile", DEVICE="cpu", CXX="/nonexistent/g++", DATA=str(tmp_path / "corpus.txt"))  # Inductor: $CXX; Triton: $CC
    says = "compile: not run: torch.compile needs a C++ compiler for Inductor's CPU kernels (g++, or CXX=...), and there is none here\n"
    assert result.returncode == 1 and result.stderr == says, result.stderr[-3000:]
    assert (tmp_path / "results" / "gpu_check_compile_cpu.md").read_text().endswith(says)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU is told")
@pytest.mark.parametrize(
    "parts, env, says",
    [
        ([], {}, "error: usage: bash bench/gpu_check.sh PART... (PART: steps, mingpt, compile, gpt2); DEVICE=cpu for a smoke run on CPU\n"),
        (
            ["all"],
            {},
            "error: unknown part 'all'; usage: bash bench/gpu_check.sh PART... (PART: steps, mingpt, compile, gpt2); DEVICE=cpu for a smoke run on CPU\n",
        ),
        (["steps"], {}, "error: no CUDA GPU is visible; DEVICE=cpu runs the parts on CPU\n"),
        (
            ["mingpt"],
            {"DEVICE": "cpu", "DATA": "/nonexistent/input.txt"},
            "error: no text for minGPT at /nonexistent/input.txt; download Tiny Shakespeare there or set DATA=path/to/tinyshakespeare.txt\n",
        ),
    ],
    ids=["no part", "unknown part", "no GPU", "no text"],
)
def test_gpu_check_started_wrong_says_so_in_one_line(tmp_path, parts, env, says):
    result = gpu_check(tmp_path, *parts, **env)
    assert result.returncode == 1 and result.stderr == says, result.stderr[-3000:]
