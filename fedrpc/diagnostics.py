"""Diagnostics: `fedrpc diagnose teacher` and `fedrpc diagnose content`.

`diagnose teacher` — is the group-fusion teacher worth distilling from?

Runs the federation in this process (the in-process transport) and, every `every`
rounds, scores each user's items with candidate teachers of its group and evaluates them
like a recommender (test split, full ranking, the run's metrics):

- teacher head(F) / output(F): the two `gfmfr.teacher` formulas on the fused item
  embeddings F_k (what clients receive);
- head(C_bar) / output(C_bar): the same on the group targets C_bar_k themselves, i.e.
  the teacher without the content (no fusion model);
- group popularity: how often the group's members interacted with each item — an
  oracle that needs the interactions, so it is a diagnostic only, never federated;
- popularity, and the students (the federated model's own test metrics).

A teacher below popularity can only pull the students towards something worse than
what they already know.

`diagnose content` — can the item content predict what the interactions teach?

Before any training: a ridge regression from the content features (text, image, both)
to what collaborative filtering learns about items, its R^2 cross-validated over items
(k folds, seeded): the items' log training popularity, their factors in the training
interactions (the top fed.latent_dim right singular vectors of the binary user x item
training matrix, scaled by the singular values; items with an interaction), and, given a
checkpoint, the item table a run learnt (the same items). R^2 <= 0 means the content
predicts the target no better than the target's mean: whatever the content then adds
to a model cannot come from what the interactions teach. Interactions are read here, so
this is a diagnostic for the data's owner, never a federated computation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import algorithms as alg
from .baselines import popularity_scores
from .config import Config
from .data import load_interactions
from .data.dataset import catalogue_of, split_of
from .data.types import DataError
from .metrics import evaluate_users, finalize
from .runtime import rank_device, server_features
from .server import Server
from .strategy import GFMFR, make_backbone_from
from .state import (SERVER_FILE, describe_differences, incompatibility, read_checkpoint,
                    result_config)
from .transport.local import LocalTransport
from .worker import Worker


class _Recording(GFMFR):
    """The strategy, keeping what its latest teacher was made from (memory: one item
    table per client)."""
    last = None

    def teacher(self, state, fused, up, labels):
        self.last = (fused, up, labels)
        return super().teacher(state, fused, up, labels)


def _teachers(srv: Server) -> dict[str, torch.Tensor]:
    """Candidate teachers' logits [G, I] (higher = preferred)."""
    cfg, (fused, up, labels) = srv.cfg, srv.strategy.last
    targets, _ = alg.group_targets(up.shared[srv.backbone.item_table], labels, cfg.gfmfr.groups,
                                   cfg.gfmfr.min_group_size, cfg.gfmfr.outlier_factor)
    with torch.no_grad():
        return {f"{kind}({name})": srv.strategy.group_logits(srv.state, E, up, labels, kind)
                for name, E in (("F", fused), ("C_bar", targets)) for kind in ("head", "output")}


def diagnose_teacher(cfg: Config, every: int = 5, progress=print) -> list[dict]:
    """Run cfg.fed.rounds rounds in process; every `every` rounds (and at the last) print
    and return each candidate's test metrics."""
    if not cfg.gfmfr.enabled:
        raise ValueError("gfmfr.enabled=false: there is no teacher to diagnose")
    inter = load_interactions(cfg)
    device = rank_device(cfg.run.device)
    workers = {1: Worker(cfg, 1, 1, inter, device)}
    transport = LocalTransport(workers)
    records = []
    try:
        srv = Server(cfg, transport, None, device)
        srv.strategy = _Recording(cfg, None, device)
        srv.features = server_features(cfg, srv.catalogue)
        split, users, ks = workers[1].split, srv.users, cfg.eval.ks

        def evaluate(scores_of_user) -> dict:
            return finalize(evaluate_users(scores_of_user, split, users, "test", ks))

        pop = popularity_scores(split.train_items, srv.catalogue.n_items)
        pop_m = evaluate(lambda b: pop.expand(len(b), -1))
        for r in range(cfg.fed.rounds):
            rec = srv.run_round(r)
            if (r + 1) % every and r != cfg.fed.rounds - 1:
                continue
            group = torch.from_numpy(srv.state.group_of_user)
            cands = _teachers(srv)
            counts = torch.zeros(cfg.gfmfr.groups, srv.catalogue.n_items)
            for u in users.tolist():
                if group[u] >= 0:
                    counts[group[u], split.train_items[split.train_indptr[u]:split.train_indptr[u + 1]]] += 1
            cands["group popularity (oracle)"] = counts + 1e-3 * pop   # ties by popularity
            res = {"round": r, "popularity": pop_m,
                   "students": (rec.get("metrics") or {}).get("test")}
            for name, s in cands.items():
                res[name] = evaluate(lambda b, s=s: s[group[b].clamp(min=0)])
            res["teacher_std_over_items"] = float(torch.sigmoid(cands[f"{cfg.gfmfr.teacher}(F)"]).std(1).mean())
            records.append(res)
            progress(_format(res, ks[0]))
    finally:
        transport.close()
    return records


def _format(res: dict, k: int) -> str:
    lines = [f"round {res['round']}  (test HR@{k} / NDCG@{k}; teacher std over items "
             f"{res['teacher_std_over_items']:.4f})"]
    for name, m in res.items():
        if isinstance(m, dict):
            lines.append(f"  {name:<28} {m[f'HR@{k}']:.4f} / {m[f'NDCG@{k}']:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------- diagnose content
RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4)


def ridge_cv_r2(X: torch.Tensor, Y: torch.Tensor, folds: int, seed: int,
                alphas=RIDGE_ALPHAS) -> dict[float, float]:
    """Out-of-fold R^2 of a ridge regression X -> Y (both [n, *]) at each penalty alpha:
    1 - sum of squared errors / sum of squares around each training fold's mean (so a
    constant prediction scores <= 0). One eigendecomposition per fold serves every alpha."""
    n = X.shape[0]
    order = np.random.default_rng([seed, 0xC0DE]).permutation(n)
    sse = {a: 0.0 for a in alphas}
    sst = 0.0
    for part in np.array_split(order, folds):
        test = torch.from_numpy(np.sort(part))
        train = torch.from_numpy(np.setdiff1d(order, part))
        mx, my = X[train].mean(0), Y[train].mean(0)
        xt, yt = X[train] - mx, Y[train] - my
        evals, evecs = torch.linalg.eigh(xt.T @ xt)
        proj = evecs.T @ (xt.T @ yt)
        xv = (X[test] - mx) @ evecs
        sst += float((Y[test] - my).pow(2).sum())
        for a in alphas:
            pred = xv @ (proj / (evals.clamp_min(0) + a)[:, None])
            sse[a] += float((Y[test] - my - pred).pow(2).sum())
    return {a: 1.0 - sse[a] / sst for a in alphas}


def interaction_factors(split, trained: np.ndarray, k: int, seed: int) -> torch.Tensor:
    """The top-k factors V_k S_k of the binary user x item training matrix (randomised
    SVD, seeded) of the items `trained` (those with a training interaction)."""
    users = np.repeat(np.arange(split.n_users), np.diff(split.train_indptr))
    m = torch.sparse_coo_tensor(torch.from_numpy(np.stack([users, split.train_items])),
                                torch.ones(len(users), dtype=torch.float64),
                                (split.n_users, split.n_items), check_invariants=True).coalesce()
    m = torch.sparse_coo_tensor(m.indices(), torch.ones_like(m.values()), m.shape,
                                check_invariants=True)
    k = max(1, min(k, len(trained) - 1, split.n_users - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(m, q=k, niter=6)
    return (v * s)[torch.from_numpy(trained)]


def _checkpoint_table(cfg: Config, folder: Path, n_items: int) -> torch.Tensor:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such checkpoint folder (give "
                        f"run.out_dir/checkpoints/round-NNNNNN)")
    saved = read_checkpoint(folder)["config"]        # every file against its hash
    current = result_config(cfg, {})
    same = ["fed.backbone", "fed.latent_dim"] + [k for k in current if k.startswith("data.")]
    if cfg.data.split == "cold_items":
        same.append("run.seed")                      # it picks the cold items
    diff = incompatibility(saved, current, same)
    if diff:
        raise DataError(f"{folder}: written with other data or another model: "
                        + describe_differences(saved, current, diff))
    shared = torch.load(folder / SERVER_FILE, weights_only=True)["shared"]
    table = shared[make_backbone_from(cfg).item_table].double()   # same fed.backbone
    if table.shape[0] < n_items:
        raise DataError(f"{folder}: its item table has {table.shape[0]} rows, the data "
                        f"{n_items} items (a checkpoint of other data?)")
    return table[:n_items]


def diagnose_content(cfg: Config, checkpoint: Optional[str] = None, folds: int = 5,
                     progress=print) -> list[dict]:
    """One record per (target, feature set): items, the best penalty and its R^2, and the
    R^2 at every penalty tried."""
    if folds < 2:
        raise ValueError(f"--folds must be >= 2, got {folds}")
    inter = load_interactions(cfg)
    split = split_of(cfg, inter)
    n = inter.n_items
    # a bad checkpoint fails before the (possibly long) encoding
    table = _checkpoint_table(cfg, Path(checkpoint), n) if checkpoint else None
    fx = server_features(cfg, catalogue_of(cfg, inter))
    sets = fx.standardised()
    if not sets:
        raise DataError("no content features to diagnose: the data has no item texts or "
                        "images, or encoder.text.backend / encoder.image.backend are none")

    counts = np.bincount(split.train_items, minlength=n)
    trained = np.flatnonzero(counts)
    factors = interaction_factors(split, trained, cfg.fed.latent_dim, cfg.run.seed)
    targets = {"log training popularity": (np.arange(n), torch.from_numpy(np.log1p(counts))[:, None]),
               f"interaction factors (k={factors.shape[1]})": (trained, factors)}
    if table is not None:
        targets[f"item table of {checkpoint}"] = (trained, table[torch.from_numpy(trained)])
    records = []
    for tname, (items, Y) in targets.items():
        if len(items) < folds:
            raise DataError(f"{tname}: {len(items)} items, fewer than --folds {folds}")
        for fname, X in sets.items():
            r2 = ridge_cv_r2(X[torch.from_numpy(items)], Y.double(), folds, cfg.run.seed)
            best = max(r2, key=r2.get)
            rec = {"target": tname, "features": fname, "items": int(len(items)),
                   "dims": int(X.shape[1]), "best_alpha": best, "r2": r2[best],
                   "r2_by_alpha": {str(a): v for a, v in r2.items()}}
            records.append(rec)
            progress(f"{tname:<40} {fname:<11} items {len(items):6d}  cv R^2 {r2[best]:+.3f} "
                     f"(alpha {best:g})")
    return records
