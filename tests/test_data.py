"""Data layer: readers, preprocessing, splits, negatives, and one clear error per bad input."""
import shutil

import numpy as np
import pytest

from conftest import write_movielens
from fedrpc.config import load_config
from fedrpc.data import (DataError, catalogue_of, data_stats, load_interactions,
                         load_item_content, split_of)
from fedrpc.data.prepare import deduplicate, k_core, leave_one_out, remap
from fedrpc.data.sampling import negatives_for_users, sample_negatives, user_rng


def ml_cfg(path, *over):
    return load_config(None, ["data.format=movielens", f"data.path={path}", *over])


# ------------------------------------------------------------------ preprocessing
def test_dedup_keeps_earliest_and_counts():
    raw = {"user": np.array([1, 1, 1, 2]), "item": np.array([5, 5, 6, 5]),
           "timestamp": np.array([30, 10, 20, 5])}
    out, dups = deduplicate(raw)
    assert dups == 1
    assert sorted(zip(out["user"], out["item"], out["timestamp"])) == [(1, 5, 10), (1, 6, 20), (2, 5, 5)]


def test_k_core_is_iterative():
    # item 9 has one interaction; dropping it leaves user 3 with one interaction
    raw = {"user": np.array([1, 1, 2, 2, 3, 3]), "item": np.array([7, 8, 7, 8, 7, 9]),
           "timestamp": np.arange(6)}
    out = k_core(raw, 2, 2)
    assert set(out["user"]) == {1, 2} and set(out["item"]) == {7, 8}


def test_remap_is_contiguous_and_keeps_original_ids():
    raw = {"user": np.array([42, 7, 42]), "item": np.array([100, 3, 3]), "timestamp": np.arange(3)}
    inter = remap(raw, {})
    assert inter.user_ids.tolist() == [7, 42] and inter.item_ids.tolist() == [3, 100]
    assert inter.user.tolist() == [1, 0, 1] and inter.item.tolist() == [1, 0, 0]


def test_leave_one_out_by_time():
    raw = {"user": np.array([0, 0, 0, 0, 1, 1]), "item": np.array([0, 1, 2, 3, 0, 1]),
           "timestamp": np.array([4, 1, 3, 2, 1, 2])}
    split = leave_one_out(remap(raw, {}))
    assert split.held_out("test")[1].tolist() == [0]       # user 0's latest
    assert split.held_out("valid")[1].tolist() == [2]      # second latest
    assert split.train_of(0).tolist() == [1, 3]
    assert split.train_of(1).tolist() == [0, 1]            # < 3 interactions: all train


# ------------------------------------------------------------------ negatives
def test_negatives_avoid_known_items_and_are_reproducible():
    excl = np.array([0, 2, 3, 7])
    a = sample_negatives(user_rng(1, 5, 9, 1), 10, excl, 500)
    b = sample_negatives(user_rng(1, 5, 9, 1), 10, excl, 500)
    assert np.array_equal(a, b)
    assert set(a) == {1, 4, 5, 6, 8, 9}
    c = sample_negatives(user_rng(1, 6, 9, 1), 10, excl, 500)
    assert not np.array_equal(a, c)                         # fresh every round


def test_negatives_do_not_depend_on_which_users_are_drawn_together():
    indptr = np.array([0, 2, 3, 5])
    items = np.array([0, 1, 4, 2, 3])
    together = negatives_for_users(0, 3, np.array([0, 1, 2]), 20, indptr, items, np.array([4, 4, 4]))
    alone = negatives_for_users(0, 3, np.array([2]), 20, indptr, items, np.array([4]))
    assert np.array_equal(together[2], alone[0])


# ------------------------------------------------------------------ readers and content
def test_movielens_reader_and_content(tmp_path):
    folder = write_movielens(tmp_path / "ml", missing_poster=3)
    cfg = ml_cfg(folder)
    inter = load_interactions(cfg)
    assert inter.n_users == 6 and len(inter) == 30
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    assert content.stats["items_missing_image"] == 1          # counted, not an error
    i3 = int(np.flatnonzero(content.item_ids == 3)[0])
    assert content.images[i3] is None
    i1 = int(np.flatnonzero(content.item_ids == 1)[0])
    assert "Plot of movie 1" in content.texts[i1]            # first TMDB row wins
    assert content.stats["tmdb_duplicate_rows_dropped"] == 1


def test_gfmfr_and_mmrec_layouts(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    (g / "inter.csv").write_text("userID,itemID,timestamp\n0,0,1\n0,1,2\n0,2,3\n1,1,1\n1,2,2\n1,3,3\n")
    np.save(g / "text_features.npy", np.eye(4, 3, dtype=np.float32))
    cfg = load_config(None, ["data.format=gfmfr", f"data.path={g}"])
    inter = load_interactions(cfg)
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    assert content.text_features.shape == (4, 3) and content.image_features is None

    m = tmp_path / "m"
    m.mkdir()
    (m / "toy.inter").write_text("userID\titemID\trating\ttimestamp\tx_label\n"
                                 "0\t0\t5\t1\t0\n0\t1\t5\t2\t1\n0\t2\t5\t3\t2\n1\t0\t5\t1\t0\n")
    np.save(m / "image_feat.npy", np.ones((3, 2), dtype=np.float32))
    cfg = load_config(None, ["data.format=mmrec", f"data.path={m}", "data.name=toy",
                             "data.split=predefined"])
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    assert split.held_out("valid")[1].tolist() == [1] and split.held_out("test")[1].tolist() == [2]
    assert load_item_content(cfg, catalogue_of(cfg, inter)).image_features.shape == (3, 2)


def _gfmfr(tmp_path, inter_text, feats=None):
    g = tmp_path / "g"
    g.mkdir(exist_ok=True)
    (g / "inter.csv").write_text(inter_text)
    np.save(g / "text_features.npy", np.zeros((3, 2), np.float32) if feats is None else feats)
    cfg = load_config(None, ["data.format=gfmfr", f"data.path={g}"])
    return cfg, g


GOOD = "userID,itemID,timestamp\n0,0,1\n0,1,2\n1,2,3\n"


@pytest.mark.parametrize("text, message", [
    ("", "inter.csv: empty file"),
    ("userID,itemID,timestamp\n", "inter.csv: no interactions"),
    ("user,rating\n1,5\n", "inter.csv: missing item id column"),
    ("userID,itemID\n0,abc\n", "inter.csv:2: item 'abc' is not a number"),
    ("userID,itemID\n0,1.5\n", "inter.csv:2: item '1.5' is not an integer id"),
    ("userID,itemID,timestamp\n0,1\n", "inter.csv:2: expected at least 3 fields, got 2"),
])
def test_bad_interaction_files(tmp_path, text, message):
    cfg, _ = _gfmfr(tmp_path, text)
    with pytest.raises(DataError) as e:
        load_interactions(cfg)
    assert message in str(e.value)


@pytest.mark.parametrize("feats, message", [
    (np.zeros((2, 4), np.float32), "text features have 2 rows but the data has 3 items"),
    (np.array([[0.0, np.nan]] + [[0.0, 0.0]] * 2, np.float32), "contain NaN or Inf (1 values; first in row 0)"),
    (np.array([[0.0, 1.0]] * 2 + [[np.inf, 0.0]], np.float32), "first in row 2"),
    (np.zeros(3, np.float32), "must be a 2-D matrix"),
])
def test_bad_feature_matrices(tmp_path, feats, message):
    cfg, _ = _gfmfr(tmp_path, GOOD, feats)
    inter = load_interactions(cfg)
    with pytest.raises(DataError) as e:
        load_item_content(cfg, catalogue_of(cfg, inter))
    assert "text_features.npy" in str(e.value) and message in str(e.value)


def test_malformed_movielens_files(tmp_path):
    folder = write_movielens(tmp_path / "ml")
    (folder / "u.data").write_text("1\t2\t3\n")
    with pytest.raises(DataError, match=r"u.data:1: expected at least 4 fields, got 3"):
        load_interactions(ml_cfg(folder))
    (folder / "u.data").write_text("1\tx\t3\t4\n")
    with pytest.raises(DataError, match=r"u.data:1: item 'x' is not a number"):
        load_interactions(ml_cfg(folder))
    (folder / "u.data").write_text("")
    with pytest.raises(DataError, match=r"u.data: no interactions"):
        load_interactions(ml_cfg(folder))


def test_bad_content_files(tmp_path):
    folder = write_movielens(tmp_path / "ml")
    cfg = ml_cfg(folder)
    cat = catalogue_of(cfg, load_interactions(cfg))
    (folder / "items_tmdb.csv").write_text("movie_id,title\n1,x\n")
    with pytest.raises(DataError, match=r"items_tmdb.csv: missing overview column"):
        load_item_content(cfg, cat)
    shutil.rmtree(folder / "posters")
    with pytest.raises(DataError, match=r"posters: posters folder not found"):
        load_item_content(ml_cfg(folder, "data.tmdb_csv="), cat)
    with pytest.raises(DataError, match=r"nope.csv: TMDB items CSV not found"):
        load_item_content(ml_cfg(folder, "data.tmdb_csv=nope.csv", "data.posters="), cat)


def test_config_pointing_at_nothing(tmp_path):
    with pytest.raises(DataError, match="data.path does not exist"):
        load_interactions(ml_cfg(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"u.data: MovieLens ratings file u.data not found"):
        load_interactions(ml_cfg(tmp_path))
    cfg, g = _gfmfr(tmp_path, GOOD)
    cfg = load_config(None, ["data.format=gfmfr", f"data.path={g}", "data.image_features=other.npy"])
    with pytest.raises(DataError, match="other.npy: image features not found"):
        load_item_content(cfg, catalogue_of(cfg, load_interactions(cfg)))


# ------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_and_has_content():
    cfg = load_config(None, ["data.synthetic.users=40", "data.synthetic.items=60",
                             "data.synthetic.mean_interactions=10"])
    a, b = load_interactions(cfg), load_interactions(cfg)
    assert np.array_equal(a.item, b.item) and np.array_equal(a.user, b.user)
    content = load_item_content(cfg, catalogue_of(cfg, a))
    assert len(content.texts) == a.n_items and content.images[0].shape == (16, 16, 3)
    other = load_interactions(load_config(None, ["run.seed=1", "data.synthetic.users=40",
                                                 "data.synthetic.items=60",
                                                 "data.synthetic.mean_interactions=10"]))
    assert not np.array_equal(a.item[:50], other.item[:50])


def _content_predicts_preference(signal):
    """How well the items' generated images predict who likes them: correlation between
    image similarity and co-interaction, over item pairs."""
    cfg = load_config(None, [f"data.synthetic.signal={signal}", "data.synthetic.users=200",
                             "data.synthetic.items=120"])
    inter = load_interactions(cfg)
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    x = np.stack([im.astype(np.float64).ravel() for im in content.images])
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    sim = np.corrcoef(x)
    m = np.zeros((inter.n_users, inter.n_items))
    m[inter.user, inter.item] = 1
    co = np.corrcoef(m.T)
    iu = np.triu_indices(inter.n_items, 1)
    ok = np.isfinite(co[iu])
    return np.corrcoef(sim[iu][ok], co[iu][ok])[0, 1]


def test_planted_signal_strength_controls_content_signal():
    strong, none = _content_predicts_preference(1.0), _content_predicts_preference(0.0)
    assert strong > 0.2
    assert abs(none) < 0.05


# ------------------------------------------------------------------ real data
def test_ml100k_stats(ml100k_path):
    stats = data_stats(ml_cfg(ml100k_path))
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    assert stats["split"] == {"train": 98114, "valid": 943, "test": 943, "users_with_test": 943}
    c = stats["content"]
    assert c["items_with_image"] == 1663 and c["items_missing_image"] == 19
    assert c["items_with_overview"] == 1664
