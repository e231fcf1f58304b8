"""`fedrpc diagnose teacher`: is the group-fusion teacher worth distilling from?

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
"""
from __future__ import annotations

import torch

from . import algorithms as alg
from .baselines import popularity_scores
from .config import Config
from .data import load_interactions
from .metrics import evaluate_users, finalize
from .runtime import rank_device, server_features
from .server import Server
from .strategy import GFMFR
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
