"""Server-side content encoders: item texts and images -> feature matrices T and V.

    features = encode_content(content, cfg.encoder)   # ItemFeatures
    features.text   # [I, D_t] float32 or None       features.text_mask   # bool [I]
    features.image  # [I, D_v] float32 or None       features.image_mask  # bool [I]

Only the server rank calls this; clients never load an encoder. Per modality, in order:
backend `none` gives None (no features, precomputed ones included: the no-content
ablation); precomputed features in `ItemContent` win (mask = non-zero rows); content
without that modality gives None; otherwise the configured backend encodes the
items that have content (an item without text/image gets a zero row and mask False),
through the on-disk cache (`cache.py`). Importing this package imports no model library;
the neural backends import theirs when they run.
"""
from __future__ import annotations

import gc
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data.types import DataError, ItemContent
from . import cache
from ..config import EncoderConfig, ImageEncoderConfig, TextEncoderConfig
from .plan import Plan, key_parts, make_plan

__all__ = ["ItemFeatures", "encode_content", "EncoderConfig", "TextEncoderConfig",
           "ImageEncoderConfig"]

log = logging.getLogger(__name__)
BUILTIN_IMAGE_SIZE = 8


@dataclass
class ItemFeatures:
    """Item feature matrices in catalogue order, with masks and a record of how they were made."""
    item_ids: np.ndarray
    text: Optional[np.ndarray]
    """[I, D_t] float32, or None when there are no text features."""
    image: Optional[np.ndarray]
    """[I, D_v] float32, or None when there are no image features."""
    text_mask: np.ndarray
    """bool [I]: False where the item has no text (its row is all zero)."""
    image_mask: np.ndarray
    """bool [I]: False where the item has no image (its row is all zero)."""
    info: dict = field(default_factory=dict)
    """Per modality: source (encoded | precomputed | disabled | absent), backend, model,
    weights, dim, items, missing (items without content), zero_rows, seconds (incl. cache
    lookup), items_per_s (items with content / seconds), encode_seconds (of the run that
    encoded them), cache (hit | miss | off), cache_file, device, batch_size, peak_rss_mb
    (process peak so far), gpu_peak_mb (on GPU)."""

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def dims(self) -> dict:
        return {m: (None if a is None else int(a.shape[1]))
                for m, a in (("text", self.text), ("image", self.image))}


def encode_content(content: ItemContent, cfg: EncoderConfig, progress: bool = True) -> ItemFeatures:
    """Text and image feature matrices for `content` (see the module docstring)."""
    for spec, key in ((cfg, "encoder"), (cfg.text, "encoder.text"), (cfg.image, "encoder.image")):
        spec.validate(key)  # also when the config was built in code, not loaded
    memo: dict = {}  # models shared by both modalities (one open_clip model for text+image)
    try:
        text, tmask, tinfo = _modality("text", content.texts, content.text_features,
                                       cfg.text, cfg, content.n_items, progress, memo)
        image, imask, iinfo = _modality("image", content.images, content.image_features,
                                        cfg.image, cfg, content.n_items, progress, memo)
    finally:
        memo.clear()
        gc.collect()
    return ItemFeatures(np.asarray(content.item_ids), text, image, tmask, imask,
                        {"items": content.n_items, "text": tinfo, "image": iinfo})


# --------------------------------------------------------------------------- one modality
def _modality(modality: str, raw: Optional[Sequence], pre: Optional[np.ndarray], spec,
              cfg: EncoderConfig, n: int, progress: bool, memo: dict):
    where = f"encoder.{modality}"
    no_mask = np.zeros(n, dtype=bool)
    if spec.backend == "none":           # the no-content ablation: precomputed ones too
        return None, no_mask, {"source": "disabled", "backend": "none"}
    if pre is not None:
        return _precomputed(modality, pre, n)
    if raw is None:
        log.info("%s: the data has no item %ss; no %s features", where, modality, modality)
        return None, no_mask, {"source": "absent", "backend": spec.backend}
    if len(raw) != n:
        raise DataError(f"item content: {len(raw)} {modality}s for {n} items")
    present = _present_rows(modality, raw)
    if len(present) == 0:
        log.warning("%s: no item has a %s; no %s features", where, modality, modality)
        return None, no_mask, {"source": "absent", "backend": spec.backend, "missing": n}
    plan = make_plan(modality, spec, where)
    if plan.random_weights:
        log.warning("!!! %s: open_clip %s runs with RANDOM WEIGHTS (no checkpoint, "
                    "allow_random_weights=true): these %s features carry no meaning; use only "
                    "for tests. Set %s.checkpoint to real weights. !!!",
                    where, plan.model, modality, where)
    t0 = time.perf_counter()
    feats, mask, run = _cached_or_encoded(plan, raw, present, cfg, n, progress, memo)
    secs = time.perf_counter() - t0
    info = {"source": "encoded", "backend": spec.backend, "model": plan.name,
            "weights": plan.weights, "dim": int(feats.shape[1]), "items": n,
            "missing": int(n - len(present)), "zero_rows": int(len(present) - mask.sum()),
            "seconds": round(secs, 3),
            "items_per_s": round(len(present) / secs, 1) if secs > 0 else None,
            "peak_rss_mb": _peak_rss_mb(), **run}
    log.info("%s: %s %s -> [%d, %d] in %.1f s (%s items/s), %d missing, cache %s",
             where, spec.backend, plan.name, n, feats.shape[1], secs,
             info["items_per_s"], info["missing"], info["cache"])
    return feats, mask, info


def _cached_or_encoded(plan: Plan, raw: Sequence, present: np.ndarray, cfg: EncoderConfig,
                       n: int, progress: bool, memo: dict):
    """(features, mask, run info): from the cache when an entry matches, else encoded."""
    path = _cache_path(plan, raw, cfg) if cfg.cache else None
    entry = cache.load(path) if path is not None else None
    if entry is not None and entry[0].shape[0] == n:
        feats, mask, meta = entry
        return feats, mask, {"cache": "hit", "cache_file": str(path),
                             "device": meta.get("device", ""),
                             "encode_seconds": meta.get("encode_seconds")}
    feats, run = _encode(plan, raw, present, cfg, n, progress, memo)
    mask = np.zeros(n, dtype=bool)
    mask[present] = np.any(feats[present] != 0, axis=1)
    run.update(cache="miss" if path is not None else "off",
               cache_file=str(path) if path is not None else None)
    if path is not None:
        cache.save(path, feats, mask, {"device": run["device"], "model": plan.model,
                                       "encode_seconds": run["encode_seconds"],
                                       "weights": plan.weights})
    return feats, mask, run


def _precomputed(modality: str, pre: np.ndarray, n: int):
    if pre.ndim != 2 or pre.shape[0] != n:
        raise DataError(f"precomputed {modality} features: shape {pre.shape}, expected "
                        f"[{n}, D] (one row per item)")
    feats = np.ascontiguousarray(pre, dtype=np.float32)
    mask = np.any(feats != 0, axis=1)
    log.info("encoder.%s: using precomputed features [%d, %d] (%d all-zero rows)",
             modality, n, feats.shape[1], int((~mask).sum()))
    return feats, mask, {"source": "precomputed", "backend": "precomputed",
                         "dim": int(feats.shape[1]), "items": n,
                         "missing": int((~mask).sum()), "seconds": 0.0, "cache": "n/a"}


def _present_rows(modality: str, raw: Sequence) -> np.ndarray:
    if modality == "image":
        return np.array([i for i, im in enumerate(raw) if im is not None], dtype=np.int64)
    rows = []
    for i, t in enumerate(raw):
        if t is not None and not isinstance(t, str):
            raise DataError(f"item row {i}: a text must be a string or None, "
                            f"got {type(t).__name__}")
        if t and t.strip():
            rows.append(i)
    return np.array(rows, dtype=np.int64)


def _cache_path(plan: Plan, raw: Sequence, cfg: EncoderConfig) -> Path:
    wd = (cache.weights_digest(plan.weights_path, Path(cfg.cache_dir))
          if plan.weights_path else "")
    cd = cache.texts_digest(raw) if plan.modality == "text" else cache.images_digest(raw)
    key = cache.cache_key(key_parts(plan, wd, cd))
    return cache.entry_path(cfg.cache_dir, plan.modality, plan.backend, key)


def _encode(plan: Plan, raw: Sequence, present: np.ndarray, cfg: EncoderConfig, n: int,
            progress: bool, memo: dict) -> tuple[np.ndarray, dict]:
    """[n, D] features (zero rows for items without content) and how they were made."""
    t0 = time.perf_counter()
    out, device, batch = _run_backend(plan, raw, present, cfg, progress, memo)
    if out.ndim != 2 or out.shape[0] != len(present):
        raise RuntimeError(f"encoder.{plan.modality}: backend returned shape {out.shape} for "
                           f"{len(present)} items")
    feats = np.zeros((n, out.shape[1]), np.float32)
    feats[present] = out
    if plan.spec.normalize:
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        np.divide(feats, norms, out=feats, where=norms > 0)
    run = {"device": device, "batch_size": batch,
           "encode_seconds": round(time.perf_counter() - t0, 3)}
    if device.startswith("cuda"):
        import torch
        run["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    gc.collect()
    return feats, run


def _run_backend(plan: Plan, raw: Sequence, present: np.ndarray, cfg: EncoderConfig,
                 progress: bool, memo: dict) -> tuple[np.ndarray, str, Optional[int]]:
    spec = plan.spec
    if plan.backend == "builtin":
        from . import builtin
        if plan.modality == "text":
            return builtin.encode_texts([raw[r] for r in present], spec.dim), "cpu", None
        size = spec.image_size or BUILTIN_IMAGE_SIZE
        mode = "squash" if spec.resize == "auto" else spec.resize
        return builtin.encode_images(raw, present, size, mode, progress), "cpu", None
    from . import neural
    device = neural.resolve_device(cfg.device)
    if plan.modality == "text":
        batch = neural.auto_batch(spec.batch_size, device, cpu=64, gpu=256)
        if plan.backend == "sentence":
            out = neural.encode_sentence(raw, present, plan, device, batch, progress)
        else:
            out = neural.encode_clip_text(raw, present, plan, device, batch, progress, memo)
    else:
        batch = neural.auto_batch(spec.batch_size, device, cpu=16, gpu=128)
        if plan.backend == "efficientnet_lite0":
            out = neural.encode_efficientnet(raw, present, plan, device, batch, progress)
        else:
            out = neural.encode_clip_image(raw, present, plan, device, batch, progress, memo)
    return out, str(device), batch


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
