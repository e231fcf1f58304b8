import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k-mm"


@pytest.fixture
def ml100k_path() -> Path:
    if not (ML100K / "u.data").is_file():
        pytest.skip(f"MovieLens-100K (ml-100k-mm layout) not found at {ML100K}")
    return ML100K


def write_movielens(folder: Path, n_users=6, n_items=8, seed=0, posters=True,
                    missing_poster=None) -> Path:
    """A tiny MovieLens-layout folder: u.data, u.item, items_tmdb.csv, posters/."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    t = 1000
    for u in range(1, n_users + 1):
        for i in rng.choice(np.arange(1, n_items + 1), size=5, replace=False):
            t += 1
            lines.append(f"{u}\t{i}\t{rng.integers(1, 6)}\t{t}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    flags = "|".join(["0"] * 19)
    (folder / "u.item").write_text("".join(
        f"{i}|Movie {i} (1990)|01-Jan-1990||http://x|{flags}\n" for i in range(1, n_items + 1)),
        encoding="latin-1")
    rows = ["movie_id,title,overview"] + [f'{i},Movie {i} (1990),"Plot of movie {i}, with a\nnewline."'
                                          for i in range(1, n_items + 1)]
    rows.append('1,Movie 1 (1990),"A duplicate row that must be dropped"')
    (folder / "items_tmdb.csv").write_text("\n".join(rows) + "\n")
    if posters:
        (folder / "posters").mkdir(exist_ok=True)
        for i in range(1, n_items + 1):
            if i == missing_poster:
                continue
            Image.fromarray(rng.integers(0, 255, (12, 8, 3), dtype=np.uint8)).save(
                folder / "posters" / f"{i}.jpg")
    return folder


DEFAULT_TIMEOUT_S = 300


def pytest_collection_modifyitems(items):
    """Every test has a hard timeout (pytest-timeout); slow ones set their own."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))
