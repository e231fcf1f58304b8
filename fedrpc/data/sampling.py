"""Negative sampling: per (seed, round, user) random streams, so that a user's negatives
are the same whichever process draws them and fresh every round."""
from __future__ import annotations

import numpy as np

# Purposes keep the streams of one (seed, round, user) apart.
TRAIN_NEGATIVES = 1
EVAL_NEGATIVES = 2


def user_rng(seed: int, round_: int, user: int, purpose: int) -> np.random.Generator:
    """The random stream of one user in one round for one purpose."""
    return np.random.default_rng([seed, round_, user, purpose])


def sample_negatives(rng: np.random.Generator, n_items: int, exclude: np.ndarray,
                     n: int) -> np.ndarray:
    """`n` item ids drawn uniformly, with replacement, from items not in `exclude`.

    `exclude` must be sorted and unique. Draws from the complement directly: index k of
    the complement maps to item k + (number of excluded ids <= that item).
    """
    n_free = n_items - len(exclude)
    if n_free <= 0:
        raise ValueError("the user has interacted with every item: no negatives to draw")
    k = rng.integers(0, n_free, size=n)
    # map the k-th free slot to its item id: shift past each excluded id below it
    shift = exclude - np.arange(len(exclude))  # free slots before each excluded id
    return k + np.searchsorted(shift, k, side="right")


def negatives_for_users(seed: int, round_: int, users: np.ndarray, n_items: int,
                        exclude_indptr: np.ndarray, exclude_items: np.ndarray,
                        counts: np.ndarray, purpose: int = TRAIN_NEGATIVES) -> list[np.ndarray]:
    """Negatives for each user in `users` (counts[j] of them for users[j]).

    `exclude_indptr/exclude_items` is a CSR of each user's known items (sorted).
    """
    out = []
    for u, c in zip(users.tolist(), counts.tolist()):
        excl = exclude_items[exclude_indptr[u]:exclude_indptr[u + 1]]
        out.append(sample_negatives(user_rng(seed, round_, u, purpose), n_items, excl, c))
    return out
