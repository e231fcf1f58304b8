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
from .prepare import deduplicate, k_core, leave_one_out, predefined_split, remap
from .synthetic import generate
from .types import DataError, Interactions, ItemContent, Split

ID_BASE = {"movielens": 1, "gfmfr": 0, "mmrec": 0, "synthetic": 1}
FEATURE_FILES = {"gfmfr": ("text_features.npy", "image_features.npy"),
                 "mmrec": ("text_feat.npy", "image_feat.npy"),
                 "movielens": ("", ""), "synthetic": ("", "")}


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
        return generate(d.synthetic, cfg.run.seed)[0]
    folder = _folder(d)
    if d.format == "movielens":
        return readers.read_movielens_interactions(folder)
    if d.format == "gfmfr":
        return readers.read_gfmfr_interactions(folder)
    return readers.read_mmrec_interactions(folder, d.name)


def load_interactions(cfg: Config) -> Interactions:
    """Read, de-duplicate, k-core filter and remap the interactions."""
    raw = _raw_interactions(cfg)
    n_raw = len(raw["user"])
    id_space = (cfg.data.synthetic.items if cfg.data.format == "synthetic"
                else int(raw["item"].max()) - ID_BASE[cfg.data.format] + 1)
    if raw["item"].min() < ID_BASE[cfg.data.format] or raw["user"].min() < 0:
        raise DataError(f"{cfg.data.path or 'synthetic data'}: ids below "
                        f"{ID_BASE[cfg.data.format]} in {cfg.data.format} data")
    raw, dups = deduplicate(raw)
    raw = k_core(raw, cfg.data.min_user_interactions, cfg.data.min_item_interactions)
    stats = {"raw_interactions": n_raw, "duplicates_dropped": dups, "id_space": id_space}
    return remap(raw, stats)


def catalogue_of(cfg: Config, inter: Interactions) -> Catalogue:
    return Catalogue(inter.item_ids, ID_BASE[cfg.data.format], inter.stats["id_space"])


def split_of(cfg: Config, inter: Interactions) -> Split:
    return predefined_split(inter) if cfg.data.split == "predefined" else leave_one_out(inter)


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
    rows = cat.item_ids - cat.id_base
    if d.format == "synthetic":
        content = generate(d.synthetic, cfg.run.seed)[1]
        keep = rows  # synthetic ids are 1..I, rows 0..I-1
        content = ItemContent(cat.item_ids, [content.texts[r] for r in keep],
                              [content.images[r] for r in keep], stats=content.stats)
    elif d.format == "movielens":
        texts, images, stats = readers.read_movielens_content(
            _folder(d), cat.item_ids, d.tmdb_csv, d.posters)
        content = ItemContent(cat.item_ids, texts, images, stats=stats)
    else:
        _folder(d)
        content = ItemContent(cat.item_ids)
    for which, attr in ((0, "text_features"), (1, "image_features")):
        path = _feature_path(d, which)
        if path:
            full = readers.read_feature_matrix(Path(path), cat.id_space,
                                               ("text", "image")[which])
            setattr(content, attr, full[rows])
    if d.format in ("gfmfr", "mmrec") and content.text_features is None \
            and content.image_features is None:
        raise DataError(f"{d.path}: no item features found for format {d.format!r}")
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
