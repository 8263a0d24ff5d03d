"""A real, throw-away Slurm cluster for the tests: munged + slurmctld + two slurmd "nodes" on this one machine.

Everything lives in a temporary directory (config via SLURM_CONF, state, spool, logs, a private munge key and
socket); the daemons run in the foreground as children of the test process and are stopped by PID afterwards. The
two node names are added to /etc/hosts as 127.0.0.x aliases for the life of the cluster and removed again.

    cluster = SlurmCluster.start()          # raises SlurmUnavailable with the reason when it cannot
    job = cluster.sbatch(script_text)       # -> job id
    cluster.wait(job, states={"COMPLETED"})
    cluster.stop()

Requirements: root, and Debian's `slurmctld slurmd slurm-client munge` (.ci/slurm-setup.sh installs them).
`slurm_cluster_or_skip()` turns SlurmUnavailable into a pytest skip with the reason, or into a failure when CI=true.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# ftlaunch-test-cluster"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be started here (not root, packages missing, a daemon did not come up); the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_requirements() -> str | None:
    """Why a cluster cannot be started on this machine, or None if it can be tried."""
    if os.geteuid() != 0:
        return "not root (the test cluster's slurmd must run as root)"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}; run .ci/slurm-setup.sh)"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    root: Path
    nodes: list[str]
    gpus_per_node: int
    cpus_per_node: int
    partition: str
    env: dict = field(default_factory=dict)
    procs: dict = field(default_factory=dict)  # name -> Popen
    started_s: float = 0.0

    # ---------------------------------------------------------------- start / stop
    @classmethod
    def start(cls, nodes: int = 2, gpus_per_node: int = 2, cpus_per_node: int = 4, partition: str = "debug",
              timeout_s: float = 60.0) -> "SlurmCluster":
        why = missing_requirements()
        if why:
            raise SlurmUnavailable(why)
        t0 = time.time()
        root = Path(tempfile.mkdtemp(prefix="ftl-slurm-"))
        os.chmod(root, 0o755)  # job steps (as root) and munged are picky about directory modes
        tag = f"{os.getpid() % 1000}"
        names = [f"ftl{tag}n{i + 1}" for i in range(nodes)]
        cluster = cls(root=root, nodes=names, gpus_per_node=gpus_per_node, cpus_per_node=cpus_per_node,
                      partition=partition)
        try:
            cluster._write_files()
            cluster._add_hosts()
            cluster._start_daemons(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        cluster.started_s = time.time() - t0
        return cluster

    @property
    def nodelist(self) -> str:
        prefix = self.nodes[0][:-1]
        return f"{prefix}[1-{len(self.nodes)}]" if len(self.nodes) > 1 else self.nodes[0]

    def _addr(self, i: int) -> str:
        return f"127.0.0.{11 + i}"

    def _write_files(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "munge", "dev", *(f"spool/{n}" for n in self.nodes)):
            (r / sub).mkdir(mode=0o755)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        # Fake GPUs: character devices (same major/minor as /dev/null) for gres.conf's File=.
        gpus = []
        for g in range(self.gpus_per_node):
            dev = r / "dev" / f"nvidia{g}"
            os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
            gpus.append(dev)
        host = socket.gethostname().split(".")[0]
        self.ctld_port = _free_port()
        node_lines = []
        for i, name in enumerate(self.nodes):
            gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
            node_lines.append(f"NodeName={name} NodeAddr={self._addr(i)} NodeHostname={host} Port={_free_port()} "
                              f"CPUs={self.cpus_per_node} RealMemory=4000{gres} State=UNKNOWN")
        conf = f"""\
# Written by tests/slurm_cluster.py for a throw-away test cluster.
ClusterName=ftltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
Waittime=0
{chr(10).join(node_lines)}
PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        (r / "slurm.conf").write_text(conf)
        gres_lines = [f"NodeName={name} Name=gpu File={r}/dev/nvidia[0-{self.gpus_per_node - 1}]"
                      for name in self.nodes] if self.gpus_per_node else []
        (r / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        self.env = {**os.environ, "SLURM_CONF": str(r / "slurm.conf")}
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]

    def _add_hosts(self) -> None:
        lines = [f"{self._addr(i)} {name} {HOSTS_MARK}" for i, name in enumerate(self.nodes)]
        with HOSTS_FILE.open("a") as f:
            f.write("\n".join(lines) + "\n")

    def _remove_hosts(self) -> None:
        try:
            text = HOSTS_FILE.read_text()
        except OSError:
            return
        mine = {f"{self._addr(i)} {name} {HOSTS_MARK}" for i, name in enumerate(self.nodes)}
        kept = [line for line in text.splitlines() if line not in mine]
        if len(kept) != len(text.splitlines()):
            HOSTS_FILE.write_text("\n".join(kept) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def _start_daemons(self, timeout_s: float) -> None:
        r = self.root
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={r}/munge/munge.socket",
                               f"--key-file={r}/munge/munge.key", f"--log-file={r}/log/munged.log",
                               f"--pid-file={r}/munge/munged.pid", f"--seed-file={r}/munge/munged.seed"])
        self._wait_for(lambda: (r / "munge" / "munge.socket").exists(), timeout_s, "munged did not create its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(r / "slurm.conf")])
        for name in self.nodes:
            self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", str(r / "slurm.conf")])
        self._wait_for(self._nodes_idle, timeout_s, "the nodes did not become idle")

    def _wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode}: {self._tail(name)}")
            if predicate():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} within {timeout_s:.0f} s: {self.logs_tail()}")

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return len(states) == len(self.nodes) and all(s == "idle" for s in states.values())

    def _tail(self, name: str, lines: int = 15) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.stdout", self.root / "log" / f"{name}.log"):
            if path.exists():
                texts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return " | ".join(texts)

    def logs_tail(self) -> str:
        return "; ".join(f"[{n}] {self._tail(n, 8)}" for n in ["slurmctld", *(f"slurmd-{x}" for x in self.nodes)])

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons by PID (slurmd, slurmctld, munged), restore /etc/hosts, delete files."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--partition", self.partition], check=False)
            deadline = time.time() + 15
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()
        self._remove_hosts()
        if os.environ.get("FTLAUNCH_KEEP_SLURM_DIR") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------- client side
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, timeout=timeout, **kw)

    def sbatch(self, script: str | Path, *args: str, cwd: Path | None = None, env: dict | None = None):
        """Submit a script (text or path); returns the completed `sbatch --parsable` call (check returncode)."""
        if isinstance(script, str):
            path = self.root / f"submit-{time.time_ns()}.sbatch"
            path.write_text(script)
            script = path
        return self.run(["sbatch", "--parsable", *args, str(script)], check=False, cwd=cwd, env=env or {})

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict ({} once the job is gone)."""
        for attempt in range(5):  # a loaded machine can make one scontrol call time out
            res = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
            if res.returncode == 0:
                return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", res.stdout))
            if "Invalid job id" in res.stderr:
                return {}
            time.sleep(0.5 * (attempt + 1))
        return {}

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "GONE")

    def wait(self, job_id: str, states=TERMINAL_STATES, timeout_s: float = 240.0, poll_s: float = 0.5) -> str:
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            state = self.state(job_id)
            if state in states or state == "GONE":
                return state
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f} s")

    def release_requeued(self, job_id: str, timeout_s: float = 30.0) -> None:
        """A requeued job waits ~2 min (BeginTime) before it may start again; let it start now.

        Not at once: slurmd rejects a credential created in the same second as the old run's revocation
        ("Killing non-startable batch JobId=N: Job credential revoked", the job FAILS). So wait until the nodes
        are done with the old run, then 2 s more."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            states = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
            if states and not any(s.startswith("comp") for s in states):
                break
            time.sleep(0.3)
        time.sleep(2.0)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)


def slurm_cluster_or_skip(**kwargs) -> SlurmCluster:
    """Start a cluster; where Slurm cannot start: pytest.skip with the reason, or pytest.fail when CI=true."""
    import pytest

    try:
        return SlurmCluster.start(**kwargs)
    except SlurmUnavailable as e:
        message = f"Slurm test cluster unavailable: {e}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the Slurm tests must run in CI)", pytrace=False)
        pytest.skip(message)


try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - only the tests import this module
    _pytest = None

if _pytest is not None:
    @_pytest.fixture(scope="session")
    def slurm_cluster():
        """One cluster for the whole test session (two nodes, two fake GPUs each); stopped afterwards."""
        cluster = slurm_cluster_or_skip(nodes=2, gpus_per_node=2)
        print(f"\nslurm test cluster up in {cluster.started_s:.1f} s: {cluster.nodelist} ({cluster.root})")
        try:
            yield cluster
        finally:
            cluster.stop()
