"""Data layer: readers, preprocessing, splits, negatives, and one clear error per bad input."""
import shutil

import numpy as np
import pytest
import torch

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
    ("userID,itemID,timestamp\n0,abc,x\n", "inter.csv:2: timestamp 'x' is not a number"),
    ("userID,itemID\n0,1.5\n", "inter.csv:2: item '1.5' is not an integer id"),
    ("userID,itemID\n0,\n", "inter.csv:2: empty item id"),
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


@pytest.mark.parametrize("name, text, message", [
    ("u.data", "1\t2\t3\n", r"u.data:1: expected at least 4 fields, got 3"),
    ("u.data", "1\tx\t3\t4\n", r"u.data:1: item 'x' is not a number"),
    ("u.data", "", r"u.data: no interactions"),
    ("ratings.dat", "1::10::5::978300760\n1::20::5\n", r"ratings.dat:2: expected at least 4 fields, got 3"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n7,x,4.5,100\n", r"ratings.csv:2: item 'x' is not a number"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n", r"ratings.csv: no interactions"),
])
def test_malformed_movielens_files(tmp_path, name, text, message):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / name).write_text(text)
    with pytest.raises(DataError, match=message):
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
    with pytest.raises(DataError, match=r"no MovieLens ratings file found \(looked for u.data "
                                        r"\(100K\), ratings.dat \(1M, 10M\) and ratings.csv"):
        load_interactions(ml_cfg(tmp_path))
    cfg, g = _gfmfr(tmp_path, GOOD)
    cfg = load_config(None, ["data.format=gfmfr", f"data.path={g}", "data.image_features=other.npy"])
    with pytest.raises(DataError, match="other.npy: image features not found"):
        load_item_content(cfg, catalogue_of(cfg, load_interactions(cfg)))


# ------------------------------------------------------------------ other releases, string ids
def test_movielens_1m_and_20m_layouts(tmp_path):
    one = tmp_path / "ml-1m"
    one.mkdir()
    (one / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978300761\n"
                                     "2::10::4::978300762\n2::30::1::978300700\n")
    (one / "movies.dat").write_bytes("10::Caf\xe9 (1995)::Comedy|Drama\n20::B (1996)::Action\n"
                                     "30::C (1997)::(no genres listed)\n".encode("latin-1"))
    cfg = ml_cfg(one, "data.tmdb_csv=", "data.posters=")
    inter = load_interactions(cfg)
    assert inter.user_ids.tolist() == [1, 2] and inter.item_ids.tolist() == [10, 20, 30]
    assert len(inter) == 4 and inter.timestamp.tolist() == [978300760, 978300761, 978300762,
                                                            978300700]
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    assert content.texts == ["Caf\xe9 (1995). Genres: Comedy, Drama.", "B (1996). Genres: Action.",
                             "C (1997). Genres: ."]

    big = tmp_path / "ml-25m"
    big.mkdir()
    (big / "ratings.csv").write_text("userId,movieId,rating,timestamp\n7,1,4.5,100\n7,2,3.0,101\n"
                                     "8,2,0.5,99\n")
    (big / "movies.csv").write_text('movieId,title,genres\n1,"Toy Story, The (1995)",Animation|Children\n'
                                    "2,Jumanji (1995),Adventure\n")
    cfg = ml_cfg(big, "data.tmdb_csv=", "data.posters=")
    inter = load_interactions(cfg)
    assert inter.n_users == 2 and inter.item_ids.tolist() == [1, 2] and len(inter) == 3
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    assert content.texts[0] == "Toy Story, The (1995). Genres: Animation, Children."

    (big / "movies.csv").write_text("movieId,title,genres\n1,Toy Story\n")
    with pytest.raises(DataError, match=r"movies.csv:2: expected 3 ','-separated fields, got 2"):
        load_item_content(ml_cfg(big, "data.tmdb_csv=", "data.posters="),
                          catalogue_of(cfg, load_interactions(ml_cfg(big))))


def test_string_ids_are_mapped_and_kept_and_features_are_optional(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    (g / "inter.csv").write_text("user_id,item_id,timestamp\nAH2X,B00A,3\nAH2X,B00C,1\n"
                                 "ZZ9,B00A,2\nAH2X,B00B,5\n")
    cfg = load_config(None, ["data.format=gfmfr", f"data.path={g}"])
    inter = load_interactions(cfg)
    assert inter.user_ids.tolist() == ["AH2X", "ZZ9"]
    assert inter.item_ids.tolist() == ["B00A", "B00B", "B00C"]
    assert inter.user.tolist() == [0, 0, 1, 0] and inter.item.tolist() == [0, 2, 0, 1]
    # an interactions-only folder is an ID-only dataset, not an error
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    assert content.text_features is None and content.image_features is None
    np.save(g / "text_features.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(DataError, match="this data has string item ids"):
        load_item_content(cfg, catalogue_of(cfg, inter))


def _amazon(folder, name, reviews, meta=None, gz=True, suffix=".jsonl"):
    import gzip
    import json
    folder.mkdir(parents=True, exist_ok=True)
    opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    ext = suffix + (".gz" if gz else "")
    with opener(folder / f"{name}{ext}") as f:
        f.write("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in reviews))
    if meta is not None:
        with opener(folder / f"meta_{name}{ext}") as f:
            f.write("".join(json.dumps(m) + "\n" for m in meta))
    return folder


def test_amazon_2023_and_2018_with_metadata_images_and_5_core(tmp_path):
    from PIL import Image
    # 6 users x 5 items, all rated by everyone: survives 5-core; user u6 and item I9 do not
    rev = [{"user_id": f"u{u}", "parent_asin": f"I{i}", "asin": f"V{i}", "rating": 5.0,
            "timestamp": 1_600_000_000_000 + 1000 * (10 * u + i)} for u in range(6) for i in range(5)]
    rev += [{"user_id": "u6", "parent_asin": "I0", "rating": 1.0, "timestamp": 1},
            {"user_id": "u0", "parent_asin": "I9", "rating": 1.0, "timestamp": 2}]
    meta = [{"parent_asin": f"I{i}", "title": f"Lipstick {i}",
             "description": [f"Shade {i}.", "Long lasting"]} for i in range(4)]
    folder = _amazon(tmp_path / "a23", "All_Beauty", rev, meta)
    (folder / "images").mkdir()
    Image.new("RGB", (4, 4)).save(folder / "images" / "I1.jpg")
    cfg = load_config(None, ["data.format=amazon", f"data.path={folder}", "data.name=All_Beauty"])
    inter = load_interactions(cfg)
    assert inter.user_ids.tolist() == [f"u{u}" for u in range(6)]
    assert inter.item_ids.tolist() == [f"I{i}" for i in range(5)] and len(inter) == 30
    assert inter.timestamp.max() == 1_600_000_054        # ms -> s
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    assert content.texts[0] == "Lipstick 0. Shade 0. Long lasting" and content.texts[4] == ""
    assert content.images[1].endswith("I1.jpg") and content.images[0] is None
    assert content.stats == {"items_with_metadata": 4, "items_with_image": 1,
                             "items_missing_image": 4}
    # k-core set by hand wins over the format's default 5
    loose = load_config(None, ["data.format=amazon", f"data.path={folder}", "data.name=All_Beauty",
                               "data.min_user_interactions=0", "data.min_item_interactions=0"])
    assert len(load_interactions(loose)) == 32

    old = [{"reviewerID": "A1", "asin": "X", "unixReviewTime": 5, "overall": 5.0},
           {"reviewerID": "A1", "asin": "Y", "unixReviewTime": 6, "overall": 4.0}]
    folder = _amazon(tmp_path / "a18", "Toys", old, gz=False, suffix=".json")
    cfg = load_config(None, ["data.format=amazon", f"data.path={folder}", "data.name=Toys",
                             "data.min_user_interactions=0", "data.min_item_interactions=0"])
    inter = load_interactions(cfg)
    assert inter.item_ids.tolist() == ["X", "Y"] and inter.timestamp.tolist() == [5, 6]
    assert load_item_content(cfg, catalogue_of(cfg, inter)).texts is None   # no metadata


@pytest.mark.parametrize("lines, message", [
    (['{"user_id": "a", "parent_asin": "b", "timestamp": 1}\n', "{oops\n"],
     "Toys.jsonl.gz:2: not a JSON record"),
    (['{"user_id": "a", "timestamp": 1}\n'], "Toys.jsonl.gz:1: missing field 'parent_asin'"),
    (['{"user_id": "a", "parent_asin": "b", "timestamp": "x"}\n'],
     "Toys.jsonl.gz:1: timestamp 'x' is not a number"),
    (['{"who": 1}\n'], "Toys.jsonl.gz:1: neither the 2023"),
    ([], "Toys.jsonl.gz: no interactions"),
])
def test_bad_amazon_files(tmp_path, lines, message):
    folder = _amazon(tmp_path / "a", "Toys", lines)
    cfg = load_config(None, ["data.format=amazon", f"data.path={folder}", "data.name=Toys"])
    with pytest.raises(DataError) as e:
        load_interactions(cfg)
    assert message in str(e.value)
    with pytest.raises(DataError, match=r"Amazon reviews file not found \(looked for Nope"):
        load_interactions(load_config(None, ["data.format=amazon", f"data.path={folder}",
                                             "data.name=Nope"]))


# ------------------------------------------------------------------ sparse and cold splits
def test_max_train_per_user_keeps_the_most_recent_training_interactions():
    raw = {"user": np.array([0] * 7 + [1] * 3), "item": np.array([0, 1, 2, 3, 4, 5, 6, 0, 1, 2]),
           "timestamp": np.array([7, 1, 6, 2, 5, 3, 4, 1, 2, 3])}
    inter = remap(raw, {})
    cfg = load_config(None, ["data.max_train_per_user=2"])
    split = split_of(cfg, inter)
    # user 0 by time: 1, 3, 5, 6, 4, 2, 0 -> test 0, valid 2, the 2 most recent others 4, 6
    assert split.train_of(0).tolist() == [4, 6]
    assert split.held_out("test")[1][:1].tolist() == [0]
    assert split.train_of(1).tolist() == [0]                  # fewer than K: all kept


def test_cold_items_never_train_and_are_ranked_among_themselves():
    from fedrpc.metrics import evaluate_users, finalize
    cfg = load_config(None, ["data.split=cold_items", "data.cold_item_share=0.2"])
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    cold = split.cold_items
    assert len(cold) == round(0.2 * inter.n_items)
    assert not np.isin(split.train_items, cold).any()
    held = np.concatenate([split.valid_items, split.test_items])
    assert np.isin(held, cold).all()
    assert len(held) + len(split.train_items) == len(inter)   # every cold interaction held out
    # each cold item is held out whole to one side, half of them each
    v, t = np.unique(split.valid_items), np.unique(split.test_items)
    assert not np.isin(v, t).any() and len(v) == len(cold) // 2 and len(t) == len(cold) - len(v)
    assert np.array_equal(split_of(cfg, inter).cold_items, cold)          # seeded
    other = split_of(load_config(None, ["data.split=cold_items", "data.cold_item_share=0.2",
                                        "run.seed=1"]), inter).cold_items
    assert not np.array_equal(other, cold)
    # distinct scores; cold items all on top: ranking among the cold items alone equals
    # the all-item ranking; cold items all at the bottom: only the all-item ranking suffers
    users = np.arange(inter.n_users)
    is_cold = torch.zeros(inter.n_items)
    is_cold[torch.from_numpy(cold)] = 1.0
    order = torch.arange(inter.n_items, dtype=torch.float32)

    def metrics(scores):
        return finalize(evaluate_users(lambda b: scores.expand(len(b), -1).clone(), split,
                                       users, "test", [10, 50]))
    top, bottom = metrics(1000 * is_cold + order), metrics(-1000 * is_cold + order)
    for k in ("HR@10", "HR@50", "NDCG@50"):
        assert top[f"cold:{k}"] == top[k] == bottom[f"cold:{k}"] > 0
        assert bottom[k] == 0.0
    assert top["users"] == bottom["users"] == int((np.diff(split.test_indptr) > 0).sum())


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
