"""`fedrpc diagnose teacher`: candidate teachers evaluated through the run's metrics;
`fedrpc diagnose content`: how well content predicts what the interactions teach."""
import numpy as np
import pytest
import torch

from fedrpc.baselines import run_popularity
from fedrpc.config import load_config
from fedrpc.data.types import DataError
from fedrpc.diagnostics import diagnose_content, diagnose_teacher, ridge_cv_r2
from fedrpc.runtime import run_local

from test_federation import SMALL


def test_teacher_diagnostic_scores_every_candidate_like_a_recommender(tmp_path):
    cfg = load_config(None, SMALL + ["fed.rounds=3", f"run.out_dir={tmp_path}"])
    lines = []
    records = diagnose_teacher(cfg, every=2, progress=lines.append)
    assert [r["round"] for r in records] == [1, 2]          # every 2nd round and the last
    assert len(lines) == 2 and "head(F)" in lines[0]
    pop = run_popularity(load_config(None, SMALL))["test"]
    for r in records:
        assert r["popularity"] == pop                        # the same evaluation path
        for name in ("head(F)", "output(F)", "head(C_bar)", "output(C_bar)",
                     "group popularity (oracle)"):
            assert 0.0 <= r[name]["HR@10"] <= 1.0 and r[name]["users"] == pop["users"]
        assert r["students"]["users"] == pop["users"]


def test_ridge_r2_is_near_one_for_a_linear_target_and_at_most_zero_for_noise():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 20, generator=g, dtype=torch.float64)
    linear = X @ torch.randn(20, 3, generator=g, dtype=torch.float64) + 5.0
    noise = torch.randn(400, 3, generator=g, dtype=torch.float64)
    assert ridge_cv_r2(X, linear, 5, 0, alphas=(1e-3,))[1e-3] > 0.999
    assert max(ridge_cv_r2(X, noise, 5, 0).values()) <= 0.0


CONTENT = ["data.synthetic.users=200", "data.synthetic.items=200",
           "data.synthetic.mean_interactions=20", "fed.latent_dim=8", "encoder.cache=false",
           "run.progress=false"]


def _r2(records, target, features="text+image"):
    return next(r["r2"] for r in records if r["target"].startswith(target)
                and r["features"] == features)


def test_content_predicts_the_interaction_factors_only_when_the_data_plants_a_signal(tmp_path):
    """Synthetic data: at signal 1 preferences follow the items' visible attributes, at 0
    they ignore them."""
    out = []
    for signal in (1.0, 0.0):
        cfg = load_config(None, CONTENT + [f"data.synthetic.signal={signal}",
                                           f"run.out_dir={tmp_path}"])
        out.append(diagnose_content(cfg, progress=lambda _: None))
    planted, none = out
    assert {r["features"] for r in planted} == {"text", "image", "text+image"}
    assert _r2(planted, "interaction factors") > 0.2
    assert _r2(none, "interaction factors") < 0.02
    assert all(r["r2"] < 0.05 for r in none)


def test_content_diagnostic_reads_the_item_table_of_a_checkpoint(tmp_path):
    cfg = load_config(None, CONTENT + ["fed.rounds=2", "fed.backbone=fedavgmf",
                                       "gfmfr.enabled=false", f"run.out_dir={tmp_path}"])
    run_local(cfg)
    ck = tmp_path / "checkpoints" / "round-000002"
    records = diagnose_content(cfg, str(ck), progress=lambda _: None)
    table = [r for r in records if r["target"].startswith("item table")]
    factors = [r for r in records if r["target"].startswith("interaction factors")]
    assert len(table) == 3 and all(r["items"] == factors[0]["items"] for r in table)
    assert all(np.isfinite(r["r2"]) for r in table)
    other = load_config(None, CONTENT + ["fed.backbone=fedrap", f"run.out_dir={tmp_path}"])
    with pytest.raises(DataError, match="fed.backbone \\('fedavgmf' there, 'fedrap' here\\)"):
        diagnose_content(other, str(ck), progress=lambda _: None)
    sparse = load_config(None, CONTENT + ["fed.backbone=fedavgmf", "data.max_train_per_user=2",
                                          f"run.out_dir={tmp_path}"])
    with pytest.raises(DataError, match="data.max_train_per_user"):
        diagnose_content(sparse, str(ck), progress=lambda _: None)
    with pytest.raises(ValueError, match="no manifest.json"):
        diagnose_content(cfg, str(tmp_path), progress=lambda _: None)
    with pytest.raises(DataError, match="no such checkpoint folder"):
        diagnose_content(cfg, str(tmp_path / "nowhere"), progress=lambda _: None)


def test_content_diagnostic_without_content_is_an_error(tmp_path):
    cfg = load_config(None, CONTENT + ["encoder.text.backend=none", "encoder.image.backend=none",
                                       f"run.out_dir={tmp_path}"])
    with pytest.raises(DataError, match="no content features"):
        diagnose_content(cfg, progress=lambda _: None)
