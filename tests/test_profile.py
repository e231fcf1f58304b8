"""The clients' content profile (gfmfr.profile_weight): what it scores, what it costs in
bytes, and that it needs content."""
import json
import logging

import numpy as np
import pytest
import torch

from fedrpc import algorithms as alg
from fedrpc.config import ConfigError, load_config
from fedrpc.data import load_interactions
from fedrpc.runtime import run_local

COLD = ["data.synthetic.users=120", "data.synthetic.items=120",
        "data.synthetic.mean_interactions=15", "data.synthetic.min_interactions=5",
        "data.split=cold_items", "fed.latent_dim=8", "fed.local_epochs=1", "fed.batch_size=32",
        "fed.rounds=2", "eval.interval=1", "fed.backbone=fedavgmf", "gfmfr.enabled=false",
        "run.progress=false", "encoder.cache=false", "run.checkpoint_every=0"]


def records(folder):
    return [json.loads(line) for line in open(folder / "rounds.jsonl")]


def test_profile_vectors_are_unit_rows_of_the_top_principal_axes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    x[3] = 0                                           # an item without content
    full = alg.profile_vectors(x, 0)
    assert torch.allclose(full, torch.nn.functional.normalize(x, dim=1))
    assert torch.allclose(alg.profile_vectors(x, 6), full)
    z = alg.profile_vectors(x, 2)
    assert z.shape == (30, 2) and bool((z[3] == 0).all())
    assert torch.allclose(z.norm(dim=1)[torch.arange(30) != 3], torch.ones(29, dtype=z.dtype))
    # the same similarities as the rank-2 approximation of x (whatever the axes' signs)
    u, s, v = torch.linalg.svd(x, full_matrices=False)
    low = torch.nn.functional.normalize(x @ v[:2].t(), dim=1)
    assert torch.allclose(z @ z.t(), low @ low.t(), atol=1e-10)


def test_blend_adds_the_weighted_profile_to_the_standardised_scores():
    s = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    p = torch.tensor([[0.5, -0.5, 1.0, -1.0]], dtype=torch.float64)
    z = (s.double() - s.double().mean()) / s.double().std()
    assert torch.allclose(alg.blend(s, p, 2.0), z + 2.0 * p)
    assert torch.allclose(alg.blend(s, p, 0.0), z)


def test_profile_ranks_cold_items_by_content_and_costs_its_vectors_in_bytes(tmp_path):
    """Synthetic data whose preferences follow the items' visible attributes, 10% of the
    items cold: scored with the profile, held-out cold items rank far higher among all
    items; each client's evaluation download grows by the content vectors (I x dims x 4
    bytes), nothing else changes hands."""
    base = run_local(load_config(None, COLD + [f"run.out_dir={tmp_path / 'b'}"]))
    prof = run_local(load_config(None, COLD + ["gfmfr.profile_weight=4", "gfmfr.profile_dims=8",
                                               f"run.out_dir={tmp_path / 'p'}"]))
    b, p = records(tmp_path / "b"), records(tmp_path / "p")
    n_items = load_interactions(load_config(None, COLD)).n_items
    for rb, rp in zip(b, p):
        lb, lp = rb["bytes"]["logical"], rp["bytes"]["logical"]
        assert lp["train_down"] == lb["train_down"] and lp["train_up"] == lb["train_up"]
        assert lp["eval_down"]["mean"] == lb["eval_down"]["mean"] + n_items * 8 * 4
        # training is untouched: the same losses
        assert rp["loss"] == rb["loss"]
    assert p[-1]["metrics"]["test"]["HR@10"] > b[-1]["metrics"]["test"]["HR@10"] + 0.1
    assert p[-1]["metrics"]["test"]["cold:NDCG@10"] > b[-1]["metrics"]["test"]["cold:NDCG@10"] + 0.05
    assert prof["best_round"] is not None and base["best_round"] is not None


def test_profile_without_content_says_so_and_changes_nothing(tmp_path, caplog):
    none = ["encoder.text.backend=none", "encoder.image.backend=none"]
    run_local(load_config(None, COLD + none + [f"run.out_dir={tmp_path / 'b'}"]))
    with caplog.at_level(logging.WARNING, logger="fedrpc.strategy"):
        run_local(load_config(None, COLD + none + ["gfmfr.profile_weight=4",
                                                   f"run.out_dir={tmp_path / 'p'}"]))
    assert "no item has content" in caplog.text
    b, p = records(tmp_path / "b"), records(tmp_path / "p")
    assert [r["metrics"] for r in b] == [r["metrics"] for r in p]
    assert [r["bytes"]["logical"] for r in b] == [r["bytes"]["logical"] for r in p]


def test_profile_from_one_modality_scores_as_that_modality_alone(tmp_path):
    """gfmfr.profile_features=text: the clients rank exactly as when the text is the only
    content the run has (encoder.image.backend=none), and not as with text and image."""
    prof = COLD + ["gfmfr.profile_weight=4", "gfmfr.profile_dims=8"]
    for name, extra in (("all", []), ("text", ["gfmfr.profile_features=text"]),
                        ("only", ["encoder.image.backend=none"])):
        run_local(load_config(None, prof + extra + [f"run.out_dir={tmp_path / name}"]))
    every, text, only = (records(tmp_path / n) for n in ("all", "text", "only"))
    assert [r["metrics"] for r in text] == [r["metrics"] for r in only]
    assert [r["bytes"]["logical"] for r in text] == [r["bytes"]["logical"] for r in only]
    assert [r["metrics"] for r in text] != [r["metrics"] for r in every]


def test_profile_of_a_modality_no_item_has_says_so_and_changes_nothing(tmp_path, caplog):
    no_image = COLD + ["encoder.image.backend=none"]
    run_local(load_config(None, no_image + [f"run.out_dir={tmp_path / 'b'}"]))
    with caplog.at_level(logging.WARNING, logger="fedrpc.strategy"):
        run_local(load_config(None, no_image + ["gfmfr.profile_weight=4",
                                                "gfmfr.profile_features=image",
                                                f"run.out_dir={tmp_path / 'p'}"]))
    assert "no item has image" in caplog.text
    b, p = records(tmp_path / "b"), records(tmp_path / "p")
    assert [r["metrics"] for r in b] == [r["metrics"] for r in p]
    assert [r["bytes"]["logical"] for r in b] == [r["bytes"]["logical"] for r in p]


@pytest.mark.parametrize("key, value, msg", [
    ("gfmfr.profile_features", "both", "must be one of 'all', 'text', 'image'"),
    ("gfmfr.profile_weight", "-1", "must be a finite number >= 0"),
    ("gfmfr.profile_weight", ".inf", "must be a finite number >= 0"),
    ("gfmfr.profile_dims", "-2", "must be >= 0"),
])
def test_profile_settings_are_checked(key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [f"{key}={value}"])
