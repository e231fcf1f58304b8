"""Starting real multi-process federations from tests: processes tagged in their
environment, a hard timeout, and every process the launch started (and their children,
e.g. the ranks of a torchrun or an mpiexec) killed by PID at the end."""
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic.users=30", "data.synthetic.items=50",
         "data.synthetic.mean_interactions=10", "data.synthetic.min_interactions=5",
         "fed.latent_dim=8", "fed.local_epochs=1", "fed.batch_size=32", "fed.rounds=3",
         "gfmfr.groups=3", "gfmfr.fusion_epochs=3", "run.progress=false",
         "encoder.cache=false", "fed.client_fraction=0.6"]
LAUNCH_TIMEOUT_S = 150


# ---------------------------------------------------------------------- launching ranks
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes started by a launch with this tag (it is in their env)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes()
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"FEDRPC_TEST_TAG={tag}".encode() in env and state != "Z":
            out.append(int(p.name))
    return out


class Launch:
    """Processes of one federation: returncodes, output, wall time."""

    def __init__(self, argv_per_rank: list[list[str]], out: Path, env: dict,
                 timeout: float = LAUNCH_TIMEOUT_S, during=None):
        """`during(procs)`, when given, runs once every process has started (e.g. to send
        a signal mid-run); the launch then waits for them all."""
        self.tag = uuid.uuid4().hex
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        base = {**os.environ, "OMP_NUM_THREADS": "1", "TP_SOCKET_IFNAME": "lo",
                "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO),
                "FEDRPC_TEST_TAG": self.tag, **env}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            base.pop(k, None)
        self.procs, self.logs = [], []
        t0 = time.monotonic()
        try:
            for i, (argv, rank_env) in enumerate(argv_per_rank):
                log = open(out / f"proc{i}.log", "wb")
                self.logs.append(out / f"proc{i}.log")
                self.procs.append(subprocess.Popen(argv, cwd=REPO, env={**base, **rank_env},
                                                   stdout=log, stderr=subprocess.STDOUT))
                log.close()
            if during is not None:
                during(self.procs)
            deadline = t0 + timeout
            for p in self.procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        finally:
            self.seconds = time.monotonic() - t0
            self._reap()
        self.returncodes = [p.returncode for p in self.procs]

    def _reap(self) -> None:
        """Kill whatever this launch started that still runs (by PID), then check."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for pid in tagged_pids(self.tag):       # e.g. ranks of a torchrun that was killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        self.leftovers = tagged_pids(self.tag)

    def text(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")


def rounds(out: Path) -> list[dict]:
    return [json.loads(l) for l in open(out / "rounds.jsonl")]


def assert_clean(launch: Launch) -> None:
    assert launch.leftovers == [], f"processes left running: {launch.leftovers}"
    assert all(p.poll() is not None for p in launch.procs)


SHM = Path("/dev/shm")


@pytest.fixture
def mpich_shm_cleanup():
    """Remove the shared-memory segments MPICH jobs of this test left behind (a job that
    ends with MPI_Abort or a SIGKILLed rank does not unlink its own)."""
    before = set(SHM.glob("mpich_shm_*"))
    yield
    for f in set(SHM.glob("mpich_shm_*")) - before:
        f.unlink(missing_ok=True)
