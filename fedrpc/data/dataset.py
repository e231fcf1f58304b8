"""Loading a configured dataset: interactions + split (worker side), content (server side).

The *catalogue* (the kept item ids and the size of the raw item-id space) is the only
thing both sides share: it is public item metadata, derived when the data is prepared.
Feature matrices (`.npy`) have one row per raw item id in ascending order: row r is item
id r + id_base (id_base = 1 for MovieLens, whose ids start at 1; 0 otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config, DataConfig
from . import readers
from .prepare import (cold_item_labels, deduplicate, k_core, keep_recent_train, loo_labels,
                      remap, split_from_labels)
from .synthetic import generate
from .types import DataError, Interactions, ItemContent, Split

ID_BASE = {"movielens": 1, "gfmfr": 0, "mmrec": 0, "synthetic": 1, "amazon": 0}
FEATURE_FILES = {"gfmfr": ("text_features.npy", "image_features.npy"),
                 "mmrec": ("text_feat.npy", "image_feat.npy"),
                 "movielens": ("", ""), "synthetic": ("", ""), "amazon": ("", "")}


@dataclass
class Catalogue:
    item_ids: np.ndarray
    """Original ids of the items in the federation, in contiguous-id order."""
    id_base: int
    id_space: int
    """Number of raw item ids (rows of a feature matrix)."""

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _folder(cfg: DataConfig) -> Path:
    p = Path(cfg.path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: data.path does not exist")
    if not p.is_dir():
        raise DataError(f"{p}: data.path must be a folder")
    return p


def _raw_interactions(cfg: Config) -> dict:
    d = cfg.data
    if d.format == "synthetic":
        return generate(d.synthetic, cfg.run.seed, texts=False, images=False)[0]
    folder = _folder(d)
    if d.format == "movielens":
        return readers.read_movielens_interactions(folder)
    if d.format == "gfmfr":
        return readers.read_gfmfr_interactions(folder)
    if d.format == "amazon":
        return readers.read_amazon_interactions(folder, d.name)
    return readers.read_mmrec_interactions(folder, d.name)


def string_ids(ids: np.ndarray) -> bool:
    return ids.dtype.kind in "US"


def load_interactions(cfg: Config) -> Interactions:
    """Read, de-duplicate, k-core filter and remap the interactions. String ids (ASINs,
    hashed user ids) are mapped to contiguous ids like integer ones, and kept."""
    raw = _raw_interactions(cfg)
    n_raw = len(raw["user"])
    base = ID_BASE[cfg.data.format]
    if string_ids(raw["item"]):         # feature rows have no id order to follow
        id_space = len(np.unique(raw["item"]))
    else:
        id_space = (cfg.data.synthetic.items if cfg.data.format == "synthetic"
                    else int(raw["item"].max()) - base + 1)
        if raw["item"].min() < base:
            raise DataError(f"{cfg.data.path or 'synthetic data'}: item ids below {base} in "
                            f"{cfg.data.format} data")
    if not string_ids(raw["user"]) and raw["user"].min() < 0:
        raise DataError(f"{cfg.data.path}: negative user ids in {cfg.data.format} data")
    raw, dups = deduplicate(raw)
    raw = k_core(raw, *cfg.data.k_core())
    stats = {"raw_interactions": n_raw, "duplicates_dropped": dups, "id_space": id_space}
    return remap(raw, stats)


def catalogue_of(cfg: Config, inter: Interactions) -> Catalogue:
    return Catalogue(inter.item_ids, ID_BASE[cfg.data.format], inter.stats["id_space"])


def split_of(cfg: Config, inter: Interactions) -> Split:
    """The configured split (data.split), then data.max_train_per_user."""
    d, cold = cfg.data, None
    if d.split == "predefined":
        if inter.label is None:
            raise DataError("data.split=predefined needs a split column in the data")
        label = inter.label
    elif d.split == "cold_items":
        label, cold = cold_item_labels(inter, d.cold_item_share, cfg.run.seed)
    else:
        label = loo_labels(inter)
    if d.max_train_per_user:
        label = keep_recent_train(inter, label, d.max_train_per_user)
    return split_from_labels(inter, label, cold)


def _feature_path(cfg: DataConfig, which: int) -> str:
    """The configured feature file (must exist), else the format's default file if present."""
    explicit = (cfg.text_features, cfg.image_features)[which]
    if explicit:
        p = Path(explicit).expanduser()
        return str(p if p.is_absolute() else Path(cfg.path) / p)
    default = FEATURE_FILES[cfg.format][which]
    if default and (Path(cfg.path) / default).is_file():
        return str(Path(cfg.path) / default)
    return ""


def load_item_content(cfg: Config, cat: Catalogue) -> ItemContent:
    """The server's view: texts, images and precomputed features of the catalogue items."""
    d = cfg.data
    if d.format == "synthetic":
        # only the modalities an encoder reads (encoder.*.backend=none reads none)
        content = generate(d.synthetic, cfg.run.seed, interactions=False,
                           texts=cfg.encoder.text.backend != "none",
                           images=cfg.encoder.image.backend != "none")[1]
        keep = cat.item_ids - cat.id_base  # synthetic ids are 1..I, rows 0..I-1
        pick = lambda rows: None if rows is None else [rows[r] for r in keep]  # noqa: E731
        content = ItemContent(cat.item_ids, pick(content.texts), pick(content.images),
                              stats=content.stats)
    elif d.format == "movielens":
        texts, images, stats = readers.read_movielens_content(
            _folder(d), cat.item_ids, d.tmdb_csv, d.posters)
        content = ItemContent(cat.item_ids, texts, images, stats=stats)
    elif d.format == "amazon":
        texts, images, stats = readers.read_amazon_content(_folder(d), d.name, cat.item_ids,
                                                           d.images)
        content = ItemContent(cat.item_ids, texts, images, stats=stats)
    else:
        _folder(d)
        content = ItemContent(cat.item_ids)   # no feature files: an ID-only dataset
    for which, attr in ((0, "text_features"), (1, "image_features")):
        path = _feature_path(d, which)
        if not path:
            continue
        if string_ids(cat.item_ids):
            raise DataError(f"{path}: feature rows follow integer item ids; this data has "
                            "string item ids, so the rows cannot be matched to items")
        full = readers.read_feature_matrix(Path(path), cat.id_space, ("text", "image")[which])
        setattr(content, attr, full[cat.item_ids - cat.id_base])
    return content


def data_stats(cfg: Config) -> dict:
    """What `fedrpc data stats` prints."""
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    out = {"users": inter.n_users, "items": inter.n_items, "interactions": len(inter),
           **inter.stats, "split": split.sizes()}
    out["density"] = round(len(inter) / (inter.n_users * inter.n_items), 6)
    cs = dict(content.stats)
    if content.texts is not None:
        cs["items_with_text"] = sum(1 for t in content.texts if t)
    if content.images is not None:
        cs["items_with_image"] = sum(1 for im in content.images if im is not None)
    for name in ("text_features", "image_features"):
        arr = getattr(content, name)
        if arr is not None:
            cs[f"{name}_dim"] = int(arr.shape[1])
    out["content"] = cs
    return out
