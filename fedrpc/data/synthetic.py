"""Synthetic federation data with a planted content signal (the embedded default data).

Users have tastes, items have attributes. Part of each item's attributes is *visible*
in its generated text and image; the rest is hidden. A user's affinity for an item mixes
the two with weight `signal`: at 1 preference is fully predictable from content, at 0
content says nothing about preference. Each user interacts with the items it likes most
(Gumbel top-k over affinities), so the data has the shape of implicit feedback.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import SyntheticConfig
from .types import ItemContent

TEMPERATURE = 0.5
CHUNK_USERS = 1024   # users whose affinities to every item are held at once
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


def generate(cfg: SyntheticConfig, seed: int, interactions: bool = True, texts: bool = True,
             images: bool = True) -> tuple[Optional[dict], ItemContent]:
    """Raw interactions (original ids from 1; None when `interactions` is false) and the
    items' generated content (texts / images None when not asked for).

    Memory is bounded at any size: affinities exist for CHUNK_USERS users at a time, never
    as a users x items matrix. The random stream is one sequence in a fixed order (tastes,
    attributes, popularity, counts, then per user its Gumbel noise and the permutation of
    its timestamps, then the content), so the data does not depend on the chunk size, and
    content alone (the server's view) skips the interactions by advancing the stream past
    them instead of drawing them."""
    rng = np.random.default_rng([seed, 0x5EED])
    U, I, k = cfg.users, cfg.items, cfg.latent_dim
    taste_v, taste_h = rng.normal(size=(U, k)), rng.normal(size=(U, k))
    attr_v, attr_h = rng.normal(size=(I, k)), rng.normal(size=(I, k))
    pop = rng.normal(scale=0.5, size=I)
    n_per_user = np.clip(rng.poisson(cfg.mean_interactions, size=U), cfg.min_interactions,
                         I // 2)
    raw = None
    if interactions:
        raw = _interactions(rng, cfg, taste_v, taste_h, attr_v, attr_h, pop, n_per_user)
    elif texts or images:
        _skip_interactions(rng, I, n_per_user)
    content = ItemContent(item_ids=np.arange(1, I + 1, dtype=np.int64))
    if texts or images:                 # texts draw first; images only follow them
        content.texts = _texts(rng, attr_v, cfg.words_per_text)
        if not texts:
            content.texts = None
        if images:
            content.images = _images(rng, attr_v, cfg.image_size)
    return raw, content


def _affinity(cfg: SyntheticConfig, taste_v, taste_h, attr_v, attr_h, pop) -> np.ndarray:
    """[users in the chunk, I] affinities (the whole catalogue for a chunk of users)."""
    k = taste_v.shape[1]
    return (np.sqrt(cfg.signal) * taste_v @ attr_v.T
            + np.sqrt(1 - cfg.signal) * taste_h @ attr_h.T) / np.sqrt(k) + pop


def _interactions(rng, cfg, taste_v, taste_h, attr_v, attr_h, pop, n_per_user) -> dict:
    """Each user's top-n items by affinity / TEMPERATURE + Gumbel noise (sampling n items
    without replacement, proportionally to exp(affinity / TEMPERATURE)), in descending
    order; its timestamps a random permutation. Chunks of CHUNK_USERS users."""
    U, I = len(n_per_user), attr_v.shape[0]
    ends = np.cumsum(n_per_user)
    users = np.repeat(np.arange(1, U + 1, dtype=np.int64), n_per_user)
    items = np.empty(int(ends[-1]), dtype=np.int64)
    times = np.empty(int(ends[-1]), dtype=np.int64)
    for a in range(0, U, CHUNK_USERS):
        b = min(U, a + CHUNK_USERS)
        score = _affinity(cfg, taste_v[a:b], taste_h[a:b], attr_v, attr_h, pop)
        score /= TEMPERATURE
        for j, u in enumerate(range(a, b)):
            n, row = int(n_per_user[u]), score[j]
            row += _gumbel(rng, I)
            top = np.argpartition(-row, n - 1)[:n]
            top = top[np.lexsort((top, -row[top]))]   # descending score, ties by item id
            items[ends[u] - n:ends[u]] = top + 1
            times[ends[u] - n:ends[u]] = rng.permutation(n) + 1_000_000
    return {"user": users, "item": items, "timestamp": times}


def _gumbel(rng: np.random.Generator, n: int) -> np.ndarray:
    """n standard Gumbel values -log(-log(1 - V)), V uniform on [0, 1): the numbers of
    `rng.gumbel(size=n)` from the same draws (one 64-bit draw each), vectorised, 3x faster.
    They may differ from numpy's in the last bit (vectorised log), which reorders items
    only at exact ties; V = 0 gives +inf where numpy would redraw (probability 2^-53)."""
    v = rng.random(size=n)
    np.subtract(1.0, v, out=v)
    np.log(v, out=v)
    np.negative(v, out=v)
    with np.errstate(divide="ignore"):
        np.log(v, out=v)
    return np.negative(v, out=v)


def _skip_interactions(rng: np.random.Generator, n_items: int, n_per_user) -> None:
    """Leave `rng` exactly where `_interactions` leaves it, without its work: the Gumbel
    noise is skipped by advancing the bit generator (one 64-bit draw per value), the
    permutations are drawn."""
    bg = rng.bit_generator
    if not isinstance(bg, np.random.PCG64):
        for n in n_per_user.tolist():
            rng.random(size=n_items)
            rng.permutation(n)
        return
    for n in n_per_user.tolist():
        state = bg.state             # advance() drops the buffered 32-bit half-draw that
        bg.advance(n_items)          # permutations use: carry it over
        moved = bg.state
        moved["has_uint32"], moved["uinteger"] = state["has_uint32"], state["uinteger"]
        bg.state = moved
        rng.permutation(n)
