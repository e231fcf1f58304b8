"""A worker rank: hosts a shard of the federation's clients, trains and evaluates them.

The worker reads interactions (never item content), keeps its clients' private
parameters, and answers the server's messages. Clients are trained together in batched
tensor operations (fedrpc.training); evaluation runs here and only metric sums leave.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import algorithms as alg
from .config import Config
from .data import Interactions, catalogue_of, load_interactions, split_of
from .messages import (CheckpointReply, CheckpointRequest, EvalReply, EvalRequest, Hello,
                       HelloReply, RestoreReply, RestoreRequest, Shutdown, TrainReply,
                       TrainRequest, fixed_sum)
from .memory import with_peak_rss
from .metrics import evaluate_users
from .rows import stack
from .state import ClientStore, save_atomic
from .strategy import MaskRequest, make_backbone_from, upload_codec
from .training import LocalSettings, build_client_batches, train_clients

log = logging.getLogger(__name__)


def shard_users(n_users: int, n_workers: int, index: int) -> np.ndarray:
    """The users hosted by worker `index` (0-based) of `n_workers`: u mod n_workers."""
    return np.arange(index, n_users, n_workers, dtype=np.int64)


class Worker:
    def __init__(self, cfg: Config, rank: int, n_workers: int,
                 inter: Optional[Interactions] = None, device: torch.device | str = "cpu"):
        self.cfg, self.rank, self.device = cfg, rank, torch.device(device)
        inter = inter if inter is not None else load_interactions(cfg)
        self.split = split_of(cfg, inter)
        self.n_items = inter.n_items
        self.catalogue = catalogue_of(cfg, inter)
        self.users = shard_users(inter.n_users, n_workers, rank - 1)
        self.backbone = make_backbone_from(cfg)
        self.codec = upload_codec(cfg, self.backbone)
        self.state = ClientStore.create(self.backbone, self.users, self.n_items, cfg.run.seed,
                                        self.device, cfg.runtime.initial_cache_mb)

    # ------------------------------------------------------------------ dispatch
    def handle(self, msg):
        if isinstance(msg, TrainRequest):
            return with_peak_rss(self.train(msg))
        if isinstance(msg, EvalRequest):
            return with_peak_rss(self.evaluate(msg))
        if isinstance(msg, MaskRequest):          # secagg's second upload phase
            return self.codec.masked_sums(msg, self._participants)
        if isinstance(msg, Hello):
            c = self.catalogue
            return HelloReply(self.rank, self.users, c.item_ids, c.id_base, c.id_space)
        if isinstance(msg, CheckpointRequest):
            return self.checkpoint(msg)
        if isinstance(msg, RestoreRequest):
            return RestoreReply(self.state.load_rows([Path(p) for p in msg.paths]),
                                len(self.users))
        if isinstance(msg, Shutdown):
            return None
        raise TypeError(f"unexpected message {type(msg).__name__}")

    # ------------------------------------------------------------------ training
    def settings(self, req: TrainRequest) -> LocalSettings:
        f = self.cfg.fed
        return LocalSettings(epochs=f.local_epochs, batch_size=f.batch_size,
                             num_negatives=f.num_negatives, lr=req.lr, lr_item=req.lr_item,
                             lr_private_item=req.lr_private_item,
                             weight_decay=f.weight_decay, seed=self.cfg.run.seed,
                             round=req.round, total_rounds=f.rounds,
                             ema_decay=self.cfg.gfmfr.ema_decay,
                             max_ratio=self.cfg.gfmfr.max_ratio,
                             compile=self.cfg.runtime.compile)

    def train(self, req: TrainRequest) -> TrainReply:
        self.state.begin_round(req.round, req.users)   # undone if the round fails
        try:
            return self._train(req)
        except BaseException:
            self.state.settle(req.round)               # this round did not complete here
            raise

    def _train(self, req: TrainRequest) -> TrainReply:
        t0 = time.perf_counter()
        s = self.settings(req)
        self._participants = req.users
        prec = self.codec.precision                # what was sent is what the clients use
        shared = prec.decode_all(req.shared)
        teacher = prec.decode(req.teacher)
        groups = None if req.teacher_row is None else torch.from_numpy(req.teacher_row)
        step = self.cfg.fed.batch_clients if self.cfg.fed.batched else 1
        chunks = [req.users[j:j + step] for j in range(0, len(req.users), step)]
        outs, kept = [], []
        for users in chunks:
            batch = build_client_batches(users, self.split.train_indptr, self.split.train_items,
                                         self.n_items, s)
            g = None
            if groups is not None:
                g = groups[torch.from_numpy(np.searchsorted(req.users, users))]
            outs.append(train_clients(self.backbone, shared, self.state, batch, s, teacher, g,
                                      store_tables=False))
            kept.append((users, batch.counts, batch.items))
        # private tables: one merge into the store for the round, not one per batch; the
        # chunks' rows (and below their uploads) are popped from `outs` and freed as they
        # are stacked, so a round never holds them twice
        if kept and outs[0].private:
            users, counts, items = (np.concatenate(x) for x in zip(*kept))
            for name in list(outs[0].private):
                self.state.put_rows(name, users, counts, items,
                                    stack([o.private.pop(name) for o in outs]))
        upload = [p.name for p in self.backbone.shared()]
        if self.cfg.gfmfr.enabled:           # what the server groups by, if not shared
            upload += list(self.backbone.group_only)
        trained = {k: stack([o.shared.pop(k) for o in outs]) for k in upload}
        n_samples = (np.concatenate([o.n_samples for o in outs])
                     if self.cfg.fed.aggregation == "samples" else None)
        return TrainReply(req.round, req.users, self.codec.encode(shared, trained), n_samples,
                          fixed_sum(stack([o.loss for o in outs])),
                          fixed_sum(stack([o.kl for o in outs])), time.perf_counter() - t0)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, req: CheckpointRequest) -> CheckpointReply:
        """Write the hosted clients' state after `req.completed` rounds (this rank's own
        file, so ranks write in parallel)."""
        t0 = time.perf_counter()
        self.state.settle(req.completed)
        meta = save_atomic(self.state.state_dict(), Path(req.path))
        return CheckpointReply(req.path, meta["sha256"], meta["bytes"], len(self.users),
                               time.perf_counter() - t0)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, req: EvalRequest) -> EvalReply:
        t0 = time.perf_counter()
        e = self.cfg.eval

        shared = {k: self.codec.precision.decode(v).to(self.device)
                  for k, v in req.shared.items()}

        content = self.codec.precision.decode(req.content)
        content = content.to(self.device) if content is not None else None

        def score(users: np.ndarray) -> torch.Tensor:
            slots = self.state.slots(users).to(self.device)
            private = {k: v[slots] for k, v in self.state.private.items()}
            private.update(self.state.dense_tables(slots))    # this batch's only
            with torch.no_grad():
                s = self.backbone.score_all(shared, private)
                if content is None:
                    return s
                # each client's profile, from its own training items (gfmfr.profile_weight)
                prof = alg.profile_scores(content, self.split.train_indptr,
                                          self.split.train_items, users)
                return alg.blend(s, prof, req.profile_weight)

        sums = evaluate_users(score, self.split, self.users, list(req.splits), e.ks, e.mode,
                              e.sampled_negatives, self.cfg.run.seed, e.batch_users)
        return EvalReply(req.round, sums, len(self.users), time.perf_counter() - t0)
