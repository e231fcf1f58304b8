"""Client grouping (GFMFR step 5b), group-id alignment (5c) and group targets (5d).

Pure functions of arrays/tensors and seeds. Grouping uses the clients' uploaded head
parameters as features; alignment keeps group k's meaning across rounds; targets are
the guarded per-group means of the uploaded item tables.
"""
from __future__ import annotations

import logging
import warnings
from typing import Literal, Optional, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import pdist, squareform
from sklearn.cluster import KMeans, SpectralClustering
from torch import Tensor

from ..rows import Rows

log = logging.getLogger(__name__)

KMEANS_N_INIT = 10
"""k-means restarts (seeded) up to KMEANS_SMALL clients; KMEANS_N_INIT_LARGE above."""
KMEANS_SMALL = 20_000
KMEANS_N_INIT_LARGE = 3
KNN_NEIGHBOURS = 12
"""Spectral clustering's affinity keeps each client's 12 nearest neighbours (symmetrised)."""
SPECTRAL_MAX_CLIENTS = 200_000
"""Above this many clients spectral clustering is refused (its exact neighbour search
grows as N^2 in time and its eigensolver's factorisation is not bounded in memory);
gfmfr.clustering=kmeans scales linearly."""
EXACT_PCA_MAX = 2048
"""PCA is exact (eigendecomposition of the smaller Gram matrix) when min(N, F) is at most
this; randomized SVD above."""
MEDIAN_PAIRS = 2_000_000
"""The RBF width uses the exact median pairwise distance up to this many pairs, else the
median of this many pairs drawn with the seed."""
_BLOCK_BYTES = 64 * 2 ** 20   # memory of one block of the neighbour search


# ------------------------------------------------------------------------ grouping
def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance (a stable naming)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _standardise(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std per column in float32 (StandardScaler's rule: a constant column
    becomes 0, never NaN); the moments are accumulated in float64."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((x - mean) / std).astype(np.float32)


def _top_components(x: Tensor, k: int, gen: torch.Generator, n_iter: int = 4
                    ) -> tuple[Tensor, Tensor]:
    """Randomized SVD of x [N, F]: (U S [N, k], S [k]), the leading k singular directions
    (Halko et al.: a Gaussian sketch with 10 extra columns, `n_iter` power iterations
    with re-orthonormalisation), seeded by `gen`."""
    p = min(k + 10, min(x.shape))
    q = torch.linalg.qr(x @ torch.randn(x.shape[1], p, generator=gen)).Q
    for _ in range(n_iter):
        q = torch.linalg.qr(x.t() @ q).Q
        q = torch.linalg.qr(x @ q).Q
    u, s, _ = torch.linalg.svd(q.t() @ x, full_matrices=False)
    return (q @ u[:, :k]) * s[:k], s[:k]


def _pca(x: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Scores of x (centred) on the fewest principal components that keep `share` of the
    variance. Exact when min(N, F) <= EXACT_PCA_MAX (eigenvectors of the smaller Gram
    matrix), else randomized SVD with the number of components doubled until the
    share is reached (the total variance is known exactly: sum of squares)."""
    t = torch.from_numpy(x)
    n, f = t.shape
    total = float(torch.sum(t.double() ** 2))
    if total <= 0:
        return x[:, :1] * 0
    if min(n, f) <= EXACT_PCA_MAX:
        evals, evecs = torch.linalg.eigh(t @ t.t() if n <= f else t.t() @ t)  # ascending
        evals, evecs = evals.flip(0).double().clamp_min(0), evecs.flip(1)
        m = int(torch.searchsorted(torch.cumsum(evals, 0) / total, share)) + 1
        m = min(m, len(evals))
        if n <= f:                      # x = U S V^T: scores U S = U sqrt(eigenvalues)
            return (evecs[:, :m] * evals[:m].sqrt().float()).numpy()
        return (t @ evecs[:, :m]).numpy()
    gen = torch.Generator().manual_seed(int(seed))
    k = 32
    while True:
        k = min(k, n, f)
        scores, s = _top_components(t, k, gen)
        kept = torch.cumsum(s.double() ** 2, 0) / total
        if kept[-1] >= share or k == min(n, f):
            m = min(int(torch.searchsorted(kept, share)) + 1, k)
            return scores[:, :m].numpy()
        k *= 2


def _preprocess(x: np.ndarray, pca: Optional[float], seed: int) -> np.ndarray:
    """Standardise, then optional PCA keeping `pca` of the variance; float32."""
    x = _standardise(x)
    n, f = x.shape
    if pca is None or n < 3 or f < 2:
        return x
    reduced = _pca(x, pca, seed)
    return reduced if reduced.shape[1] >= 1 else x


def pca_components(features: np.ndarray, pca: Optional[float]) -> int:
    """How many dimensions the grouping's preprocessing keeps for these features."""
    x = np.asarray(features, dtype=np.float32)
    x = x.reshape(x.shape[0], -1)
    x = x[np.isfinite(x).all(axis=1)]
    return int(_preprocess(x, pca, 0).shape[1]) if len(x) else 0


def _sampled_median_distance(t: Tensor, seed: int) -> float:
    """Median Euclidean distance over MEDIAN_PAIRS pairs i != j drawn with `seed`."""
    n = t.shape[0]
    rng = np.random.default_rng(seed)
    i = torch.from_numpy(rng.integers(0, n, MEDIAN_PAIRS))
    j = torch.from_numpy(rng.integers(0, n - 1, MEDIAN_PAIRS))
    j = j + (j >= i).long()                                     # j != i
    step = max(1, _BLOCK_BYTES // (8 * t.shape[1]))
    return _median([((t[i[s:s + step]] - t[j[s:s + step]]) ** 2).sum(1)
                    for s in range(0, MEDIAN_PAIRS, step)])


def _median(d2_parts: list) -> float:
    """Median distance from parts of squared distances; over the positive ones when it
    is 0 (many duplicate rows); 1 when there is none."""
    d2 = torch.cat(d2_parts) if d2_parts else torch.zeros(0)
    med = float(d2.median()) if d2.numel() else 0.0
    if med <= 0.0:
        pos = d2[d2 > 0]
        med = float(pos.median()) if pos.numel() else 1.0
    return med ** 0.5


def knn_affinity(x: np.ndarray, k: int = KNN_NEIGHBOURS, seed: int = 0):
    """Sparse RBF affinity on the k-nearest-neighbour graph: A_ij = exp(-gamma d_ij^2)
    when j is among i's k nearest neighbours or i among j's (symmetrised), else 0;
    gamma = 1 / (2 m^2) with m the median pairwise distance: exact up to MEDIAN_PAIRS
    pairs, else over MEDIAN_PAIRS pairs drawn with `seed`.

    The neighbour search is exact and blocked (rows at a time, about 64 MB each), so
    memory stays O(N k + block). Returns a scipy.sparse CSR matrix [N, N], zero diagonal.
    """
    from scipy import sparse

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = t.shape[0]
    k = max(1, min(k, n - 1))
    exact_median = n * (n - 1) // 2 <= MEDIAN_PAIRS
    sq = (t * t).sum(1)
    rows = max(1, _BLOCK_BYTES // (4 * n))
    nbr_d, nbr_i, upper = [], [], []
    for s in range(0, n, rows):
        d2 = (sq[s:s + rows, None] + sq[None, :] - 2 * (t[s:s + rows] @ t.t())).clamp_min(0)
        r = torch.arange(d2.shape[0])
        if exact_median:                 # the pairs (i, j > i) of these rows
            upper.append(d2[torch.arange(n) > (r + s).unsqueeze(1)])
        d2[r, r + s] = float("inf")
        d, i = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        nbr_d.append(d)
        nbr_i.append(i)
    med = _median(upper) if exact_median else _sampled_median_distance(t, seed)
    gamma = 1.0 / (2.0 * med * med)
    d2, idx = torch.cat(nbr_d), torch.cat(nbr_i)
    w = torch.exp(-gamma * d2).double().numpy().reshape(-1)
    a = sparse.csr_matrix((w, (np.repeat(np.arange(n), k), idx.numpy().reshape(-1))),
                          shape=(n, n))
    return a.maximum(a.T).tocsr()


def rbf_affinity(x: np.ndarray) -> np.ndarray:
    """Dense A_ij = exp(-gamma * ||x_i - x_j||^2), gamma = 1 / (2 * median_{i<j} ||x_i - x_j||^2)
    (the affinity before the k-NN one; kept as the reference for small N).

    The median is taken over the pairwise (Euclidean) distances and then squared. If it
    is 0 (many duplicate rows) the median of the positive distances is used instead.
    """
    dist = pdist(x)
    med = float(np.median(dist)) if dist.size else 0.0
    if med <= 0.0:
        pos = dist[dist > 0]
        med = float(np.median(pos)) if pos.size else 1.0
    gamma = 1.0 / (2.0 * med * med)
    return np.exp(-gamma * squareform(dist) ** 2)


def _kmeans(x: np.ndarray, g: int, seed: int) -> np.ndarray:
    n_init = KMEANS_N_INIT if len(x) <= KMEANS_SMALL else KMEANS_N_INIT_LARGE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KMeans(n_clusters=g, n_init=n_init, random_state=seed).fit_predict(x)


def _cluster(x: np.ndarray, g: int, method: str, seed: int) -> np.ndarray:
    """Cluster rows of `x` into `g` groups; spectral falls back to KMeans on failure."""
    if method == "spectral":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc = SpectralClustering(n_clusters=g, affinity="precomputed",
                                        random_state=seed, assign_labels="kmeans")
                return sc.fit_predict(knn_affinity(x, seed=seed))
        except Exception as exc:  # numerical failure on degenerate inputs
            log.warning("spectral clustering failed (%s); falling back to KMeans", exc)
    return _kmeans(x, g, seed)


def group_clients(features: np.ndarray, n_groups: int,
                  method: Literal["spectral", "kmeans"] = "spectral",
                  pca: Optional[float] = 0.95, seed: int = 0) -> np.ndarray:
    """Cluster N clients into at most `n_groups` groups by their feature rows.

    Pipeline, in float32: standardise (StandardScaler's rule) -> PCA keeping `pca` of the
    variance (skipped if None or N < 3; `_pca`: exact for min(N, F) <= EXACT_PCA_MAX,
    randomized SVD above) -> SpectralClustering on the sparse k-nearest-neighbour RBF
    affinity of `knn_affinity` (at most SPECTRAL_MAX_CLIENTS clients), or KMeans with a
    fixed n_init; all seeded. Labels are renumbered in order of first appearance.

    Edge cases (never crash): N == 0 -> empty; the number of groups used is
    min(n_groups, #distinct finite rows), so N < G, N == 1 and identical rows give
    fewer groups (all 0 when only one is possible); rows with a non-finite value are
    not clustered and join the largest group (ties: the smallest id).
    Returns int64 labels [N] in [0, n_groups).
    """
    if method not in ("spectral", "kmeans"):
        raise ValueError(f"group_clients: method must be 'spectral' or 'kmeans', got {method!r}")
    if n_groups < 1:
        raise ValueError(f"group_clients: n_groups must be >= 1, got {n_groups}")
    if pca is not None and not 0.0 < pca < 1.0:
        raise ValueError(f"group_clients: pca must be in (0, 1) or None, got {pca}")
    x = np.asarray(features, dtype=np.float32)
    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    n = x.shape[0]
    if method == "spectral" and n > SPECTRAL_MAX_CLIENTS:
        raise ValueError(f"group_clients: spectral clustering of {n:,} clients exceeds its "
                         f"limit of {SPECTRAL_MAX_CLIENTS:,} (quadratic neighbour search, "
                         f"unbounded eigensolver memory); use gfmfr.clustering=kmeans")
    labels = np.zeros(n, dtype=np.int64)
    finite = np.isfinite(x).all(axis=1)
    xf = x[finite]
    g = min(n_groups, _distinct_rows(xf, n_groups)) if len(xf) else 0
    if g >= 2:
        labels[finite] = _canonical(_cluster(_preprocess(xf, pca, seed), g, method, seed))
    if (~finite).any() and finite.any():
        labels[~finite] = int(np.argmax(np.bincount(labels[finite])))
    return labels


def _distinct_rows(x: np.ndarray, cap: int) -> int:
    """min(#distinct rows of x, cap), rows compared by value (-0.0 + 0.0 makes every zero
    +0.0): a set of the rows' bytes, without sorting the rows (np.unique(axis=0) sorted
    943 heads of 8,321 values in 0.09 s), over the first rows when they already hold
    `cap`; only the rows counted are copied."""
    def count(rows: np.ndarray) -> int:
        return len(set(map(bytes, np.ascontiguousarray(rows) + np.zeros((), rows.dtype))))

    n_head = max(cap * 64, 1024)
    head = count(x[:n_head])
    if head >= cap or len(x) <= n_head:
        return min(head, cap)
    return min(count(x), cap)


# ----------------------------------------------------------------------- alignment
def align_groups(prev_users: Optional[np.ndarray], prev_labels: Optional[np.ndarray],
                 users: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Relabel `labels` so that group k keeps its meaning across rounds.

    With M[a, b] = #users present in both rounds labelled a now and b before, the
    Hungarian algorithm picks the permutation pi maximising sum_a M[a, pi(a)] (ties
    broken towards keeping the current id) and returns pi(labels). No previous round
    or no common user: `labels` unchanged. Deterministic.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if prev_users is None or prev_labels is None or len(prev_users) == 0:
        return labels.copy()
    prev_labels = np.asarray(prev_labels, dtype=np.int64)
    for name, lab in (("labels", labels), ("prev_labels", prev_labels)):
        if lab.size and (lab.min() < 0 or lab.max() >= n_groups):
            raise ValueError(f"align_groups: {name} must lie in [0, {n_groups})")
    _, now_idx, prev_idx = np.intersect1d(np.asarray(users), np.asarray(prev_users),
                                          assume_unique=True, return_indices=True)
    if now_idx.size == 0:
        return labels.copy()
    overlap = np.zeros((n_groups, n_groups), dtype=np.int64)
    np.add.at(overlap, (labels[now_idx], prev_labels[prev_idx]), 1)
    score = overlap * (n_groups + 1) + np.eye(n_groups, dtype=np.int64)
    rows, cols = linear_sum_assignment(score, maximize=True)
    mapping = np.empty(n_groups, dtype=np.int64)
    mapping[rows] = cols
    return mapping[labels]


# ------------------------------------------------------------------------- targets
def group_targets(tables: Union[Tensor, Rows], labels: Union[np.ndarray, Tensor],
                  n_groups: int, min_group_size: int = 2, outlier_factor: float = 5.0
                  ) -> tuple[Tensor, dict]:
    """Per-group fusion targets: C_bar_k = mean of the uploaded tables of group k.

    `tables`: the N uploaded item tables as `Rows` (rows over the table sent) or a
    dense [N, I, d] tensor (clients in the caller's fixed order); `labels` [N].
    Guards: an upload with any non-finite value is excluded; a finite upload with
    ||C_n||_F > outlier_factor * median_n ||C_n||_F (lower median) is excluded. A group
    with fewer than `min_group_size` kept members (including an empty group) gets the
    mean over all kept uploads instead. If nothing is kept, targets are zeros.

    Returns (targets [G, I, d], info) with info keys: n_excluded_nonfinite,
    n_excluded_outlier, kept_per_group (list), fallback (group ids using the global
    mean), group_ok (BoolTensor [G]: group has >= 1 member this round and a target
    exists, i.e. it is worth training on). Never contains NaN. Works on the stored rows
    only: no [N, I, d] tensor is built.
    """
    if isinstance(tables, Tensor):
        if tables.dim() != 3:
            raise ValueError(f"group_targets: tables must be [N, I, d], got {tuple(tables.shape)}")
        tables = Rows.from_dense(tables)
    n = tables.n
    lab = labels if isinstance(labels, Tensor) else torch.from_numpy(np.asarray(labels))
    lab = lab.to(dtype=torch.long).reshape(-1).cpu()
    if lab.numel() != n:
        raise ValueError(f"group_targets: {lab.numel()} labels for {n} tables")
    if n and (lab.min() < 0 or lab.max() >= n_groups):
        raise ValueError(f"group_targets: labels must lie in [0, {n_groups})")
    nonfinite = ~tables.finite()
    outlier = torch.zeros_like(nonfinite)
    if (~nonfinite).any():
        norms = tables.sq_dist(torch.zeros_like(tables.base)).sqrt()[~nonfinite]
        med = norms.median()  # lower median for an even count
        if med > 0:
            outlier[~nonfinite] = norms > outlier_factor * med
    keep = ~(nonfinite | outlier)
    i, d = tables.base.shape
    targets = torch.zeros((n_groups, i, d), dtype=tables.base.dtype)
    kept = torch.bincount(lab[keep], minlength=n_groups).tolist()
    fallback = [k for k in range(n_groups) if kept[k] < min_group_size]
    if keep.any():
        sums, counts = tables.weighted_sums(lab, n_groups, keep=keep)
        global_mean = sums.sum(0) / counts.sum()
        for k in range(n_groups):
            targets[k] = (global_mean if k in fallback else sums[k] / counts[k]).to(targets.dtype)
    present = torch.bincount(lab, minlength=n_groups) > 0
    info = dict(n_excluded_nonfinite=int(nonfinite.sum()), n_excluded_outlier=int(outlier.sum()),
                kept_per_group=kept, fallback=fallback,
                group_ok=present & bool(keep.any()))
    if info["n_excluded_nonfinite"] or info["n_excluded_outlier"] or fallback:
        log.info("group targets: excluded %d non-finite, %d outlier uploads; fallback groups %s",
                 info["n_excluded_nonfinite"], info["n_excluded_outlier"], fallback)
    return targets, info


def lopsided_groups(sizes, share: float = 0.9) -> str | None:
    """A warning when one group holds more than `share` of the clients (the grouping
    then carries next to no group structure), else None."""
    sizes = np.asarray(sizes)
    total = int(sizes.sum())
    if total == 0 or len(sizes) < 2 or sizes.max() <= share * total:
        return None
    return (f"one group holds {int(sizes.max())} of {total} clients (group sizes "
            f"{sizes.tolist()}): the group-wise teacher is close to one global teacher")
