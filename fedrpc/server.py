"""The server (rank 0): the round loop of GFMFR.

    sample -> send -> collect -> aggregate -> group -> fuse -> teach -> evaluate -> log

The server holds the item content features, the global shared parameters, the group
fusion model and the groups. It never holds interactions or private parameters: it
learns the catalogue and which clients exist from the workers' Hello replies, and sees
only uploads of shared parameters and metric sums.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import algorithms as alg
from .config import Config, to_dict
from .data import Catalogue
from .messages import EvalRequest, Hello, HelloReply, TrainReply, TrainRequest, stack_sorted
from .metrics import add_sums, finalize
from .reporting import append_jsonl, write_json
from .transport import Transport
from .worker import learning_rates, make_backbone_from

log = logging.getLogger(__name__)
SAMPLING = 0x5A  # purpose id of the participant-sampling stream


@dataclass
class ContentFeatures:
    """Item features on the server, rows in catalogue order."""
    text: Optional[torch.Tensor]
    image: Optional[torch.Tensor]
    text_mask: Optional[torch.Tensor]
    image_mask: Optional[torch.Tensor]
    info: dict = field(default_factory=dict)


@dataclass
class GroupState:
    """What the server remembers about groups between rounds."""
    group_of_user: np.ndarray            # [U] last group per user, -1 = never grouped
    prev_users: Optional[np.ndarray] = None
    prev_labels: Optional[np.ndarray] = None
    teacher: Optional[torch.Tensor] = None   # [G, I] g_k for the next round
    warned_lopsided: bool = False


def sample_participants(users: np.ndarray, cfg: Config, round_: int) -> np.ndarray:
    f = cfg.fed
    n = f.clients_per_round or max(1, int(round(f.client_fraction * len(users))))
    if n >= len(users):
        return users.copy()
    rng = np.random.default_rng([cfg.run.seed, round_, SAMPLING])
    return np.sort(rng.choice(users, size=n, replace=False))


class Server:
    def __init__(self, cfg: Config, transport: Transport, features: Optional[ContentFeatures],
                 device: torch.device | str = "cpu"):
        """`device`: where the group fusion model trains (features are moved there)."""
        self.cfg, self.transport, self.features = cfg, transport, features
        self.device = torch.device(device)
        self.backbone = make_backbone_from(cfg)
        hello = transport.exchange(-1, "hello", {r: Hello() for r in transport.worker_ranks},
                                   cfg.runtime.startup_timeout_s)
        self.hosts = {r: h.users for r, h in hello.items()}
        self.catalogue = _one_catalogue(hello)
        self.users = np.sort(np.concatenate(list(self.hosts.values())))
        self.shared = self.backbone.init_shared(self.catalogue.n_items, cfg.run.seed)
        self.groups = GroupState(np.full(int(self.users.max()) + 1, -1, dtype=np.int64))
        self.fusion = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ one round
    def run_round(self, r: int) -> dict:
        cfg, t = self.cfg, {}
        rec: dict = {"round": r}

        # --- sample participants and send each worker its clients' instruction
        tic = time.perf_counter()
        participants = sample_participants(self.users, cfg, r)
        requests = self._train_requests(r, participants)
        replies = self.transport.exchange(r, "train", requests, cfg.runtime.round_timeout_s)
        up = stack_sorted(list(replies.values()))
        t["train"] = time.perf_counter() - tic
        rec["clients"] = int(len(up.users))
        rec["loss"] = {"base": float(up.loss.mean()), "kl": float(up.kl.mean())}

        # --- aggregate the shared parameters
        tic = time.perf_counter()
        weights = (torch.from_numpy(up.n_samples).double()
                   if cfg.fed.aggregation == "samples" else None)
        self.shared = alg.mean_aggregate({p.name: up.shared[p.name] for p in self.backbone.shared()},
                                         weights)
        t["aggregate"] = time.perf_counter() - tic

        # --- group clients, fuse content per group, derive the teacher
        if cfg.gfmfr.enabled:
            rec["gfmfr"] = self._group_fuse_teach(r, up, t)

        # --- evaluate (federated: only metric sums come back)
        if self._eval_due(r):
            tic = time.perf_counter()
            rec["metrics"] = self._evaluate(r)
            t["eval"] = time.perf_counter() - tic
        t["total"] = sum(t.values())
        rec["seconds"] = {k: round(v, 4) for k, v in t.items()}
        rec["bytes"] = self.transport.ledger.round_summary(r)
        return rec

    def _train_requests(self, r: int, participants: np.ndarray) -> dict[int, TrainRequest]:
        f, gs, rates = self.cfg.fed, self.groups, learning_rates(self.cfg)
        lr = rates["lr"] * f.lr_decay ** r
        lr_item = rates["lr_item"] * f.lr_item_decay ** r
        lr_private_item = rates["lr_private_item"] * f.lr_item_decay ** r
        out = {}
        for rank, hosted in self.hosts.items():
            users = participants[np.isin(participants, hosted)]
            if len(users) == 0:
                continue
            teacher = rows = None
            if gs.teacher is not None:
                g = gs.group_of_user[users]
                present = np.unique(g[g >= 0])
                rows = np.where(g >= 0, np.searchsorted(present, g), -1).astype(np.int64)
                teacher = gs.teacher[torch.from_numpy(present)]
            out[rank] = TrainRequest(r, users, self.shared, lr, lr_item, lr_private_item,
                                     teacher, rows)
        return out

    def _group_fuse_teach(self, r: int, up: TrainReply, t: dict) -> dict:
        g, gs, bb = self.cfg.gfmfr, self.groups, self.backbone
        tic = time.perf_counter()
        head = torch.cat([up.shared[n].reshape(len(up.users), -1) for n in bb.head], 1)
        labels = alg.group_clients(head.double().numpy(), g.groups, g.clustering,
                                   g.pca or None, seed=self.cfg.run.seed * 1000 + r)
        labels = alg.align_groups(gs.prev_users, gs.prev_labels, up.users, labels, g.groups)
        gs.prev_users, gs.prev_labels = up.users, labels
        gs.group_of_user[up.users] = labels
        targets, info = alg.group_targets(up.shared[bb.item_table], labels, g.groups,
                                          g.min_group_size, g.outlier_factor)
        t["group"] = time.perf_counter() - tic

        tic = time.perf_counter()
        fz = self._fusion_model()
        fx, dev = self.features, self.device
        text, image = fx.text.to(dev), fx.image.to(dev)
        masks = (fx.text_mask.to(dev), fx.image_mask.to(dev))
        res = alg.train_fusion(fz, self.fusion_opt, text, image, targets.to(dev),
                               info["group_ok"].to(dev), g.fusion_epochs,
                               g.fusion_time_budget_s or None, g.fusion_batch_size,
                               seed=self.cfg.run.seed * 1000 + r,
                               text_mask=masks[0], image_mask=masks[1])
        fused = alg.fused_items(fz, text, image, masks,
                                torch.arange(g.groups, device=dev)).to("cpu")
        gs.teacher = self._teacher(fused, up, labels)
        t["fusion"] = time.perf_counter() - tic
        sizes = np.bincount(labels, minlength=g.groups)
        warning = alg.lopsided_groups(sizes)
        if warning and not gs.warned_lopsided:
            gs.warned_lopsided = True       # once per run; every round's sizes are logged
            log.warning("round %d: %s; gfmfr.clustering=%s%s", r, warning, g.clustering,
                        " (kmeans gives balanced groups)" if g.clustering == "spectral" else "")
        return {"group_sizes": sizes.tolist(),
                "fallback_groups": list(map(int, info["fallback"])),
                "excluded_uploads": int(info["n_excluded_nonfinite"] + info["n_excluded_outlier"]),
                "fusion_loss": float(res["losses"][-1]) if res["losses"] else None,
                "fusion_epochs": int(res["epochs_run"])}

    def _teacher(self, fused: torch.Tensor, up: TrainReply, labels: np.ndarray) -> torch.Tensor:
        """g_k over all items from the fused embeddings and the group's averaged head."""
        logits = self.group_logits(fused, up, labels, self.cfg.gfmfr.teacher)
        return torch.sigmoid(logits).clamp(1e-7, 1 - 1e-7)

    def group_logits(self, E: torch.Tensor, up: TrainReply, labels: np.ndarray,
                     kind: str) -> torch.Tensor:
        """Each group's preference logits [G, I] over item embeddings E [G, I, d], scored
        with the group's averaged uploads: kind "output" (the output layer alone, the
        paper's formula) or "head" (the whole shared scoring head, no user part)."""
        g, bb = self.cfg.gfmfr, self.backbone
        names = bb.output if kind == "output" else bb.head
        # an empty group takes the global value (the mean upload for a group-only head)
        head = {n: _group_means(up.shared[n], labels, g.groups,
                                self.shared[n] if n in self.shared else up.shared[n].mean(0))
                for n in names}
        if kind == "output":
            w, b = (head[n] for n in bb.output)
            return alg.teacher_logits(E, w, b.reshape(-1))
        return bb.group_logits(E, head)

    def _fusion_model(self):
        if self.fusion is None:
            g, fx = self.cfg.gfmfr, self.features
            torch.manual_seed(self.cfg.run.seed)
            self.fusion = alg.GroupFusion(g.groups, fx.text.shape[1], fx.image.shape[1],
                                          self.cfg.fed.latent_dim, fusion=g.fusion).to(self.device)
            self.fusion_opt = alg.make_fusion_optimizer(self.fusion, g.fusion_lr)
        return self.fusion

    # ------------------------------------------------------------------ evaluation
    def _eval_due(self, r: int) -> bool:
        e = self.cfg.eval
        return (r + 1) % e.interval == 0 or r == self.cfg.fed.rounds - 1

    def _evaluate(self, r: int) -> dict:
        reqs = {rank: EvalRequest(r, self.shared, ("valid", "test"), len(users))
                for rank, users in self.hosts.items()}
        replies = self.transport.exchange(r, "eval", reqs, self.cfg.runtime.round_timeout_s)
        out = {}
        for which in ("valid", "test"):
            total: dict = {}
            for rank in sorted(replies):
                total = add_sums(total, replies[rank].sums[which])
            out[which] = finalize(total)
        return out


def _one_catalogue(hello: dict[int, HelloReply]) -> Catalogue:
    first = hello[min(hello)]
    for h in hello.values():
        if not np.array_equal(h.item_ids, first.item_ids):
            raise RuntimeError(f"worker rank {h.rank} reports a different item catalogue "
                               f"than rank {first.rank}: the ranks read different data")
    return Catalogue(first.item_ids, first.id_base, first.id_space)


def _group_means(values: torch.Tensor, labels: np.ndarray, n_groups: int,
                 fallback: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [N, ...] per group -> [G, ...]; empty groups take `fallback`."""
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return torch.stack([values[lab == k].mean(0) if (lab == k).any() else fallback
                        for k in range(n_groups)])


# ---------------------------------------------------------------------- the run
def best_rounds(history: list[dict], k: int) -> dict:
    """Test metrics at the best validation round (by NDCG@k), and the reference code's
    convention: the mean of the tests at the best-val-HR@k and best-val-NDCG@k rounds."""
    evals = [h for h in history if "metrics" in h]
    if not evals:
        return {}
    by_ndcg = max(evals, key=lambda h: (h["metrics"]["valid"][f"NDCG@{k}"], -h["round"]))
    by_hr = max(evals, key=lambda h: (h["metrics"]["valid"][f"HR@{k}"], -h["round"]))
    ref = {m: (by_ndcg["metrics"]["test"][m] + by_hr["metrics"]["test"][m]) / 2
           for m in by_ndcg["metrics"]["test"] if m != "users"}
    return {"best_round": by_ndcg["round"], "selected_by": f"valid NDCG@{k}",
            "valid": by_ndcg["metrics"]["valid"], "test": by_ndcg["metrics"]["test"],
            "reference_convention": {
                "description": f"mean of test at best-valid-HR@{k} round ({by_hr['round']}) "
                               f"and best-valid-NDCG@{k} round ({by_ndcg['round']})",
                "test": ref}}


def run_rounds(server: Server, out_dir: Path, progress: bool = True) -> dict:
    """The federation: rounds with evaluation, early stopping, logs and a summary."""
    from tqdm import tqdm

    cfg = server.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rounds.jsonl").unlink(missing_ok=True)
    k = cfg.eval.ks[0]
    best, since_best, stopped_early = -math.inf, 0, False
    bar = tqdm(range(cfg.fed.rounds), desc="rounds", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    for r in bar:
        rec = server.run_round(r)
        server.history.append(rec)
        append_jsonl(out_dir / "rounds.jsonl", rec)
        bar.set_postfix_str(_progress_line(rec, k))
        # with a progress bar the line is already on screen
        log.log(logging.DEBUG if progress else logging.INFO, "round %d %s", r, _progress_line(rec, k))
        if "metrics" in rec and cfg.eval.patience:
            score = rec["metrics"]["valid"][f"NDCG@{k}"]
            best, since_best = (score, 0) if score > best else (best, since_best + 1)
            if since_best >= cfg.eval.patience:
                stopped_early = True
                log.info("early stop at round %d: no better valid NDCG@%d for %d evaluations",
                         r, k, cfg.eval.patience)
                break
    summary = {"config": to_dict(cfg), "rounds_run": len(server.history),
               "stopped_early": stopped_early, "seconds": time.perf_counter() - t_start,
               **best_rounds(server.history, k),
               "features": server.features.info if server.features else None,
               "seconds_per_round_by_phase": _mean_phases(server.history)}
    write_json(out_dir / "summary.json", summary)
    return summary


def _mean_phases(history: list[dict]) -> dict:
    keys = sorted({k for h in history for k in h["seconds"]})
    return {k: round(float(np.mean([h["seconds"].get(k, 0.0) for h in history])), 4)
            for k in keys}


def _progress_line(rec: dict, k: int) -> str:
    parts = [f"loss {rec['loss']['base']:.4f}"]
    if rec["loss"]["kl"]:
        parts.append(f"kl {rec['loss']['kl']:.4f}")
    if "metrics" in rec:
        v, te = rec["metrics"]["valid"], rec["metrics"]["test"]
        parts.append(f"val HR@{k} {v[f'HR@{k}']:.4f} NDCG@{k} {v[f'NDCG@{k}']:.4f}")
        parts.append(f"test HR@{k} {te[f'HR@{k}']:.4f} NDCG@{k} {te[f'NDCG@{k}']:.4f}")
    lg = rec["bytes"]["logical"]
    down = lg.get("train_down", {}).get("mean", 0) / 1e6
    upb = lg.get("train_up", {}).get("mean", 0) / 1e6
    parts.append(f"client MB down {down:.3f} up {upb:.3f}")
    parts.append(f"{rec['seconds']['total']:.2f}s")
    return " | ".join(parts)
