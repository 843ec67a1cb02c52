"""slurm/sbatch_run.sh and mingpt/slurm/sbatch_run.sh on a real Slurm cluster of two nodes, each its own host (slurm_cluster.py).

Every job is the project's script, submitted unmodified with `sbatch` from the repository root;
tests change only sbatch options (--chdir puts the output file and the snapshot in tmp_path).
"""

import re
import subprocess
import time

import torch

from support import snapshots
from conftest import REPO, RESUME_ARGS, assert_bit_identical, epochs, script_env

SCRIPT = "slurm/sbatch_run.sh"
USAGE = "submit from the repository root: sbatch slurm/sbatch_run.sh"


def test_two_jobs_share_the_nodes_and_scancel_leaves_no_process(slurm, tmp_path):
    # Each job takes 1 of the 2 CPUs of each node, so both run at once, with the same first node.
    # One asks for the nodes' 2 emulated GPUs: one process per GPU (training on the CPU all the same).
    options = (f"--chdir={tmp_path}",)
    cpu_job = slurm.sbatch(SCRIPT, "100000", "10", options=options)
    gpu_job = slurm.sbatch(SCRIPT, "100000", "10", options=(*options, "--gpus-per-node=2"))
    for job_id, per_node in ((cpu_job, 1), (gpu_job, 2)):
        slurm.wait_for_output(job_id, r"Epoch 11/100000")  # after the first snapshot
        assert slurm.job(job_id)["NodeList"] == "node[1-2]"
        assert f"Batchsize: 32 x {2 * per_node} ranks" in slurm.output(job_id)
        workers = sorted((env["SLURMD_NODENAME"], env["LOCAL_RANK"]) for env in slurm.workers(job_id).values())
        assert workers == [(node, str(rank)) for node in ("node1", "node2") for rank in range(per_node)]
    ports = {re.search(r"rendezvous at \S+:(\d+)", slurm.output(job_id)).group(1) for job_id in (cpu_job, gpu_job)}
    assert len(ports) == 2, "two jobs on one first node must not share a rendezvous port"
    start = time.monotonic()
    slurm.run("scancel", str(cpu_job), str(gpu_job))
    slurm.wait_for_queue_without([cpu_job, gpu_job], timeout=60)
    # SIGTERM ends every process at once; nothing waited for Slurm's SIGKILL (KillWait, 30 s).
    assert time.monotonic() - start < 20
    for job_id in (cpu_job, gpu_job):
        assert slurm.job_processes(job_id) == [], f"processes of job {job_id} outlived it"
        job = slurm.job(job_id)
        assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0"
        assert snapshots.read(str(tmp_path / f"snapshot-{job_id}.pt"), "cpu")["EPOCHS_RUN"] % 10 == 0


def test_two_node_job_trains_on_both_nodes_and_the_warning_signal_requeues_it_to_resume_from_its_snapshot(slurm, tmp_path, reference_snapshot):
    job_id = slurm.sbatch(SCRIPT, *RESUME_ARGS, options=(f"--chdir={tmp_path}",))  # 60 epochs, a snapshot every 10
    workers = slurm.wait_for_workers(job_id, 2).values()
    # One process per node (each node gave the job 1 CPU), on both nodes, one rank each.
    assert sorted(env["SLURMD_NODENAME"] for env in workers) == ["node1", "node2"]
    assert sorted(env["RANK"] for env in workers) == ["0", "1"]
    slurm.wait_for_output(job_id, r"Epoch 12/60")  # after the first snapshot
    # What Slurm does for `--signal=B:USR1@120` when the time limit nears: SIGUSR1 to the batch shell alone.
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    job = slurm.wait_for_end(job_id, timeout=180)
    output = slurm.output(job_id)  # both runs: the output file is opened in append mode
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output[-3000:]
    # The rendezvous is at the first node's own address, not localhost, on a port from the job id.
    assert f"2 nodes x 1 processes, rendezvous at 10.77.0.11:{20000 + job_id % 10000} (node1)" in output
    snapshot = tmp_path / f"snapshot-{job_id}.pt"
    assert f"SIGUSR1: the job is requeued now; it resumes from {snapshot}" in output
    first_run, resumed = output.split(f"Resuming training from {snapshot}: ")
    done = int(resumed.split()[0])
    assert done % 10 == 0 and done >= 10 and f"Epoch {done} | Training snapshot saved at {snapshot}\n" in first_run
    assert epochs(first_run)[-1][0] < 60, "the first run was not stopped"
    assert [n for n, _ in epochs(resumed)] == list(range(done + 1, 61)), "an epoch after the snapshot was repeated or skipped"
    assert output.count("Batchsize: 32 x 2 ranks") == len(epochs(output))
    assert_bit_identical(snapshot, reference_snapshot)
    assert (tmp_path / f"slurm-ddp-multinode-{job_id}.out").exists()


def test_job_submitted_away_from_the_repository_fails_with_one_line(slurm, tmp_path):
    job_id = slurm.sbatch(str(REPO / SCRIPT), cwd=tmp_path)
    job = slurm.wait_for_end(job_id, timeout=60)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0"
    assert slurm.output(job_id) == f"error: {tmp_path}/slurm/launch.sh not found; {USAGE}\n"


def test_script_run_outside_slurm_fails_with_one_line(tmp_path):
    env = {name: value for name, value in script_env().items() if not name.startswith("SLURM_")}
    result = subprocess.run(["bash", str(REPO / SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == f"error: not in a Slurm job; {USAGE}\n" and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_mingpt_script_trains_a_tiny_gpt_on_both_nodes(slurm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the king sees the sea. the queen loves a crown.\n" * 200)
    overrides = (
        f"data_config.path={corpus}", "gpt_config.n_layer=1", "gpt_config.n_head=2", "gpt_config.n_embd=32",
        "data_config.block_size=16", "trainer_config.batch_size=32", "trainer_config.max_epochs=2", "trainer_config.log_every=50",
    )  # fmt: skip
    job_id = slurm.sbatch("mingpt/slurm/sbatch_run.sh", *overrides, options=(f"--chdir={tmp_path}",))
    job = slurm.wait_for_end(job_id, timeout=180)
    output = slurm.output(job_id)
    assert job["JobState"] == "COMPLETED", output[-3000:]
    assert "2 nodes x 1 processes, rendezvous at 10.77.0.11" in output
    assert "2 ranks on cpu" in output and "Epoch 2/2 | test loss" in output and "Sample:\n" in output
    snapshot = torch.load(tmp_path / f"gpt_snapshot-{job_id}.pt", weights_only=True)
    assert snapshot["EPOCHS_RUN"] == 2 and snapshot["WINDOWS_DONE"] == 0
    assert (tmp_path / f"slurm-ddp-mingpt-{job_id}.out").exists()
