"""preflight.py, the check before a long job: real torchrun on this machine, and on the two hosts of the test Slurm cluster."""

import datetime
import importlib.util
import re
import socket

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, no_traceback_from, python_cmd, run, torchrun_cmd

HOST = socket.gethostname()
SIZES = ["4 B", "64 KiB", "1 MiB", "16 MiB"]
ROW = re.compile(r"^all-reduce\s+(\d+ \w+)\s+[\d.]+ ms\s+[\d.]+ GB/s$", re.MULTILINE)
NODE = re.compile(r"^node (\d+)  (\S+)\s+(ranks? [\d-]+)\s+(\S+) (\S+)\s+(.+)$", re.MULTILINE)


def test_two_processes_on_one_machine_pass_with_a_line_per_node_and_all_reduce_rows(tmp_path):
    result = run(torchrun_cmd("tools/preflight.py"), tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"preflight: 2 ranks on 1 node, gloo, torch {torch.__version__}"
    # gloo uses the interface of the address the hostname resolves to (loopback, on many machines)
    node, host, ranks, interface, address, chosen_by = NODE.match(lines[1]).groups()
    assert (node, host, ranks, chosen_by) == ("0", HOST, "ranks 0-1", f"hostname {HOST}")
    assert address == socket.gethostbyname(HOST) and interface in dict(socket.if_nameindex()).values()
    assert ROW.findall(result.stdout) == SIZES
    assert lines[-1] == "preflight: OK, 2 ranks on 1 node" and len(lines) == 2 + 1 + len(SIZES) + 1
    assert list(tmp_path.iterdir()) == []


def test_interface_that_does_not_exist_is_one_problem_line_with_its_fix(tmp_path):
    result = run(torchrun_cmd("tools/preflight.py", "--timeout", "20"), tmp_path, timeout=120, env={"GLOO_SOCKET_IFNAME": "nosuch0"})
    assert result.returncode != 0
    assert NODE.search(result.stdout).group(4, 5, 6) == ("nosuch0", "(none)", "GLOO_SOCKET_IFNAME=nosuch0")
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, result.stdout
    assert re.fullmatch(
        rf"problem: ranks 0-1 on node 0 \({HOST}\): GLOO_SOCKET_IFNAME=nosuch0 names no interface that is up with an IPv4 address "
        r"\(.+ here\); set GLOO_SOCKET_IFNAME=\S+",
        problems[0],
    ), problems[0]
    assert "all-reduce" not in result.stdout  # no attempt to connect: it would fail, less clearly
    assert result.stdout.endswith("preflight: 1 problem\n")
    assert no_traceback_from("preflight.py", result.stdout + result.stderr)


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "error: this is launched by torchrun, not python: torchrun --standalone --nproc_per_node=gpu tools/preflight.py"),
        (["--timeout", "0"], "preflight.py: error: argument --timeout: must be greater than 0, got 0 (see --help)"),
    ],
    ids=["python", "timeout"],
)
def test_started_wrong_it_says_so_in_one_line(tmp_path, args, says):
    result = run(python_cmd("tools/preflight.py", *args), tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.startswith(says) and result.stderr.count("\n") == 1, result.stderr


def test_a_rank_back_after_rank_0_left_finds_no_verdict_and_no_backtrace():
    """A rank held up past rank 0's verdict and exit (stopped, as in test_gpu_logic.py's hang; or swapped
    out) comes back to a store that left with rank 0, which may host it. Seen under load: a backtrace."""
    spec = importlib.util.spec_from_file_location("preflight", REPO / "tools" / "preflight.py")
    preflight = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preflight)
    rank0 = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # a real store, on a free port
    rank1 = dist.TCPStore("127.0.0.1", rank0.port, is_master=False)
    rank0.set("plan", "connect")
    assert preflight.posted(rank1, ["plan"], datetime.timedelta(seconds=5)) == ["connect"]
    del rank0  # rank 0 leaves, and its store with it
    assert preflight.posted(rank1, ["verdict"], datetime.timedelta(seconds=5)) == [None]


def test_on_two_slurm_hosts_each_node_has_its_own_address_and_loopback_is_a_problem(slurm, tmp_path):
    # Two jobs at once (each takes 1 CPU of each node): one as submitted, one with gloo pinned to loopback.
    options = (f"--chdir={tmp_path}",)
    good = slurm.sbatch("slurm/preflight.sh", options=options)
    bad = slurm.sbatch("slurm/preflight.sh", options=options, GLOO_SOCKET_IFNAME="lo")
    jobs = {job_id: slurm.wait_for_end(job_id) for job_id in (good, bad)}
    header = f"preflight: 2 ranks on 2 nodes, gloo, torch {torch.__version__}"

    output = slurm.output(good)
    assert jobs[good]["JobState"] == "COMPLETED", output[-3000:]
    nodes = {host: f"{interface} {address}" for _, host, _, interface, address, _ in NODE.findall(output)}
    assert nodes == {"node1": "eth0 10.77.0.11", "node2": "eth0 10.77.0.12"}, output[-3000:]
    assert ROW.findall(output) == SIZES
    assert [line for line in output.splitlines() if line.startswith("preflight:")] == [header, "preflight: OK, 2 ranks on 2 nodes"]

    output = slurm.output(bad)
    assert jobs[bad]["JobState"] == "FAILED", output[-3000:]
    problems = [line for line in output.splitlines() if line.startswith("problem:")]
    assert problems == [
        f"problem: {ranks} on node {node} ({host}): GLOO_SOCKET_IFNAME=lo gives loopback 127.0.0.1, "
        "which other nodes cannot reach; set GLOO_SOCKET_IFNAME=eth0"
        for node, host, ranks, *_ in NODE.findall(output)
    ], output[-3000:]
    assert sorted(host for _, host, *_ in NODE.findall(output)) == ["node1", "node2"]  # a problem on each
    assert [line for line in output.splitlines() if line.startswith("preflight:")] == [header, "preflight: 2 problems"]
    assert "all-reduce" not in output  # no attempt to connect: it would fail, less clearly
