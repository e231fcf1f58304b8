"""Readers for the on-disk dataset layouts. Every problem raises DataError naming the file.

Interactions and item content are read by separate functions: in a distributed run the
server reads content and never interactions, the workers the reverse.

Layouts:
- movielens: `u.data` (user, item, rating, time; tab-separated), `u.item` (pipe-separated,
  latin-1), optionally a TMDB items CSV (movie_id, overview, ...) and `posters/<id>.jpg`.
- gfmfr: `inter.csv` with a header naming user, item and (optional) timestamp columns, and
  `text_features.npy` / `image_features.npy`, one row per item id.
- mmrec: `<name>.inter`, tab-separated with header `userID itemID ... x_label` (0 train,
  1 valid, 2 test), and `text_feat.npy` / `image_feat.npy`.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from .types import DataError

USER_COLS = ("userid", "user_id", "user", "uid", "u")
ITEM_COLS = ("itemid", "item_id", "item", "iid", "i", "movie_id", "movieid")
TIME_COLS = ("timestamp", "time", "ts", "unix_time")
LABEL_COLS = ("x_label", "label", "split")


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} is not a file")
    return path


def _to_int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        try:
            f = float(value)
        except ValueError:
            raise DataError(f"{path}:{line}: {column} {value!r} is not a number") from None
        if not f.is_integer():
            raise DataError(f"{path}:{line}: {column} {value!r} is not an integer id")
        return int(f)


def _parse_rows(path: Path, rows, columns: dict[str, int], first_line: int) -> dict:
    """Parse integer columns {name: index} out of split text rows."""
    out = {name: [] for name in columns}
    need = max(columns.values()) + 1
    n = 0
    for n, row in enumerate(rows):
        line = first_line + n
        if len(row) == 1 and not row[0].strip():
            continue  # blank line
        if len(row) < need:
            raise DataError(f"{path}:{line}: expected at least {need} fields, got {len(row)}")
        for name, idx in columns.items():
            out[name].append(_to_int(row[idx].strip(), path, line, name))
    if not out[next(iter(columns))]:
        raise DataError(f"{path}: no interactions (the file is empty)")
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def _find_column(header: list[str], names: tuple[str, ...], path: Path, what: str,
                 required: bool = True) -> Optional[int]:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    if required:
        raise DataError(f"{path}: missing {what} column (looked for one of "
                        f"{', '.join(names)}; header is {', '.join(header)})")
    return None


def read_movielens_interactions(folder: Path) -> dict:
    """u.data -> dict(user, item, timestamp) with original ids."""
    path = _require_file(folder / "u.data", "MovieLens ratings file u.data")
    with open(path, encoding="latin-1") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    return _parse_rows(path, rows, {"user": 0, "item": 1, "timestamp": 3}, 1)


def _read_header_table(path: Path, delimiter: str) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise DataError(f"{path}: empty file (expected a header row)")
    return rows[0], rows[1:]


def _read_interaction_table(path: Path, delimiter: str, with_label: bool) -> dict:
    header, rows = _read_header_table(path, delimiter)
    cols = {"user": _find_column(header, USER_COLS, path, "user id"),
            "item": _find_column(header, ITEM_COLS, path, "item id")}
    t = _find_column(header, TIME_COLS, path, "timestamp", required=False)
    if t is not None:
        cols["timestamp"] = t
    if with_label:
        cols["label"] = _find_column(header, LABEL_COLS, path, "split label (x_label)")
    out = _parse_rows(path, rows, cols, 2)
    if "timestamp" not in out:
        # no time column: file order is the time order
        out["timestamp"] = np.arange(len(out["user"]), dtype=np.int64)
    if with_label:
        bad = ~np.isin(out["label"], (0, 1, 2))
        if bad.any():
            raise DataError(f"{path}: split label must be 0 (train), 1 (valid) or 2 (test); "
                            f"found {int(out['label'][bad][0])}")
    return out


def read_gfmfr_interactions(folder: Path) -> dict:
    return _read_interaction_table(_require_file(folder / "inter.csv", "interactions file"),
                                   ",", with_label=False)


def read_mmrec_interactions(folder: Path, name: str) -> dict:
    path = _require_file(folder / f"{name}.inter", "MMRec interactions file")
    return _read_interaction_table(path, "\t", with_label=True)


# ----------------------------------------------------------------------------- content
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


def read_movielens_items(folder: Path) -> dict[int, str]:
    """u.item -> {movie id: 'Title. Genres: a, b'} (the fallback text of an item)."""
    path = _require_file(folder / "u.item", "MovieLens items file u.item")
    out: dict[int, str] = {}
    with open(path, encoding="latin-1") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("|")
            if len(parts) < 5 + len(GENRES):
                raise DataError(f"{path}:{line_no}: expected {5 + len(GENRES)} "
                                f"'|'-separated fields, got {len(parts)}")
            mid = _to_int(parts[0], path, line_no, "movie id")
            genres = [g for g, flag in zip(GENRES, parts[5:]) if flag.strip() == "1"]
            out[mid] = f"{parts[1]}. Genres: {', '.join(genres)}."
    if not out:
        raise DataError(f"{path}: no items (the file is empty)")
    return out


def read_tmdb_overviews(path: Path) -> tuple[dict[int, str], int]:
    """TMDB items CSV -> ({movie id: overview}, duplicate rows dropped). First row wins."""
    _require_file(path, "TMDB items CSV")
    header, rows = _read_header_table(path, ",")
    id_col = _find_column(header, ("movie_id", "item_id", "id"), path, "movie_id")
    ov_col = _find_column(header, ("overview",), path, "overview")
    title_col = _find_column(header, ("title",), path, "title", required=False)
    out: dict[int, str] = {}
    dups = 0
    for n, row in enumerate(rows, 2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) <= max(id_col, ov_col):
            raise DataError(f"{path}: record {n}: expected {len(header)} fields, got {len(row)}")
        mid = _to_int(row[id_col].strip(), path, n, "movie_id")
        if mid in out:
            dups += 1
            continue
        overview = row[ov_col].strip()
        title = row[title_col].strip() if title_col is not None else ""
        out[mid] = f"{title}. {overview}" if (overview and title) else overview
    return out, dups


def read_movielens_content(folder: Path, item_ids: np.ndarray, tmdb_csv: str,
                           posters: str) -> tuple[list[str], list, dict]:
    """Texts and poster paths for `item_ids`, with counts of what was missing."""
    fallback = read_movielens_items(folder)
    overviews, dups = ({}, 0)
    if tmdb_csv:
        overviews, dups = read_tmdb_overviews(folder / tmdb_csv)
    texts, images = [], []
    n_overview = n_fallback = n_missing_img = 0
    poster_dir = folder / posters if posters else None
    if poster_dir is not None and not poster_dir.is_dir():
        raise DataError(f"{poster_dir}: posters folder not found (set data.posters='' to "
                        "run without images)")
    for mid in item_ids.tolist():
        ov = overviews.get(mid, "")
        if ov:
            texts.append(ov)
            n_overview += 1
        else:
            texts.append(fallback.get(mid, ""))
            n_fallback += 1
        if poster_dir is not None:
            p = poster_dir / f"{mid}.jpg"
            if p.is_file():
                images.append(str(p))
            else:
                images.append(None)
                n_missing_img += 1
    stats = {"items_with_overview": n_overview, "items_text_fallback": n_fallback,
             "tmdb_duplicate_rows_dropped": dups}
    if poster_dir is not None:
        stats["items_with_image"] = len(item_ids) - n_missing_img
        stats["items_missing_image"] = n_missing_img
    return texts, (images if poster_dir is not None else None), stats


def read_feature_matrix(path: Path, n_rows: int, what: str) -> np.ndarray:
    """A float feature matrix with exactly `n_rows` rows and only finite values."""
    _require_file(path, f"{what} features")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for corrupt files
        raise DataError(f"{path}: cannot read {what} features as .npy ({e})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} features must be a 2-D matrix, got shape {arr.shape}")
    if arr.shape[0] != n_rows:
        raise DataError(f"{path}: {what} features have {arr.shape[0]} rows but the data has "
                        f"{n_rows} items (one row per item id, in ascending id order)")
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{path}: {what} features must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{path}: {what} features contain NaN or Inf ({int(bad.sum())} values; "
                        f"first in row {row})")
    return arr
