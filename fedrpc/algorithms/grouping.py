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
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from torch import Tensor

log = logging.getLogger(__name__)

KMEANS_N_INIT = 10


# ------------------------------------------------------------------------ grouping
def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance (a stable naming)."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    remap = {int(old): new for new, old in enumerate(order)}
    return np.array([remap[int(x)] for x in labels], dtype=np.int64)


def _preprocess(x: np.ndarray, pca: Optional[float], seed: int) -> np.ndarray:
    """StandardScaler (constant columns -> 0, never NaN), then optional PCA(`pca` var)."""
    x = StandardScaler().fit_transform(x)
    n, f = x.shape
    if pca is None or n < 3 or f < 2:
        return x
    reduced = PCA(n_components=pca, svd_solver="full", random_state=seed).fit_transform(x)
    return reduced if reduced.shape[1] >= 1 else x


def pca_components(features: np.ndarray, pca: Optional[float]) -> int:
    """How many dimensions the grouping's preprocessing keeps for these features."""
    x = np.asarray(features, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    x = x[np.isfinite(x).all(axis=1)]
    return int(_preprocess(x, pca, 0).shape[1]) if len(x) else 0


def rbf_affinity(x: np.ndarray) -> np.ndarray:
    """A_ij = exp(-gamma * ||x_i - x_j||^2), gamma = 1 / (2 * median_{i<j} ||x_i - x_j||^2).

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


def _cluster(x: np.ndarray, g: int, method: str, seed: int) -> np.ndarray:
    """Cluster rows of `x` into `g` groups; spectral falls back to KMeans on failure."""
    if method == "spectral":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sc = SpectralClustering(n_clusters=g, affinity="precomputed",
                                        random_state=seed, assign_labels="kmeans")
                return sc.fit_predict(rbf_affinity(x))
        except Exception as exc:  # numerical failure on degenerate inputs
            log.warning("spectral clustering failed (%s); falling back to KMeans", exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KMeans(n_clusters=g, n_init=KMEANS_N_INIT, random_state=seed).fit_predict(x)


def group_clients(features: np.ndarray, n_groups: int,
                  method: Literal["spectral", "kmeans"] = "spectral",
                  pca: Optional[float] = 0.95, seed: int = 0) -> np.ndarray:
    """Cluster N clients into at most `n_groups` groups by their feature rows.

    Pipeline: StandardScaler -> PCA keeping `pca` of the variance (skipped if None or
    N < 3) -> SpectralClustering on the RBF affinity of `rbf_affinity`, or KMeans with
    a fixed n_init; both seeded. Labels are renumbered in order of first appearance.

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
    x = np.asarray(features, dtype=np.float64)
    x = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
    n = x.shape[0]
    labels = np.zeros(n, dtype=np.int64)
    finite = np.isfinite(x).all(axis=1)
    xf = x[finite]
    g = min(n_groups, len(np.unique(xf, axis=0))) if len(xf) else 0
    if g >= 2:
        labels[finite] = _canonical(_cluster(_preprocess(xf, pca, seed), g, method, seed))
    if (~finite).any() and finite.any():
        labels[~finite] = int(np.argmax(np.bincount(labels[finite])))
    return labels


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
def _upload_filter(flat: Tensor, outlier_factor: float) -> tuple[Tensor, Tensor]:
    """Masks of uploads that are non-finite, and of finite ones with ||x||_F > f * median."""
    nonfinite = ~torch.isfinite(flat).all(dim=1)
    outlier = torch.zeros_like(nonfinite)
    if (~nonfinite).any():
        norms = torch.linalg.vector_norm(flat[~nonfinite].double(), dim=1)
        med = norms.median()  # lower median for an even count
        if med > 0:
            outlier[~nonfinite] = norms > outlier_factor * med
    return nonfinite, outlier


def group_targets(tables: Tensor, labels: Union[np.ndarray, Tensor], n_groups: int,
                  min_group_size: int = 2, outlier_factor: float = 5.0
                  ) -> tuple[Tensor, dict]:
    """Per-group fusion targets: C_bar_k = mean of the uploaded tables of group k.

    `tables` [N, I, d] (clients in the caller's fixed order), `labels` [N].
    Guards: an upload with any non-finite value is excluded; a finite upload with
    ||C_n||_F > outlier_factor * median_n ||C_n||_F is excluded. A group with fewer
    than `min_group_size` kept members (including an empty group) gets the mean over
    all kept uploads instead. If nothing is kept, targets are zeros.

    Returns (targets [G, I, d], info) with info keys: n_excluded_nonfinite,
    n_excluded_outlier, kept_per_group (list), fallback (group ids using the global
    mean), group_ok (BoolTensor [G]: group has >= 1 member this round and a target
    exists, i.e. it is worth training on). Never contains NaN.
    """
    if tables.dim() != 3:
        raise ValueError(f"group_targets: tables must be [N, I, d], got {tuple(tables.shape)}")
    n = tables.shape[0]
    lab = labels if isinstance(labels, Tensor) else torch.from_numpy(np.asarray(labels))
    lab = lab.to(device=tables.device, dtype=torch.long).reshape(-1)
    if lab.numel() != n:
        raise ValueError(f"group_targets: {lab.numel()} labels for {n} tables")
    if n and (lab.min() < 0 or lab.max() >= n_groups):
        raise ValueError(f"group_targets: labels must lie in [0, {n_groups})")
    nonfinite, outlier = _upload_filter(tables.reshape(n, -1), outlier_factor)
    keep = ~(nonfinite | outlier)
    targets = tables.new_zeros((n_groups,) + tuple(tables.shape[1:]))
    global_mean = tables[keep].mean(dim=0) if keep.any() else None
    kept, fallback = [], []
    for k in range(n_groups):
        members = keep & (lab == k)
        kept.append(int(members.sum()))
        if kept[-1] >= min_group_size:
            targets[k] = tables[members].mean(dim=0)
        else:
            fallback.append(k)
            if global_mean is not None:
                targets[k] = global_mean
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
