"""Synthetic federation data with a planted content signal (the embedded default data).

Users have tastes, items have attributes. Part of each item's attributes is *visible*
in its generated text and image; the rest is hidden. A user's affinity for an item mixes
the two with weight `signal`: at 1 preference is fully predictable from content, at 0
content says nothing about preference. Each user interacts with the items it likes most
(Gumbel top-k over affinities), so the data has the shape of implicit feedback.
"""
from __future__ import annotations

import numpy as np

from ..config import SyntheticConfig
from .types import ItemContent

TEMPERATURE = 0.5
FILLER = ("a", "the", "story", "of", "with", "and", "about", "film")


def _words(rng: np.random.Generator, n: int) -> list[str]:
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: set[str] = set()
    while len(out) < n:
        k = rng.integers(2, 4)
        out.add("".join(rng.choice(list(cons)) + rng.choice(list(vows)) for _ in range(k)))
    return sorted(out)


def _texts(rng, attrs: np.ndarray, words_per_text: int) -> list[str]:
    k = attrs.shape[1]
    vocab = _words(rng, 2 * k * 4)
    rng.shuffle(vocab)
    pos = np.array(vocab[: k * 4]).reshape(k, 4)
    neg = np.array(vocab[k * 4:]).reshape(k, 4)
    texts = []
    for x in attrs:
        w = np.abs(x) / np.abs(x).sum()
        dims = rng.choice(k, size=words_per_text, p=w)
        words = [(pos if x[j] > 0 else neg)[j, rng.integers(4)] for j in dims]
        fill = rng.choice(FILLER, size=max(1, words_per_text // 3))
        texts.append(" ".join(list(fill[:1]) + words + list(fill[1:])))
    return texts


def _images(rng, attrs: np.ndarray, size: int) -> list[np.ndarray]:
    k = attrs.shape[1]
    coarse = rng.normal(size=(k, 4, 4, 3))
    rep = int(np.ceil(size / 4))
    basis = np.repeat(np.repeat(coarse, rep, axis=1), rep, axis=2)[:, :size, :size, :]
    field = np.tensordot(attrs, basis, axes=(1, 0)) / np.sqrt(k)  # [I, S, S, 3]
    noise = rng.normal(scale=0.15, size=field.shape)
    img = 128 + 100 * np.tanh(field + noise)
    return list(np.clip(img, 0, 255).astype(np.uint8))


def generate(cfg: SyntheticConfig, seed: int) -> tuple[dict, ItemContent]:
    """Raw interactions (original ids from 1) and the items' generated content."""
    rng = np.random.default_rng([seed, 0x5EED])
    U, I, k = cfg.users, cfg.items, cfg.latent_dim
    taste_v, taste_h = rng.normal(size=(U, k)), rng.normal(size=(U, k))
    attr_v, attr_h = rng.normal(size=(I, k)), rng.normal(size=(I, k))
    pop = rng.normal(scale=0.5, size=I)
    aff = (np.sqrt(cfg.signal) * taste_v @ attr_v.T
           + np.sqrt(1 - cfg.signal) * taste_h @ attr_h.T) / np.sqrt(k) + pop
    n_per_user = np.clip(rng.poisson(cfg.mean_interactions, size=U), cfg.min_interactions,
                         I // 2)
    users, items, times = [], [], []
    for u in range(U):
        g = rng.gumbel(size=I)
        top = np.argsort(-(aff[u] / TEMPERATURE + g), kind="stable")[: n_per_user[u]]
        users.append(np.full(len(top), u + 1))
        items.append(top + 1)
        times.append(rng.permutation(len(top)) + 1_000_000)
    raw = {"user": np.concatenate(users).astype(np.int64),
           "item": np.concatenate(items).astype(np.int64),
           "timestamp": np.concatenate(times).astype(np.int64)}
    content = ItemContent(item_ids=np.arange(1, I + 1, dtype=np.int64),
                          texts=_texts(rng, attr_v, cfg.words_per_text),
                          images=_images(rng, attr_v, cfg.image_size))
    return raw, content
