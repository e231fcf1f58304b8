"""Ranking metrics against hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from fedrpc.data.prepare import split_from_labels
from fedrpc.data.types import Interactions
from fedrpc.metrics import add_sums, evaluate_users, finalize, metric_sums, target_ranks


def ranks(scores, targets, mask=None):
    s = torch.tensor([scores], dtype=torch.float64)
    m = None if mask is None else torch.tensor([mask])
    return target_ranks(s, torch.tensor([targets]), m)[0].tolist()


def test_rank_counts_higher_scores():
    assert ranks([0.1, 0.9, 0.5, 0.3], [2]) == [2.0]


def test_ties_count_against_the_held_out_item():
    # item 2 ties with items 1 and 3: both count ahead of it
    assert ranks([0.9, 0.5, 0.5, 0.5], [2]) == [4.0]


def test_masked_items_do_not_compete():
    assert ranks([0.9, 0.8, 0.5, 0.1], [2], [True, True, False, False]) == [1.0]


def test_nan_score_is_worst():
    assert ranks([0.9, 0.8, float("nan"), 0.1], [2]) == [4.0]


def test_several_held_out_items():
    # targets 1 and 2 tie: the one listed first ranks first
    assert ranks([0.9, 0.5, 0.5, 0.7], [1, 2]) == [3.0, 4.0]
    # padding (-1) is no target: item 2 now competes and ties item 1
    assert ranks([0.9, 0.5, 0.5, 0.7], [1, -1]) == [4.0, math.inf]


def test_sums_do_not_depend_on_how_users_are_split():
    r = torch.rand(50, 1, dtype=torch.float64) * 40 + 1
    whole = metric_sums(r, [10])
    parts = [metric_sums(r[i:i + 7], [10]) for i in range(0, 50, 7)]
    total = {}
    for p in reversed(parts):
        total = add_sums(total, p)
    assert total == whole


def test_metric_values_by_hand():
    r = torch.tensor([[3.0], [1.0], [12.0]], dtype=torch.float64)
    m = finalize(metric_sums(r, [1, 5, 20]))
    assert m["users"] == 3
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["HR@20"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((0.5 + 1.0) / 3)
    assert m["NDCG@20"] == pytest.approx((0.5 + 1.0 + 1 / math.log2(13)) / 3)
    assert m["Recall@5"] == pytest.approx(2 / 3)
    assert m["MRR"] == pytest.approx((1 / 3 + 1 + 1 / 12) / 3)


def test_multi_target_ndcg_and_recall():
    r = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    m = finalize(metric_sums(r, [3, 5]))
    ideal = 1 + 1 / math.log2(3)
    assert m["NDCG@3"] == pytest.approx(0.5 / ideal)
    assert m["NDCG@5"] == pytest.approx((0.5 + 1 / math.log2(5)) / ideal)
    assert m["Recall@3"] == pytest.approx(0.5)
    assert m["Recall@5"] == pytest.approx(1.0)


def _tiny_split():
    # user 0: train {0, 1}, valid {2}, test {3}; user 1: train {4}, valid {0}, test {1}
    user = np.array([0, 0, 0, 0, 1, 1, 1])
    item = np.array([0, 1, 2, 3, 4, 0, 1])
    label = np.array([0, 0, 1, 2, 0, 1, 2])
    inter = Interactions(user, item, np.arange(7), np.array([10, 11]), np.arange(6))
    return split_from_labels(inter, label)


def test_full_ranking_masks_train_and_the_other_split():
    split = _tiny_split()
    # user 0 scores: train items 0,1 and valid item 2 highest, test item 3 next
    scores = {0: [9.0, 8.0, 7.0, 5.0, 1.0, 6.0], 1: [9.0, 3.0, 0.0, 0.0, 9.0, 3.0]}
    fn = lambda users: torch.tensor([scores[u] for u in users.tolist()])
    m = finalize(evaluate_users(fn, split, np.array([0, 1]), "test", [1, 2]))
    # user 0: items 0,1 (train) and 2 (valid) masked; candidate 5 (6.0) beats 3 -> rank 2
    # user 1: items 4 (train), 0 (valid) masked; item 5 ties item 1 -> rank 2
    assert m["users"] == 2
    assert m["HR@1"] == 0.0
    assert m["HR@2"] == 1.0


def test_sampled_mode_is_seeded_and_never_samples_known_items():
    split = _tiny_split()
    fn = lambda users: torch.arange(6, dtype=torch.float64).expand(len(users), -1)
    a = evaluate_users(fn, split, np.array([0, 1]), "test", [1], mode="sampled",
                       sampled_negatives=3, seed=1)
    b = evaluate_users(fn, split, np.array([0, 1]), "test", [1], mode="sampled",
                       sampled_negatives=3, seed=1)
    assert a == b
    # user 0 may only draw negatives from {4, 5}; both score above item 3 -> rank 4
    m = finalize(evaluate_users(fn, split, np.array([0]), "test", [1, 4], mode="sampled",
                                sampled_negatives=3, seed=1))
    assert m["HR@4"] == 1.0 and m["MRR"] == pytest.approx(1 / 4)


def _rank_by_definition(s, targets, mask):
    """The docstring's formula, one target at a time, in Python."""
    out = []
    for j, t in enumerate(targets):
        if t < 0:
            out.append(math.inf)
            continue
        st = -math.inf if math.isnan(s[t]) else s[t]
        val = lambda i: -math.inf if math.isnan(s[i]) else s[i]
        others = [c for c in range(len(s)) if not mask[c] and c not in targets]
        r = 1 + sum(val(c) >= st for c in others)
        r += sum(val(u) > st or (val(u) == st and k < j)
                 for k, u in enumerate(targets) if u >= 0 and k != j)
        out.append(float(r))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ranks_match_the_definition_with_ties_nan_and_masks(dtype):
    g = torch.Generator().manual_seed(0)
    B, I = 12, 30
    scores = (torch.rand(B, I, generator=g) * 5).round().to(dtype)   # many ties
    scores[torch.rand(B, I, generator=g) < 0.1] = float("nan")
    mask = torch.rand(B, I, generator=g) < 0.3
    targets = torch.stack([torch.randperm(I, generator=g)[:3] for _ in range(B)])
    targets[::4, 2] = -1
    mask[torch.arange(B).unsqueeze(1), targets.clamp(min=0)] = False
    got = target_ranks(scores, targets, mask)
    for b in range(B):
        assert got[b].tolist() == _rank_by_definition(scores[b].tolist(), targets[b].tolist(),
                                                      mask[b].tolist())


def test_best_round_is_selected_by_the_cold_metrics_on_a_cold_item_split():
    """With cold-item metrics present (data.split=cold_items), the reported test is that
    of the round with the best validation cold:NDCG@k, not the all-item NDCG@k."""
    from fedrpc.server import best_rounds

    def ev(r, ndcg, cold):
        m = {"NDCG@10": ndcg, "HR@10": ndcg, "cold:NDCG@10": cold, "cold:HR@10": cold}
        return {"round": r, "metrics": {"valid": m, "test": {**m, "tag": r}}}

    hist = [ev(0, 0.01, 0.10), ev(1, 0.00, 0.30), ev(2, 0.00, 0.20)]
    out = best_rounds(hist, 10)
    assert out["best_round"] == 1 and out["selected_by"] == "valid cold:NDCG@10"
    plain = [{"round": h["round"], "metrics": {s: {k: v for k, v in m.items()
                                                   if not k.startswith("cold:")}
                                               for s, m in h["metrics"].items()}}
             for h in hist]
    assert best_rounds(plain, 10)["best_round"] == 0
