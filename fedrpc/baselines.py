"""Non-federated reference points evaluated through the federated evaluation code path:
popularity (the floor every model must beat)."""
from __future__ import annotations

import numpy as np
import torch

from .config import Config
from .data import load_interactions, split_of
from .metrics import evaluate_users, finalize


def popularity_scores(train_items: np.ndarray, n_items: int) -> torch.Tensor:
    """Score of an item = its number of training interactions."""
    return torch.from_numpy(np.bincount(train_items, minlength=n_items).astype(np.float64))


def run_popularity(cfg: Config) -> dict:
    """Validation and test metrics of the popularity recommender."""
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    pop = popularity_scores(split.train_items, split.n_items)
    users = np.arange(split.n_users)
    out = {}
    for which in ("valid", "test"):
        sums = evaluate_users(lambda b: pop.expand(len(b), -1), split, users, which,
                              cfg.eval.ks, cfg.eval.mode, cfg.eval.sampled_negatives,
                              cfg.run.seed, cfg.eval.batch_users)
        out[which] = finalize(sums)
    return out
