"""Client-side training: every backbone learns; batched training equals one-by-one."""
import numpy as np
import pytest
import torch

from fedrpc.config import load_config
from fedrpc.data import load_interactions, split_of
from fedrpc.models import BACKBONES, make_backbone
from fedrpc.rows import Rows
from fedrpc.state import ClientStore
from fedrpc.training import LocalSettings, build_client_batches, train_clients

SMALL = ["data.synthetic.users=24", "data.synthetic.items=60",
         "data.synthetic.mean_interactions=12", "data.synthetic.min_interactions=5"]


@pytest.fixture(scope="module")
def small():
    cfg = load_config(None, SMALL)
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    return inter, split


def _train(name, small, users, settings, teacher=None, groups=None, one_by_one=False, state=None):
    inter, split = small
    bb = make_backbone(name, 8)
    shared = bb.init_shared(inter.n_items, 0)
    state = state or ClientStore.create(bb, np.arange(inter.n_users), inter.n_items, 0)
    chunks = [users[j:j + 1] for j in range(len(users))] if one_by_one else [users]
    outs = []
    for ch in chunks:
        batch = build_client_batches(ch, split.train_indptr, split.train_items,
                                     inter.n_items, settings)
        g = None if groups is None else groups[np.searchsorted(users, ch)]
        outs.append(train_clients(bb, shared, state, batch, settings, teacher, g))
    return bb, state, outs


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_backbone_learns(name, small):
    inter = small[0]
    users = np.arange(inter.n_users)
    s = LocalSettings(epochs=1, batch_size=32, lr=0.05, lr_item=5.0)
    bb, state, [first] = _train(name, small, users, s)
    for p in bb.shared():
        assert first.shared[p.name].shape == (len(users), *p.full_shape(inter.n_items))
    s20 = LocalSettings(epochs=20, batch_size=32, lr=0.05, lr_item=5.0)
    _, _, [later] = _train(name, small, users, s20)
    # the mean loss over 20 local epochs is well below that of the first epoch
    assert later.loss.mean() < first.loss.mean() - 0.02
    assert torch.isfinite(later.loss).all()


@pytest.mark.parametrize("name", ["fedrap", "pfedrec"])
def test_batched_equals_one_by_one(name, small):
    inter = small[0]
    users = np.arange(0, inter.n_users, 2)             # a subset, like a sampled round
    s = LocalSettings(epochs=2, batch_size=16, lr=0.05, lr_item=2.0, round=3, total_rounds=10)
    teacher = torch.rand(3, inter.n_items).clamp(0.05, 0.95)
    groups = torch.tensor([j % 4 - 1 for j in range(len(users))])  # some clients have no group
    _, st_b, [b] = _train(name, small, users, s, teacher, groups)
    _, st_1, ones = _train(name, small, users, s, teacher, groups, one_by_one=True)
    for k in b.shared:
        one = [o.shared[k] for o in ones]
        one = Rows.cat(one).dense() if isinstance(one[0], Rows) else torch.cat(one)
        mine = b.shared[k].dense() if isinstance(b.shared[k], Rows) else b.shared[k]
        torch.testing.assert_close(mine, one, rtol=1e-5, atol=1e-6)
    for k in st_b.private:
        torch.testing.assert_close(st_b.private[k], st_1.private[k], rtol=1e-5, atol=1e-6)
    everyone = torch.arange(len(st_b.users))
    for k, v in st_b.dense_tables(everyone).items():
        torch.testing.assert_close(v, st_1.dense_tables(everyone)[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_b.ratio, st_1.ratio, equal_nan=True)
    torch.testing.assert_close(b.kl, torch.cat([o.kl for o in ones]))


def test_training_is_deterministic(small):
    users = np.arange(small[0].n_users)
    s = LocalSettings(epochs=1, batch_size=16, round=2)
    _, _, [a] = _train("fedrap", small, users, s)
    _, _, [b] = _train("fedrap", small, users, s)
    for k in a.shared:
        if isinstance(a.shared[k], Rows):
            assert torch.equal(a.shared[k].dense(), b.shared[k].dense())
        else:
            assert torch.equal(a.shared[k], b.shared[k])


def negatives(batch, c):
    """The negative samples client c trains on this round, over all its epochs."""
    items, labels = batch.samples(c)
    return items[labels == 0]


def test_negatives_are_fresh_each_round(small):
    inter, split = small
    users = np.arange(inter.n_users)
    b0 = build_client_batches(users, split.train_indptr, split.train_items,
                              inter.n_items, LocalSettings(round=0))
    b1 = build_client_batches(users, split.train_indptr, split.train_items,
                              inter.n_items, LocalSettings(round=1))
    neg0 = np.sort(negatives(b0, 0))
    neg1 = np.sort(negatives(b1, 0))
    assert not np.array_equal(neg0, neg1)
    assert not set(split.train_of(0).tolist()) & set(neg0.tolist())
    # 4 negatives per positive, every epoch sees each sample once
    pos = split.train_of(0)
    assert b0.n_samples[0] == 5 * len(pos)
    assert len(b0.samples(0)[0]) == 5 * b0.n_samples[0]


def test_held_out_items_can_be_negatives(small):
    """Negatives exclude only training positives: excluding the held-out items too would
    leak them (they would be the only items a per-user item table never pushes down)."""
    inter, split = small
    users = np.arange(inter.n_users)
    held = {u: set(split.test_items[split.test_indptr[u]:split.test_indptr[u + 1]])
            | set(split.valid_items[split.valid_indptr[u]:split.valid_indptr[u + 1]])
            for u in users}
    drawn = 0
    for r in range(5):
        b = build_client_batches(users, split.train_indptr, split.train_items, inter.n_items,
                                 LocalSettings(round=r, epochs=1))
        for c, u in enumerate(users):
            negs = set(negatives(b, c).tolist())
            drawn += len(negs & held[u])
    assert drawn > 0


def test_bench_counts_the_work_of_a_round():
    from fedrpc.bench import bench_train
    from fedrpc.config import load_config
    from fedrpc.data import load_interactions, split_of
    from test_federation import SMALL
    cfg = load_config(None, SMALL)
    r = bench_train(cfg)
    split = split_of(cfg, load_interactions(cfg))
    f = cfg.fed
    positives = len(split.train_items)
    w = r["workload"]
    assert w["sample_steps"] == positives * (1 + f.num_negatives) * f.local_epochs
    assert w["slots"] == w["steps"] * f.batch_size >= w["sample_steps"]
    assert w["matmul_gflop"] == round(w["slots"] * 6 * f.latent_dim ** 2 / 1e9, 1)
    assert r["batched_s"] > 0 and r["one_by_one_s"] > 0 and r["straightforward_s"] > 0


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_full_ranking_scores_equal_the_training_logits(name):
    """Evaluation scores every item with the same model the clients train."""
    from fedrpc.models.backbones import Backbone
    bb = make_backbone(name, 8)
    shared = bb.init_shared(30, 0)
    private = {}
    for u in range(3):
        for k, v in bb.init_private(30, 0, u).items():
            private.setdefault(k, []).append(v + 0.1 * torch.randn_like(v))
    private = {k: torch.stack(v) for k, v in private.items()}
    torch.testing.assert_close(bb.score_all(shared, private),
                               Backbone.score_all(bb, shared, private))


def test_private_tables_keep_only_the_rows_clients_trained(small):
    """A worker's memory for FedRAP's private item tables grows with the rows its clients
    trained, not with clients x items; every other row reads as its initial value."""
    inter, split = small
    users = np.arange(inter.n_users)
    s = LocalSettings(epochs=1, batch_size=16)
    bb, state, _ = _train("fedrap", small, users, s)
    batch = build_client_batches(users, split.train_indptr, split.train_items,
                                 inter.n_items, s)
    assert state.stored_rows() == int(batch.counts.sum()) < len(users) * inter.n_items
    full = state.dense_tables(torch.arange(len(users)))["P"]
    trained = torch.zeros(len(users), inter.n_items, dtype=torch.bool)
    trained[torch.from_numpy(np.repeat(users, batch.counts)), torch.from_numpy(batch.items)] = True
    assert (full[~trained] == 0).all() and (full[trained] != 0).any(-1).all()


def test_kept_initial_tables_give_the_same_numbers(small):
    """runtime.initial_cache_mb changes no number: FedRAP-MLP's private tables (random
    initial values) train and evaluate bit for bit alike whether no client, some or all
    keep their drawn initial tables, over two rounds with different clients."""
    inter, split = small
    bb = make_backbone("fedrap_mlp", 8)
    per_client_mb = inter.n_items * 8 * 4 / 2 ** 20
    results = []
    for mb in (0.0, per_client_mb * inter.n_users / 2, 1024.0):
        state = ClientStore.create(bb, np.arange(inter.n_users), inter.n_items, 0,
                                   initial_cache_mb=mb)
        outs = []
        for r, users in enumerate([np.arange(0, inter.n_users, 2), np.arange(inter.n_users)]):
            s = LocalSettings(epochs=2, batch_size=16, lr=0.05, lr_item=2.0, round=r,
                              total_rounds=2)
            outs.append(_train("fedrap_mlp", small, users, s, state=state)[2][0])
        everyone = torch.arange(inter.n_users)
        results.append((outs, state.dense_tables(everyone)["P"],
                        state.table_rows("P", np.array([3, 20]), np.array([2, 1]),
                                         np.array([5, inter.n_items - 1, 0]))))
    for outs, tables, rows in results[1:]:
        for o, ref in zip(outs, results[0][0]):
            assert torch.equal(o.loss, ref.loss)
            assert torch.equal(o.shared["C"].values, ref.shared["C"].values)
        assert torch.equal(tables, results[0][1]) and torch.equal(rows, results[0][2])


@pytest.mark.parametrize("name", ["fedrap", "fedrap_mlp", "fedavgmf"])
def test_packed_rows_train_like_whole_tables(name, small):
    """Training on each client's packed rows gives what training on whole [I, d] tables
    gives (the straightforward reference, one client at a time), within float tolerance:
    the representation does not change the model."""
    inter, split = small
    users = np.arange(0, inter.n_users, 3)
    s = LocalSettings(epochs=2, batch_size=16, lr=0.05, lr_item=2.0, round=1)
    bb, state, [out] = _train(name, small, users, s)
    shared0 = bb.init_shared(inter.n_items, 0)
    batch = build_client_batches(users, split.train_indptr, split.train_items,
                                 inter.n_items, s)
    for c, u in enumerate(users):
        params = {p.name: (shared0[p.name] if p.shared
                           else bb.init_private(inter.n_items, 0, int(u))[p.name]).clone()
                  for p in bb.params()}
        for step in range(int(batch.steps[c])):
            it, y = (torch.from_numpy(x) for x in batch.minibatch(c, step))
            leaves = {k: t.clone().requires_grad_(True) for k, t in params.items()}
            rows = {p.name: leaves[p.name][it].unsqueeze(0) for p in bb.params() if p.table}
            dense = {p.name: leaves[p.name].unsqueeze(0) for p in bb.params() if not p.table}
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                bb.logits(rows, dense)[0], y)
            reg = bb.regulariser(rows, dense, torch.ones(1, len(it), dtype=torch.bool),
                                  bb.regulariser_weight(s.round))
            loss = (loss if reg is None else loss + reg[0]) * min(1.0, len(it) / s.batch_size)
            loss.backward()
            with torch.no_grad():
                for p in bb.params():
                    t, g = params[p.name], leaves[p.name].grad
                    if p.table:
                        lr = s.lr_item if p.shared else s.lr_private_item
                        hit = torch.unique(it)
                        t[hit] -= lr * (g[hit] + s.weight_decay * t[hit])
                    else:
                        t -= s.lr * (g + s.weight_decay * t)
        for p in bb.params():
            if p.table and p.shared:
                got = out.shared[p.name].table(c)
            elif p.table:
                got = state.dense_tables(state.slots(np.array([u])))[p.name][0]
            elif p.shared:
                got = out.shared[p.name][c]
            else:
                got = state.private[p.name][int(state.slots(np.array([u]))[0])]
            torch.testing.assert_close(got, params[p.name], rtol=1e-4, atol=1e-5)


def test_a_client_file_of_another_layout_is_refused(small, tmp_path):
    """A checkpoint whose private parameters do not match (another backbone, or private
    tables stored densely) is refused by name instead of being half loaded."""
    inter = small[0]
    bb = make_backbone("fedrap", 8)
    store = ClientStore.create(bb, np.arange(inter.n_users), inter.n_items, 0)
    sd = store.state_dict()
    sd["private"]["P"] = torch.zeros(inter.n_users, inter.n_items, 8)   # the dense layout
    del sd["tables"]
    torch.save(sd, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="cannot be resumed"):
        store.load_rows([tmp_path / "old.pt"])
