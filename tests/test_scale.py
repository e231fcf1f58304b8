"""Scale (issue 14): the chunked synthetic generator, peak RSS per rank in the round
records, and `fedrpc bench scale` as real processes that leave nothing behind."""
import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from fedrpc.bench_scale import bench_scale, figures, run_federation, scale_overrides
from fedrpc.config import SyntheticConfig, load_config
from fedrpc.data import synthetic
from fedrpc.data.synthetic import TEMPERATURE, generate
from fedrpc.memory import peak_rss_mb, with_peak_rss
from fedrpc.messages import EvalReply
from launch import REPO, tagged_pids


# ---------------------------------------------------------------------- the generator
def test_generated_data_has_the_asked_size_and_contiguous_ids():
    cfg = SyntheticConfig(users=500, items=400, mean_interactions=30, min_interactions=8)
    raw, content = generate(cfg, 3, texts=False, images=False)
    users, items = raw["user"], raw["item"]
    assert np.array_equal(np.unique(users), np.arange(1, 501))      # every user, ids 1..U
    assert items.min() >= 1 and items.max() <= 400
    per_user = np.bincount(users)[1:]
    assert per_user.min() >= 8 and per_user.max() <= 200
    assert abs(per_user.mean() - 30) < 1.5                            # Poisson mean 30
    assert len(np.unique(users * 1000 + items)) == len(users)        # no repeated pair
    assert len(np.unique(items)) > 300                                # not a few popular items
    assert content.texts is None and content.images is None


def _dense_reference(cfg: SyntheticConfig, seed: int) -> dict:
    """The generator as it was: the whole users x items matrix, a full argsort per user."""
    rng = np.random.default_rng([seed, 0x5EED])
    U, I, k = cfg.users, cfg.items, cfg.latent_dim
    taste_v, taste_h = rng.normal(size=(U, k)), rng.normal(size=(U, k))
    attr_v, attr_h = rng.normal(size=(I, k)), rng.normal(size=(I, k))
    pop = rng.normal(scale=0.5, size=I)
    aff = (np.sqrt(cfg.signal) * taste_v @ attr_v.T
           + np.sqrt(1 - cfg.signal) * taste_h @ attr_h.T) / np.sqrt(k) + pop
    n = np.clip(rng.poisson(cfg.mean_interactions, size=U), cfg.min_interactions, I // 2)
    users, items, times = [], [], []
    for u in range(U):
        g = rng.gumbel(size=I)
        top = np.argsort(-(aff[u] / TEMPERATURE + g), kind="stable")[: n[u]]
        users.append(np.full(len(top), u + 1))
        items.append(top + 1)
        times.append(rng.permutation(len(top)) + 1_000_000)
    return {"user": np.concatenate(users), "item": np.concatenate(items),
            "timestamp": np.concatenate(times)}


@pytest.mark.parametrize("cfg,seed", [(SyntheticConfig(), 0),
                                      (SyntheticConfig(users=30, items=50, mean_interactions=10,
                                                       min_interactions=5), 1),
                                      (SyntheticConfig(users=1500, items=300, signal=0.3), 7)])
def test_chunked_generator_gives_the_dense_generators_data(cfg, seed, monkeypatch):
    ref = _dense_reference(cfg, seed)
    for chunk in (synthetic.CHUNK_USERS, 7):
        monkeypatch.setattr(synthetic, "CHUNK_USERS", chunk)
        raw, _ = generate(cfg, seed, texts=False, images=False)
        for key in ("user", "item", "timestamp"):
            assert np.array_equal(raw[key], ref[key]), (key, chunk)


def test_content_alone_is_the_content_of_the_full_generation():
    cfg = SyntheticConfig(users=300, items=120)
    _, full = generate(cfg, 5)
    raw, alone = generate(cfg, 5, interactions=False)
    assert raw is None and alone.texts == full.texts
    assert all(np.array_equal(a, b) for a, b in zip(alone.images, full.images))
    _, images_only = generate(cfg, 5, interactions=False, texts=False)
    assert images_only.texts is None
    assert all(np.array_equal(a, b) for a, b in zip(images_only.images, full.images))


# ---------------------------------------------------------------------- peak RSS
def test_peak_rss_is_read_and_stamped_on_replies():
    assert peak_rss_mb() > 10
    stamped = with_peak_rss(EvalReply(0, {}, 3))
    assert stamped.peak_rss_mb > 10 and stamped.n_clients == 3
    assert with_peak_rss(None) is None


def test_local_round_records_carry_peak_rss_per_rank(tmp_path):
    from fedrpc.runtime import run_local
    cfg = load_config(REPO / "configs/scale.yaml",
                      scale_overrides(60, 80, 10) + [f"run.out_dir={tmp_path}",
                                                     "fed.transport=local", "fed.workers=2",
                                                     "gfmfr.groups=2", "fed.latent_dim=8"])
    run_local(cfg)
    rec = [json.loads(line) for line in open(tmp_path / "rounds.jsonl")][-1]
    assert set(rec["peak_rss_mb"]) == {"0", "1", "2"}
    assert all(v > 10 for v in rec["peak_rss_mb"].values())
    out = figures(rec, {"sample_steps": 100}, 2, "local")
    assert out["peak_rss_total_mb"] == max(rec["peak_rss_mb"].values())   # one process
    assert out["bytes"]["logical_total"] > 0 and out["bytes"]["physical_payload"] > 0


# ---------------------------------------------------------------------- bench scale
SMALL = ["fed.latent_dim=8", "gfmfr.groups=3", "gfmfr.fusion_epochs=1"]


def _bench_env(tag: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "FEDRPC_TEST_TAG": tag}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _reap(tag: str) -> list[int]:
    """Kill what a test's launch left (by PID); what was left."""
    left = tagged_pids(tag)
    for pid in left:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return left


@pytest.mark.timeout(400)
def test_bench_scale_runs_every_worker_count_and_reports_rss_per_rank(tmp_path):
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "fedrpc", "bench", "scale", "configs/scale.yaml",
           "--users", "200", "--items", "300", "--workers", "1,2", "--out", str(tmp_path),
           "--timeout", "300", *SMALL]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=_bench_env(tag), capture_output=True,
                           text=True, timeout=360)
    finally:
        left = _reap(tag)
    assert left == [], f"processes left running: {left}"
    assert p.returncode == 0, p.stderr[-3000:]
    assert "peak RSS per rank" in p.stdout and "written:" in p.stdout
    r = json.load(open(tmp_path / "scale.json"))
    assert r["data"]["users"] == 200 and r["data"]["items"] <= 300
    assert [x["workers"] for x in r["runs"]] == [1, 2]
    for x, ranks in zip(r["runs"], ({"0", "1"}, {"0", "1", "2"})):
        assert x["clients"] == 200                                      # every client
        assert set(x["peak_rss_mb"]) == ranks and min(x["peak_rss_mb"].values()) > 10
        assert x["peak_rss_total_mb"] == pytest.approx(sum(x["peak_rss_mb"].values()), abs=1)
        assert x["sample_steps_per_s"] > 0
        assert set(x["seconds"]) >= {"train", "aggregate", "group", "fusion", "eval"}
        assert x["bytes"]["logical_total"] > 0 and x["bytes"]["physical_wire"] > 0
    # the same clients, the same protocol: the logical bytes do not depend on the packing
    assert r["runs"][0]["bytes"]["logical_total"] == r["runs"][1]["bytes"]["logical_total"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["failing", "timed_out"])
def test_a_failing_or_late_run_is_named_and_its_processes_killed(tmp_path, monkeypatch, case):
    tag = uuid.uuid4().hex
    monkeypatch.setenv("FEDRPC_TEST_TAG", tag)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    ov = scale_overrides(50, 60, 10) + SMALL
    if case == "failing":
        ov.append("fed.local_epochs=0")                    # every rank: a config error
    try:
        with pytest.raises(RuntimeError, match="exited with 2" if case == "failing"
                           else "timed out"):
            run_federation(str(REPO / "configs/scale.yaml"), ov, tmp_path, 2, "rpc",
                           timeout_s=100 if case == "failing" else 0.01)
    finally:
        left = _reap(tag)
    assert left == []


def test_bench_scale_rejects_an_unknown_transport():
    with pytest.raises(ValueError, match="transport"):
        bench_scale("configs/scale.yaml", [], 50, 60, 10, transport="mpi")


@pytest.mark.timeout(200)
def test_sigterm_to_bench_scale_kills_the_ranks_it_started(tmp_path):
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "fedrpc", "bench", "scale", "configs/scale.yaml",
           "--users", "200", "--items", "300", "--workers", "2", "--out", str(tmp_path),
           *SMALL]
    bench = subprocess.Popen(cmd, cwd=REPO, env=_bench_env(tag), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(tagged_pids(tag)) < 4 and time.monotonic() < deadline:   # bench + 3 ranks
            time.sleep(0.1)
        assert bench.poll() is None and len(tagged_pids(tag)) >= 4
        bench.send_signal(15)
        assert bench.wait(60) == 128 + 15
        deadline = time.monotonic() + 20
        while tagged_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if bench.poll() is None:
            bench.kill()
        left = _reap(tag)
    assert left == [], f"processes left running: {left}"


def test_sigterm_while_a_rank_starts_ends_the_bench_only_once_the_rank_is_recorded():
    """A SIGTERM between a rank's fork and its Popen's return would leave a rank nobody
    can kill: it is held until the rank is in the list the bench kills from."""
    from fedrpc.bench_scale import _Stopper
    stopper, recorded = _Stopper(), []
    with pytest.raises(SystemExit) as e:
        with stopper.start():
            stopper(15, None)                   # arrives while the rank starts
            recorded.append("rank")
    assert recorded == ["rank"] and e.value.code == 128 + 15
    with pytest.raises(SystemExit):
        stopper(15, None)                       # outside a start: at once
