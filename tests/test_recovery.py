"""Failures and recovery: checkpoints, bit-identical resume (also with another number of
workers), stop signals, worker failures under abort and skip, hostile uploads, corrupt
or foreign checkpoints, and a run folder that is never silently reused."""
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrpc.rows import Rows

from fedrpc.config import ConfigError, load_config
from fedrpc.messages import TrainReply
from fedrpc.reporting import RunDir
from fedrpc.runtime import run_local
from fedrpc.server import RoundFailed
from fedrpc.state import ServerState
from fedrpc.strategy import GFMFR
from fedrpc.worker import Worker
from launch import REPO, SMALL, Launch, assert_clean, free_port, tagged_pids

CKPT = ["run.checkpoint_every=1", "run.keep_checkpoints=0", "fed.rounds=4"]
TIMING = ("seconds", "peak_rss_mb")   # measurements of the processes, not results


def cfg_of(out: Path, *over: str):
    return load_config(None, SMALL + CKPT + [f"run.out_dir={out}", *over])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "rounds.jsonl")]


def results(out: Path) -> list[dict]:
    """Each completed round's record without its timings and without the bytes between
    ranks (both depend on how the clients are packed; logical bytes do not)."""
    return [{**{k: v for k, v in r.items() if k not in TIMING},
             "bytes": r["bytes"]["logical"]}
            for r in records(out) if "failure" not in r]


def summary_numbers(out: Path) -> dict:
    s = json.load(open(out / "summary.json"))
    return {k: s[k] for k in ("rounds_run", "best_round", "valid", "test",
                              "reference_convention", "stopped_early")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs (one worker) every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    for bb in ("fedrap", "fedavgmf"):
        run_local(cfg_of(root / bb, f"fed.backbone={bb}"))
    return root


def interrupted_after(ref: Path, out: Path, completed: int) -> None:
    """`out` as a run stopped after `completed` rounds would leave it."""
    (out / "checkpoints").mkdir(parents=True)
    name = f"round-{completed:06d}"
    shutil.copytree(ref / "checkpoints" / name, out / "checkpoints" / name)
    (out / "rounds.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in records(ref)[:completed]))


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("backbone", ["fedrap", "fedavgmf"])
def test_resume_is_bit_identical_also_with_another_number_of_workers(tmp_path, reference,
                                                                      backbone):
    ref = reference / backbone
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        interrupted_after(ref, out, 2)
        run_local(cfg_of(out, f"fed.backbone={backbone}", "run.resume=auto",
                         f"fed.workers={workers}"))
        assert results(out) == results(ref), f"{workers} workers"
        assert summary_numbers(out) == summary_numbers(ref)


def test_checkpoints_hold_every_client_once_and_old_ones_are_pruned(tmp_path):
    out = tmp_path / "run"
    run_local(cfg_of(out, "fed.workers=2", "run.keep_checkpoints=2"))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["round-000003", "round-000004"]
    manifest = json.loads((out / "checkpoints/round-000004/manifest.json").read_text())
    assert manifest["round"] == 4
    assert manifest["config"]["fed.latent_dim"] == 8 and "run.out_dir" not in manifest["config"]
    assert manifest["config_sha256"] == hashlib.sha256(
        json.dumps(manifest["config"], sort_keys=True).encode()).hexdigest()
    users = np.concatenate([torch.load(out / "checkpoints" / f, weights_only=True)["users"].numpy()
                            for f in manifest["client_files"]])
    assert sorted(users.tolist()) == list(range(30))


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path, reference, caplog):
    ref = reference / "fedrap"
    out = tmp_path / "run"
    interrupted_after(ref, out, 2)
    name = "round-000003"
    shutil.copytree(ref / "checkpoints" / name, out / "checkpoints" / name)
    server_file = out / "checkpoints" / name / "server.pt"
    server_file.write_bytes(server_file.read_bytes()[:1000])           # truncated
    run_local(cfg_of(out, "run.resume=auto"))
    assert "skipping checkpoint round-000003" in caplog.text
    assert "does not match its hash" in caplog.text
    assert results(out) == results(ref)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path, reference):
    out = tmp_path / "run"
    interrupted_after(reference / "fedrap", out, 2)
    for over, key in (("fed.latent_dim=16", "fed.latent_dim"), ("run.seed=1", "run.seed"),
                      ("data.synthetic.users=31", "data.synthetic.users"),
                      ("fed.backbone=fedavgmf", "fed.backbone")):
        with pytest.raises(ConfigError, match=rf"different configuration: .*{key} \("):
            run_local(cfg_of(out, "run.resume=auto", over))
    with pytest.raises(ConfigError, match="run.resume: .*no manifest.json"):
        run_local(cfg_of(tmp_path / "other", f"run.resume={tmp_path / 'nowhere'}"))


# ---------------------------------------------------------------------- worker failures
def _fail_on(monkeypatch, rank: int, rounds: set):
    orig = Worker._train

    def train(self, req):
        if self.rank == rank and req.round in rounds:
            raise RuntimeError(f"injected failure in round {req.round}")
        return orig(self, req)

    monkeypatch.setattr(Worker, "_train", train)


def test_abort_records_the_failure_checkpoints_the_last_complete_round_and_resumes_exactly(
        tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    _fail_on(monkeypatch, 2, {2})
    # no periodic checkpoints: the failure itself writes the last complete round; rank 1
    # trained its clients in round 2 before rank 2 failed, and that is rolled back
    with pytest.raises(RoundFailed, match=r"worker rank 2: RuntimeError: injected failure "
                                          r"in round 2.*checkpoint .*round-000002"):
        run_local(cfg_of(out, "fed.workers=2", "run.checkpoint_every=0"))
    recs = records(out)
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert recs[2]["failure"]["rank"] == 2 and recs[2]["failure"]["policy"] == "abort"
    assert "injected failure" in recs[2]["failure"]["error"]
    monkeypatch.undo()
    run_local(cfg_of(out, "fed.workers=2", "run.checkpoint_every=0", "run.resume=auto"))
    assert results(out) == results(reference / "fedrap")


def test_skip_goes_on_without_the_failed_rank_and_records_its_clients(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _fail_on(monkeypatch, 2, {1})
    summary = run_local(cfg_of(out, "fed.workers=2", "runtime.on_worker_failure=skip"))
    recs = records(out)
    assert summary["rounds_run"] == 4
    lost = recs[1]["failures"]
    assert [f["rank"] for f in lost] == [2] and lost[0]["clients_lost"] > 0
    assert recs[1]["clients"] == recs[0]["clients"] - lost[0]["clients_lost"]
    assert all("failures" not in r for r in recs[:1] + recs[2:])
    assert all(r["clients"] == recs[0]["clients"] for r in recs[2:])


# ---------------------------------------------------------------------- hostile uploads
def test_hostile_uploads_never_enter_the_mean():
    cfg = load_config(None, SMALL + ["fed.backbone=fedavgmf", "fed.max_update_norm=10"])
    strategy = GFMFR(cfg)
    shared = strategy.backbone.init_shared(50, 0)
    state = ServerState(dict(shared), np.full(10, -1))
    gen = torch.Generator().manual_seed(0)

    def reply(users, poison=None):
        n = len(users)
        up = {k: v.unsqueeze(0) + 0.01 * torch.randn((n, *v.shape), generator=gen)
              for k, v in shared.items()}
        if poison is not None:
            up["Q"][poison[0]] = poison[1](up["Q"][poison[0]])
        plain[tuple(users)] = up
        up = strategy.codec.encode(shared, {**up, "Q": Rows.from_dense(up["Q"], shared["Q"])})
        return TrainReply(0, np.array(users), up, None)

    plain = {}

    honest = reply([0, 1, 2, 3])
    nan = reply([4], (0, lambda q: q * float("nan")))
    huge = reply([5], (0, lambda q: q * 1e6))
    wrong = TrainReply(0, np.array([6]), {**reply([6]).shared, "Q": torch.zeros(1, 49, 8)},
                       None)
    admitted = strategy.admit(state, [honest, nan, huge, wrong], 0)
    assert admitted.up.users.tolist() == [0, 1, 2, 3]
    assert {k: sorted(v) for k, v in admitted.rejected.items()} == {
        "nonfinite": [4], "update_norm": [5], "shape_or_dtype": [6]}
    strategy.aggregate(state, admitted.up)
    for k, v in plain[(0, 1, 2, 3)].items():
        torch.testing.assert_close(state.shared[k], v.mean(0))


def test_a_poisoned_client_is_counted_and_the_run_stays_finite(tmp_path, monkeypatch):
    orig = Worker._train

    def poisoned(self, req):
        rep = orig(self, req)
        q = rep.shared["Q"]                        # the worker's first participant
        q.values[:int(q.counts[0])] = float("inf")
        return rep

    monkeypatch.setattr(Worker, "_train", poisoned)
    run_local(cfg_of(tmp_path / "run", "fed.backbone=fedavgmf"))
    for rec in records(tmp_path / "run"):
        assert rec["rejected"] == {"nonfinite": 1}
        assert all(np.isfinite(v) for v in rec["metrics"]["test"].values())


# ---------------------------------------------------------------------- the run folder
def test_a_second_run_into_a_busy_or_finished_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    held = RunDir(out).open()
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(PID {os.getpid()}\)"):
            run_local(cfg_of(out))
    finally:
        held.close()
    run_local(cfg_of(out, "fed.rounds=1"))
    before = (out / "rounds.jsonl").read_text()
    with pytest.raises(ConfigError, match="holds the records of an earlier run"):
        run_local(cfg_of(out, "fed.rounds=1"))
    assert (out / "rounds.jsonl").read_text() == before
    run_local(cfg_of(out, "fed.rounds=1", "run.overwrite=true"))


def test_an_out_dir_that_is_a_file_fails_before_any_data_is_loaded(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")

    def never(cfg):
        raise AssertionError("data was loaded")

    monkeypatch.setattr("fedrpc.data.load_interactions", never)
    with pytest.raises(ConfigError, match="run.out_dir: .* is a file"):
        run_local(cfg_of(f))


# ---------------------------------------------------------------------- day-one mistakes
@pytest.mark.parametrize("over", ["fed.client_fraction=0.05", "fed.client_fraction=0.3",
                                  "fed.clients_per_round=3"])
def test_partial_participation_with_group_fusion_runs(tmp_path, over):
    summary = run_local(cfg_of(tmp_path / "run", over, "fed.workers=3",
                               "run.checkpoint_every=0"))
    assert summary["rounds_run"] == 4
    assert all(r["clients"] >= 1 for r in records(tmp_path / "run"))


def test_asking_for_more_than_the_data_has_is_said(tmp_path, caplog):
    with pytest.raises(ConfigError, match="fed.workers: 31 workers but the data has 30 users"):
        run_local(cfg_of(tmp_path / "a", "fed.workers=31"))
    with pytest.raises(ConfigError, match="gfmfr.groups: 40 groups but only 30 clients"):
        run_local(cfg_of(tmp_path / "b", "gfmfr.groups=40"))
    run_local(cfg_of(tmp_path / "c", "fed.clients_per_round=100", "fed.rounds=1"))
    assert "fed.clients_per_round=100 but the data has 30 clients" in caplog.text
    assert records(tmp_path / "c")[0]["clients"] == 30


def test_the_config_is_a_frozen_picklable_value():
    cfg = load_config(REPO / "configs/ml100k.yaml", ["fed.rounds=3"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(FrozenInstanceError):
        cfg.fed.rounds = 4


# ---------------------------------------------------------------------- real processes
def _first_round_then(sig, procs_of):
    """A `during` hook: wait for the first round's record, then send `sig`."""
    def during(procs):
        out = procs_of["out"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "rounds.jsonl").is_file() and (out / "rounds.jsonl").read_text().strip():
                break
            if any(p.poll() is not None for p in procs):
                return
            time.sleep(0.1)
        os.kill(procs[procs_of["target"]].pid, sig)
    return during


SLOW = {"FEDRPC_FAIL_MODE": "slow", "FEDRPC_SLOW_S": "1.5"}
ENTRY = str(REPO / "tests" / "failing_worker.py")


def _cmd(out: Path, *over: str) -> list[str]:
    return [sys.executable, ENTRY, "run", "configs/quickstart.yaml", *SMALL, *CKPT,
            f"run.out_dir={out}", *over]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_checkpoints_exits_75_and_the_run_resumes_exactly(tmp_path, reference,
                                                                        sig):
    out = tmp_path / "run"
    launch = Launch([(_cmd(out, "run.checkpoint_every=0"), {})], tmp_path / "logs",
                    {**SLOW, "FEDRPC_FAIL_RANK": "1"},
                    during=_first_round_then(sig, {"out": out, "target": 0}))
    assert_clean(launch)
    text = launch.text(0)
    assert launch.returncodes == [75], text[-3000:]
    assert f"stopped by {sig.name} after" in text and "run.resume=auto" in text
    assert "Traceback" not in text
    completed = len(records(out))
    assert 1 <= completed < 4
    assert (out / "checkpoints" / f"round-{completed:06d}" / "manifest.json").is_file()
    run_local(cfg_of(out, "run.checkpoint_every=0", "run.resume=auto"))
    assert results(out) == results(reference / "fedrap")


def _spawn(n: int, out: Path, logs: Path, *over: str, env=None, during=None) -> Launch:
    port = str(free_port())
    cmd = _cmd(out, "fed.transport=rpc", *over)
    ranks = [(cmd, {"RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(n)]
    return Launch(ranks, logs, env or {}, during=during)


@pytest.mark.timeout(300)
def test_sigterm_to_the_rpc_server_checkpoints_every_rank_and_resumes_on_fewer(tmp_path,
                                                                              reference):
    out = tmp_path / "run"
    launch = _spawn(3, out, tmp_path / "logs1", env={**SLOW, "FEDRPC_FAIL_RANK": "2"},
                    during=_first_round_then(signal.SIGTERM, {"out": out, "target": 0}))
    assert_clean(launch)
    assert launch.returncodes == [75, 0, 0], launch.text(0)[-3000:]
    done = len(records(out))
    manifest = json.loads((out / "checkpoints" / f"round-{done:06d}" / "manifest.json").read_text())
    assert sorted(manifest["client_files"]) == [f"round-{done:06d}/clients-rank1.pt",
                                                f"round-{done:06d}/clients-rank2.pt"]
    again = _spawn(2, out, tmp_path / "logs2", "run.resume=auto")
    assert_clean(again)
    assert again.returncodes == [0, 0], again.text(0)[-3000:]
    assert results(out) == results(reference / "fedrap")


@pytest.mark.timeout(300)
def test_a_killed_rpc_worker_under_abort_is_named_and_the_run_resumes_exactly(tmp_path,
                                                                              reference):
    out = tmp_path / "run"
    launch = _spawn(3, out, tmp_path / "logs1", env={
        "FEDRPC_FAIL_RANK": "2", "FEDRPC_FAIL_MODE": "kill", "FEDRPC_FAIL_ROUND": "2"})
    assert_clean(launch)
    assert launch.returncodes[0] == 1 and launch.returncodes[2] == -signal.SIGKILL
    assert "worker rank 2" in launch.text(0) and "round-000002" in launch.text(0)
    recs = records(out)
    assert recs[-1]["round"] == 2 and recs[-1]["failure"]["rank"] == 2
    again = _spawn(3, out, tmp_path / "logs2", "run.resume=auto")
    assert_clean(again)
    assert again.returncodes == [0, 0, 0], again.text(0)[-3000:]
    assert results(out) == results(reference / "fedrap")


@pytest.mark.timeout(300)
def test_a_killed_rpc_worker_under_skip_finishes_the_round_checkpoints_and_exits(tmp_path):
    out = tmp_path / "run"
    launch = _spawn(3, out, tmp_path / "logs1", "runtime.on_worker_failure=skip", env={
        "FEDRPC_FAIL_RANK": "2", "FEDRPC_FAIL_MODE": "kill", "FEDRPC_FAIL_ROUND": "2"})
    assert_clean(launch)
    text = launch.text(0)
    assert launch.returncodes[0] == 1, text[-3000:]
    assert "worker rank 2" in text and "cannot rejoin" in text
    recs = records(out)
    assert recs[-1]["round"] == 2 and recs[-1]["failures"][0]["rank"] == 2
    assert recs[-1]["clients"] < recs[0]["clients"]
    manifest = json.loads((out / "checkpoints/round-000003/manifest.json").read_text())
    # the lost rank's clients continue from the newest checkpoint that has them
    assert manifest["client_files"] == ["round-000003/clients-rank1.pt",
                                        "round-000002/clients-rank1.pt",
                                        "round-000002/clients-rank2.pt"]
    again = _spawn(2, out, tmp_path / "logs2", "run.resume=auto",
                   "runtime.on_worker_failure=skip")
    assert_clean(again)
    assert again.returncodes == [0, 0], again.text(0)[-3000:]
    assert [r["round"] for r in records(out) if "metrics" in r] == [0, 1, 2, 3]


@pytest.mark.timeout(300)
def test_killing_the_torchrun_launcher_leaves_no_rank_behind(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
           ENTRY, "run", "configs/quickstart.yaml", *SMALL, *CKPT, "fed.rounds=40",
           f"run.out_dir={out}", "fed.transport=rpc"]
    launch, left = Launch.__new__(Launch), {}

    def during(procs):
        _first_round_then(signal.SIGKILL, {"out": out, "target": 0})(procs)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and tagged_pids(launch.tag):
            time.sleep(0.5)
        left["pids"] = tagged_pids(launch.tag)

    Launch.__init__(launch, [(cmd, {})], tmp_path / "logs", {**SLOW, "FEDRPC_FAIL_RANK": "1"},
                    during=during)
    assert left["pids"] == [], "ranks still running after their launcher was killed"
    assert_clean(launch)
    done = len(records(out))
    assert done < 40
    # the server stopped as on SIGTERM: the rounds it finished are in a checkpoint
    assert (out / "checkpoints" / f"round-{done:06d}" / "manifest.json").is_file()


@pytest.mark.timeout(300)
def test_a_rank_of_another_launch_on_the_same_port_is_refused(tmp_path, reference):
    """Two jobs given the same MASTER_PORT: the second job's worker finds the first job's
    rendezvous, says so and exits; the first job is not disturbed."""
    out, port = tmp_path / "run", str(free_port())
    intruder = {}

    def during(procs):
        _first_round_then(0, {"out": out, "target": 0})(procs)   # signal 0: just wait
        env = {**os.environ, "RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "FEDRPC_RUN_ID": "job-2",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        p = subprocess.run(_cmd(tmp_path / "other", "fed.transport=rpc",
                                "runtime.startup_timeout_s=30"),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        intruder.update(rc=p.returncode, text=p.stdout + p.stderr)

    ranks = [(_cmd(out, "fed.transport=rpc"), {
        "RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port, "FEDRPC_RUN_ID": "job-1"}) for r in range(3)]
    # job 1's rounds last long enough for the intruder to arrive while it runs
    launch = Launch(ranks, tmp_path / "logs", {**SLOW, "FEDRPC_SLOW_S": "5",
                                               "FEDRPC_FAIL_RANK": "1"}, during=during)
    assert_clean(launch)
    assert intruder["rc"] != 0
    assert "belongs to another run (job-1; this launch is job-2)" in intruder["text"]
    assert launch.returncodes == [0, 0, 0], launch.text(0)[-3000:]
    assert results(out) == results(reference / "fedrap")


@pytest.mark.timeout(300)
def test_partial_participation_with_group_fusion_over_rpc_matches_in_process(tmp_path):
    over = ("fed.client_fraction=0.1", "run.checkpoint_every=0")
    local = tmp_path / "local"
    run_local(cfg_of(local, *over))
    launch = _spawn(3, tmp_path / "rpc", tmp_path / "logs", *over)
    assert_clean(launch)
    assert launch.returncodes == [0, 0, 0], launch.text(0)[-3000:]
    assert results(tmp_path / "rpc") == results(local)


def test_a_failing_worker_in_process_is_one_line_not_a_traceback(tmp_path):
    p = subprocess.run(_cmd(tmp_path / "run"), cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "FEDRPC_FAIL_RANK": "1",
                                         "FEDRPC_FAIL_MODE": "raise", "FEDRPC_FAIL_ROUND": "1",
                                         "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert p.returncode == 1
    assert "fedrpc: error: worker rank 1: RuntimeError: injected failure in round 1" in p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert records(tmp_path / "run")[-1]["failure"]["rank"] == 1
