"""Non-federated reference points evaluated through the federated evaluation code path:
popularity (the floor every model must beat) and centralised matrix factorisation (the
ceiling federated training is measured against)."""
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


def run_central_mf(cfg: Config, epochs: int = 30, lr: float = 0.005, batch_size: int = 1024,
                   weight_decay: float = 1e-6) -> dict:
    """Centralised matrix factorisation on all training interactions: the ceiling that
    federated training is measured against. BCE with `fed.num_negatives` fresh negatives
    per positive each epoch (the same per-user sampler as the clients), Adam, the same
    evaluation; reports the test at the best validation NDCG@K epoch."""
    from .data.sampling import negatives_for_users
    from .server import best_rounds

    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    U, I, d = split.n_users, split.n_items, cfg.fed.latent_dim
    gen = torch.Generator().manual_seed(cfg.run.seed)
    user_emb = torch.nn.Parameter(torch.randn(U, d, generator=gen) * 0.1)
    item_emb = torch.nn.Parameter(torch.randn(I, d, generator=gen) * 0.1)
    opt = torch.optim.Adam([user_emb, item_emb], lr=lr, weight_decay=weight_decay)
    users = np.arange(U)
    pos_u = np.repeat(users, np.diff(split.train_indptr))
    history = []
    for epoch in range(epochs):
        counts = np.diff(split.train_indptr) * cfg.fed.num_negatives
        negs = negatives_for_users(cfg.run.seed, epoch, users, I, split.train_indptr,
                                   split.train_items, counts)
        u = np.concatenate([pos_u, np.repeat(users, counts)])
        i = np.concatenate([split.train_items, np.concatenate(negs)])
        y = np.concatenate([np.ones(len(pos_u)), np.zeros(int(counts.sum()))]).astype(np.float32)
        perm = torch.randperm(len(u), generator=gen)
        u, i, y = torch.from_numpy(u)[perm], torch.from_numpy(i)[perm], torch.from_numpy(y)[perm]
        for s in range(0, len(u), batch_size):
            bu, bi, by = u[s:s + batch_size], i[s:s + batch_size], y[s:s + batch_size]
            logit = (user_emb[bu] * item_emb[bi]).sum(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, by)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = lambda b: user_emb[torch.from_numpy(b)] @ item_emb.T
            sums = evaluate_users(score, split, users, ["valid", "test"], cfg.eval.ks,
                                  cfg.eval.mode, cfg.eval.sampled_negatives, cfg.run.seed,
                                  cfg.eval.batch_users)
        history.append({"round": epoch, "metrics": {k: finalize(v) for k, v in sums.items()}})
    return {"epochs": epochs, **best_rounds(history, cfg.eval.ks[0])}
