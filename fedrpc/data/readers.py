"""Readers for the on-disk dataset layouts. Every problem raises DataError naming the file.

Interactions and item content are read by separate functions: in a distributed run the
server reads content and never interactions, the workers the reverse.

Layouts:
- movielens, by release (detected from the ratings file): 100K `u.data` (user, item,
  rating, time; tab-separated) + `u.item` (pipe-separated, latin-1); 1M / 10M
  `ratings.dat` + `movies.dat` (`::`-separated); 20M / 25M / 32M `ratings.csv` +
  `movies.csv` (with header); optionally a TMDB items CSV (movie_id, overview, ...) and
  `posters/<id>.jpg`.
- gfmfr: `inter.csv` with a header naming user, item and (optional) timestamp columns, and
  `text_features.npy` / `image_features.npy`, one row per item id.
- mmrec: `<name>.inter`, tab-separated with header `userID itemID ... x_label` (0 train,
  1 valid, 2 test), and `text_feat.npy` / `image_feat.npy`.
- amazon: Amazon review data, `<name>.jsonl` (2023) or `<name>.json` (2018), plain or
  gzipped, with item metadata `meta_<name>.jsonl` / `.json` and image files
  `<images>/<asin>.jpg`.
gfmfr and mmrec ids may be strings (ASINs, hashed user ids); Amazon ids always are.
"""
from __future__ import annotations

import csv
import gzip
import json
import warnings
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


def _parse_rows(path: Path, rows, columns: dict[str, int], first_line: int,
                string_ids: tuple[str, ...] = ()) -> dict:
    """Parse integer columns {name: index} out of split text rows. The columns named in
    `string_ids` may hold string ids (ASINs, hashed user ids): a column whose values are
    not all numbers is kept as strings (see `_id_column`)."""
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
            value = row[idx].strip()
            out[name].append(value if name in string_ids else _to_int(value, path, line, name))
    if not out[next(iter(columns))]:
        raise DataError(f"{path}: no interactions (the file is empty)")
    return {k: (_id_column(v, path, first_line, k) if k in string_ids
                else np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def _id_column(values: list[str], path: Path, first_line: int, column: str) -> np.ndarray:
    """Integer ids when every value is a number, else the ids as strings (kept as they
    are; `remap` maps them to contiguous ids and keeps the originals)."""
    for n, v in enumerate(values):
        if not v:
            raise DataError(f"{path}:{first_line + n}: empty {column} id")
    try:
        return np.asarray([int(v) for v in values], dtype=np.int64)
    except ValueError:
        pass
    as_float = []
    for n, v in enumerate(values):
        try:
            as_float.append(float(v))
        except ValueError:
            return np.asarray(values, dtype=str)       # string ids
    bad = next(n for n, f in enumerate(as_float) if not f.is_integer())
    raise DataError(f"{path}:{first_line + bad}: {column} {values[bad]!r} is not an integer id")


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


# MovieLens releases: (ratings file, items file, field separator, header row?)
MOVIELENS_LAYOUTS = {"100k": ("u.data", "u.item", "\t", False),
                     "1m/10m": ("ratings.dat", "movies.dat", "::", False),
                     "20m+": ("ratings.csv", "movies.csv", ",", True)}


def movielens_layout(folder: Path) -> str:
    """Which MovieLens release `folder` holds, by its ratings file."""
    for name, (ratings, *_rest) in MOVIELENS_LAYOUTS.items():
        if (folder / ratings).is_file():
            return name
    raise DataError(f"{folder}: no MovieLens ratings file found (looked for u.data (100K), "
                    "ratings.dat (1M, 10M) and ratings.csv (20M, 25M, 32M))")


def _numeric_table(path: Path, sep: str, header: bool, width: int) -> np.ndarray | None:
    """A numeric table read in one pass of numpy's parser ([rows, width] float64), or
    None when it does not parse cleanly (the caller then reports the bad line)."""
    with open(path, encoding="latin-1") as f:
        if header:
            f.readline()
        text = f.read()
    if sep != " ":
        text = text.replace(sep, " ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            flat = np.fromstring(text, sep=" ")
        except ValueError:
            return None
    # one record of `width` numbers per non-blank line
    lines = sum(1 for ln in text.split("\n") if ln.strip())
    if lines == 0 or flat.size != lines * width:
        return None
    return flat.reshape(-1, width)


def read_movielens_interactions(folder: Path) -> dict:
    """The ratings file of any MovieLens release -> dict(user, item, timestamp)."""
    ratings, _, sep, header = MOVIELENS_LAYOUTS[movielens_layout(folder)]
    path = folder / ratings
    fast = _numeric_table(path, sep, header, 4)
    cols = {"user": 0, "item": 1, "timestamp": 3}
    if fast is not None and np.all(fast[:, [0, 1, 3]] == np.round(fast[:, [0, 1, 3]])):
        return {k: fast[:, c].astype(np.int64) for k, c in cols.items()}
    with open(path, encoding="latin-1") as f:   # slow path: names the bad line
        rows = [line.rstrip("\n").split(sep) for line in f]
    if header:
        if not rows:
            raise DataError(f"{path}: no interactions (the file is empty)")
        rows = rows[1:]
    return _parse_rows(path, rows, cols, 2 if header else 1)


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
    out = _parse_rows(path, rows, cols, 2, string_ids=("user", "item"))
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
    """The items file of any MovieLens release -> {movie id: 'Title. Genres: a, b.'}
    (the fallback text of an item)."""
    layout = movielens_layout(folder)
    _, items, sep, header = MOVIELENS_LAYOUTS[layout]
    path = _require_file(folder / items, f"MovieLens items file {items}")
    out: dict[int, str] = {}
    if layout == "100k":
        with open(path, encoding="latin-1") as f:
            rows = [line.rstrip("\n").split("|") for line in f]
        need = 5 + len(GENRES)
    elif layout == "1m/10m":                    # MovieID::Title::Genres (a|b)
        with open(path, encoding="latin-1") as f:
            rows = [line.rstrip("\n").split("::") for line in f]
        need = 3
    else:                                       # movieId,title,genres with quoted titles
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        need = 3
    for line_no, parts in enumerate(rows, 2 if header else 1):
        if not parts or not any(p.strip() for p in parts):
            continue
        if len(parts) < need:
            sep_name = "|" if layout == "100k" else sep
            raise DataError(f"{path}:{line_no}: expected {need} '{sep_name}'-separated fields, "
                            f"got {len(parts)}")
        mid = _to_int(parts[0], path, line_no, "movie id")
        if layout == "100k":
            genres = [g for g, flag in zip(GENRES, parts[5:]) if flag.strip() == "1"]
        else:
            genres = [g for g in parts[2].split("|") if g and g != "(no genres listed)"]
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


# ----------------------------------------------------------------------------- amazon
AMAZON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
# (user, item, time) fields of the 2023 release (time in ms) and of the 2018 release (s)
AMAZON_FIELDS = (("user_id", "parent_asin", "timestamp", 1000),
                 ("reviewerID", "asin", "unixReviewTime", 1))


def _amazon_file(folder: Path, stem: str, what: str, required: bool = True) -> Optional[Path]:
    for suffix in AMAZON_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    if required:
        raise DataError(f"{folder}: {what} not found (looked for {stem}"
                        f"{{{','.join(AMAZON_SUFFIXES)}}}; set data.name to the file's stem)")
    return None


def _json_lines(path: Path):
    """(line number, record) of a JSON-lines file, plain or gzipped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not a JSON record ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object per line")
                yield line_no, rec
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def read_amazon_interactions(folder: Path, name: str) -> dict:
    """Amazon reviews `<name>.jsonl` (2023: user_id, parent_asin, timestamp in ms) or
    `<name>.json` (2018: reviewerID, asin, unixReviewTime in s), plain or .gz ->
    dict(user, item, timestamp) with string ids (seconds)."""
    path = _amazon_file(folder, name, "Amazon reviews file")
    users, items, times = [], [], []
    fields = None
    for line_no, rec in _json_lines(path):
        if fields is None:
            fields = next((f for f in AMAZON_FIELDS if f[0] in rec or f[1] in rec), None)
            if fields is None:
                raise DataError(f"{path}:{line_no}: neither the 2023 (user_id, parent_asin, "
                                "timestamp) nor the 2018 (reviewerID, asin, unixReviewTime) "
                                "review fields")
        u_key, i_key, t_key, per_s = fields
        item = rec.get(i_key) or rec.get("asin")
        for key, value in ((u_key, rec.get(u_key)), (i_key, item), (t_key, rec.get(t_key))):
            if value is None or value == "":
                raise DataError(f"{path}:{line_no}: missing field {key!r}")
        if not isinstance(rec[t_key], (int, float)) or isinstance(rec[t_key], bool):
            raise DataError(f"{path}:{line_no}: {t_key} {rec[t_key]!r} is not a number")
        users.append(str(rec[u_key]))
        items.append(str(item))
        times.append(int(rec[t_key]) // per_s)
    if not users:
        raise DataError(f"{path}: no interactions (the file is empty)")
    return {"user": np.asarray(users, dtype=str), "item": np.asarray(items, dtype=str),
            "timestamp": np.asarray(times, dtype=np.int64)}


def _text_of(value) -> str:
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value)
    return str(value).strip() if value is not None else ""


def read_amazon_content(folder: Path, name: str, item_ids: np.ndarray,
                        images: str) -> tuple[Optional[list[str]], Optional[list], dict]:
    """Texts (title + description from `meta_<name>.jsonl` / `.json`, if present) and
    image files `<images>/<asin>.jpg` (if the folder exists) of `item_ids`."""
    texts = None
    stats: dict = {}
    meta = _amazon_file(folder, f"meta_{name}", "Amazon metadata file", required=False)
    if meta is not None:
        wanted = {str(i) for i in item_ids.tolist()}
        by_id: dict[str, str] = {}
        for line_no, rec in _json_lines(meta):
            asin = rec.get("parent_asin") or rec.get("asin")
            if asin is None:
                raise DataError(f"{meta}:{line_no}: missing field 'parent_asin' / 'asin'")
            if asin in wanted and asin not in by_id:
                title, desc = _text_of(rec.get("title")), _text_of(rec.get("description"))
                by_id[asin] = f"{title}. {desc}".strip(". ") if desc else title
        texts = [by_id.get(str(i), "") for i in item_ids.tolist()]
        stats["items_with_metadata"] = sum(1 for t in texts if t)
    paths = None
    img_dir = folder / images if images else None
    if img_dir is not None and img_dir.is_dir():
        paths = [str(img_dir / f"{i}.jpg") if (img_dir / f"{i}.jpg").is_file() else None
                 for i in item_ids.tolist()]
        stats["items_with_image"] = sum(1 for p in paths if p is not None)
        stats["items_missing_image"] = len(paths) - stats["items_with_image"]
    return texts, paths, stats
