"""A throw-away Slurm cluster for the tests: real munged, slurmctld and slurmd daemons.

Every Slurm daemon runs in its own network and UTS namespace, with its own hostname and
address, so a job really spans several hosts: a `localhost` address, Gloo bound to loopback
or a rendezvous host that is not recognised would fail here as on a real cluster. The nodes
meet on a bridge that lives in the controller's namespace, on a range used only inside these
namespaces (10.77.0.0/24). Each daemon sees a private /etc/hosts that names every host.
Client commands (sbatch, squeue, ...) run in the controller's network namespace. Everything
else lives in one temporary folder; `stop` ends every daemon it started, by PID.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from conftest import REPO, process_env, script_env

SUBNET = "10.77.0"
CONTROLLER = "ctl"
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "ip", "nsenter", "unshare")
INSTALL = "apt-get install slurmctld slurmd slurm-client munge iproute2"
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")

SLURM_CONF = """\
ClusterName=ddptest
SlurmctldHost={controller}({controller_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket={folder}/munge.socket,cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule every second, not every minute: a requeued job starts as soon as it may.
SchedulerParameters=batch_sched_delay=0,sched_interval=1
MpiDefault=none
GresTypes=gpu
ReturnToService=2
MinJobAge=600
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(Exception):
    """This machine cannot run the cluster (not root, packages missing, no network namespaces)."""


def check_prerequisites() -> None:
    """Raise SlurmUnavailable, saying what to do, unless the cluster can be started here."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("needs root (network namespaces, and daemons running jobs as root)")
    missing = [command for command in COMMANDS if shutil.which(command) is None]
    if missing:
        raise SlurmUnavailable(f"{', '.join(missing)} not found; install them: {INSTALL}")


class SlurmCluster:
    """`nodes` compute nodes node1..nodeN, each with 2 CPUs and 2 emulated GPUs, and a controller.

    The GPUs are Slurm's only (a job that asks for them gets SLURM_GPUS_ON_NODE and
    CUDA_VISIBLE_DEVICES); CUDA sees none, so the training runs on the CPU.
    """

    def __init__(self, folder: Path, nodes: int = 2) -> None:
        self.folder = folder
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.addresses = {CONTROLLER: f"{SUBNET}.1", **{n: f"{SUBNET}.{10 + i}" for i, n in enumerate(self.nodes, 1)}}
        self.netns_prefix = f"ddpslurm{os.getpid()}-"
        self.namespaces: list[str] = []
        self.daemons: dict[str, subprocess.Popen] = {}
        self.conf = folder / "slurm.conf"

    # ------------------------------------------------------------------ start and stop

    def start(self, timeout: float = 60) -> None:
        """Start every daemon and wait until every node is idle; SlurmUnavailable if this machine cannot."""
        check_prerequisites()
        self._write_files()
        self._make_network()
        self._start_daemon("munged", None, [
            "munged", "--foreground", "--force", f"--socket={self.folder}/munge.socket",
            f"--key-file={self.folder}/munge.key", f"--pid-file={self.folder}/munged.pid",
            f"--log-file={self.folder}/munged.log", f"--seed-file={self.folder}/munged.seed",
        ])  # fmt: skip
        self._wait(lambda: (self.folder / "munge.socket").exists(), "munged to listen", timeout)
        self._start_daemon("slurmctld", CONTROLLER, ["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._start_daemon(node, node, ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait(self._nodes_idle, "every node to be idle", timeout)

    def stop(self, timeout: float = 60) -> None:
        """Cancel every job, end every daemon by PID, kill what is left of jobs, delete the namespaces."""
        try:
            if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
                self.cancel_all(timeout)
        finally:
            self._stop_daemons()
            for pid in self.job_processes():  # only if a job outlived its slurmd
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for name in reversed(self.namespaces):
                subprocess.run(["ip", "netns", "delete", name], check=False)

    def _write_files(self) -> None:
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        key = self.folder / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self.folder.chmod(0o700)
        node_lines = "\n".join(f"NodeName={n} NodeAddr={self.addresses[n]} CPUs=2 RealMemory=4000 Gres=gpu:2" for n in self.nodes)
        # Slurm drains a node whose GPU files are missing or not character devices: these are /dev/null's.
        for i in range(2):
            os.mknod(self.folder / f"gpu{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        (self.folder / "gres.conf").write_text(f"Name=gpu File={self.folder}/gpu[0-1]\n")
        self.conf.write_text(
            SLURM_CONF.format(controller=CONTROLLER, controller_addr=self.addresses[CONTROLLER], folder=self.folder, node_lines=node_lines)
        )
        hosts = ["127.0.0.1 localhost"] + [f"{address} {name}" for name, address in self.addresses.items()]
        (self.folder / "hosts").write_text("\n".join(hosts) + "\n")

    def _make_network(self) -> None:
        """One namespace per host; the nodes' veth pairs meet on a bridge in the controller's."""
        ctl = self._add_namespace(CONTROLLER)
        ip = ["ip", "-n", ctl]
        self._ip(*ip, "link", "set", "lo", "up")
        self._ip(*ip, "link", "add", "br0", "type", "bridge")
        self._ip(*ip, "addr", "add", f"{self.addresses[CONTROLLER]}/24", "dev", "br0")
        self._ip(*ip, "link", "set", "br0", "up")
        for node in self.nodes:
            ns = self._add_namespace(node)
            self._ip(*ip, "link", "add", f"v-{node}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip(*ip, "link", "set", f"v-{node}", "master", "br0", "up")
            self._ip("ip", "-n", ns, "addr", "add", f"{self.addresses[node]}/24", "dev", "eth0")
            self._ip("ip", "-n", ns, "link", "set", "eth0", "up")
            self._ip("ip", "-n", ns, "link", "set", "lo", "up")

    def _add_namespace(self, host: str) -> str:
        name = self.netns_prefix + host
        result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise SlurmUnavailable(f"cannot create a network namespace: {result.stderr.strip()}")
        self.namespaces.append(name)
        return name

    @staticmethod
    def _ip(*cmd: str) -> None:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")

    def _start_daemon(self, name: str, host: str | None, argv: list[str]) -> None:
        """Start a daemon in the foreground; on a host, in that host's network and UTS namespaces.

        `nsenter`, `unshare` and `sh` each exec the next program, so the PID we hold is the
        daemon's. The private mount namespace lets /etc/hosts be replaced for this host alone.
        (`ip netns exec` would also remount /sys, which slurmd cannot run with.)
        """
        if host is not None:
            argv = [
                "nsenter", f"--net=/run/netns/{self.netns_prefix}{host}", "unshare", "--uts", "--mount", "--",
                "sh", "-c", 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"',
                "sh", str(self.folder / "hosts"), host, *argv,
            ]  # fmt: skip
        with open(self.folder / f"{name}.out", "w") as log:
            self.daemons[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _stop_daemons(self) -> None:
        for daemon in self.daemons.values():
            if daemon.poll() is None:
                daemon.terminate()
        deadline = time.monotonic() + 5
        for daemon in self.daemons.values():
            try:
                daemon.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=30)

    def _nodes_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
        return states[1::2] == ["idle"] * len(self.nodes)

    def _wait(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [name for name, daemon in self.daemons.items() if daemon.poll() is not None]
            if dead or time.monotonic() > deadline:
                problem = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout} s"
                raise RuntimeError(f"waiting for {what}: {problem}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for failure messages."""
        parts = []
        for log in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ------------------------------------------------------------------ using the cluster

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of client commands, which sbatch passes on to the job."""
        env = script_env()
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this Python's torchrun
        for name in [name for name in env if name.startswith(("SLURM_", "SBATCH_", "SRUN_")) and name != "SLURM_CONF"]:
            del env[name]  # from a Slurm job this test suite may itself run in
        env.update(extra)
        return env

    def run(self, *cmd: str, cwd: Path = REPO, timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scancel, ...) run where it can reach the controller."""
        argv = ["nsenter", f"--net=/run/netns/{self.netns_prefix}{CONTROLLER}", *cmd]
        return subprocess.run(argv, cwd=cwd, env=self.env(**env), capture_output=True, text=True, timeout=timeout)

    def sbatch(self, script: str, *args: str, options: tuple[str, ...] = (), cwd: Path = REPO, **env: str) -> int:
        """Submit `script` with sbatch from `cwd` (the job's SLURM_SUBMIT_DIR); return the job id."""
        result = self.run("sbatch", "--parsable", *options, script, *args, cwd=cwd, **env)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """The fields of `scontrol show job` (JobState, Restarts, StdOut, NodeList, ...)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id))
        if result.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def output(self, job_id: int) -> str:
        """What the job wrote to its output file so far."""
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_output(self, job_id: int, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output(job_id))
            if match:
                return match
            if self.job(job_id)["JobState"] in ENDED:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen in job {job_id} ({self.job(job_id)['JobState']}):\n{self.output(job_id)[-4000:]}")

    def wait_for_workers(self, job_id: int, count: int, timeout: float = 120) -> dict[int, dict[str, str]]:
        """The job's torchrun workers (PID -> environment), once `count` of them run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.job(job_id)["JobState"] not in ENDED:
            workers = self.workers(job_id)
            if len(workers) >= count:
                return workers
            time.sleep(0.1)
        raise AssertionError(f"{count} workers not seen in job {job_id} ({self.job(job_id)['JobState']}):\n{self.output(job_id)[-4000:]}")

    def wait_for_end(self, job_id: int, timeout: float = 120) -> dict[str, str]:
        """Wait until the job has ended for good; return its fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in ENDED:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s:\n{self.output(job_id)[-4000:]}")

    def queue(self) -> list[int]:
        """Jobs in the queue: pending, running, or still ending (completing)."""
        return [int(job_id) for job_id in self.run("squeue", "-h", "-o", "%i").stdout.split()]

    def wait_for_queue_without(self, job_ids: list[int], timeout: float = 60) -> None:
        """Wait until these jobs have left the queue: every process of theirs has ended."""
        self._wait(lambda: not set(job_ids) & set(self.queue()), f"jobs {job_ids} to leave the queue", timeout)

    def cancel_all(self, timeout: float = 60) -> None:
        job_ids = self.queue()
        if job_ids:
            self.run("scancel", *map(str, job_ids))
            self.wait_for_queue_without(job_ids, timeout)

    def job_processes(self, job_id: int | None = None) -> list[int]:
        """Live processes of one job (or of any job of this cluster), found by their environment."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = process_env(int(entry.name))
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and env.get("SLURM_CONF") == str(self.conf) and "SLURM_JOB_ID" in env:
                if job_id is None or env["SLURM_JOB_ID"] == str(job_id):
                    found.append(int(entry.name))
        return found

    def workers(self, job_id: int) -> dict[int, dict[str, str]]:
        """The job's torchrun workers (processes with a LOCAL_RANK): PID -> environment."""
        workers = {}
        for pid in self.job_processes(job_id):
            try:
                env = process_env(pid)
            except OSError:
                continue
            if "LOCAL_RANK" in env:
                workers[pid] = env
        return workers
