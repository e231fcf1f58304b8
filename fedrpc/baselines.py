"""Non-federated reference points evaluated through the federated evaluation code path:
random scoring (chance), popularity (the floor every model must beat) and centralised
matrix factorisation (the ceiling federated training is measured against), with a grid
search of its Adam learning rate and weight decay on the validation split."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .config import Config, ConfigError
from .data import load_interactions, split_of
from .data.types import Split
from .metrics import COLD, evaluate_users, finalize

RANDOM_PURPOSE = 7_001
"""The random-scoring baseline's stream: user_rng-style seeds (run.seed, purpose, user),
distinct from every training and evaluation stream."""

DEFAULT_LRS = (0.002, 0.005, 0.02)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-5, 1e-4)


def popularity_scores(train_items: np.ndarray, n_items: int) -> torch.Tensor:
    """Score of an item = its number of training interactions."""
    return torch.from_numpy(np.bincount(train_items, minlength=n_items).astype(np.float64))


def _evaluate(cfg: Config, split: Split, score: Callable[[np.ndarray], torch.Tensor]) -> dict:
    users = np.arange(split.n_users)
    sums = evaluate_users(score, split, users, ["valid", "test"], cfg.eval.ks, cfg.eval.mode,
                          cfg.eval.sampled_negatives, cfg.run.seed, cfg.eval.batch_users)
    return {which: finalize(sums[which]) for which in ("valid", "test")}


def run_popularity(cfg: Config) -> dict:
    """Validation and test metrics of the popularity recommender."""
    split = split_of(cfg, load_interactions(cfg))
    pop = popularity_scores(split.train_items, split.n_items)
    return _evaluate(cfg, split, lambda b: pop.expand(len(b), -1))


def random_scores(seed: int, users: np.ndarray, n_items: int) -> torch.Tensor:
    """[len(users), n_items] scores drawn uniformly in [0, 1), one seeded stream per user
    (seed, purpose, user): a user's scores do not depend on the batch it is scored in."""
    return torch.from_numpy(np.stack([
        np.random.default_rng([seed, RANDOM_PURPOSE, int(u)]).random(n_items)
        for u in users]) if len(users) else np.zeros((0, n_items)))


def run_random(cfg: Config) -> dict:
    """Validation and test metrics of scoring every item at random (seeded by run.seed):
    the chance level of each metric, including the `cold:` ones of data.split=cold_items,
    where the held-out item is ranked among the few cold items alone."""
    split = split_of(cfg, load_interactions(cfg))
    return _evaluate(cfg, split, lambda b: random_scores(cfg.run.seed, b, split.n_items))


def _check_mf_args(epochs: int, lrs: Sequence[float], weight_decays: Sequence[float]) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs: must be an integer >= 1, got {epochs!r}")
    if not lrs:
        raise ConfigError("--lr: needs at least one learning rate")
    if not weight_decays:
        raise ConfigError("--weight-decay: needs at least one value")
    for lr in lrs:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigError(f"--lr: a learning rate must be a finite number > 0, got {lr!r}")
    for wd in weight_decays:
        if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
            raise ConfigError(f"--weight-decay: must be a finite number >= 0, got {wd!r}")


def _mf_history(cfg: Config, split: Split, epochs: int, lr: float, weight_decay: float,
                batch_size: int) -> list[dict]:
    """Train centralised MF for `epochs` epochs; validation and test metrics after each."""
    from .data.sampling import negatives_for_users

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
            metrics = _evaluate(cfg, split, lambda b: user_emb[torch.from_numpy(b)] @ item_emb.T)
        history.append({"round": epoch, "metrics": metrics})
    return history


def select_metric(cfg: Config, metric: Optional[str] = None) -> str:
    """The validation metric that picks the epoch (and the grid point): `metric`, or
    NDCG@K with K = eval.ks[0] (cold:NDCG@K on a cold-item split, as federated runs
    select). A one-line error for a name evaluation does not report."""
    names = [f"{m}@{k}" for k in cfg.eval.ks for m in ("HR", "NDCG", "Recall")] + ["MRR"]
    cold = cfg.data.split == "cold_items" and cfg.eval.mode == "full"
    if cold:
        names += [COLD + n for n in names]
    metric = metric or f"{COLD if cold else ''}NDCG@{cfg.eval.ks[0]}"
    if metric not in names:
        hint = (" (cold: metrics need data.split=cold_items and eval.mode=full)"
                if metric.startswith(COLD) else "")
        raise ConfigError(f"--select: unknown metric {metric!r}{hint}; one of {', '.join(names)}")
    return metric


def _select_epoch(history: list[dict], k: int, metric: str) -> dict:
    """The test at the best validation `metric` epoch (ties: the earlier epoch); with the
    metric a federated run selects by (NDCG@k, cold:NDCG@k on a cold-item split), exactly
    what its summary reports."""
    from .server import best_rounds, selection_prefix
    if metric == f"{selection_prefix(history, k)}NDCG@{k}":
        return best_rounds(history, k)
    best = max(history, key=lambda h: (h["metrics"]["valid"][metric], -h["round"]))
    return {"best_round": best["round"], "selected_by": f"valid {metric}",
            "valid": best["metrics"]["valid"], "test": best["metrics"]["test"]}


def run_central_mf(cfg: Config, epochs: int = 30, lr: float = 0.005, batch_size: int = 1024,
                   weight_decay: float = 1e-6, select: Optional[str] = None) -> dict:
    """Centralised matrix factorisation on all training interactions: the ceiling that
    federated training is measured against. BCE with `fed.num_negatives` fresh negatives
    per positive each epoch (the same per-user sampler as the clients), Adam, the same
    evaluation; reports the test at the best validation epoch by `select` (default
    NDCG@K, K = eval.ks[0])."""
    _check_mf_args(epochs, [lr], [weight_decay])
    metric = select_metric(cfg, select)
    split = split_of(cfg, load_interactions(cfg))
    history = _mf_history(cfg, split, epochs, lr, weight_decay, batch_size)
    return {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
            **_select_epoch(history, cfg.eval.ks[0], metric)}


def tune_central_mf(cfg: Config, lrs: Sequence[float] = DEFAULT_LRS,
                    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, epochs: int = 30,
                    batch_size: int = 1024, progress: bool = False,
                    on_point: Optional[Callable[[dict], None]] = None,
                    select: Optional[str] = None) -> dict:
    """Centralised MF tuned on the validation split: every (lr, weight_decay) of the grid
    trains for `epochs` epochs; a point's score is its best validation metric over the
    epochs (`select`, default NDCG@K with K = eval.ks[0]), and the chosen point is the
    grid's best score (ties: the earlier point in grid order, lr-major, then the earlier
    epoch). Test metrics are read only at the chosen (lr, weight_decay, epoch) and never
    take part in the choice.

    Returns the run_central_mf result of the chosen point plus "tune": the grid (each
    point's best validation metric, its epoch and the test there), the chosen point, and
    "constant": true when the metric was the same at every point and epoch (the choice
    is then the first point, and says nothing)."""
    from tqdm.auto import tqdm

    lrs, weight_decays = [float(x) for x in lrs], [float(x) for x in weight_decays]
    _check_mf_args(epochs, lrs, weight_decays)
    metric = select_metric(cfg, select)
    k = cfg.eval.ks[0]
    key = f"valid {metric}"
    split = split_of(cfg, load_interactions(cfg))
    grid, results, seen = [], [], set()
    points = [(lr, wd) for lr in lrs for wd in weight_decays]
    with tqdm(total=len(points), desc="mf grid", unit="point", disable=not progress) as bar:
        for lr, wd in points:
            history = _mf_history(cfg, split, epochs, lr, wd, batch_size)
            seen.update(h["metrics"]["valid"][metric] for h in history)
            res = _select_epoch(history, k, metric)
            row = {"lr": lr, "weight_decay": wd, "best_epoch": res["best_round"],
                   key: res["valid"][metric], f"valid HR@{k}": res["valid"][f"HR@{k}"],
                   "test": res["test"]}
            grid.append(row)
            results.append(res)
            if on_point is not None:
                on_point(row)
            bar.set_postfix({"lr": lr, "wd": wd, metric: f"{res['valid'][metric]:.4f}"},
                            refresh=False)
            bar.update(1)
    best = max(range(len(grid)), key=lambda j: (grid[j][key], -j))
    chosen = {"lr": grid[best]["lr"], "weight_decay": grid[best]["weight_decay"],
              "best_epoch": grid[best]["best_epoch"], key: grid[best][key]}
    return {"epochs": epochs, "lr": chosen["lr"], "weight_decay": chosen["weight_decay"],
            **results[best],
            "tune": {"metric": metric,
                     "selected_by": f"best {key} over the grid and epochs; test only at "
                                    "the chosen point",
                     "lrs": lrs, "weight_decays": weight_decays, "epochs": epochs,
                     "constant": len(seen) == 1, "grid": grid, "chosen": chosen}}


# ------------------------------------------------------------------ content profile
DEFAULT_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def content_vectors(cfg: Config, inter) -> tuple[torch.Tensor, str]:
    """Each item's content vector [I, r] as the federation's clients get it
    (`algorithms.profile_vectors` of the standardised features gfmfr.profile_features
    names, gfmfr.profile_dims), and the name of the feature set. Encodes through the
    config's encoders (and their cache), on this machine."""
    from .algorithms import PROFILE_FEATURES, profile_vectors
    from .data.dataset import catalogue_of
    from .data.types import DataError
    from .runtime import server_features
    which = cfg.gfmfr.profile_features
    name, x = server_features(cfg, catalogue_of(cfg, inter)).combined(which)
    if x is None:
        what = PROFILE_FEATURES[which][1] + ("" if which == "all" else
                                             f" (gfmfr.profile_features={which})")
        raise DataError(f"--model content needs item content: the data has no item {what}, "
                        "or encoder.text.backend / encoder.image.backend are none")
    return profile_vectors(x, cfg.gfmfr.profile_dims), name


def content_scores(z: torch.Tensor, split: Split, users: np.ndarray, log_pop: torch.Tensor,
                   alpha: float) -> torch.Tensor:
    """[len(users), I]: each user's profile scores (`algorithms.profile_scores`: the mean
    cosine similarity of an item's content to the content of the user's training items,
    standardised over the items) plus `alpha` times the standardised
    log(1 + training popularity) `log_pop` [I]."""
    from .algorithms import profile_scores
    s = profile_scores(z, split.train_indptr, split.train_items, users)
    return s + alpha * log_pop.to(s.dtype)


def run_content(cfg: Config, alphas: Sequence[float] = (0.0,),
                select: Optional[str] = None) -> dict:
    """The content-profile recommender (`content_scores`) with the popularity weight
    alpha: one value, or a grid chosen on the validation metric `select` (default as
    `select_metric`; ties: the earlier alpha), test read only at the chosen alpha. Not
    federated: popularity needs everyone's interactions."""
    from .algorithms import standardise_rows
    alphas = [float(a) for a in alphas]
    if not alphas or any(not math.isfinite(a) or a < 0 for a in alphas):
        raise ConfigError(f"--alpha: finite values >= 0 needed, got {alphas}")
    metric = select_metric(cfg, select)
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    z, features = content_vectors(cfg, inter)
    lp = standardise_rows(torch.log1p(popularity_scores(split.train_items,
                                                       split.n_items))[None])[0]
    grid = []
    for a in alphas:
        res = _evaluate(cfg, split, lambda b, a=a: content_scores(z, split, b, lp, a))
        grid.append({"alpha": a, f"valid {metric}": res["valid"][metric], **res})
    best = max(range(len(grid)), key=lambda j: (grid[j][f"valid {metric}"], -j))
    out = {"alpha": grid[best]["alpha"], "features": features,
           "valid": grid[best]["valid"], "test": grid[best]["test"]}
    if len(alphas) > 1:
        out["tune"] = {"metric": metric, "alphas": alphas,
                       "grid": [{"alpha": g["alpha"], f"valid {metric}": g[f"valid {metric}"],
                                 "test": g["test"]} for g in grid]}
    return out
