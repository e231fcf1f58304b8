"""Interaction preprocessing: de-duplication, k-core, id remapping, splits."""
from __future__ import annotations

import numpy as np

from .types import DataError, Interactions, Split


def deduplicate(raw: dict) -> tuple[dict, int]:
    """Keep each (user, item) pair once: its earliest interaction (file order on ties)."""
    order = np.lexsort((np.arange(len(raw["user"])), raw["timestamp"], raw["item"], raw["user"]))
    u, i = raw["user"][order], raw["item"][order]
    first = np.ones(len(u), dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    keep = np.sort(order[first])  # back to file order
    return {k: v[keep] for k, v in raw.items()}, int(len(u) - first.sum())


def k_core(raw: dict, min_user: int, min_item: int) -> dict:
    """Repeatedly drop users / items with fewer interactions than the thresholds."""
    if min_user <= 1 and min_item <= 1:
        return raw
    keep = np.ones(len(raw["user"]), dtype=bool)
    while True:
        u, i = raw["user"][keep], raw["item"][keep]
        _, uinv, ucnt = np.unique(u, return_inverse=True, return_counts=True)
        _, iinv, icnt = np.unique(i, return_inverse=True, return_counts=True)
        ok = (ucnt[uinv] >= min_user) & (icnt[iinv] >= min_item)
        if ok.all():
            break
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False
        if not keep.any():
            raise DataError(f"k-core filtering (users >= {min_user}, items >= {min_item}) "
                            "removed every interaction; lower data.min_user_interactions / "
                            "data.min_item_interactions")
    return {k: v[keep] for k, v in raw.items()}


def remap(raw: dict, stats: dict) -> Interactions:
    """Contiguous ids in ascending order of the original ids."""
    user_ids, user = np.unique(raw["user"], return_inverse=True)
    item_ids, item = np.unique(raw["item"], return_inverse=True)
    return Interactions(user=user.astype(np.int64), item=item.astype(np.int64),
                        timestamp=raw["timestamp"], user_ids=user_ids, item_ids=item_ids,
                        label=raw.get("label"), stats=stats)


def csr_by_user(n_users: int, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((items, users))
    counts = np.bincount(users, minlength=n_users)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items[order].astype(np.int64)


def split_from_labels(inter: Interactions, label: np.ndarray,
                      cold_items: np.ndarray | None = None) -> Split:
    """The split of labelled interactions: 0 train, 1 valid, 2 test (others dropped)."""
    parts = {}
    for name, code in (("train", 0), ("valid", 1), ("test", 2)):
        m = label == code
        parts[f"{name}_indptr"], parts[f"{name}_items"] = csr_by_user(inter.n_users, inter.user[m],
                                                               inter.item[m])
    return Split(inter.n_users, inter.n_items, **parts, cold_items=cold_items)


def loo_labels(inter: Interactions) -> np.ndarray:
    """Leave-one-out labels (see `leave_one_out`)."""
    n = len(inter)
    order = np.lexsort((np.arange(n), inter.timestamp, inter.user))
    users = inter.user[order]
    counts = np.bincount(inter.user, minlength=inter.n_users)
    ends = np.cumsum(counts)
    pos_from_end = ends[users] - 1 - np.arange(n)
    label_sorted = np.zeros(n, dtype=np.int64)
    eligible = counts[users] >= 3
    label_sorted[eligible & (pos_from_end == 0)] = 2
    label_sorted[eligible & (pos_from_end == 1)] = 1
    label = np.empty(n, dtype=np.int64)
    label[order] = label_sorted
    return label


def cold_item_labels(inter: Interactions, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cold items): a seeded `share` of the items (at least one) is cold: every
    interaction with a cold item is held out, and every other one trains. Training never
    sees a cold item. Each cold item goes whole to validation or to test (a seeded half
    of them each; test takes the odd one), so that choosing rounds or hyper-parameters on
    validation learns nothing about how popular the test's cold items are."""
    rng = np.random.default_rng([seed, 0xC01D])
    n_cold = min(inter.n_items, max(1, int(round(share * inter.n_items))))
    cold = np.sort(rng.choice(inter.n_items, size=n_cold, replace=False))
    valid = rng.permutation(cold)[:n_cold // 2]
    label = np.zeros(len(inter), dtype=np.int64)
    label[np.isin(inter.item, cold)] = 2
    label[np.isin(inter.item, valid)] = 1
    return label, cold


def keep_recent_train(inter: Interactions, label: np.ndarray, k: int) -> np.ndarray:
    """Labels where only each user's `k` most recent training interactions still train
    (the older ones are dropped: label -1). Ties in time: the later line is more recent."""
    label = label.copy()
    train = np.flatnonzero(label == 0)
    order = train[np.lexsort((-train, -inter.timestamp[train], inter.user[train]))]
    users = inter.user[order]
    first = np.concatenate([[0], np.flatnonzero(users[1:] != users[:-1]) + 1])
    starts = np.repeat(first, np.diff(np.concatenate([first, [len(order)]])))
    label[order[np.arange(len(order)) - starts >= k]] = -1
    return label


def leave_one_out(inter: Interactions) -> Split:
    """Per user by time: latest = test, second latest = valid, the rest = train.

    Ties in time are broken by file order (the later line is the later interaction).
    Users with fewer than 3 interactions keep everything in train.
    """
    return split_from_labels(inter, loo_labels(inter))
