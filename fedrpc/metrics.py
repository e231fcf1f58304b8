"""Ranking metrics: HR@K, NDCG@K, Recall@K and MRR, full ranking or sampled negatives.

Pure functions. Evaluation returns *sums* over users (and the user count), so that
workers can evaluate their own clients and only the sums travel; `finalize` divides.

For a user with held-out items H (|H| = n) and rank r_j of each held-out item j:
    rank r_j = 1 + #{other candidates c : s_c >= s_j}   (ties count against j)
             + #{held-out t : s_t > s_j, or s_t == s_j and t listed before j}
where other candidates are the items that are neither masked (the user's training
positives and the other split's held-out items) nor held out. Then
    HR@K     = 1[min_j r_j <= K]
    Recall@K = #{j : r_j <= K} / n
    NDCG@K   = sum_{j : r_j <= K} 1/log2(1 + r_j)  /  sum_{r=1}^{min(n,K)} 1/log2(1 + r)
    MRR      = 1 / min_j r_j
A NaN score counts as the worst possible score.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .data.sampling import EVAL_NEGATIVES, sample_negatives, user_rng
from .data.types import Split


def _clean(scores: torch.Tensor) -> torch.Tensor:
    """A float32/float64 copy of `scores` with NaN -> -inf (ranking in float32 is exact
    for float32 scores: widening does not change any comparison)."""
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    return torch.nan_to_num(scores, nan=-np.inf)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Ranks [B, T] of `targets` [B, T] (item index, -1 = padding; inf rank) in `scores`
    [B, I]; `mask` [B, I] True marks items that are not candidates.

    The items that do not compete (masked ones and the targets themselves) get the score
    -inf in a copy of `scores`, so a target's count of items ahead is one comparison of
    the whole row; a target scored -inf (NaN) has every candidate ahead of it."""
    scores = _clean(scores)
    B, T = targets.shape
    valid = targets >= 0
    tidx = targets.clamp(min=0)
    ts = torch.gather(scores, 1, tidx)                      # [B, T]
    ts = torch.where(valid, ts, torch.full_like(ts, -np.inf))
    rows = torch.arange(B).unsqueeze(1).expand(B, T)
    excluded_t = (rows[valid], targets[valid])
    if mask is not None:
        scores.masked_fill_(mask, -np.inf)
    scores[excluded_t] = -np.inf
    ranks = torch.empty(B, T, dtype=torch.float64)
    for j in range(T):
        s = ts[:, j:j + 1]
        ahead = (scores >= s).sum(1)
        worst = torch.nonzero((s[:, 0] == -np.inf) & valid[:, j]).reshape(-1)
        if worst.numel():                       # only the candidates count ahead
            ex = mask[worst].clone() if mask is not None else \
                torch.zeros(len(worst), scores.shape[1], dtype=torch.bool)
            wt = targets[worst]
            wr = torch.arange(len(worst)).unsqueeze(1).expand_as(wt)
            ex[wr[wt >= 0], wt[wt >= 0]] = True
            ahead[worst] = (~ex).sum(1)
        higher_t = ((ts > s) & valid).sum(1)
        tied_before = ((ts[:, :j] == s) & valid[:, :j]).sum(1)
        ranks[:, j] = (1 + ahead + higher_t + tied_before).double()
    ranks[~valid] = np.inf
    return ranks


SCALE = 2 ** 40
"""Metric sums are fixed-point integers (value * 2^40, rounded per user): integer sums do
not depend on how users are split over workers or in what order the sums are added, so
the federated metrics are bit-identical for any number of ranks."""


def _fixed(per_user: torch.Tensor) -> int:
    return int(torch.round(per_user.double() * SCALE).long().sum())


def metric_sums(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, int]:
    """Fixed-point sums over users of HR/NDCG/Recall@K and MRR; rows with no target are
    skipped. `finalize` turns sums into means."""
    ranks = ranks.double()
    n = torch.isfinite(ranks).sum(1)
    keep = n > 0
    ranks, n = ranks[keep], n[keep].double()
    out = {"users": int(keep.sum())}
    gains = 1.0 / torch.log2(1.0 + ranks)                  # 0 where rank is inf
    best = ranks.min(1).values
    for k in ks:
        hit = ranks <= k
        ideal_terms = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
        ideal = torch.cumsum(ideal_terms, 0)[(n.clamp(max=k) - 1).long()]
        out[f"HR@{k}"] = _fixed((best <= k).double())
        out[f"NDCG@{k}"] = _fixed((gains * hit).sum(1) / ideal)
        out[f"Recall@{k}"] = _fixed(hit.sum(1).double() / n)
    out["MRR"] = _fixed(1.0 / best)
    return out


def add_sums(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def finalize(sums: dict[str, int]) -> dict[str, float]:
    """Means over users from metric sums."""
    n = sums.get("users", 0)
    return {k: (v / SCALE / n if n else 0.0) for k, v in sums.items() if k != "users"} \
        | {"users": n}


def _csr_rows(indptr: np.ndarray, items: np.ndarray, users: np.ndarray):
    return [items[indptr[u]:indptr[u + 1]] for u in users.tolist()]


def _csr_pairs(indptr: np.ndarray, items: np.ndarray, users: np.ndarray
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in `users`, item) for every item of every user's CSR row, without a loop."""
    start, stop = indptr[users], indptr[users + 1]
    lens = (stop - start).astype(np.int64)
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lens)
    offset = np.arange(int(lens.sum()), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
    cols = items[np.repeat(start, lens) + offset].astype(np.int64)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def _padded_rows(indptr: np.ndarray, items: np.ndarray, users: np.ndarray) -> torch.Tensor:
    """The users' CSR rows as [B, max length] item indices, padded with -1."""
    lens = (indptr[users + 1] - indptr[users]).astype(np.int64)
    rows, cols = _csr_pairs(indptr, items, users)
    out = torch.full((len(users), max(int(lens.max(initial=0)), 1)), -1, dtype=torch.long)
    pos = torch.arange(len(rows)) - torch.from_numpy(np.repeat(np.cumsum(lens) - lens, lens))
    out[rows, pos] = cols
    return out


def _padded(rows: list[np.ndarray]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
    return out


def evaluate_users(score_fn: Callable[[np.ndarray], torch.Tensor], split: Split,
                   users: np.ndarray, which: str | Sequence[str], ks: Iterable[int],
                   mode: str = "full", sampled_negatives: int = 99, seed: int = 0,
                   batch_users: int = 256) -> dict:
    """Metric sums over `users` (global ids) for split `which` ('valid' or 'test'), or
    {split: sums} when `which` is a list of splits (scores are computed once for all).

    `score_fn(users_batch) -> [B, n_items]` scores every item for each user.
    """
    splits = [which] if isinstance(which, str) else list(which)
    ks = list(ks)
    sums = {w: {"users": 0} for w in splits}
    for start in range(0, len(users), batch_users):
        batch = users[start:start + batch_users]
        scores = score_fn(batch).detach().to("cpu")
        for w in splits:
            ranks = _split_ranks(scores, split, batch, w, mode, sampled_negatives, seed)
            if ranks is not None:
                sums[w] = add_sums(sums[w], metric_sums(ranks, ks))
            if ranks is not None and split.cold_items is not None and mode == "full":
                cold = _split_ranks(scores, split, batch, w, mode, sampled_negatives, seed,
                                    cold_only=True)
                sums[w] = add_sums(sums[w], {f"{COLD}{k}": v for k, v in
                                             metric_sums(cold, ks).items() if k != "users"})
    return sums[which] if isinstance(which, str) else sums


COLD = "cold:"
"""Prefix of the metrics ranked among the cold items alone (data.split=cold_items: every
held-out item is cold, so they average over the same users as the others)."""


def _split_ranks(scores, split: Split, batch: np.ndarray, which: str, mode: str,
                 sampled_negatives: int, seed: int, cold_only: bool = False):
    """Ranks of the held-out items of `which` for the users of `batch` that have some;
    `cold_only`: among the cold items alone (every other item is masked)."""
    ho_ptr, ho_items = split.held_out(which)
    keep = np.flatnonzero(ho_ptr[batch + 1] > ho_ptr[batch])
    if len(keep) == 0:
        return None
    batch, scores = batch[keep], scores[torch.from_numpy(keep)]
    other_ptr, other_items = split.held_out("test" if which == "valid" else "valid")
    if mode == "sampled":
        targets = _padded(_csr_rows(ho_ptr, ho_items, batch))
        excluded = [np.concatenate([a, b]) for a, b in zip(
            _csr_rows(split.train_indptr, split.train_items, batch),
            _csr_rows(other_ptr, other_items, batch))]
        return _sampled_ranks(scores, targets, excluded, split.n_items, sampled_negatives,
                              seed, batch)
    targets = _padded_rows(ho_ptr, ho_items, batch)
    if cold_only:
        mask = torch.ones(len(batch), split.n_items, dtype=torch.bool)
        mask[:, torch.from_numpy(split.cold_items.astype(np.int64))] = False
    else:
        mask = torch.zeros(len(batch), split.n_items, dtype=torch.bool)
    for ptr, items in ((split.train_indptr, split.train_items), (other_ptr, other_items)):
        mask[_csr_pairs(ptr, items, batch)] = True
    return target_ranks(scores, targets, mask)


def _sampled_ranks(scores, targets, excluded, n_items, n_neg, seed, batch):
    """Rank each held-out item against `n_neg` negatives drawn per user (fixed per seed)."""
    rows = []
    for b, u in enumerate(batch.tolist()):
        known = np.unique(np.concatenate([excluded[b], targets[b][targets[b] >= 0].numpy()]))
        neg = sample_negatives(user_rng(seed, 0, u, EVAL_NEGATIVES), n_items, known, n_neg)
        rows.append(torch.from_numpy(neg))
    negs = torch.stack(rows)                                   # [B, n_neg]
    T = targets.shape[1]
    cand = torch.cat([targets.clamp(min=0), negs], 1)
    cand_scores = torch.gather(scores, 1, cand)
    local_targets = torch.where(targets >= 0, torch.arange(T).expand_as(targets), -1)
    return target_ranks(cand_scores, local_targets)
