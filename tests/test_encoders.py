"""Server-side content encoders: builtin, sentence (MiniLM), EfficientNet-Lite0, open_clip,
masks for missing content, clear errors, the feature cache and lazy imports.

The real-weights tests read ML-100K from ../shared/data/ml-100k-mm and skip (saying so)
where it is absent. The whole module takes about a minute on 2 CPU cores: encoding all
1,682 ML-100K texts with MiniLM (~30 s) is the bulk.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedrpc.config import ConfigError, load_config
from fedrpc.data import DataError, ItemContent, catalogue_of, load_interactions, load_item_content
from fedrpc.encoders import ItemFeatures, encode_content
from fedrpc.encoders.cli import run_encode

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k-mm"
TINY_CLIP = "ViT-S-32-alt"  # the smallest open_clip architecture (43 M parameters)


def enc_cfg(tmp_path, *overrides):
    return load_config(None, [f"encoder.cache_dir={tmp_path / 'cache'}", *overrides]).encoder


def content_of(texts=None, images=None, **kw) -> ItemContent:
    n = len(texts if texts is not None else images)
    return ItemContent(np.arange(1, n + 1), texts=texts, images=images, **kw)


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def ml100k():
    if not (ML100K / "u.item").is_file():
        pytest.skip(f"MovieLens-100K with posters/overviews (ml-100k-mm) not found at {ML100K}; "
                    "the real-weights encoder tests need it")
    cfg = load_config(None, ["data.format=movielens", f"data.path={ML100K}"])
    inter = load_interactions(cfg)
    return load_item_content(cfg, catalogue_of(cfg, inter))


def rows_of(content, *ids):
    where = {int(i): r for r, i in enumerate(content.item_ids)}
    return [where[i] for i in ids]


# ------------------------------------------------------------------ builtin
TEXTS = ["the cat sat on the mat with another cat",
         "a cat sat on a mat",
         "quantum chromodynamics lecture notes for graduate students",
         "",
         None]


def test_builtin_text_shapes_masks_and_similarity(tmp_path):
    cfg = enc_cfg(tmp_path, "encoder.cache=false", "encoder.image.backend=none")
    f = encode_content(content_of(TEXTS), cfg, progress=False)
    assert isinstance(f, ItemFeatures) and f.image is None and not f.image_mask.any()
    assert f.text.shape == (5, 256) and f.text.dtype == np.float32
    assert f.text_mask.tolist() == [True, True, True, False, False]
    assert not f.text[3:].any() and f.info["text"]["missing"] == 2
    assert np.allclose(np.linalg.norm(f.text[:3], axis=1), 1.0, atol=1e-5)
    assert cos(f.text[0], f.text[1]) > abs(cos(f.text[0], f.text[2])) + 0.3
    again = encode_content(content_of(TEXTS), cfg, progress=False)
    np.testing.assert_array_equal(f.text, again.text)


def test_builtin_image_shapes_and_similarity(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    near = np.clip(a.astype(int) + rng.integers(-10, 11, a.shape), 0, 255).astype(np.uint8)
    far = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    cfg = enc_cfg(tmp_path, "encoder.cache=false", "encoder.text.backend=none")
    f = encode_content(content_of(images=[a, near, far, None]), cfg, progress=False)
    assert f.text is None and f.image.shape == (4, 3 * 8 * 8 + 64)
    assert f.image_mask.tolist() == [True, True, True, False] and not f.image[3].any()
    assert f.info["image"]["missing"] == 1
    assert cos(f.image[0], f.image[1]) > cos(f.image[0], f.image[2]) + 0.3
    again = encode_content(content_of(images=[a, near, far, None]), cfg, progress=False)
    np.testing.assert_array_equal(f.image, again.image)


def test_synthetic_quickstart_defaults(tmp_path):
    cfg = load_config(None, [f"encoder.cache_dir={tmp_path}"])
    content = load_item_content(cfg, catalogue_of(cfg, load_interactions(cfg)))
    f = encode_content(content, cfg.encoder, progress=False)
    assert f.dims() == {"text": 256, "image": 256}
    assert f.text_mask.all() and f.image_mask.all() and f.n_items == content.n_items
    assert f.info["text"]["backend"] == f.info["image"]["backend"] == "builtin"


def test_precomputed_features_take_precedence(tmp_path):
    pre = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 0.0]])
    content = content_of(["a b", "c d", "e f"], text_features=pre)
    f = encode_content(content, enc_cfg(tmp_path), progress=False)
    np.testing.assert_array_equal(f.text, pre.astype(np.float32))
    assert f.text_mask.tolist() == [True, False, True]
    assert f.info["text"]["source"] == "precomputed" and f.info["text"]["missing"] == 1
    assert f.image is None  # no images in this content
    # backend none is the no-content ablation: it drops precomputed features too
    off = encode_content(content, enc_cfg(tmp_path, "encoder.text.backend=none"), progress=False)
    assert off.text is None and not off.text_mask.any()
    assert off.info["text"]["source"] == "disabled"


# ------------------------------------------------------------------ cache
def test_cache_hit_identical_and_changed_text_reencodes(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (12, 8, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["red apple pie", "green apple tart", "blue sky"]
    cfg = enc_cfg(tmp_path)
    first = encode_content(content_of(texts, imgs), cfg, progress=False)
    assert first.info["text"]["cache"] == first.info["image"]["cache"] == "miss"
    second = encode_content(content_of(texts, imgs), cfg, progress=False)
    assert second.info["text"]["cache"] == second.info["image"]["cache"] == "hit"
    np.testing.assert_array_equal(first.text, second.text)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.text_mask, second.text_mask)
    changed = encode_content(content_of(["red apple pie", "green apple tart", "grey sky"], imgs),
                             cfg, progress=False)
    assert changed.info["text"]["cache"] == "miss" and changed.info["image"]["cache"] == "hit"
    assert not np.array_equal(changed.text[2], first.text[2])
    other_model = encode_content(content_of(texts, imgs), enc_cfg(tmp_path, "encoder.text.dim=128"),
                                 progress=False)
    assert other_model.info["text"]["cache"] == "miss" and other_model.text.shape == (3, 128)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert not [n for n in files if n.endswith(".tmp")]  # atomic writes leave no temp file
    assert len([n for n in files if n.startswith("text-")]) == 3


def test_cache_key_follows_image_file_content(tmp_path):
    from PIL import Image
    p = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
    cfg = enc_cfg(tmp_path, "encoder.text.backend=none")
    assert encode_content(content_of(images=[str(p)]), cfg, progress=False).info["image"]["cache"] == "miss"
    assert encode_content(content_of(images=[str(p)]), cfg, progress=False).info["image"]["cache"] == "hit"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(p)  # same path, new pixels
    assert encode_content(content_of(images=[str(p)]), cfg, progress=False).info["image"]["cache"] == "miss"


def test_corrupt_cache_entry_is_reencoded(tmp_path, caplog):
    cfg = enc_cfg(tmp_path, "encoder.image.backend=none")
    f = encode_content(content_of(["x y"]), cfg, progress=False)
    Path(f.info["text"]["cache_file"]).write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        g = encode_content(content_of(["x y"]), cfg, progress=False)
    assert g.info["text"]["cache"] == "miss" and "unreadable feature cache" in caplog.text
    np.testing.assert_array_equal(f.text, g.text)


# ------------------------------------------------------------------ errors
def test_corrupt_image_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    for backend in ("builtin", "efficientnet_lite0"):
        cfg = enc_cfg(tmp_path, "encoder.cache=false", "encoder.text.backend=none",
                      f"encoder.image.backend={backend}")
        content = content_of(images=[np.zeros((8, 8, 3), np.uint8), str(bad), None])
        with pytest.raises(DataError, match="broken.jpg: cannot read image"):
            encode_content(content, cfg, progress=False)


def test_missing_image_file_path_is_an_error(tmp_path):
    cfg = enc_cfg(tmp_path, "encoder.text.backend=none")
    with pytest.raises(DataError, match="nowhere.jpg: image file not found"):
        encode_content(content_of(images=[str(tmp_path / "nowhere.jpg")]), cfg, progress=False)


@pytest.mark.parametrize("overrides, match", [
    (["encoder.text.backend=word2vec"], "encoder.text.backend: must be one of"),
    (["encoder.image.backend=resnet"], "encoder.image.backend: must be one of"),
    (["encoder.image.backend=open_clip"], "encoder.image.checkpoint: open_clip needs a local"),
    (["encoder.text.checkpoint=/x.pt"], "encoder.text.checkpoint: not used by backend 'builtin'"),
    (["encoder.text.bogus=1"], "encoder.text.bogus: unknown key"),
    (["encoder.image.batch_size=-1"], "encoder.image.batch_size: must be >= 0"),
    (["encoder.device=tpu"], "encoder.device: must be auto"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    for modality, backend in (("image", "efficientnet_lite0"), ("image", "open_clip"),
                              ("text", "open_clip")):
        cfg = enc_cfg(tmp_path, f"encoder.{modality}.backend={backend}",
                      f"encoder.{modality}.checkpoint={tmp_path / 'missing.pt'}")
        with pytest.raises(ConfigError, match=rf"encoder.{modality}.checkpoint: checkpoint file "
                                              r"not found: .*missing.pt"):
            encode_content(content_of(["a"], [np.zeros((4, 4, 3), np.uint8)]), cfg, progress=False)


def test_sentence_model_folder_not_found(tmp_path):
    cfg = enc_cfg(tmp_path, "encoder.image.backend=none", "encoder.text.backend=sentence",
                  f"encoder.text.model={tmp_path / 'no-such-model'}")
    with pytest.raises(ConfigError, match="encoder.text.model: model folder not found: .*no-such-model"):
        encode_content(content_of(["a"]), cfg, progress=False)


# ------------------------------------------------------------------ open_clip (random weights)
def clip_overrides(modality, *extra):
    return [f"encoder.{modality}.backend=open_clip", f"encoder.{modality}.model={TINY_CLIP}",
            *extra]


def test_open_clip_random_weights_warns_and_checkpoint_loads(tmp_path, caplog):
    import open_clip
    import torch
    rng = np.random.default_rng(0)
    content = content_of(["a red car", "a blue boat", None],
                         [rng.integers(0, 256, (30, 20, 3), dtype=np.uint8), None,
                          rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)])
    rand = [*clip_overrides("text", "encoder.text.allow_random_weights=true"),
            *clip_overrides("image", "encoder.image.allow_random_weights=true")]
    with caplog.at_level(logging.WARNING, logger="fedrpc.encoders"):
        f = encode_content(content, enc_cfg(tmp_path, *rand), progress=False)
    embed = open_clip.get_model_config(TINY_CLIP)["embed_dim"]
    assert f.text.shape == (3, embed) and f.image.shape == (3, embed)
    assert f.text_mask.tolist() == [True, True, False]
    assert f.image_mask.tolist() == [True, False, True] and not f.image[1].any()
    warnings = [r for r in caplog.records if "RANDOM WEIGHTS" in r.getMessage()]
    assert {r.levelno for r in warnings} == {logging.WARNING} and len(warnings) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedrpc.encoders"):  # cache hit: warns again
        hit = encode_content(content, enc_cfg(tmp_path, *rand), progress=False)
    assert hit.info["image"]["cache"] == "hit" and "RANDOM WEIGHTS" in caplog.text

    # A checkpoint (another random init, saved to disk) loads through the config option.
    torch.manual_seed(123)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedrpc.encoders"):
        g = encode_content(content, enc_cfg(tmp_path, *clip_overrides("text", f"encoder.text.checkpoint={ckpt}"),
                                            *clip_overrides("image", f"encoder.image.checkpoint={ckpt}")),
                           progress=False)
    assert "RANDOM WEIGHTS" not in caplog.text
    assert g.info["image"]["weights"] == str(ckpt.resolve())
    assert not np.allclose(g.image[0], f.image[0])
    with torch.inference_mode():  # the same numbers as the checkpointed model itself
        want = model.eval().encode_text(open_clip.get_tokenizer(TINY_CLIP)(["a red car"]))[0]
    np.testing.assert_allclose(g.text[0], (want / want.norm()).numpy(), atol=1e-5)

    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.nothing": torch.zeros(1)}, wrong)
    with pytest.raises(ConfigError, match="encoder.image.checkpoint: .*wrong.pt: cannot load"):
        encode_content(content, enc_cfg(tmp_path, "encoder.text.backend=none",
                                        *clip_overrides("image", f"encoder.image.checkpoint={wrong}")),
                       progress=False)


def test_open_clip_unknown_model_is_a_clear_error(tmp_path):
    cfg = enc_cfg(tmp_path, "encoder.image.backend=none", "encoder.text.backend=open_clip",
                  "encoder.text.model=ViT-Q-99", "encoder.text.allow_random_weights=true")
    with pytest.raises(ConfigError, match="encoder.text.model: unknown open_clip model 'ViT-Q-99'"):
        encode_content(content_of(["a"]), cfg, progress=False)


# ------------------------------------------------------------------ real weights on ML-100K
@pytest.mark.timeout(600)
def test_minilm_star_wars_neighbours_on_all_ml100k_texts(ml100k, tmp_path):
    cfg = enc_cfg(tmp_path, "encoder.text.backend=sentence", "encoder.image.backend=none")
    f = encode_content(ml100k, cfg, progress=False)
    assert f.text.shape == (1682, 384) and f.text_mask.all()
    assert f.info["text"]["model"] == "all-MiniLM-L6-v2"
    sims = f.text @ f.text.T  # rows are unit length: cosine
    star_wars, empire = rows_of(ml100k, 50, 172)
    top5 = lambda r: set(np.argsort(-sims[r])[1:6].tolist())  # noqa: E731 (0 is itself)
    assert empire in top5(star_wars) and star_wars in top5(empire)
    hit = encode_content(ml100k, cfg, progress=False)
    assert hit.info["text"]["cache"] == "hit"
    np.testing.assert_array_equal(hit.text, f.text)


@pytest.mark.timeout(600)
def test_efficientnet_lite0_finds_a_resized_poster(ml100k, tmp_path):
    from PIL import Image
    # ~300 items: every 5th of the catalogue, plus Star Wars (id 50) and items without poster.
    rows = sorted(set(range(0, 1682, 6)) | set(rows_of(ml100k, 50))
                  | {i for i, im in enumerate(ml100k.images) if im is None})
    images = [ml100k.images[r] for r in rows]
    n_missing = sum(im is None for im in images)
    poster = Image.open(ml100k.images[rows_of(ml100k, 50)[0]]).convert("RGB")
    images.append(np.asarray(poster.resize((poster.width * 9 // 10, poster.height * 9 // 10))))
    cfg = enc_cfg(tmp_path, "encoder.cache=false", "encoder.text.backend=none",
                  "encoder.image.backend=efficientnet_lite0")
    f = encode_content(content_of(images=images), cfg, progress=False)
    assert f.image.shape == (len(images), 1280) and n_missing == 19
    assert f.info["image"]["missing"] == n_missing == int((~f.image_mask).sum())
    assert not f.image[~f.image_mask].any()
    sims = f.image[:-1] @ f.image[-1]
    assert rows[int(np.argmax(sims))] == rows_of(ml100k, 50)[0]


# ------------------------------------------------------------------ run_encode
def test_run_encode_summary_and_cache_hit(tmp_path):
    over = [f"encoder.cache_dir={tmp_path / 'cache'}", f"run.out_dir={tmp_path / 'run'}",
            "run.progress=false", "data.synthetic.items=60", "data.synthetic.users=20",
            "data.synthetic.mean_interactions=10"]
    s = run_encode(load_config(None, over))
    assert s["text"]["cache"] == s["image"]["cache"] == "miss"
    assert s["text"]["dim"] == 256 and s["image"]["missing"] == 0 and s["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "run" / "encode_summary.json").read_text())["items"] == s["items"]
    s2 = run_encode(load_config(None, over))
    assert s2["text"]["cache"] == s2["image"]["cache"] == "hit"


# ------------------------------------------------------------------ lazy imports
HEAVY = ("open_clip", "transformers", "timm", "sentence_transformers", "efficientnet_lite_pytorch")


def test_importing_fedrpc_does_not_import_model_libraries():
    code = f"""
import sys, json
import fedrpc, fedrpc.config, fedrpc.data, fedrpc.encoders, fedrpc.encoders.cli
from fedrpc.config import load_config
from fedrpc.encoders import encode_content
from fedrpc.data import ItemContent
import numpy as np
cfg = load_config(None, ["encoder.cache=false"]).encoder   # builtin encoders only
f = encode_content(ItemContent(np.arange(2), {TEXTS[:2]!r}, [np.zeros((4, 4, 3), np.uint8)] * 2),
                   cfg, progress=False)
print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules],
                  "text": f.text.tolist()}}))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    # The builtin text encoder gives the same numbers in another process / hash seed.
    here = encode_content(content_of(TEXTS[:2]), load_config(None, ["encoder.cache=false"]).encoder,
                          progress=False)
    np.testing.assert_allclose(np.array(res["text"], np.float32), here.text, atol=0)
