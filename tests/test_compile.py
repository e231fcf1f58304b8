"""runtime.compile: the local-training step compiled by torch.compile gives the same
numbers whatever the number of workers, and the uncompiled step's numbers within float
rounding."""
import json

import numpy as np
import pytest
import torch

from fedrpc.config import load_config
from fedrpc.data import load_interactions, split_of
from fedrpc.models import make_backbone
from fedrpc.rows import Rows
from fedrpc.runtime import run_local
from fedrpc.state import ClientStore
from fedrpc.training import LocalSettings, build_client_batches, has_cxx_compiler, train_clients

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


def test_compiled_round_equals_eager_and_is_the_same_one_client_at_a_time():
    """One round of local training, compiled: within float rounding of the uncompiled
    round (weight decay on, a teacher, rows repeated within minibatches), and the same
    to the bit whether the clients train together or one at a time."""
    cfg = load_config(None, ["data.synthetic.users=16", "data.synthetic.items=40",
                             "data.synthetic.mean_interactions=12",
                             "data.synthetic.min_interactions=5"])
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    users = np.arange(inter.n_users)
    teacher = torch.rand(3, inter.n_items, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([j % 4 - 1 for j in range(len(users))])   # some without a group

    def run(compile_, one_by_one=False):
        s = LocalSettings(epochs=2, batch_size=16, num_negatives=6, lr=0.05, lr_item=2.0,
                          weight_decay=0.01, round=3, total_rounds=10, compile=compile_)
        bb = make_backbone("fedrap", 8)
        shared = bb.init_shared(inter.n_items, 0)
        state = ClientStore.create(bb, users, inter.n_items, 0)
        outs, repeated = [], False
        for ch in ([users[j:j + 1] for j in range(len(users))] if one_by_one else [users]):
            batch = build_client_batches(ch, split.train_indptr, split.train_items,
                                         inter.n_items, s)
            repeated |= any(bool((m >= 0).any()) for _, m in batch.row_writers())
            outs.append(train_clients(bb, shared, state, batch, s, teacher,
                                      groups[np.searchsorted(users, ch)]))
        table = Rows.cat([o.shared["C"] for o in outs]).dense()
        return table, state, torch.cat([o.loss for o in outs]), repeated

    eager, st_e, loss_e, repeated = run(False)
    together, st_c, loss_c, _ = run(True)
    alone, st_1, loss_1, _ = run(True, one_by_one=True)
    assert repeated                       # some minibatch names a row twice
    torch.testing.assert_close(together, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for k in st_e.private:
        torch.testing.assert_close(st_c.private[k], st_e.private[k], rtol=1e-5, atol=1e-6)
    assert torch.equal(together, alone) and torch.equal(loss_c, loss_1)
    for k in st_c.private:
        assert torch.equal(st_c.private[k], st_1.private[k])
    assert torch.equal(st_c.ratio.nan_to_num(-1), st_1.ratio.nan_to_num(-1))
