"""mean_aggregate: exact means on hand-made tensors, determinism, loud errors; the
server's stacking of the workers' uploads (in user order, each received part freed once
copied)."""
import weakref

import numpy as np
import pytest
import torch

from fedrpc import rows as rows_module
from fedrpc.algorithms import mean_aggregate
from fedrpc.messages import TrainReply, stack_sorted
from fedrpc.rows import Rows


def _uploads():
    return {"C": torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]], [[5.0, 10.0]]]),  # [3, 1, 2]
            "b2": torch.tensor([0.0, 3.0, 6.0])}


def test_plain_mean_exact():
    out = mean_aggregate(_uploads())
    assert torch.equal(out["C"], torch.tensor([[3.0, 6.0]]))
    assert torch.equal(out["b2"], torch.tensor(3.0))


def test_weighted_mean_exact_and_normalised():
    out = mean_aggregate(_uploads(), weights=torch.tensor([2.0, 1.0, 1.0]))
    # (2*[1,2] + [3,6] + [5,10]) / 4
    assert torch.equal(out["C"], torch.tensor([[2.5, 5.0]]))  # weights 1/2, 1/4, 1/4 exact
    assert torch.equal(out["b2"], torch.tensor(2.25))
    scaled = mean_aggregate(_uploads(), weights=torch.tensor([20, 10, 10]))
    assert torch.allclose(scaled["C"], out["C"])


def test_zero_weight_ignores_client_and_dtype_kept():
    u = {"x": torch.tensor([[1.0], [100.0]], dtype=torch.float64)}
    out = mean_aggregate(u, weights=torch.tensor([1.0, 0.0]))
    assert out["x"].dtype == torch.float64 and out["x"].item() == 1.0


def test_deterministic_bit_identical():
    g = torch.Generator().manual_seed(0)
    u = {"C": torch.randn(37, 50, 8, generator=g), "w": torch.randn(37, 16, generator=g)}
    w = torch.rand(37, generator=g)
    for weights in (None, w):
        a, b = mean_aggregate(u, weights), mean_aggregate(u, weights)
        assert all(torch.equal(a[k], b[k]) for k in u)


@pytest.mark.parametrize("uploads,weights,match", [
    ({}, None, "no uploads"),
    ({"C": torch.zeros(0, 3)}, None, "N == 0"),
    ({"C": torch.zeros(2, 3), "b": torch.zeros(3)}, None, "disagree"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, float("nan")]), "finite"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, float("inf")]), "finite"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, -1.0]), ">= 0"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([0.0, 0.0]), "positive sum"),
    ({"C": torch.zeros(2, 3)}, torch.tensor([1.0, 1.0, 1.0]), "expected N=2"),
    ({"C": torch.zeros(2, 3, dtype=torch.long)}, None, "floating"),
])
def test_errors(uploads, weights, match):
    with pytest.raises(ValueError, match=match):
        mean_aggregate(uploads, weights)


def _tables(n_clients=5, n_items=6, d=3):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n_items, d, generator=g)
    tables = base.repeat(n_clients, 1, 1)
    tables[:, ::2] += torch.randn(n_clients, (n_items + 1) // 2, d, generator=g)
    return base, tables


def _reply(users, base, tables):
    return TrainReply(0, np.asarray(users), {"C": Rows.from_dense(tables[users], base),
                                             "b": torch.tensor(users, dtype=torch.float32)},
                      None)


def test_stacking_uploads_sorts_clients_and_frees_each_received_part():
    base, tables = _tables()
    replies = [_reply([0, 2, 4], base, tables), _reply([1, 3], base, tables)]  # u mod 2
    received = [weakref.ref(r.shared["C"].values) for r in replies]
    up = stack_sorted(replies)
    assert replies == []                      # the caller's list is emptied
    assert all(ref() is None for ref in received)   # received rows freed once copied
    assert up.users.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(up.shared["C"].dense(), tables)
    assert torch.equal(up.shared["b"], torch.arange(5, dtype=torch.float32))


def test_one_workers_sorted_uploads_are_stacked_without_a_copy():
    base, tables = _tables()
    reply = _reply([0, 1, 2, 3, 4], base, tables)
    values = reply.shared["C"].values
    up = stack_sorted([reply])
    assert up.shared["C"].values is values
    assert torch.equal(up.shared["C"].dense(), tables)


def test_a_table_is_finite_unless_a_value_is_nan_or_infinite():
    """Every non-finite value is found, and a finite row whose sum overflows float32 is
    still finite."""
    base, tables = _tables()
    tables[1, 4, 0], tables[3, 0, 2], tables[2, 1, 1] = float("nan"), float("inf"), float("-inf")
    tables[4, 2] = 3e38                       # finite values, their sum is inf
    rows = Rows.from_dense(tables, base)
    assert rows.finite().tolist() == [True, False, False, False, True]


def test_row_reductions_do_not_depend_on_the_chunk_size(monkeypatch):
    """The group sums and distances are bit-identical whatever the chunk size."""
    base, tables = _tables()
    rows = Rows.from_dense(tables, base)
    groups, weights = torch.tensor([1, 0, 1, 2, 0]), torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    whole = rows.weighted_sums(groups, 3, weights), rows.sq_dist(base * 0.5)
    monkeypatch.setattr(rows_module, "CHUNK_BYTES", 8 * tables.shape[2] * 2)   # 2 rows
    chunked = rows.weighted_sums(groups, 3, weights), rows.sq_dist(base * 0.5)
    assert torch.equal(whole[0][0], chunked[0][0]) and torch.equal(whole[0][1], chunked[0][1])
    assert torch.equal(whole[1], chunked[1])


def test_stacking_a_workers_chunks_frees_each_chunk_once_copied():
    """A worker's trained rows of several client chunks are stacked as torch.cat would,
    and each chunk is freed once copied, so a round does not hold them twice."""
    from fedrpc.rows import cat_release
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, generator=gen) for n in (4, 1, 6)]
    expected = torch.cat(parts)
    refs = [weakref.ref(p) for p in parts]
    out = cat_release(parts)
    assert parts == [] and all(r() is None for r in refs)
    assert torch.equal(out, expected)
