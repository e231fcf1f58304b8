"""GFMFR on sparse data with partial participation: losses stay bounded and groups stay
non-degenerate (or the run says why), for the dot-product backbones whose large item
rates made GFMFR diverge when a client with fewer samples than a minibatch took
proportionally larger steps (README, "Stability on sparse data"). Before that fix this
test failed at client fraction 0.1: base loss 0.25 at round 0, 1.3 at round 8, 3e16 at
round 39."""
import json
import logging

import numpy as np
import pytest

from fedrpc.config import load_config
from fedrpc.runtime import run_local

SPARSE = ["data.synthetic.users=80", "data.synthetic.items=120",
          "data.synthetic.mean_interactions=12", "data.synthetic.min_interactions=8",
          "data.max_train_per_user=5", "fed.latent_dim=16", "fed.rounds=40",
          "eval.interval=40", "gfmfr.fusion_epochs=3", "gfmfr.groups=4",
          "encoder.text.backend=none", "encoder.image.backend=none",
          "run.progress=false", "encoder.cache=false"]


def _run(tmp_path, *over):
    run_local(load_config(None, SPARSE + [f"run.out_dir={tmp_path}", *over]))
    return [json.loads(line) for line in open(tmp_path / "rounds.jsonl")]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backbone", ["fedavgmf", "pfedrec"])
def test_losses_stay_bounded_and_groups_non_degenerate(tmp_path, caplog, backbone):
    caplog.set_level(logging.WARNING, logger="fedrpc.server")
    for fraction in (0.1, 0.3, 1.0):
        caplog.clear()
        recs = _run(tmp_path / f"{fraction}", f"fed.backbone={backbone}",
                    f"fed.client_fraction={fraction}")
        base = np.array([r["loss"]["base"] for r in recs])
        assert np.isfinite(base).all()
        # bounded: never above the first round's (the untrained model's) loss
        assert base.max() <= base[0] * 1.05, (fraction, base.round(3).tolist())
        assert recs[-1]["metrics"]["test"]["HR@10"] > 0
        lopsided = [r["round"] for r in recs
                    if max(r["gfmfr"]["group_sizes"]) > 0.9 * r["clients"]]
        warned = any("one group holds" in m for m in caplog.messages)
        # groups non-degenerate in most rounds, and never silently degenerate
        assert len(lopsided) <= 0.25 * len(recs), (fraction, lopsided)
        assert warned or not lopsided

