"""The clients' content profile (fedrpc's extension, `gfmfr.profile_weight`).

The server turns its item features into one unit vector per item (`profile_vectors`) and
sends them with the evaluation request. Each client's profile is the mean of those
vectors over its own training items, formed where its interactions are and never sent
anywhere; an item's profile score is its vector's dot product with the profile (the
mean cosine similarity to the client's items). The client ranks items by its model's
scores and its profile scores, each standardised over the items, the latter weighted
(`blend`). The same scores make the non-federated `baseline --model content`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PROFILE_FEATURES = {"all": ("content", "texts or images"), "text": ("text", "texts"),
                    "image": ("image", "images")}
"""gfmfr.profile_features -> (what it names, the item fields it needs): the words of the
warning or error when no item has them."""


def profile_vectors(x: Tensor, dims: int) -> Tensor:
    """[I, min(dims, D)] unit rows (float64) from features x [I, D] (standardised, zeros
    for an item without content): x projected on its top `dims` principal axes (the
    eigenvectors of x^T x; 0 or >= D: x itself), each row scaled to norm 1. A row of
    zeros stays zeros."""
    x = x.double()
    if 0 < dims < x.shape[1]:
        _, axes = torch.linalg.eigh(x.t() @ x)          # ascending eigenvalues
        x = x @ axes[:, -dims:]
    return torch.nn.functional.normalize(x, dim=1)


def standardise_rows(s: Tensor) -> Tensor:
    """Each row at zero mean and unit standard deviation (a constant row: zeros)."""
    return (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-12)


def profile_scores(z: Tensor, indptr: np.ndarray, items: np.ndarray,
                   users: np.ndarray) -> Tensor:
    """[len(users), I] standardised profile scores: for each user, z [I, r] times the mean
    of z over its items items[indptr[u]:indptr[u + 1]] (a user without items: zeros)."""
    users = np.asarray(users, dtype=np.int64)
    counts = torch.from_numpy((indptr[users + 1] - indptr[users]).astype(np.int64))
    rows = torch.from_numpy(np.concatenate([items[indptr[u]:indptr[u + 1]] for u in users])
                            if len(users) else np.zeros(0, np.int64)).long().to(z.device)
    owner = torch.repeat_interleave(torch.arange(len(users)), counts).to(z.device)
    profile = torch.zeros(len(users), z.shape[1], dtype=z.dtype, device=z.device).index_add_(
        0, owner, z.index_select(0, rows)) / counts.clamp(min=1).unsqueeze(1).to(z)
    return standardise_rows(profile @ z.t())


def blend(scores: Tensor, profile: Tensor, weight: float) -> Tensor:
    """The model's scores standardised per user plus `weight` x the profile scores."""
    return standardise_rows(scores.to(profile.dtype)) + weight * profile
