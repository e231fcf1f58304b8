"""On-disk feature cache: content-addressed `.npz` files, written atomically.

A cache entry's key hashes everything that decides the features: the modality, the
backend and its settings (model name, preprocessing), the weights (a SHA-256 of the
checkpoint file or model folder), the library version, and the content itself (every
text; every image's bytes). Change any of them and the key changes, so a stale entry is
never read; it just stops being used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data.types import DataError, Image

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the encoders change in a way that changes their output."""
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing
def _update_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def _memo_path(memo_dir: Optional[Path]) -> Optional[Path]:
    return None if memo_dir is None else memo_dir / "weights-digests.json"


def weights_digest(path: str | Path, memo_dir: Optional[Path] = None) -> str:
    """SHA-256 of a weights file, or of every file in a model folder (names + bytes).

    Hashing a large checkpoint takes seconds, so digests are remembered in `memo_dir`
    keyed by (absolute path, size, modification time) of each file.
    """
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    memo_file = _memo_path(memo_dir)
    memo: dict = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    h = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        stamp = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(stamp)
        if digest is None:
            fh = hashlib.sha256()
            _update_file(fh, f)
            digest = memo[stamp] = fh.hexdigest()
            changed = True
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        h.update(digest.encode())
    if changed and memo_file is not None:
        _atomic_write_bytes(memo_file, json.dumps(memo, indent=0, sort_keys=True).encode())
    return h.hexdigest()


def texts_digest(texts: Sequence[Optional[str]]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = b"\x00<none>" if t is None else t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def images_digest(images: Sequence[Image]) -> str:
    """Hash of every image's content: file bytes (not the path), array bytes, or None."""
    h = hashlib.sha256()
    for i, im in enumerate(images):
        if im is None:
            h.update(b"N")
        elif isinstance(im, np.ndarray):
            h.update(b"A" + repr((im.shape, im.dtype.str)).encode())
            h.update(np.ascontiguousarray(im).tobytes())
        elif isinstance(im, (str, Path)):
            p = Path(im)
            if not p.is_file():
                raise DataError(f"{p}: image file not found (use None for an item without image)")
            fh = hashlib.sha256()
            _update_file(fh, p)
            h.update(b"F" + fh.digest())
        else:
            raise DataError(f"item row {i}: an image must be a file path, an HxWx3 uint8 "
                            f"array or None, got {type(im).__name__}")
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- files
def _atomic_write(path: Path, write) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it into place:
    a reader sees the old entry or the complete new one, never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; cache files follow the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def entry_path(cache_dir: str | Path, modality: str, backend: str, key: str) -> Path:
    return Path(cache_dir) / f"{modality}-{backend}-{key[:24]}.npz"


def load(path: Path) -> Optional[tuple[np.ndarray, np.ndarray, dict]]:
    """(features, mask, meta) from a cache entry, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, mask, meta = z["features"], z["mask"], json.loads(str(z["meta"]))
    except Exception as e:  # a truncated or foreign file: re-encode, do not crash
        log.warning("%s: ignoring unreadable feature cache entry (%s)", path, e)
        return None
    return feats.astype(np.float32, copy=False), mask.astype(bool, copy=False), meta


def save(path: Path, features: np.ndarray, mask: np.ndarray, meta: dict) -> None:
    """Write one entry atomically."""
    _atomic_write(path, lambda f: np.savez(
        f, features=features.astype(np.float32), mask=mask.astype(bool),
        meta=np.array(json.dumps(meta, sort_keys=True, default=str))))
