"""A real one-node SLURM cluster under a temporary directory, for tests.

Debian's slurmctld, slurmd and munge (installed with apt-get when missing), every path
under the given directory, daemons started in the foreground (-D / -F) as our own child
processes and stopped by PID. Settings that work on small machines and in containers:
proctrack/pgid, task/none, select/cons_tres, MpiDefault=pmi2; jobs that start more
ranks than cores need `--overcommit`.
"""
import logging
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


class Unavailable(Exception):
    """SLURM cannot be installed or started here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(timeout: float = 600) -> None:
    """apt-get update && apt-get install the SLURM packages when a daemon is missing."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and apt-get (as root) is not available: "
                          "apt-get install " + " ".join(PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class Cluster:
    """slurm.conf, munge key and daemons under `root`; `env` is what sbatch needs."""

    def __init__(self, root: Path, cpus: int):
        self.root, self.cpus = root, cpus
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        for d in ("state", "spool", "munge", "log", "jobs"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.socket = root / "munge" / "munge.socket"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=fedrpctest", f"SlurmctldHost={self.host}",
            # job ids never seen before: MPICH names its shared memory after the job and
            # step, and a segment an aborted job left behind must not meet a new job
            f"FirstJobId={random.randrange(10**5, 6 * 10**7)}",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/pgid", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=pmi2", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin", "KillWait=5", "MinJobAge=600",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            ""]))

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_file = open(self.root / "log" / f"{name}.out", "wb")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log_file,
                                           stderr=subprocess.STDOUT,
                                           start_new_session=True))
        log_file.close()

    def start(self, timeout: float = 60) -> None:
        self._write_conf()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        m = self.root / "munge"
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--key-file={key}",
                               f"--socket={self.socket}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.socket.exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the node did not become idle")

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env,
                           capture_output=True, text=True, timeout=20)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if ok():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise Unavailable(f"{what} within {timeout:g} s; logs: {self.logs()[-1500:]}")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                         for f in sorted((self.root / "log").glob("*")) if f.is_file())

    def stop(self) -> None:
        """Stop the daemons we started (by PID, slurmd first), waiting for each."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        self.procs = []
