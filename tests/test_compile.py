"""runtime.compile: the local-training step compiled by torch.compile gives the same
numbers whatever the number of workers, and the uncompiled step's numbers within float
rounding."""
import json

import pytest

from fedrpc.config import load_config
from fedrpc.runtime import run_local
from fedrpc.training import has_cxx_compiler

pytestmark = pytest.mark.skipif(not has_cxx_compiler(),
                                reason="torch.compile's CPU kernels need a C++ compiler")

SMALL = ["data.synthetic.users=30", "data.synthetic.items=50",
         "data.synthetic.mean_interactions=10", "data.synthetic.min_interactions=5",
         "fed.latent_dim=8", "fed.local_epochs=2", "fed.batch_size=16", "fed.rounds=3",
         "gfmfr.groups=3", "gfmfr.fusion_epochs=3", "run.progress=false",
         "encoder.cache=false", "fed.backbone=fedrap_mlp", "fed.client_fraction=0.6"]


def _rounds(path, *over):
    run_local(load_config(None, SMALL + [f"run.out_dir={path}", *over]))
    return [json.loads(line) for line in open(path / "rounds.jsonl")]


@pytest.mark.timeout(900)
def test_compiled_step_is_independent_of_workers_and_close_to_eager(tmp_path):
    one = _rounds(tmp_path / "c1", "runtime.compile=true", "fed.workers=1")
    two = _rounds(tmp_path / "c2", "runtime.compile=true", "fed.workers=2")
    eager = _rounds(tmp_path / "e", "fed.workers=1")
    # rounds 1 and 2 train with a teacher: both compiled graphs are exercised
    assert any(r["loss"]["kl"] > 0 for r in one)
    for a, b in zip(one, two):
        assert a["loss"] == b["loss"] and a.get("metrics") == b.get("metrics")
    for a, e in zip(one, eager):
        assert a["loss"]["base"] == pytest.approx(e["loss"]["base"], rel=1e-4)
        assert a["loss"]["kl"] == pytest.approx(e["loss"]["kl"], rel=1e-2, abs=1e-9)
        for split in ("valid", "test"):
            for k, v in a["metrics"][split].items():
                assert v == pytest.approx(e["metrics"][split][k], abs=0.05), (split, k)
