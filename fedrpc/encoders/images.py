"""Reading item images (file paths or arrays) and turning them into square arrays.

Everything here is numpy + PIL: no torch, so the builtin encoder stays light. A missing
image (None) is the caller's business (it is masked); an unreadable file is a `DataError`
naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image as PILImage

from ..data.types import DataError, Image

RESAMPLE = {"bilinear": PILImage.Resampling.BILINEAR, "bicubic": PILImage.Resampling.BICUBIC}


def describe(image: Image, index: int) -> str:
    """How to name an image in an error message."""
    return str(image) if isinstance(image, (str, Path)) else f"item row {index} (in-memory image)"


def load_rgb(image: Image, index: int) -> PILImage.Image:
    """An RGB PIL image from a path or an HxWx3 / HxW uint8 array."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{path}: image file not found (use None for an item without image)")
        try:
            with PILImage.open(path) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises several types for corrupt or truncated files
            raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise DataError(f"{describe(image, index)}: image array must be HxWx3 (or HxW), "
                            f"got shape {image.shape}")
        if arr.dtype != np.uint8:
            if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
                raise DataError(f"{describe(image, index)}: image array must be finite numbers")
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return PILImage.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    raise DataError(f"item row {index}: an image must be a file path, an HxWx3 uint8 array "
                    f"or None, got {type(image).__name__}")


def square(im: PILImage.Image, size: int, mode: str, resample: str = "bicubic") -> np.ndarray:
    """`im` as a size x size x 3 uint8 array: squash | crop (centre) | pad (black)."""
    rs = RESAMPLE[resample]
    w, h = im.size
    if mode == "squash" or w == h:
        out = im.resize((size, size), rs)
    elif mode == "crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), rs)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = im.crop((left, top, left + size, top + size))
    elif mode == "pad":
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        out = PILImage.new("RGB", (size, size))
        out.paste(im.resize((nw, nh), rs), ((size - nw) // 2, (size - nh) // 2))
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return np.asarray(out, dtype=np.uint8)


def present_rows(images: Sequence[Image]) -> np.ndarray:
    """Indices of the items that have an image."""
    return np.array([i for i, im in enumerate(images) if im is not None], dtype=np.int64)


def load_batch(images: Sequence[Image], rows: np.ndarray, size: int, mode: str,
               resample: str = "bicubic") -> np.ndarray:
    """Rows `rows` of `images` as a [B, size, size, 3] uint8 array."""
    return np.stack([square(load_rgb(images[r], int(r)), size, mode, resample) for r in rows])
