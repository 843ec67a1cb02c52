"""Pre-flight check: run it before a long job, started exactly as the job will be, on every node.
    torchrun --standalone --nproc_per_node=gpu tools/preflight.py       # one machine
    torchrun --nnodes=2 --nproc_per_node=gpu --rdzv_id=456 --rdzv_backend=c10d --rdzv_endpoint=HOST:29603 tools/preflight.py

In seconds, global rank 0 prints one line per node (its host, its ranks, the network interface
gloo or NCCL uses there), the time and bus bandwidth of all-reduces at a few sizes, one line
per problem with its fix, and a verdict. The exit status is 0 only when there is no problem.
A node that never starts is torchrun's to time out: add --rdzv_conf=join_timeout=60 to it.

A rank that hangs in an all-reduce is a problem line after --timeout, with gloo and with NCCL. NCCL
by default ends a process whose collective timed out from its watchdog thread (SIGABRT, no line of
ours), so preflight sets TORCH_NCCL_BLOCKING_WAIT=1: each collective waits on the host, up to the
timeout, and then raises. What hangs inside NCCL's own connection setup stays NCCL's to end.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository root holds support/
from support import cli, launch  # noqa: E402

USAGE = "torchrun --standalone --nproc_per_node=gpu tools/preflight.py; on several nodes, the job's torchrun command with tools/preflight.py"
SIZES = (("4 B", 4), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20), ("16 MiB", 16 << 20))  # latency ... bandwidth
SIOCGIFFLAGS, SIOCGIFADDR, IFF_UP = 0x8913, 0x8915, 0x1  # linux/sockios.h, linux/if.h


def ipv4_interfaces() -> dict[str, str]:
    """This machine's network interfaces that are up and have an IPv4 address: name -> address."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack("H", fcntl.ioctl(sock, SIOCGIFFLAGS, request)[16:18])[0]
                address = socket.inet_ntoa(fcntl.ioctl(sock, SIOCGIFADDR, request)[20:24])
            except OSError:  # no IPv4 address
                continue
            if flags & IFF_UP:
                found[name] = address
    return found


def interface(variable: str, interfaces: dict[str, str]) -> tuple[str, str | None, str]:
    """The interface this node's connections use, its address, and what chose it.
    (To see NCCL's own choice: NCCL_DEBUG=INFO prints "NET/Socket : Using ...".)"""
    names = [name for name in os.environ.get(variable, "").split(",") if name]
    if names:  # gloo takes names, NCCL name prefixes ("eth" matches eth0)
        nccl = variable.startswith("NCCL")
        name = ([n for n in interfaces if n in names or (nccl and n.startswith(tuple(names)))] or names)[0]
        return name, interfaces.get(name), f"{variable}={os.environ[variable]}"
    if variable.startswith("NCCL"):  # NCCL's own order: InfiniBand first; loopback and docker last
        ranked = sorted(interfaces, key=lambda n: (n == "lo" or n.startswith("docker"), not n.startswith("ib")))
        name = (ranked or ["lo"])[0]
        return name, interfaces.get(name), "NCCL's default"
    host = socket.gethostname()
    try:  # gloo binds to the address the hostname resolves to
        address = socket.gethostbyname(host)
    except OSError:
        address = "127.0.0.1"
    name = next((n for n, a in interfaces.items() if a == address), None)
    if name is None:  # a loopback address other than 127.0.0.1, or none of this machine's: gloo uses loopback
        name, address = "lo", address if address.startswith("127.") else "127.0.0.1"
    return name, address, f"hostname {host}"


def describe_rank() -> dict:
    """What rank 0 needs to know of this rank."""
    local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    device = "cpu" if gpus == 0 else f"cuda:{local_rank}" if local_rank < gpus else "missing"
    variable = "GLOO_SOCKET_IFNAME" if device == "cpu" else "NCCL_SOCKET_IFNAME"
    interfaces = ipv4_interfaces()
    name, address, chosen_by = interface(variable, interfaces)
    return {
        "rank": int(os.environ["RANK"]), "local_rank": local_rank, "node": int(os.environ["GROUP_RANK"]),
        "host": socket.gethostname(), "device": device, "gpus": gpus, "torch": torch.__version__,
        "variable": variable, "interface": name, "address": address, "chosen_by": chosen_by,
        "others": {n: a for n, a in interfaces.items() if not a.startswith("127.")},
    }  # fmt: skip


def posted(store: dist.Store, keys: list[str], timeout: datetime.timedelta) -> list[str | None]:
    """The values posted under `keys` in the job's store; None for those not posted in time, and for all
    of them once the store is gone: rank 0, which may host it, left after its verdict (a rank held up
    past rank 0's wait for it, as a stopped one is, comes back to a closed store)."""
    try:
        store.wait(keys, timeout)
    except dist.DistStoreError:
        pass  # timed out
    except dist.DistNetworkError:
        return [None] * len(keys)
    return [store.get(key).decode() if store.check([key]) else None for key in keys]


def span(ranks: list[dict]) -> str:
    """Some ranks of one node: torchrun numbers a node's ranks without gaps."""
    return f"ranks {ranks[0]['rank']}-{ranks[-1]['rank']}" if len(ranks) > 1 else f"rank {ranks[0]['rank']}"


def where(ranks: list[dict]) -> str:
    return f"{span(ranks)} on node {ranks[0]['node']} ({ranks[0]['host']})"


def node_problems(node: list[dict], hosts: int) -> list[str]:
    """What keeps this node's ranks from connecting, with the fix."""
    first, problems = node[0], []
    address, chosen_by = first["address"], first["chosen_by"]
    fix = f"set {first['variable']}={next(iter(first['others']), 'IFACE')}"
    if address is None:
        others = ", ".join(f"{n} {a}" for n, a in first["others"].items()) or "no other"
        problems.append(f"{where(node)}: {chosen_by} names no interface that is up with an IPv4 address ({others} here); {fix}")
    elif address.startswith("127.") and hosts > 1:  # fine for torchrun agents on one host
        problems.append(f"{where(node)}: {chosen_by} gives loopback {address}, which other nodes cannot reach; {fix}")
    for rank in (r for r in node if r["device"] == "missing"):
        gpus = f"{rank['gpus']} visible"
        problems.append(f"{where([rank])}: no GPU for local rank {rank['local_rank']} ({gpus}); use --nproc_per_node=gpu")
    return problems


def check(ranks: list[dict | None], backend: str, timeout: datetime.timedelta) -> tuple[list[str], str]:
    """Rank 0: print a line per node; return the problems (one line each, with the fix) and who answered."""
    present = [r for r in ranks if r is not None]
    nodes: dict[int, list[dict]] = {}
    for rank in present:
        nodes.setdefault(rank["node"], []).append(rank)
    who = f"{cli.plural(len(present), 'rank')} on {cli.plural(len(nodes), 'node')}"
    print(f"preflight: {who}, {backend}, torch {torch.__version__}", flush=True)
    width = max(len(node[0]["host"]) for node in nodes.values())
    for number, node in sorted(nodes.items()):
        used = f"{node[0]['interface']} {node[0]['address'] or '(none)'}"
        print(f"node {number}  {node[0]['host']:<{width}}  {span(node):<9}  {used:<21}  {node[0]['chosen_by']}", flush=True)
    waited = f"{timeout.total_seconds():g} s (--timeout)"
    problems = [f"rank {r} did not answer within {waited}; its node's output says why" for r, found in enumerate(ranks) if found is None]
    for node in nodes.values():
        problems += node_problems(node, hosts=len({r["host"] for r in present}))
    # Nodes that differ here may fail to connect, or hang: check before trying.
    for what, key, fix in (("torch versions", "torch", "install the same everywhere"), ("GPU counts", "gpus", "use alike nodes")):
        if len({node[0][key] for node in nodes.values()}) > 1:
            each = ", ".join(f"node {n} {node[0][key]}" for n, node in sorted(nodes.items()))
            problems.append(f"nodes have different {what} ({each}); {fix}")
    return problems, who


def gpu_seconds(collectives: Callable[[], list[dist.Work]]) -> float:
    """The GPU time of the NCCL collectives that `collectives` issues, by CUDA events. Not the host's:
    with TORCH_NCCL_BLOCKING_WAIT the host sleeps a millisecond between looks at each collective."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for work in collectives():  # all issued before the first wait: the GPU runs them back to back
        work.wait()  # the compute stream waits for it; the host too, for at most the timeout
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_all_reduce(nbytes: int, device: str, repeats: int) -> tuple[float, list[int]]:
    """Seconds per all-reduce of `nbytes` (the slowest rank's mean), and the ranks that got a wrong sum."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tensor = torch.full((nbytes // 4,), float(rank + 1), device=device)
    dist.all_reduce(tensor)  # untimed (it sets up buffers); it sums to 1 + 2 + ... + world_size, unless data is corrupted
    wrong = not bool((tensor == world_size * (world_size + 1) / 2).all())
    if device.startswith("cuda"):
        seconds = gpu_seconds(lambda: [dist.all_reduce(tensor, async_op=True) for _ in range(repeats)])
    else:  # gloo: each all-reduce returns when it is done
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(tensor)
        seconds = time.perf_counter() - start
    stats = torch.zeros(1 + world_size, dtype=torch.float64, device=device)
    stats[0], stats[1 + rank] = seconds / repeats, float(wrong)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # a collective is as slow as its slowest rank
    return stats[0].item(), [r for r in range(world_size) if stats[1 + r] > 0]


def measure(device: str, repeats: int) -> list[str]:
    """All-reduces of each size; rank 0 prints a row per size. Returns the problems."""
    rank, world_size, problems = dist.get_rank(), dist.get_world_size(), []
    if rank == 0:
        print(f"all-reduce  {'size':>6}  {'time':>10}  bus bandwidth (slowest rank, mean of {repeats})", flush=True)
    for label, nbytes in SIZES:
        seconds, wrong = time_all_reduce(nbytes, device, repeats)
        bus = 2 * (world_size - 1) / world_size * nbytes / seconds  # as nccl-tests defines it
        if rank == 0:
            print(f"all-reduce  {label:>6}  {seconds * 1e3:7.3f} ms  {bus / 1e9:7.3f} GB/s", flush=True)
        if wrong:
            problems.append(f"all-reduce of {label} gave wrong sums on rank(s) {wrong}; on consumer GPUs try NCCL_P2P_DISABLE=1")
    return problems


def report(problems: list[str], who: str) -> None:
    for problem in problems:
        print(f"problem: {problem}", flush=True)
    print(f"preflight: {cli.plural(len(problems), 'problem')}" if problems else f"preflight: OK, {who}", flush=True)


def connect_and_measure(store: dist.Store, device: str, backend: str, args: argparse.Namespace, who: str) -> int:
    """The process group over the store, then the all-reduces. Rank 0 reports: 0 without a problem."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        if device != "cpu":
            torch.cuda.set_device(device)  # NCCL then uses this rank's GPU only
            # Read when the group is made: a collective that outlasts the timeout then raises here, which
            # becomes a problem line, instead of NCCL's watchdog ending the process (see the top).
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=args.timeout)
        problems = measure(device, args.repeats)
    except RuntimeError as err:  # the ranks could not connect, or a collective timed out
        if "timed out" in str(err).lower():  # gloo: "Timed out waiting ...ms"; NCCL: "... timed out in blocking wait"
            waited = f"{args.timeout.total_seconds():g} s (--timeout)"
            problems = [f"connecting or an all-reduce over {backend} took over {waited}: a rank hangs, or cannot reach the others; "
                        f"check the interfaces above, and each node's output ({cli.brief(err, limit=120)})"]  # fmt: skip
        else:
            problems = [f"connecting or an all-reduce over {backend} failed: {cli.brief(err)}; check the interfaces above, and firewalls"]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        report(problems, who)
    return int(bool(problems))


def roll_call(store: dist.Store, args: argparse.Namespace) -> int:
    """Each rank posts its description; rank 0 checks them all; then all connect and measure, or stop."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    me = describe_rank()
    store.set(f"rank/{rank}", json.dumps(me))
    backend, who = "gloo" if me["device"] == "cpu" else "nccl", ""  # one backend everywhere, once the nodes are alike
    if rank == 0:
        ranks = posted(store, [f"rank/{r}" for r in range(world_size)], args.timeout)
        problems, who = check([json.loads(r) if r else None for r in ranks], backend, args.timeout)
        if problems:
            report(problems, who)
        store.set("plan", "stop" if problems else "connect")
        if problems:
            return 1
    elif posted(store, ["plan"], 2 * args.timeout) != ["connect"]:  # rank 0 waits up to --timeout first
        return 1
    return connect_and_measure(store, me["device"], backend, args, who)


def main(args: argparse.Namespace) -> int:
    """Every rank's exit status: rank 0's verdict. The others wait for it (torchrun would stop rank 0
    as soon as one of them exits non-zero), and rank 0 leaves last: it may host the job's store
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and a rank that loses it mid-request prints a backtrace."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # init_process_group does two things: meet at the job's store (MASTER_ADDR:MASTER_PORT), then
    # connect every pair of ranks. Done apart, the roll call in the store works where connecting fails.
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=args.timeout))
    except dist.DistError as err:
        cli.fail(f"the ranks did not all reach the store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {cli.brief(err)}")
    # torchrun's store outlives a restart of the workers: keys of our own for each attempt
    store = dist.PrefixStore(f"preflight/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    status = roll_call(store, args)
    if rank == 0:
        store.set("verdict", str(status))
        posted(store, [f"left/{r}" for r in range(1, world_size)], args.timeout)
        return status
    verdict = posted(store, ["verdict"], 3 * args.timeout)[0]  # rank 0 may wait out --timeout twice
    if verdict is not None:  # rank 0 is waiting for this, in the store it may host
        store.set(f"left/{rank}", "")
    return int(verdict or 1)


if __name__ == "__main__":
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--timeout", type=cli.seconds, default=datetime.timedelta(seconds=30), metavar="SECONDS",
        help="how long the ranks wait for each other, at the store and in each collective, before reporting who is missing "
        "(default: 30)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=5, metavar="N", help="timed all-reduces of each size, after an untimed one (default: 5)"
    )
    args = parser.parse_args()
    # Launched by torchrun? Dies with it. ("cpu": a rank without its GPU is reported with the other problems.)
    launch.torchrun_worker("cpu", USAGE)
    raise SystemExit(main(args))
