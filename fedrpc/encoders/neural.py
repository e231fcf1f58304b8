"""Neural backends: sentence-transformers, open_clip (text and image towers), EfficientNet-Lite0.

This module imports torch at the top but every model library (sentence_transformers,
transformers, open_clip, efficientnet_lite_pytorch) only inside the function that needs
it; `fedrpc.encoders` imports this module only when a neural backend runs.

Every encoder takes the full list of texts/images and the `rows` to encode (the items
that have content) and returns a float32 [len(rows), D] array. Models run in eval mode
under `torch.inference_mode()`, in batches, on the configured device.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..config import ConfigError
from ..data.types import Image
from .images import load_batch
from .plan import Plan

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TF_LITE_MEAN, TF_LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
"""EfficientNet-Lite was trained on (x - 127) / 128 inputs (TF reference; timm's
tf_efficientnet_lite0 uses the same). Measured on the ML-100K posters: a franchise partner
(Star Wars / Empire / Jedi, Godfather I / II, ... 43 films) is among a poster's 5 nearest
neighbours for 33-35% of the films with this normalisation, 23% with ImageNet mean/std."""
EFFICIENTNET_SIZE = 224


def resolve_device(device: str) -> torch.device:
    """The torch device for `encoder.device`; on CUDA, peak-memory stats restart here."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"encoder.device: {device!r} requested but CUDA is not available "
                          "(use auto or cpu)")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return dev


def auto_batch(batch_size: int, device: torch.device, cpu: int, gpu: int) -> int:
    return batch_size or (gpu if device.type == "cuda" else cpu)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False)


def _chunks(rows: np.ndarray, batch: int) -> list[np.ndarray]:
    return [rows[i:i + batch] for i in range(0, len(rows), batch)]


# --------------------------------------------------------------------------- text
def encode_sentence(texts: Sequence[str], rows: np.ndarray, plan: Plan, device: torch.device,
                    batch: int, progress: bool) -> np.ndarray:
    """Mean-pooled sentence embeddings (the model folder's own pooling/normalisation)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar
    try:
        model = SentenceTransformer(plan.model, device=str(device), local_files_only=True)
    except Exception as e:
        raise ConfigError(f"{plan.where}.model: cannot load sentence model {plan.model!r} "
                          f"offline ({type(e).__name__}: {e}); give a local model folder") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if plan.spec.max_length:
        model.max_seq_length = plan.spec.max_length
    model.eval()
    # Longest texts first: batches of similar length waste little on padding.
    order = np.argsort([-len(texts[r]) for r in rows], kind="stable")
    outs = []
    with torch.inference_mode(), _progress(len(rows), f"{plan.where} sentence", progress) as bar:
        for chunk in _chunks(order, batch):
            outs.append(model.encode([texts[r] for r in rows[chunk]], batch_size=len(chunk),
                                     convert_to_numpy=True, show_progress_bar=False))
            bar.update(len(chunk))
    if not outs:
        return np.zeros((0, 0), np.float32)
    out = np.empty((len(rows), outs[0].shape[1]), np.float32)
    out[order] = np.concatenate(outs)
    return out


def load_clip(plan: Plan, device: torch.device, memo: dict):
    """(model, tokenizer, preprocess cfg) of an open_clip model; built once per memo."""
    key = ("open_clip", plan.model, plan.weights_path, str(device))
    if key in memo:
        return memo[key]
    import open_clip
    if plan.model not in open_clip.list_models():
        near = [m for m in open_clip.list_models() if plan.model.lower()[:5] in m.lower()]
        raise ConfigError(f"{plan.where}.model: unknown open_clip model {plan.model!r}"
                          + (f"; similar: {', '.join(near[:8])}" if near else
                             "; see open_clip.list_models()"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-weight runs (tests) are reproducible
        model = open_clip.create_model(plan.model, pretrained=None)
    if plan.weights_path:
        try:
            open_clip.load_checkpoint(model, plan.weights_path)
        except Exception as e:
            raise ConfigError(f"{plan.where}.checkpoint: {plan.weights_path}: cannot load into "
                              f"open_clip {plan.model} ({type(e).__name__}: {e})") from None
    model.eval().to(device)
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    memo[key] = (model, open_clip.get_tokenizer(plan.model), pre)
    return memo[key]


def encode_clip_text(texts: Sequence[str], rows: np.ndarray, plan: Plan, device: torch.device,
                     batch: int, progress: bool, memo: dict) -> np.ndarray:
    model, tokenizer, _ = load_clip(plan, device, memo)
    outs = []
    with torch.inference_mode(), _progress(len(rows), f"{plan.where} open_clip", progress) as bar:
        for chunk in _chunks(rows, batch):
            tok = tokenizer([texts[r] for r in chunk]).to(device)
            outs.append(model.encode_text(tok).float().cpu().numpy())
            bar.update(len(chunk))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- images
def _prefetched(images: Sequence[Image], chunks: list[np.ndarray], size: int,
                mode: str) -> Iterator[np.ndarray]:
    """Decoded batches, the next one decoded in a thread while the model runs."""
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load_batch, images, chunks[0], size, mode)
        for k in range(len(chunks)):
            cur = nxt.result()
            if k + 1 < len(chunks):
                nxt = pool.submit(load_batch, images, chunks[k + 1], size, mode)
            yield cur


def _run_images(images: Sequence[Image], rows: np.ndarray, forward: Callable, size: int,
                mode: str, mean, std, device: torch.device, batch: int, desc: str,
                progress: bool) -> np.ndarray:
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    outs = []
    with torch.inference_mode(), _progress(len(rows), desc, progress) as bar:
        for arr in _prefetched(images, _chunks(rows, batch), size, mode):
            # NHWC uint8 -> NCHW float; the permuted view is already channels_last.
            x = torch.from_numpy(arr).to(device, non_blocking=True).permute(0, 3, 1, 2)
            x = (x.float() / 255.0 - m) / s
            outs.append(forward(x).float().cpu().numpy())
            bar.update(len(arr))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def encode_clip_image(images: Sequence[Image], rows: np.ndarray, plan: Plan,
                      device: torch.device, batch: int, progress: bool,
                      memo: dict) -> np.ndarray:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    model, _, pre = load_clip(plan, device, memo)
    size = plan.spec.image_size or int(np.atleast_1d(pre.get("size", 224))[0])
    mode = plan.spec.resize
    if mode == "auto":
        mode = {"shortest": "crop", "longest": "pad", "squash": "squash"}.get(
            pre.get("resize_mode", "shortest"), "crop")
    return _run_images(images, rows, model.encode_image, size, mode,
                       pre.get("mean", OPENAI_DATASET_MEAN), pre.get("std", OPENAI_DATASET_STD),
                       device, batch, f"{plan.where} open_clip", progress)


def load_efficientnet_lite0(plan: Plan, device: torch.device):
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        state = torch.load(plan.weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise ConfigError(f"{plan.where}.checkpoint: {plan.weights_path}: not an "
                          f"EfficientNet-Lite0 state dict ({type(e).__name__}: {e})") from None
    model.eval().to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def encode_efficientnet(images: Sequence[Image], rows: np.ndarray, plan: Plan,
                        device: torch.device, batch: int, progress: bool) -> np.ndarray:
    """1280-d global-average-pooled features of the last conv block (before the classifier)."""
    model = load_efficientnet_lite0(plan, device)
    size = plan.spec.image_size or EFFICIENTNET_SIZE
    mode = "crop" if plan.spec.resize == "auto" else plan.spec.resize

    def forward(x):
        return model.extract_features(x).mean(dim=(2, 3))

    return _run_images(images, rows, forward, size, mode, TF_LITE_MEAN, TF_LITE_STD, device,
                       batch, f"{plan.where} efficientnet_lite0", progress)
