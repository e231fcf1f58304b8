"""Reference points: the random-scoring chance level, and centralised MF tuned on the
validation split alone."""
import json
import math

import numpy as np
import torch
import pytest

from fedrpc import baselines
from fedrpc.baselines import (random_scores, run_central_mf, run_random, tune_central_mf)
from fedrpc.cli import main
from fedrpc.config import ConfigError, load_config
from fedrpc.data import load_interactions, split_of

TINY = ["data.synthetic.users=40", "data.synthetic.items=60",
        "data.synthetic.mean_interactions=10", "data.synthetic.min_interactions=5",
        "fed.latent_dim=8", "run.progress=false", "encoder.cache=false", "eval.ks=[5,20]"]


def tiny(*over):
    return load_config(None, TINY + list(over))


def test_tune_chooses_the_best_validation_point_and_reports_its_test():
    cfg = tiny()
    seen = []
    r = tune_central_mf(cfg, lrs=[0.002, 0.05], weight_decays=[0.0, 1e-3], epochs=4,
                        on_point=seen.append)
    grid = r["tune"]["grid"]
    assert [(g["lr"], g["weight_decay"]) for g in grid] == \
        [(0.002, 0.0), (0.002, 1e-3), (0.05, 0.0), (0.05, 1e-3)]
    assert seen == grid                                  # the per-point callback
    best = max(grid, key=lambda g: g["valid NDCG@5"])
    ch = r["tune"]["chosen"]
    assert (ch["lr"], ch["weight_decay"], ch["best_epoch"]) == \
        (best["lr"], best["weight_decay"], best["best_epoch"])
    assert (r["lr"], r["weight_decay"], r["best_round"]) == \
        (best["lr"], best["weight_decay"], best["best_epoch"])
    assert r["valid"]["NDCG@5"] == best["valid NDCG@5"] == ch["valid NDCG@5"]
    assert r["test"] == best["test"]
    # the chosen point alone, trained again, gives the same epoch and the same test
    alone = run_central_mf(cfg, epochs=4, lr=ch["lr"], weight_decay=ch["weight_decay"])
    assert alone["best_round"] == ch["best_epoch"] and alone["test"] == r["test"]
    json.dumps(r)                                        # written as baseline_mf.json


def _history(valid_ndcg, test_ndcg):
    return [{"round": e, "metrics": {
        "valid": {"HR@5": v, "NDCG@5": v, "users": 1},
        "test": {"HR@5": t, "NDCG@5": t, "users": 1}}} for e, (v, t) in
        enumerate(zip(valid_ndcg, test_ndcg))]


def test_tune_selection_never_looks_at_the_test(monkeypatch):
    # point (lr 0.1) has the best test everywhere; point (lr 0.2) the best validation,
    # at epoch 1; its test there is what must be reported
    fake = {0.1: _history([0.1, 0.2, 0.3], [0.9, 0.9, 0.9]),
            0.2: _history([0.2, 0.5, 0.4], [0.05, 0.07, 0.6]),
            0.3: _history([0.5, 0.1, 0.1], [0.8, 0.8, 0.8])}      # ties 0.5, later in grid
    monkeypatch.setattr(baselines, "_mf_history",
                        lambda cfg, split, epochs, lr, wd, bs: fake[lr])
    r = tune_central_mf(tiny(), lrs=[0.1, 0.2, 0.3], weight_decays=[0], epochs=3)
    assert [g["best_epoch"] for g in r["tune"]["grid"]] == [2, 1, 0]
    assert r["tune"]["chosen"] == {"lr": 0.2, "weight_decay": 0.0, "best_epoch": 1,
                                   "valid NDCG@5": 0.5}
    assert r["best_round"] == 1 and r["test"]["NDCG@5"] == 0.07


@pytest.mark.parametrize("kw, msg", [
    ({"lrs": [-0.01]}, "--lr: a learning rate must be a finite number > 0"),
    ({"lrs": [0.0]}, "--lr: a learning rate must be a finite number > 0"),
    ({"lrs": [float("nan")]}, "--lr: a learning rate must be a finite number > 0"),
    ({"lrs": []}, "--lr: needs at least one learning rate"),
    ({"weight_decays": []}, "--weight-decay: needs at least one value"),
    ({"weight_decays": [0, -1e-5]}, "--weight-decay: must be a finite number >= 0"),
    ({"epochs": 0}, "--epochs: must be an integer >= 1"),
])
def test_bad_grid_values_are_clear_errors_before_any_work(monkeypatch, kw, msg):
    def no_data(cfg):
        raise AssertionError("data loaded before the grid was checked")
    monkeypatch.setattr(baselines, "load_interactions", no_data)
    with pytest.raises(ConfigError, match=msg):
        tune_central_mf(tiny(), **kw)


@pytest.mark.parametrize("args, msg", [
    (["--tune", "--lr", ","], "--lr: empty list"),
    (["--tune", "--weight-decay", "0,x"], "--weight-decay: not a comma list of numbers"),
    (["--lr=-0.5"], "--lr: a learning rate must be a finite number > 0"),
    (["--lr", "0.01,0.02"], "--lr: several values need --tune"),
])
def test_cli_grid_errors_are_one_line_exit_2(tmp_path, capsys, args, msg):
    rc = main(["baseline", "configs/quickstart.yaml", "--model", "mf", *args,
               f"run.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fedrpc: error: ") and msg in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_cli_tune_prints_the_grid_and_writes_it(tmp_path, capsys):
    rc = main(["baseline", "configs/quickstart.yaml", "--model", "mf", "--tune", "--lr",
               "0.01,0.05", "--weight-decay", "0", "--epochs", "2", f"run.out_dir={tmp_path}",
               *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((tmp_path / "baseline_mf.json").read_text())
    grid = result["tune"]["grid"]
    assert [(g["lr"], g["weight_decay"]) for g in grid] == [(0.01, 0.0), (0.05, 0.0)]
    assert "valid NDCG@5" in out
    assert sum(line.endswith(" *") for line in out.splitlines()) == 1
    assert result["tune"]["chosen"]["lr"] == result["lr"]
    assert f"lr {result['lr']:g}, weight decay 0" in out


def test_select_picks_by_another_validation_metric(monkeypatch):
    fake = {0.1: _history([0.3, 0.1], [0.0, 0.0]), 0.2: _history([0.2, 0.2], [0.0, 0.0])}
    for h in fake[0.1] + fake[0.2]:
        h["metrics"]["valid"]["HR@20"] = 1.0 - h["metrics"]["valid"]["HR@5"]
    monkeypatch.setattr(baselines, "_mf_history",
                        lambda cfg, split, epochs, lr, wd, bs: fake[lr])
    r = tune_central_mf(tiny(), lrs=[0.1, 0.2], weight_decays=[0], epochs=2, select="HR@20")
    assert r["tune"]["metric"] == "HR@20" and not r["tune"]["constant"]
    assert (r["lr"], r["best_round"]) == (0.1, 1) and r["selected_by"] == "valid HR@20"
    with pytest.raises(ConfigError, match="--select: unknown metric 'NDCG@7'"):
        tune_central_mf(tiny(), select="NDCG@7")
    with pytest.raises(ConfigError, match="cold: metrics need data.split=cold_items"):
        run_central_mf(tiny(), select="cold:NDCG@5")
    flat = _history([0.0, 0.0], [0.1, 0.2])
    monkeypatch.setattr(baselines, "_mf_history", lambda *a: flat)
    r = tune_central_mf(tiny(), lrs=[0.1, 0.2], weight_decays=[0], epochs=2)
    assert r["tune"]["constant"] and (r["lr"], r["best_round"]) == (0.1, 0)


def test_random_baseline_is_seeded(tmp_path, capsys):
    a, b = run_random(tiny()), run_random(tiny())
    assert a == b
    assert run_random(tiny("run.seed=1")) != a
    users = np.arange(10)
    whole = random_scores(3, users, 60)
    assert whole.shape == (10, 60)
    assert (random_scores(3, users[4:7], 60) == whole[4:7]).all()   # batch-independent
    rc = main(["baseline", "configs/quickstart.yaml", "--model", "random",
               f"run.out_dir={tmp_path}", *TINY])
    assert rc == 0
    written = json.loads((tmp_path / "baseline_random.json").read_text())
    assert written["test"] == a["test"] and written["seed"] == 0


def test_random_hit_rate_is_the_analytic_chance_level():
    cfg = load_config(None, ["data.synthetic.users=1500", "data.synthetic.items=120",
                             "data.synthetic.mean_interactions=12",
                             "data.synthetic.min_interactions=5", "eval.ks=[10,30]",
                             "run.progress=false", "encoder.cache=false"])
    split = split_of(cfg, load_interactions(cfg))
    r = run_random(cfg)["test"]
    n_test = np.diff(split.test_indptr)
    assert (n_test <= 1).all()                                       # leave-one-out
    users = np.flatnonzero(n_test == 1)
    # candidates: every item but the user's training positives and validation item
    cands = split.n_items - np.diff(split.train_indptr)[users] - np.diff(split.valid_indptr)[users]
    for k in (10, 30):
        p = np.minimum(k, cands) / cands                             # P(rank <= k)
        expected, se = p.mean(), math.sqrt((p * (1 - p)).sum()) / len(p)
        assert abs(r[f"HR@{k}"] - expected) < 4 * se, (k, r[f"HR@{k}"], expected, se)
        assert 0.05 < expected < 0.5


def test_mf_selects_on_the_cold_metric_of_a_cold_item_split_by_default():
    """As federated runs do: ranked among all items every model scores near 0 there."""
    from fedrpc.baselines import select_metric
    assert select_metric(load_config(None, ["data.split=cold_items"])) == "cold:NDCG@10"
    assert select_metric(load_config(None, [])) == "NDCG@10"


CONTENT = ["data.synthetic.users=200", "data.synthetic.items=200",
           "data.synthetic.mean_interactions=20", "fed.latent_dim=8", "encoder.cache=false",
           "run.progress=false", "eval.ks=[10,50]"]


def test_content_baseline_beats_chance_only_when_preferences_follow_the_content():
    """Synthetic data: at signal 1 users like items whose visible attributes resemble
    those they liked; at 0 the attributes say nothing."""
    planted, none = (load_config(None, CONTENT + [f"data.synthetic.signal={s}"])
                     for s in (1.0, 0.0))
    chance = run_random(planted)["test"]["HR@10"]
    assert baselines.run_content(planted)["test"]["HR@10"] > 2 * chance
    assert baselines.run_content(none)["test"]["HR@10"] < 1.5 * run_random(none)["test"]["HR@10"]


def test_content_score_is_the_mean_similarity_to_the_users_items_plus_alpha_popularity():
    cfg = load_config(None, CONTENT)
    split = split_of(cfg, load_interactions(cfg))
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(split.n_items, 6, generator=g,
                                                  dtype=torch.float64), dim=1)
    users = np.array([3, 0, 7])
    lp = torch.randn(split.n_items, generator=g, dtype=torch.float64)
    s0 = baselines.content_scores(z, split, users, lp, 0.0)
    for row, u in zip(s0, users):
        mine = split.train_items[split.train_indptr[u]:split.train_indptr[u + 1]]
        cos = (z @ z[torch.from_numpy(mine)].t()).mean(1)        # mean cosine, per item
        assert torch.allclose(row, (cos - cos.mean()) / cos.std(), atol=1e-10)
    # a user's scores do not depend on who else is in the batch
    assert torch.allclose(baselines.content_scores(z, split, users[1:], lp, 0.0), s0[1:])
    assert torch.allclose(baselines.content_scores(z, split, users, lp, 2.5), s0 + 2.5 * lp)


def test_content_tune_chooses_alpha_on_validation_and_writes_the_grid(tmp_path, capsys):
    rc = main(["baseline", "configs/quickstart.yaml", "--model", "content", "--tune",
               "--alpha", "0,1,1000", f"run.out_dir={tmp_path}", *CONTENT])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((tmp_path / "baseline_content.json").read_text())
    grid = result["tune"]["grid"]
    assert [g["alpha"] for g in grid] == [0.0, 1.0, 1000.0]
    best = max(grid, key=lambda g: g["valid NDCG@10"])
    assert result["alpha"] == best["alpha"] and result["test"] == best["test"]
    assert sum(line.endswith(" *") for line in out.splitlines()) == 1
    # at a large weight the ranking is popularity's
    cfg = load_config(None, CONTENT)
    assert grid[2]["test"]["HR@10"] == pytest.approx(
        baselines.run_popularity(cfg)["test"]["HR@10"], abs=0.02)


@pytest.mark.parametrize("args, msg", [
    (["--model", "mf", "--alpha", "1"], "--alpha applies to --model content only"),
    (["--model", "content", "--lr", "0.1"], "--lr and --weight-decay apply to --model mf only"),
    (["--model", "popularity", "--tune"], "--tune and --select apply to"),
    (["--model", "content", "--alpha", "0,1"], "--alpha: several values need --tune"),
    (["--model", "content", "--alpha=-1"], "--alpha: finite values >= 0"),
    (["--model", "content", "encoder.text.backend=none", "encoder.image.backend=none"],
     "--model content needs item content"),
    (["--model", "content", "encoder.image.backend=none", "gfmfr.profile_features=image"],
     "no item images (gfmfr.profile_features=image)"),
])
def test_content_baseline_errors_are_one_line_exit_2(tmp_path, capsys, args, msg):
    rc = main(["baseline", "configs/quickstart.yaml", *args, f"run.out_dir={tmp_path}", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fedrpc: error: ") and msg in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
