"""Plain data containers shared by the data layer, the server and the workers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass
class Interactions:
    """Implicit-feedback interactions with contiguous ids.

    `user`, `item` index 0..n_users-1 / 0..n_items-1; `user_ids[u]` / `item_ids[i]` are
    the original ids, kept so that results map back. `label` is the predefined split
    (0 train, 1 valid, 2 test) where the data has one, else None.
    """
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    label: Optional[np.ndarray] = None
    stats: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Split:
    """Per-user train positives and held-out items, as CSR arrays over users.

    `train_indptr[u]:train_indptr[u+1]` slices `train_items` for user u; likewise for
    valid and test. Users with no held-out item have an empty slice.
    """
    n_users: int
    n_items: int
    train_indptr: np.ndarray
    train_items: np.ndarray
    valid_indptr: np.ndarray
    valid_items: np.ndarray
    test_indptr: np.ndarray
    test_items: np.ndarray
    cold_items: Optional[np.ndarray] = None
    """data.split=cold_items: the items training never sees (evaluation also ranks among
    them alone); None otherwise."""

    def train_of(self, u: int) -> np.ndarray:
        return self.train_items[self.train_indptr[u]:self.train_indptr[u + 1]]

    def held_out(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        if which == "valid":
            return self.valid_indptr, self.valid_items
        if which == "test":
            return self.test_indptr, self.test_items
        raise ValueError(f"split must be 'valid' or 'test', got {which!r}")

    def sizes(self) -> dict:
        return {"train": int(len(self.train_items)), "valid": int(len(self.valid_items)),
                "test": int(len(self.test_items)),
                "users_with_test": int((np.diff(self.test_indptr) > 0).sum())}


Image = Union[str, np.ndarray, None]
"""An item image: a file path, an HxWx3 uint8 array, or None when missing."""


@dataclass
class ItemContent:
    """What the server knows about items: text, images and/or precomputed features.

    Rows follow the catalogue order (`item_ids`). Never holds interactions.
    """
    item_ids: np.ndarray
    texts: Optional[list[str]] = None
    images: Optional[list[Image]] = None
    text_features: Optional[np.ndarray] = None
    image_features: Optional[np.ndarray] = None
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)
