"""A real two-node SLURM cluster on this machine, for the tests of `slurm/` and of multi-node
launchers (recipe: ../shared/notes/slurm-two-nodes.md).

One `slurmctld` (as host `ctl`, on a bridge) and two `slurmd` daemons, each in its own network,
hostname and mount namespace (`node1`, `node2`, each with its own address and a hosts file that
names all three), so a job's ranks on node2 really talk to node1 over the network. Debian's
packages are installed with apt when missing. Everything is torn down by pid and namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

NODES = ("node1", "node2")
BRIDGE = "mtpbr0"
SUBNET = "10.213.7"
CTL_ADDR = f"{SUBNET}.1"
ADDRS = {name: f"{SUBNET}.{11 + i}" for i, name in enumerate(NODES)}
PACKAGES = ("slurmctld", "slurmd", "slurm-client")


class Unavailable(Exception):
    """This machine cannot run the cluster (the reason says why)."""


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ensure_installed() -> None:
    """Install Debian's SLURM when missing (root only); Unavailable if that cannot be done."""
    if all(shutil.which(d) for d in ("slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and this is not root with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ("apt-get", "install", "-y", "-q", *PACKAGES)
    if _run(*install, check=False, env=env).returncode != 0:
        _run("apt-get", "update", "-q", env=env)
        _run(*install, env=env)


def _conf(root: Path) -> str:
    nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs=2 RealMemory=4000" for n, a in ADDRS.items())
    return f"""\
ClusterName=mtptest
SlurmctldHost=ctl({CTL_ADDR})
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
SlurmctldPort=6817
SlurmdPort=6818
MpiDefault=none
KillWait=10
InactiveLimit=0
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class SlurmCluster:
    """Start with `start()`, stop with `stop()` (idempotent). `env` is what a client needs
    (SLURM_CONF); `node_shell(name, cmd)` runs a command as if logged in on a node."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.hosts = root / "hosts"
        self.env = {"PATH": os.environ["PATH"], "SLURM_CONF": str(self.conf)}
        """What a SLURM client needs; sbatch also gets the environment a test gives it."""
        self._daemons: list[subprocess.Popen] = []

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> SlurmCluster:
        ensure_installed()
        if os.geteuid() != 0:
            raise Unavailable("creating network namespaces needs root")
        self._remove_network()  # a killed earlier session may have left them
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(self.root))
        self.hosts.write_text(
            "127.0.0.1 localhost\n"
            + f"{CTL_ADDR} ctl\n"
            + "".join(f"{a} {n}\n" for n, a in ADDRS.items())
        )
        try:
            self._make_network()
        except RuntimeError as e:
            raise Unavailable(f"cannot make network namespaces: {e}") from e
        self._spawn(
            ["unshare", "-u", "sh", "-c", f"hostname ctl; exec slurmctld -D -f {self.conf}"]
        )
        for node in NODES:
            self._spawn(self._in_node(node, f"exec slurmd -D -f {self.conf}"))
        self._wait_idle()
        return self

    def stop(self) -> None:
        if self.conf.exists():
            _run("scancel", "--full", "--user=root", check=False, env=self.env)
            time.sleep(1)
        for node in NODES:  # job processes live in the nodes' namespaces
            self._kill_namespace(node)
        for p in self._daemons:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self._daemons.clear()
        self._remove_network()

    # --- helpers for tests -------------------------------------------------------------

    def _in_node(self, node: str, cmd: str) -> list[str]:
        """argv running shell `cmd` on `node`: its network, its hostname, its /etc/hosts."""
        return [
            "nsenter",
            f"--net=/var/run/netns/mtp-{node}",
            "unshare",
            "-u",
            "-m",
            "sh",
            "-c",
            f"hostname {node}; mount --bind {self.hosts} /etc/hosts; {cmd}",
        ]

    def node_popen(self, node: str, cmd: str, **kw) -> subprocess.Popen:
        """Start shell `cmd` on `node` (its own session, so a test can kill it whole)."""
        return subprocess.Popen(self._in_node(node, cmd), start_new_session=True, **kw)

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> int:
        """Submit a job; its id."""
        env = {**(os.environ if env is None else env), **self.env}
        proc = _run("sbatch", "--parsable", *args, cwd=cwd, env=env)
        return int(proc.stdout.strip().split(";")[0])

    def signal_batch(self, job_id: int, sig: str, check: bool = True) -> bool:
        """Signal the job's batch shell, as SLURM does `--signal=B:SIG@T` before a time limit.
        Whether it was delivered (check=False: a job that has just ended is not an error)."""
        proc = _run("scancel", f"--signal={sig}", "--batch", str(job_id), check=check, env=self.env)
        return proc.returncode == 0

    def release(self, job_id: int) -> None:
        """Start a requeued job in 2 s (SLURM holds one for about 2 minutes). Not at once: a
        start in the second of the requeue is refused ("Job credential revoked")."""
        deadline = time.monotonic() + 30
        while True:  # the requeue must have reached PENDING before its start can be moved
            if _run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2", check=False,
                    env=self.env).returncode == 0:  # fmt: skip
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cannot release job {job_id}")
            time.sleep(0.5)

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (the first record: an array's first task)."""
        out = _run("scontrol", "show", "job", "-o", str(job_id), env=self.env).stdout
        line = out.splitlines()[0]
        return dict(re.findall(r"(\S+?)=(\S*)", line))

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED")) -> dict:
        """Poll until every task of the job reaches one of the final states."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = _run("scontrol", "show", "job", "-o", str(job_id), env=self.env).stdout
            jobs = [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines()]
            if jobs and all(j["JobState"] in final for j in jobs):
                return jobs[0] if len(jobs) == 1 else {"tasks": jobs}
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {out}")

    def wait_state(self, job_id: int, state: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] == state:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not {state} after {timeout} s: {info}")

    # --- internals ---------------------------------------------------------------------

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.root / "log" / "daemons.out", "ab")  # noqa: SIM115 (the daemon holds it)
        self._daemons.append(
            subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True, env=self.env)
        )

    def _make_network(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{CTL_ADDR}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i, (node, addr) in enumerate(ADDRS.items()):
            ns, host_end, node_end = f"mtp-{node}", f"mtpv{i}h", f"mtpv{i}n"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _run("ip", "link", "set", node_end, "netns", ns)
            _run("ip", "link", "set", host_end, "master", BRIDGE)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", node_end)
            _run("ip", "-n", ns, "link", "set", node_end, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def _kill_namespace(self, node: str) -> None:
        pids = _run("ip", "netns", "pids", f"mtp-{node}", check=False).stdout.split()
        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(int(pid)))
                procs[-1].kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def _remove_network(self) -> None:
        for node in NODES:
            if Path(f"/var/run/netns/mtp-{node}").exists():
                self._kill_namespace(node)
                _run("ip", "netns", "del", f"mtp-{node}", check=False)
        _run("ip", "link", "del", BRIDGE, check=False)

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            for p in self._daemons:
                if p.poll() is not None:
                    raise RuntimeError(f"a SLURM daemon exited: {self._logs()}")
            proc = _run("sinfo", "-h", "-N", "-o", "%N %t", check=False, env=self.env)
            out = proc.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout} s: {out!r}\n{self._logs()}")

    def _logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted((self.root / "log").glob("*"))
        )
