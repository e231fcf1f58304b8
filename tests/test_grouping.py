"""group_clients, align_groups, group_targets."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from fedrpc.algorithms import align_groups, group_clients, group_targets


def _blobs(n_per=20, k=4, f=30, seed=0):
    rng = np.random.RandomState(seed)
    centers = rng.randn(k, f) * 10.0
    truth = np.repeat(np.arange(k), n_per)
    x = centers[truth] + rng.randn(len(truth), f) * 0.3
    perm = rng.permutation(len(truth))
    return x[perm], truth[perm]


# ------------------------------------------------------------------- group_clients
@pytest.mark.parametrize("method", ["spectral", "kmeans"])
@pytest.mark.parametrize("pca", [0.95, None])
def test_recovers_planted_clusters(method, pca):
    x, truth = _blobs()
    labels = group_clients(x, 4, method=method, pca=pca, seed=3)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert labels.dtype == np.int64 and labels.shape == (80,)


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_same_seed_same_labels(method):
    rng = np.random.RandomState(1)
    x = rng.randn(60, 12)  # no clear structure: the seed matters
    a = group_clients(x, 5, method=method, seed=7)
    b = group_clients(x.copy(), 5, method=method, seed=7)
    assert np.array_equal(a, b)


def test_constant_columns_do_not_produce_nan():
    x, truth = _blobs(k=3)
    x = np.hstack([x, np.full((len(x), 4), 2.5)])
    labels = group_clients(x, 3, seed=0)
    assert adjusted_rand_score(truth, labels) == 1.0


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_fewer_clients_than_groups(method):
    x = np.random.RandomState(0).randn(3, 5)
    labels = group_clients(x, 5, method=method)
    assert sorted(labels.tolist()) == [0, 1, 2]
    assert group_clients(x[:1], 5, method=method).tolist() == [0]
    assert group_clients(x[:0], 5, method=method).shape == (0,)


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_identical_rows(method):
    x = np.tile(np.arange(6.0), (10, 1))
    assert group_clients(x, 3, method=method).tolist() == [0] * 10
    x[:5] += 1.0  # two distinct rows -> at most two groups
    labels = group_clients(x, 3, method=method)
    assert set(labels.tolist()) == {0, 1} and len(set(labels[:5])) == 1
    x[:5] = 0.0
    x[:2] = -0.0  # equal by value to the zeros: still two distinct rows
    labels = group_clients(x, 3, method=method)
    assert set(labels.tolist()) == {0, 1} and len(set(labels[:5])) == 1


@pytest.mark.parametrize("method", ["spectral", "kmeans"])
def test_nonfinite_rows_do_not_crash(method):
    x, truth = _blobs(k=3)
    x[0, 2], x[5, :] = np.nan, np.inf
    labels = group_clients(x, 3, method=method, seed=0)
    ok = np.ones(len(x), bool)
    ok[[0, 5]] = False
    assert adjusted_rand_score(truth[ok], labels[ok]) == 1.0
    assert np.array_equal(labels, group_clients(x, 3, method=method, seed=0))
    assert group_clients(np.full((4, 3), np.nan), 2).tolist() == [0] * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        group_clients(np.zeros((3, 2)), 2, method="dbscan")
    with pytest.raises(ValueError, match="pca"):
        group_clients(np.zeros((3, 2)), 2, pca=1.5)


# -------------------------------------------------------------------- align_groups
def test_alignment_undoes_permutation():
    users = np.arange(12)
    prev = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    perm = np.array([2, 3, 1, 0])
    assert np.array_equal(align_groups(users, prev, users, perm[prev], 4), prev)


def test_alignment_partial_overlap():
    prev_users, prev = np.array([1, 2, 3, 4, 5, 6]), np.array([0, 0, 1, 1, 2, 2])
    users = np.array([2, 4, 6, 7, 8])  # 7 and 8 are new
    labels = np.array([1, 2, 0, 0, 2])  # now: 2 -> grp 1, 4 -> grp 2, 6 -> grp 0
    out = align_groups(prev_users, prev, users, labels, 3)
    assert out.tolist() == [0, 1, 2, 2, 1]


def test_alignment_no_previous_or_no_overlap():
    labels = np.array([2, 0, 1])
    assert align_groups(None, None, np.arange(3), labels, 3).tolist() == [2, 0, 1]
    out = align_groups(np.array([10, 11]), np.array([0, 1]), np.arange(3), labels, 3)
    assert out.tolist() == [2, 0, 1]


def test_alignment_is_a_permutation():
    rng = np.random.RandomState(0)
    prev_users, users = rng.permutation(50)[:30], rng.permutation(50)[:30]
    out = align_groups(prev_users, rng.randint(0, 5, 30), users, labels := rng.randint(0, 5, 30), 5)
    pairs = set(zip(labels.tolist(), out.tolist()))
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)


# ------------------------------------------------------------------- group_targets
def test_targets_hand_computed_means():
    tables = torch.arange(4 * 2 * 1, dtype=torch.float32).reshape(4, 2, 1) + 1.0
    # tables: [[1],[2]], [[3],[4]], [[5],[6]], [[7],[8]]
    targets, info = group_targets(tables, np.array([0, 1, 0, 1]), 2, outlier_factor=100.0)
    assert torch.equal(targets, torch.tensor([[[3.0], [4.0]], [[5.0], [6.0]]]))
    assert info["fallback"] == [] and info["kept_per_group"] == [2, 2]
    assert info["group_ok"].tolist() == [True, True]


def test_group_of_one_falls_back_to_global_mean():
    tables = torch.tensor([[[1.0]], [[3.0]], [[8.0]]])
    targets, info = group_targets(tables, torch.tensor([0, 0, 1]), 3, outlier_factor=100.0)
    assert targets[0].item() == 2.0
    assert targets[1].item() == pytest.approx(4.0) and targets[2].item() == pytest.approx(4.0)
    assert info["fallback"] == [1, 2]
    assert info["group_ok"].tolist() == [True, True, False]  # group 2 has no member


def test_nan_and_outlier_uploads_excluded():
    g = torch.Generator().manual_seed(0)
    tables = torch.randn(6, 5, 3, generator=g)
    tables[1, 2, 0] = float("nan")
    tables[4] *= 1e6  # blown-up table, the reference's failure
    labels = np.array([0, 0, 0, 1, 1, 1])
    targets, info = group_targets(tables, labels, 2)
    assert torch.isfinite(targets).all()
    assert info["n_excluded_nonfinite"] == 1 and info["n_excluded_outlier"] == 1
    assert torch.allclose(targets[0], tables[[0, 2]].mean(0))
    assert torch.allclose(targets[1], tables[[3, 5]].mean(0))


def test_singleton_with_blown_up_table_never_nan():
    tables = torch.ones(4, 3, 2)
    tables[3] = float("inf")
    targets, info = group_targets(tables, np.array([0, 0, 0, 1]), 2)
    assert torch.isfinite(targets).all() and info["fallback"] == [1]
    assert torch.equal(targets[1], torch.ones(3, 2))
    all_bad, info = group_targets(torch.full((2, 3, 2), float("nan")), np.array([0, 1]), 2)
    assert torch.equal(all_bad, torch.zeros(2, 3, 2)) and not info["group_ok"].any()


def test_a_group_holding_almost_every_client_is_reported():
    from fedrpc.algorithms import lopsided_groups
    # ML-100K, FedRAP, spectral clustering, round 39
    msg = lopsided_groups([933, 7, 1, 1, 1])
    assert msg and "933 of 943 clients" in msg
    assert lopsided_groups([73, 219, 372, 102, 177]) is None
    assert lopsided_groups([0, 0, 0]) is None and lopsided_groups([5]) is None


# ------------------------------------------------------------- scaling paths
def test_spectral_refuses_more_clients_than_its_limit(monkeypatch):
    from fedrpc.algorithms import grouping
    monkeypatch.setattr(grouping, "SPECTRAL_MAX_CLIENTS", 50)
    x, _ = _blobs()
    with pytest.raises(ValueError, match="gfmfr.clustering=kmeans"):
        group_clients(x, 4, method="spectral")
    assert len(set(group_clients(x, 4, method="kmeans").tolist())) == 4


def test_randomized_pca_keeps_the_variance_share_and_the_clusters(monkeypatch):
    from fedrpc.algorithms import grouping
    x, truth = _blobs(n_per=30, f=60)
    exact = grouping._pca(grouping._standardise(x), 0.95, seed=0)
    monkeypatch.setattr(grouping, "EXACT_PCA_MAX", 8)    # force the randomized path
    xs = grouping._standardise(x)
    approx = grouping._pca(xs, 0.95, seed=0)
    total = float((xs.astype(np.float64) ** 2).sum())
    assert (approx.astype(np.float64) ** 2).sum() >= 0.95 * total * (1 - 1e-4)
    assert approx.shape[1] == exact.shape[1]
    assert np.array_equal(approx, grouping._pca(xs, 0.95, seed=0))
    for method in ("spectral", "kmeans"):
        assert adjusted_rand_score(truth, group_clients(x, 4, method, seed=1)) == 1.0


def test_knn_affinity_is_a_symmetric_sparse_graph():
    from fedrpc.algorithms.grouping import knn_affinity
    x, truth = _blobs(n_per=25, k=2)
    a = knn_affinity(x, k=5)
    assert a.shape == (50, 50) and (abs(a - a.T) > 0).nnz == 0
    assert a.diagonal().sum() == 0
    assert ((a > 0).sum(axis=1) >= 5).all() and a.nnz <= 2 * 5 * 50
    assert a.max() <= 1.0 and a.min() >= 0.0
    # neighbours stay inside a well-separated blob
    rows, cols = a.nonzero()
    assert (truth[rows] == truth[cols]).all()
