"""The shipped sbatch scripts on a real one-node SLURM cluster (tests/slurm_cluster.py).

Each of slurm/single_node.sbatch, multi_node.sbatch and mpi.sbatch, submitted with
`sbatch --wait`, completes with per-round metrics and bytes, bit-identical to the
in-process run. A worker SIGKILLed mid-run under mpi.sbatch is named by the server, the
job fails within the round timeout, and nothing is left running. Skipped, with the
reason, where SLURM cannot be installed or started.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedrpc.config import load_config
from fedrpc.runtime import run_local
from launch import (REPO, SMALL, Launch, assert_clean, mpich_shm_cleanup,  # noqa: F401
                    rounds, tagged_pids)
from slurm_cluster import Cluster, Unavailable, ensure_installed

JOB_TIMEOUT_S = 240


pytestmark = pytest.mark.usefixtures("mpich_shm_cleanup")
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        ensure_installed()
        cluster = Cluster(tmp_path_factory.mktemp("slurm"), os.cpu_count() or 1)
    except (Unavailable, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"no SLURM cluster: {e}")
    try:
        try:
            cluster.start()
        except Unavailable as e:
            pytest.skip(f"no SLURM cluster: {e}")
        yield cluster
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs) and not cluster.procs


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    run_local(load_config(None, SMALL + [f"run.out_dir={out}"]))
    return out


class Job:
    """One `sbatch --wait` of a script under slurm/, its processes tagged in their env."""

    def __init__(self, cluster: Cluster, script: str, out: Path, sbatch_opts: list[str],
                 env: dict, overrides: list[str], on_start=None):
        self.tag, self.out = uuid.uuid4().hex, out
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "job.out"
        bin_dir = str(Path(sys.executable).parent)
        run_env = {**cluster.env, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                   "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                   "TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo",
                   "FEDRPC_TEST_TAG": self.tag, **env}
        self.env = run_env
        cmd = ["sbatch", "--wait", "--parsable", f"--output={self.log}", *sbatch_opts,
               f"slurm/{script}", "configs/quickstart.yaml", *SMALL, f"run.out_dir={out}",
               *overrides]
        t0 = time.monotonic()
        self.deadline = t0 + JOB_TIMEOUT_S
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            if on_start is not None:
                on_start(self)
            stdout, stderr = proc.communicate(
                timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        finally:
            self.seconds = time.monotonic() - t0
            self.job_id = (stdout or "").strip().split(";")[0]
            if self.job_id and (proc.returncode is None or proc.returncode < 0):
                subprocess.run(["scancel", self.job_id], env=cluster.env, timeout=30)
            self.leftovers = self._reap()
        self.returncode, self.stderr = proc.returncode, stderr

    def _reap(self) -> list[int]:
        """Wait for the job's processes to end (SLURM cleans up after a failed step);
        kill any that remain, by PID, and report them."""
        deadline = time.monotonic() + 20
        while tagged_pids(self.tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = tagged_pids(self.tag)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


SCRIPTS = {
    "single_node.sbatch": (["--cpus-per-task=2", "--overcommit"], {"NPROC": "3"}),
    "multi_node.sbatch": (["--nodes=1", "--cpus-per-task=2", "--overcommit"],
                          {"NPROC_PER_NODE": "3"}),
    "mpi.sbatch": (["--ntasks=3", "--overcommit"], {}),
}


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_sbatch_script_runs_the_federation_with_the_local_numbers(slurm, local_run,
                                                                        tmp_path, script):
    opts, env = SCRIPTS[script]
    job = Job(slurm, script, tmp_path / "run", opts, env, [])
    assert job.leftovers == []
    text = job.text()
    assert job.returncode == 0, f"{job.stderr}\n{text[-3000:]}\n{slurm.logs()[-2000:]}"
    assert re.search(r"round 2 loss [\d.]+ .*test HR@10 [\d.]+ .*client MB down", text)
    got, ref = rounds(tmp_path / "run"), rounds(local_run)
    assert [r["metrics"] for r in got] == [r["metrics"] for r in ref]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    for r in got:
        phys = r["bytes"]["physical"]
        assert set(phys) == {"0->1", "0->2", "1->0", "2->0"}
        assert all(p["wire"] >= p["payload"] > 0 for p in phys.values())
    rt = json.load(open(tmp_path / "run" / "summary.json"))["runtime"]
    assert rt["world_size"] == 3
    assert (rt["transport"], rt["launcher"]) == \
        (("mpi", "slurm") if script == "mpi.sbatch" else ("rpc", "torchrun"))


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_srun_torch_rpc_meets_at_the_job_derived_rendezvous(slurm, local_run, tmp_path):
    """srun alone (no torchrun, no MASTER_ADDR/PORT): torch RPC meets on the step's first
    host at a port derived from SLURM_JOB_ID."""
    out = tmp_path / "run"
    cmd = ["srun", "-n", "3", "--overcommit", sys.executable, "-m", "fedrpc", "run",
           "configs/quickstart.yaml", *SMALL, f"run.out_dir={out}", "fed.transport=rpc"]
    launch = Launch([(cmd, {})], out / "logs", {"SLURM_CONF": str(slurm.conf)},
                    timeout=JOB_TIMEOUT_S)        # Launch drops MASTER_ADDR/MASTER_PORT
    assert_clean(launch)
    assert launch.returncodes == [0], launch.text(0)[-3000:]
    assert [r["metrics"] for r in rounds(out)] == [r["metrics"] for r in rounds(local_run)]
    rt = json.load(open(out / "summary.json"))["runtime"]
    assert (rt["transport"], rt["launcher"], rt["world_size"]) == ("rpc", "slurm", 3)


def _kill_rank_when_running(rank: int, out: Path, killed: dict):
    """SIGKILL the process of `rank` once the run has logged a round."""
    def on_start(job: Job):
        while time.monotonic() < job.deadline:
            if (out / "rounds.jsonl").exists() and (out / "rounds.jsonl").read_text():
                for pid in tagged_pids(job.tag):
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if f"SLURM_PROCID={rank}".encode() in env and b"fedrpc" in cmd:
                        os.kill(pid, signal.SIGKILL)
                        killed["pid"], killed["at"] = pid, time.monotonic()
                        return
            time.sleep(0.05)
    return on_start


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_a_worker_killed_mid_run_under_sbatch_is_named_and_the_job_ends(slurm, tmp_path):
    out, killed = tmp_path / "run", {}
    job = Job(slurm, "mpi.sbatch", out, ["--ntasks=3", "--overcommit"], {},
              ["fed.rounds=200", "runtime.round_timeout_s=10"],
              on_start=_kill_rank_when_running(2, out, killed))
    assert killed, "rank 2 was never found running"
    assert job.leftovers == []
    assert job.returncode != 0
    text = job.text()
    # at the round timeout, or sooner when MPI reports the dead peer mid-transfer
    assert re.search(r"fedrpc: error: worker rank 2: (no reply within 10 s \(runtime."
                     r"round_timeout_s\): it hangs or died|the rank died or is unreachable: "
                     r"MPI error class \d+ while exchanging with it) \(round \d+, \w+\)",
                     text), text[-3000:]
    assert len(rounds(out)) < 200
    assert time.monotonic() - killed["at"] < 10 + 60


def _requeue_when_running(out: Path, done: dict):
    """`scontrol requeue` the job once the run has logged a round (what the scripts do
    themselves 60 s before the time limit)."""
    def on_start(job: Job):
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            if (out / "rounds.jsonl").exists() and (out / "rounds.jsonl").read_text():
                ids = subprocess.run(["squeue", "-h", "-o", "%i"], env=job.env, text=True,
                                     capture_output=True, timeout=30).stdout.split()
                if ids:
                    run = lambda *a: subprocess.run(["scontrol", *a], env=job.env, timeout=30,
                                                    capture_output=True, text=True)
                    run("requeue", ids[0]).check_returncode()
                    done["job"] = ids[0]
                    # a requeued job waits ~2 min before it is eligible again: not here
                    while time.monotonic() < deadline:
                        if "JobState=PENDING" in run("show", "job", ids[0]).stdout:
                            run("update", f"JobId={ids[0]}", "StartTime=now")
                            return
                        time.sleep(0.5)
                    return
            time.sleep(0.1)
    return on_start


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 120)
def test_a_requeued_job_resumes_from_its_checkpoint_with_the_same_numbers(slurm, tmp_path):
    over = ["fed.rounds=40", "run.checkpoint_every=0", "eval.interval=10"]
    ref = tmp_path / "ref"
    run_local(load_config(None, SMALL + over + [f"run.out_dir={ref}"]))
    out, done = tmp_path / "run", {}
    opts, env = SCRIPTS["single_node.sbatch"]
    job = Job(slurm, "single_node.sbatch", out, opts, env, over,
              on_start=_requeue_when_running(out, done))
    assert done, "the job was never seen running"
    assert job.leftovers == []
    text = job.text()
    assert job.returncode == 0, f"{job.stderr}\n{text[-3000:]}\n{slurm.logs()[-2000:]}"
    # the first start stopped after a checkpoint; the second resumed from it
    assert list((out / "checkpoints").iterdir()), "no checkpoint was written"
    assert "resumed from" in text or "run.resume=auto" in text
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "bytes", "peak_rss_mb")} for r in rs]
    assert strip(rounds(out)) == strip(rounds(ref))
