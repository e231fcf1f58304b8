"""GroupFusion, its five fusion modules, fused_items, train_fusion, teacher."""
import pytest
import torch

from fedrpc.algorithms import (FUSIONS, GroupFusion, fused_items, make_fusion_optimizer,
                               teacher_preferences, train_fusion)

G, I, DT, DV, D = 3, 50, 12, 10, 8


def _problem(seed=0):
    """Features and targets from a fixed random linear map (group-dependent)."""
    g = torch.Generator().manual_seed(seed)
    T, V = torch.randn(I, DT, generator=g), torch.randn(I, DV, generator=g)
    A, B = torch.randn(G, DT, D, generator=g) / DT ** 0.5, torch.randn(DV, D, generator=g) / DV ** 0.5
    targets = torch.einsum("it,gtd->gid", T, A) + (V @ B).unsqueeze(0)
    return T, V, targets


def _model(fusion, seed=0):
    torch.manual_seed(seed)
    return GroupFusion(G, DT, DV, D, fusion=fusion)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_shape_and_loss_falls(fusion):
    T, V, targets = _problem()
    model = _model(fusion)
    out = model(torch.tensor([0, 2, 1]), torch.tensor([5, 5, 49]), T, V)
    assert out.shape == (3, D)
    opt = make_fusion_optimizer(model, lr=1e-2)
    res = train_fusion(model, opt, T, V, targets, torch.ones(G, dtype=torch.bool),
                       epochs=30, time_budget_s=None, batch_size=32, seed=0)
    assert res["epochs_run"] == 30 and res["pairs"] == G * I and not res["nonfinite"]
    assert res["losses"][-1] < 0.5 * res["losses"][0], res["losses"]
    F = fused_items(model, T, V, None, torch.arange(G))
    assert F.shape == (G, I, D)
    assert torch.allclose(F[1, 7], model(torch.tensor([1]), torch.tensor([7]), T, V)[0], atol=1e-5)


@pytest.mark.parametrize("fusion", ["attention", "moe", "mlp"])
def test_one_item_independent_of_rest_of_batch(fusion):
    T, V, _ = _problem()
    model = _model(fusion)
    tmask = torch.rand(I, generator=torch.Generator().manual_seed(1)) > 0.3
    for train_mode in (True, False):
        model.train(train_mode)
        a = model(torch.tensor([1, 0, 2, 2]), torch.tensor([7, 3, 9, 40]), T, V, tmask, None)
        b = model(torch.tensor([1, 2]), torch.tensor([7, 11]), T, V, tmask, None)
        c = model(torch.tensor([1]), torch.tensor([7]), T, V, tmask, None)
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[0], c[0], atol=1e-6)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_missing_modalities_give_finite_outputs_and_grads(fusion):
    T, V, targets = _problem()
    T, V = T.clone(), V.clone()
    tmask, vmask = torch.ones(I, dtype=torch.bool), torch.ones(I, dtype=torch.bool)
    tmask[:10], vmask[5:15] = False, False  # items 5..9 have neither modality
    T[:10], V[5:15] = float("nan"), float("nan")  # missing rows may hold garbage
    model = _model(fusion)
    out = model(torch.arange(G).repeat(5), torch.arange(15), T, V, tmask, vmask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a missing token is ignored: its (garbage) feature value does not matter
    T2 = T.clone()
    T2[:10] = 123.0
    out2 = model(torch.arange(G).repeat(5), torch.arange(15), T2, V, tmask, vmask)
    assert torch.allclose(out, out2)
    F = fused_items(model, T, V, (tmask, vmask), [0, 2])
    assert F.shape == (2, I, D) and torch.isfinite(F).all()


def test_moe_router_is_one_softmax():
    T, V, _ = _problem()
    model = _model("moe")
    tokens, mask = model.tokens(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), T, V)
    w = model.fusion.router_weights(tokens, mask)
    assert w.shape == (3, 4)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    assert torch.allclose(w, torch.softmax(model.fusion.router(tokens.flatten(1)), -1))
    # applying softmax twice would flatten the weights towards uniform
    assert not torch.allclose(w, torch.softmax(w, -1))
    experts = torch.stack([e(tokens, mask) for e in model.fusion.experts], 1)
    assert torch.allclose(model.fusion(tokens, mask), (w.unsqueeze(-1) * experts).sum(1), atol=1e-6)


def test_training_is_seeded_and_respects_group_ok():
    T, V, targets = _problem()
    runs = []
    for _ in range(2):
        model = _model("mlp")
        opt = make_fusion_optimizer(model, lr=1e-2)
        ok = torch.tensor([True, False, True])
        res = train_fusion(model, opt, T, V, targets, ok, epochs=3, time_budget_s=None,
                           batch_size=16, seed=5)
        runs.append((res, model.group_emb.weight.detach().clone()))
    assert runs[0][0]["losses"] == runs[1][0]["losses"] and runs[0][0]["pairs"] == 2 * I
    assert torch.equal(runs[0][1], runs[1][1])
    fresh = _model("mlp").group_emb.weight
    assert torch.equal(runs[0][1][1], fresh[1])  # group 1 unused: its embedding untouched


def test_time_budget_stops_early_but_runs_one_epoch():
    T, V, targets = _problem()
    model = _model("mlp")
    res = train_fusion(model, make_fusion_optimizer(model), T, V, targets,
                       torch.ones(G, dtype=torch.bool), epochs=1000, time_budget_s=1e-6,
                       batch_size=64, seed=0)
    assert res["epochs_run"] == 1 < 1000 and len(res["losses"]) == 1


def test_training_rejects_nan_targets_and_wrong_shapes():
    T, V, targets = _problem()
    model = _model("sum")
    opt = make_fusion_optimizer(model)
    bad = targets.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_fusion(model, opt, T, V, bad, torch.ones(G, dtype=torch.bool), 1, None, 8, 0)
    with pytest.raises(ValueError, match="T must be"):
        model(torch.tensor([0]), torch.tensor([0]), T[:, :5], V)
    with pytest.raises(ValueError, match="fusion must be"):
        GroupFusion(G, DT, DV, D, fusion="concat")


def test_teacher_in_open_unit_interval():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(G, I, D, generator=g)
    w, b = torch.randn(G, D, generator=g), torch.randn(G, generator=g)
    p = teacher_preferences(F, w, b)
    assert p.shape == (G, I)
    assert torch.allclose(p[2, 3], torch.sigmoid(F[2, 3] @ w[2] + b[2]))
    extreme = teacher_preferences(F * 1e4, w, b)
    assert (extreme > 0).all() and (extreme < 1).all()
    assert extreme.min() >= 1e-7 and extreme.max() <= 1 - 1e-7
    with pytest.raises(ValueError, match="NaN"):
        teacher_preferences(F, w, b * float("nan"))


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_grid_equals_the_pairwise_model(fusion):
    """GroupFusion.grid (what training and fused_items use) is the same function as the
    per-pair forward, missing modalities included."""
    T, V, _ = _problem()
    tmask = torch.rand(I, generator=torch.Generator().manual_seed(2)) > 0.3
    vmask = torch.rand(I, generator=torch.Generator().manual_seed(3)) > 0.3
    model = _model(fusion)
    groups, items = torch.tensor([2, 0]), torch.tensor([4, 9, 0, 33, 17])
    grid = model.grid(groups, items, T, V, tmask, vmask)
    pairs = model(groups.repeat_interleave(len(items)), items.repeat(len(groups)), T, V,
                  tmask, vmask).reshape(len(groups), len(items), D)
    assert grid.shape == (2, 5, D)
    assert torch.allclose(grid, pairs, atol=1e-5)


def test_an_epoch_takes_as_many_steps_as_pair_minibatches():
    """ceil(pairs / batch_size) Adam steps per epoch, every pair seen once per epoch."""
    T, V, targets = _problem()
    model = _model("mlp")
    opt = make_fusion_optimizer(model, lr=1e-2)
    train_fusion(model, opt, T, V, targets, torch.ones(G, dtype=torch.bool), epochs=2,
                 time_budget_s=None, batch_size=40, seed=0)
    assert opt.state[model.group_emb.weight]["step"] == 2 * -(-G * I // 40)


def test_content_prior_moves_the_table_towards_the_size_weighted_fused_rows():
    """gfmfr.content_prior = beta: C <- C + beta (sum_k n_k F_k / sum_k n_k - C) over the
    groups that trained; groups left out of fusion (group_ok False) do not count."""
    import numpy as np

    from fedrpc.config import load_config
    from fedrpc.state import ServerState
    from fedrpc.strategy import GFMFR

    cfg = load_config(None, ["fed.backbone=fedavgmf", "fed.latent_dim=4",
                             "gfmfr.groups=3", "gfmfr.content_prior=0.25"])
    strategy = GFMFR(cfg)
    name = strategy.backbone.item_table
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(6, 4, generator=gen)
    state = ServerState({**strategy.backbone.init_shared(6, 0), name: table.clone()},
                        np.full(10, -1))
    fused = torch.randn(3, 6, 4, generator=gen)
    sizes = np.array([1, 3, 5])
    ok = torch.tensor([True, True, False])
    shift = strategy.content_prior(state, fused, sizes, ok)
    prior = (1 * fused[0] + 3 * fused[1]) / 4
    expected = table + 0.25 * (prior - table)
    assert torch.allclose(state.shared[name], expected, atol=1e-6)
    assert shift == pytest.approx(float((0.25 * (prior - table)).pow(2).mean().sqrt()), rel=1e-5)
    off = GFMFR(load_config(None, ["fed.backbone=fedavgmf", "fed.latent_dim=4", "gfmfr.groups=3"]))
    assert off.content_prior(state, fused, sizes, ok) is None      # 0 = the paper's method
