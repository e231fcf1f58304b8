"""Weight-free deterministic encoders: fast, no downloads, good enough for the quickstart.

- text: hashed TF-IDF bag of words. Each word goes to one of `dim` buckets with a sign
  (both from CRC-32, so identical on every machine and Python run); its weight is
  (1 + log tf) * idf, idf computed over the catalogue's texts. Texts sharing words are
  close in cosine; texts sharing none are near-orthogonal.
- image: the image squashed (or cropped/padded, per `resize`) to `size` x `size` pixels (centred to [-0.5, 0.5]) plus a
  4x4x4 joint RGB colour histogram of a 32x32 version; each part L2-normalised, so
  layout and colour weigh the same. Feature size 3 * size^2 + 64.
"""
from __future__ import annotations

import re
import zlib
from collections import Counter
from typing import Sequence

import numpy as np

from ..data.types import Image
from .images import load_rgb, square

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
HIST_BINS = 4
HIST_SIZE = 32


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _bucket(word: str, dim: int) -> tuple[int, float]:
    b = word.encode("utf-8")
    return zlib.crc32(b) % dim, (1.0 if zlib.crc32(b"~" + b) & 1 else -1.0)


def encode_texts(texts: Sequence[str], dim: int) -> np.ndarray:
    """[len(texts), dim] hashed TF-IDF vectors (not normalised)."""
    counts = [Counter(tokens(t)) for t in texts]
    df: Counter = Counter()
    for c in counts:
        df.update(c.keys())
    n = len(texts)
    idf = {w: np.log((1 + n) / (1 + d)) + 1.0 for w, d in df.items()}
    slots = {w: _bucket(w, dim) for w in df}
    out = np.zeros((n, dim), dtype=np.float64)
    for row, c in enumerate(counts):
        for w, tf in c.items():
            b, sign = slots[w]
            out[row, b] += sign * (1.0 + np.log(tf)) * idf[w]
    return out.astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x)
    return x / n if n > 0 else x


def image_vector(image: Image, index: int, size: int, mode: str = "squash") -> np.ndarray:
    im = load_rgb(image, index)
    px = square(im, size, mode, "bilinear").astype(np.float32) / 255.0 - 0.5
    small = square(im, HIST_SIZE, mode, "bilinear") // (256 // HIST_BINS)
    code = (small[..., 0].astype(np.int64) * HIST_BINS + small[..., 1]) * HIST_BINS + small[..., 2]
    hist = np.bincount(code.ravel(), minlength=HIST_BINS ** 3).astype(np.float32)
    return np.concatenate([_unit(px.ravel()), _unit(hist)])


def image_dim(size: int) -> int:
    return 3 * size * size + HIST_BINS ** 3


def encode_images(images: Sequence[Image], rows: np.ndarray, size: int, mode: str = "squash",
                  progress: bool = False) -> np.ndarray:
    """[len(rows), 3*size^2 + 64] pixel + colour-histogram vectors of images[rows]."""
    from tqdm.auto import tqdm
    out = np.zeros((len(rows), image_dim(size)), dtype=np.float32)
    for k, r in enumerate(tqdm(rows, desc="image builtin", unit="img", disable=not progress,
                               leave=False)):
        out[k] = image_vector(images[r], int(r), size, mode)
    return out
