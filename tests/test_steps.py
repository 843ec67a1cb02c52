"""Each step runs end to end on CPU, really learns, and saves what it says it saves."""

import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from conftest import REPO, RESUME_ARGS, epochs, python_cmd, run, torchrun_cmd

from support import cli
import datautils


def assert_learns(output: str, total_epochs: int) -> None:
    losses = epochs(output)
    assert [n for n, _ in losses] == list(range(1, total_epochs + 1)), output[-2000:]
    first, last = losses[0][1], losses[-1][1]
    assert last < 0.1 * first, f"loss fell only from {first} to {last}"


def test_dataset_is_learnable_and_identical_on_every_rank():
    a, b = datautils.MyTrainDataset(256), datautils.MyTrainDataset(256)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    # The best linear fit explains the targets down to the noise: the task is learnable.
    design = torch.cat([a.inputs, torch.ones(256, 1)], dim=1)
    solution = torch.linalg.lstsq(design, a.targets).solution
    residual = (design @ solution - a.targets).pow(2).mean()
    assert residual < 1e-3 < a.targets.var()


def test_single_gpu_learns_and_saves_a_checkpoint(tmp_path):
    # 6 epochs, saved after the 4th and the last: the loss reaches the noise (1e-4) by the 6th, not by the 4th.
    result = run(python_cmd("single_gpu.py", "6", "4"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert_learns(result.stdout, 6)
    assert "Batchsize: 32 | Steps: 64 |" in result.stdout  # 2048 samples / 32 on one device
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(state) == {"weight", "bias"}
    # The weights saved were learned: they are the function the data was drawn from, to the noise...
    truth = true_function()
    scale = float(truth["weight"].abs().max())
    for name, value in state.items():
        error = float((value - truth[name]).abs().max())
        assert error < 1e-3 * scale, f"saved {name} is {error:.2e} from the data's function (of size {scale:.2f})"
    # ...and they are the last epoch's: the held-out loss its line printed (to its 6 decimals).
    _, val_set, model, _ = datautils.load_train_objs()
    model.load_state_dict(state)
    saved = datautils.metrics(datautils.evaluate(model, [val_set[range(len(val_set))]], "cpu"))["val loss"]
    printed = float(re.findall(r"\| val loss ([0-9.]+)", result.stdout)[-1])
    assert saved == pytest.approx(printed, abs=1e-6), f"the checkpoint's val loss is {saved:.6f}, the last epoch printed {printed}"


def true_function() -> dict[str, torch.Tensor]:
    """The toy's linear function, named as nn.Linear names it: solved exactly from noiseless samples of datautils' own data."""
    data = datautils.MyTrainDataset(64, noise=0.0)
    solution = torch.linalg.lstsq(torch.cat([data.inputs, torch.ones(64, 1)], dim=1), data.targets).solution
    return {"weight": solution[:-1].T, "bias": solution[-1]}


SPAWN_EPOCHS = 6  # the loss falls from about 19 to 0.005: learning shows, and the weights are still far from converged


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict[int, tuple[str, Path]]:
    """multigpu.py on 2 processes x 32 and on 1 process x 64, the same global batch, both started at once on
    this host: by process count, the output and the checkpoint (None: the job failed; its output is the error)."""
    found = {}

    def launch(world_size: int, batch_size: int) -> None:
        folder = tmp_path_factory.mktemp(f"spawned{world_size}")
        result = run(python_cmd("multigpu.py", str(SPAWN_EPOCHS), "10", "--world_size", str(world_size), "--batch_size", str(batch_size)), folder)
        found[world_size] = (result.stdout, folder / "checkpoint.pt") if result.returncode == 0 else (result.stderr[-3000:], None)

    threads = [threading.Thread(target=launch, args=sizes) for sizes in ((2, 32), (1, 64))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return found


def test_two_multigpu_jobs_on_one_host_do_not_collide(spawned):
    # Each job's processes meet at a port of their own (a fixed MASTER_PORT, as in the official series, would be taken by the other job).
    for world_size, (output, checkpoint) in spawned.items():
        assert checkpoint is not None, f"the {world_size}-process job failed:\n{output}"
        assert len(epochs(output)) == SPAWN_EPOCHS


def test_multigpu_spawns_two_cpu_ranks_that_learn(spawned):
    output, _ = spawned[2]
    assert_learns(output, SPAWN_EPOCHS)
    # Each rank sees half the data; only rank 0 prints.
    assert output.count("Batchsize: 32 x 2 ranks | Steps: 32") == SPAWN_EPOCHS


VALUES = re.compile(r"Epoch (\d+)/\d+ .*\| loss ([0-9.]+) \| val loss ([0-9.]+)")


def test_multigpu_ranks_train_one_model_the_weights_of_one_process(spawned):
    # DDP averages the gradients: 2 x 32 takes the steps of 1 x 64 (DistributedSampler deals each
    # rank every other sample of the same shuffled order), to float rounding.
    assert all(checkpoint for _, checkpoint in spawned.values()), "a job failed: see test_two_multigpu_jobs_on_one_host_do_not_collide"
    a, b = (torch.load(spawned[n][1], weights_only=True) for n in (2, 1))
    assert a.keys() == b.keys()
    for name in a:
        difference, scale = float((a[name] - b[name]).abs().max()), float(b[name].abs().max())
        assert difference <= 1e-5 * scale, f"{name}: rank 0 saved weights {difference:.2e} away from one process's (of size {scale:.2f})"
    # Rank 0 saved; every rank trained and evaluated its part with its own weights, and the losses
    # printed are sums over all ranks: they are one process's only if rank 1 held rank 0's weights too.
    printed = {n: VALUES.findall(output) for n, (output, _) in spawned.items()}
    assert [int(epoch) for epoch, _, _ in printed[2]] == list(range(1, SPAWN_EPOCHS + 1))
    for (epoch, *losses), (_, *alone) in zip(printed[2], printed[1], strict=True):
        assert [float(v) for v in losses] == pytest.approx([float(v) for v in alone], rel=1e-5, abs=2e-6), f"epoch {epoch}: {losses} vs {alone}"


# What a step does around its process group, in order: import launch, join, make the model and the
# optimizer (which imports torch._dynamo), train a step, leave. Prints how many of gloo's threads (named pt_gloo_runloop, gloo_tcp_loop) are alive.
FREED = f"""
import gc, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
import datautils
from support import launch
if sys.argv[1] == "fsdp":
    import fsdp  # not for DDP: importing FSDP imports torch.distributed.nn, as launch does
gloo = lambda: sum("gloo" in open(f"/proc/self/task/{{task}}/comm").read() for task in os.listdir("/proc/self/task"))
dist.init_process_group("gloo")
_, _, model, optimizer = datautils.load_train_objs()
if sys.argv[1] == "fsdp":  # as fsdp.py does
    fsdp.shard_model(model, "cpu", "toy")
    optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)
else:
    model = torch.nn.parallel.DistributedDataParallel(model)
model(torch.ones(2, datautils.IN_FEATURES)).sum().backward()
optimizer.step()
training = gloo()
model = optimizer = None
gc.collect()
dist.destroy_process_group()
if sys.argv[1] == "fsdp":
    launch.end_process_group_left_up()  # what every worker runs at exit: DTensor's caches hold FSDP's group
print(f"gloo threads: {{training}} in training, {{gloo()}} after destroy_process_group", flush=True)
"""


# torch 2.11 keeps FSDP's device mesh somewhere besides the DTensor caches that launch.py empties: expected
# to fail there, and only there (no other version was seen to), strictly, so that the mark goes when it passes.
OLD_TORCH_KEEPS_THE_MESH = pytest.mark.xfail(
    cli.torch_release(torch.__version__) == (2, 11), reason="torch 2.11 keeps FSDP's mesh elsewhere; 2.14.1 lets it go", strict=True
)


@pytest.mark.parametrize("wrapper", ["ddp", pytest.param("fsdp", marks=OLD_TORCH_KEEPS_THE_MESH)])
def test_destroy_process_group_frees_gloo_so_a_finished_run_cannot_abort_at_exit(tmp_path, wrapper):
    # Threads of gloo left alive at exit abort a process now and then (SIGABRT) after it succeeded.
    (tmp_path / "freed.py").write_text(FREED)
    result = run(torchrun_cmd(str(tmp_path / "freed.py"), wrapper), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = re.findall(r"gloo threads: (\d+) in training, (\d+) after destroy_process_group", result.stdout)
    assert len(counts) == 2 and all(int(training) > 0 and after == "0" for training, after in counts), result.stdout


def test_torchrun_learns_and_snapshots_every_save_every_and_at_the_end(tmp_path):
    result = run(torchrun_cmd("multigpu_torchrun.py", "7", "5"), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_learns(result.stdout, 7)
    assert "Epoch 5 | Training snapshot saved" in result.stdout and "Epoch 7 | Training snapshot saved" in result.stdout
    snapshot = torch.load(tmp_path / "snapshot.pt", weights_only=True)
    assert snapshot["EPOCHS_RUN"] == 7
    assert snapshot["OPTIMIZER_STATE"]["state"], "momentum buffers must be saved"
    assert not list(tmp_path.glob("*.tmp")), "a temporary snapshot file was left behind"


def test_a_finished_run_trains_nothing_and_a_new_global_batch_is_noted(tmp_path, reference_snapshot):
    # Resuming neither repeats nor skips an epoch: tests/test_equivalence.py and the fault tolerance tests check that.
    shutil.copy(reference_snapshot, tmp_path / "snapshot.pt")  # 60 of 60 epochs, 2 processes x 32
    saved = (tmp_path / "snapshot.pt").read_bytes()
    again = run(torchrun_cmd("multinode.py", *RESUME_ARGS, "--batch_size", "16"), tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming training from snapshot.pt: 60 epochs done" in again.stdout
    assert "Note: the global batch changed from 64 (2 processes x 32) to 32 (2 x 16); --batch_size 32 keeps it" in again.stdout
    assert "Nothing to train: the snapshot has 60 of 60 epochs done" in again.stdout and epochs(again.stdout) == []
    assert (tmp_path / "snapshot.pt").read_bytes() == saved, "a run with nothing to train rewrote the snapshot"


def test_augmentation_is_drawn_per_image_and_epoch_on_any_rank_or_worker_and_repeats():
    from torch.utils.data import DataLoader, DistributedSampler

    images, _ = datautils.cifar10("fake")  # random crop and flip over generated images
    again, _ = datautils.cifar10("fake")
    first = torch.stack([images[i][0] for i in range(16)])
    assert torch.equal(first, torch.stack([again[i][0] for i in range(16)])), "another run draws the same augmentations"
    images.set_augmentation_epoch(1)
    assert not torch.equal(first, torch.stack([images[i][0] for i in range(16)])), "each epoch draws new ones"
    # Neighbouring images, as two workers or two ranks would take them, get different draws
    # (the classic bug: every worker starts from the same random state and repeats the others' draws).
    draws = [images.draw(i) for i in range(64)]
    assert len(set(draws)) > 40
    # Whoever fetches an image (a loader worker, either rank) gets the same draw: the resume and any
    # number of processes or workers see exactly the augmentations of an uninterrupted run.
    expected = {i: images[i][0] for i in range(16)}
    for rank in (0, 1):
        sampler = DistributedSampler(range(16), num_replicas=2, rank=rank, shuffle=False)
        loader = DataLoader(images, batch_size=4, sampler=sampler, num_workers=2)
        fetched = torch.cat([batch for batch, _ in loader])
        assert torch.equal(fetched, torch.stack([expected[i] for i in range(rank, 16, 2)]))
