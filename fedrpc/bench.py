"""`fedrpc bench train`: seconds of one round of local training on the same clients, in
the same process, three ways:
- batched: the worker's path, all clients together (fedrpc.training);
- one at a time: the same code with one client per call (fed.batched=false);
- straightforward: the usual per-user loop — an nn.Parameter copy of every parameter per
  client, its minibatches one by one, and torch.optim.SGD (dense gradients and dense
  weight decay on the whole item tables). It is a speed reference, not the same numbers:
  torch's SGD decays every row, fedrpc only the rows a step touches.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, replace_key
from .data import load_interactions
from .messages import TrainRequest
from .training import build_client_batches
from .strategy import learning_rates
from .worker import Worker


def _straightforward(worker: Worker, req: TrainRequest) -> None:
    bb, s = worker.backbone, worker.settings(req)
    split = worker.split
    for u in req.users.tolist():
        batch = build_client_batches(np.array([u]), split.train_indptr, split.train_items,
                                     worker.n_items, s)
        slot = worker.state.slots(np.array([u]))
        private = {k: v[slot][0] for k, v in worker.state.private.items()}
        private.update({k: v[0] for k, v in worker.state.dense_tables(slot).items()})
        params, groups = {}, []
        for p in bb.params():
            src = req.shared[p.name] if p.shared else private[p.name]
            params[p.name] = torch.nn.Parameter(src.clone())
            lr = (s.lr_item if p.shared else s.lr_private_item) if p.table else s.lr
            groups.append({"params": [params[p.name]], "lr": lr})
        opt = torch.optim.SGD(groups, lr=s.lr, weight_decay=s.weight_decay)
        for step in range(int(batch.steps[0])):
            v = torch.from_numpy(batch.valid[0, step])
            it = torch.from_numpy(batch.sample_items()[0, step])[v]
            y = torch.from_numpy(batch.labels[0, step])[v]
            rows = {p.name: params[p.name][it].unsqueeze(0) for p in bb.params() if p.table}
            dense = {p.name: params[p.name].unsqueeze(0) for p in bb.params() if not p.table}
            logits = bb.logits(rows, dense)
            loss = F.binary_cross_entropy_with_logits(logits[0], y)
            reg = bb.regulariser(rows, dense, torch.ones(1, len(it), dtype=torch.bool), s.round)
            if reg is not None:
                loss = loss + reg[0]
            opt.zero_grad()
            loss.backward()
            opt.step()


BMM_CLIENTS = 1024  # clients in the throughput probe: enough to saturate, bounded memory


def _bmm_gflops(n: int, b: int, d: int, k: int, seconds: float = 1.0) -> float:
    """Throughput of torch.bmm here at the training's shapes [n, b, d] x [n, d, k]."""
    x, w = torch.randn(n, b, d), torch.randn(n, d, k)
    torch.bmm(x, w)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.bmm(x, w)
        reps += 1
    return 2 * n * b * d * k * reps / (time.perf_counter() - t0) / 1e9


def workload(cfg: Config, worker: Worker, users: np.ndarray) -> dict:
    """What one round of local training computes: sample-steps, padded slots, the
    matrix-product FLOP, and the time those FLOP take at this machine's bmm throughput
    (a lower bound for any batching of this backbone)."""
    s, d = worker.settings(TrainRequest(0, users, {}, **learning_rates(cfg))), cfg.fed.latent_dim
    b = build_client_batches(users, worker.split.train_indptr, worker.split.train_items,
                             worker.n_items, s)
    slots = int(b.steps.sum()) * s.batch_size
    k = worker.backbone.item_map_width()
    gflop = slots * 6 * d * k / 1e9   # 3 products (forward, 2 backward) x 2 FLOP per MAC
    gflops = _bmm_gflops(min(len(users), BMM_CLIENTS), s.batch_size, d, k)
    return {"sample_steps": int(b.valid.sum()), "slots": slots, "steps": int(b.steps.sum()),
            "matmul_gflop": round(gflop, 1), "bmm_gflops": round(gflops, 1),
            "matmul_floor_s": round(gflop / gflops, 2)}


def bench_train(cfg: Config, n_clients: int = 0, repeats: int = 1) -> dict:
    inter = load_interactions(cfg)
    n = inter.n_users if not n_clients else min(n_clients, inter.n_users)
    users = np.arange(n)
    out = {"clients": int(n), "local_epochs": cfg.fed.local_epochs,
           "threads": torch.get_num_threads()}
    for mode in ("batched", "one_by_one", "straightforward"):
        cfg = replace_key(cfg, "fed.batched", mode == "batched")
        times = []
        for _ in range(repeats):
            worker = Worker(cfg, 1, 1, inter)
            shared = worker.backbone.init_shared(inter.n_items, cfg.run.seed)
            req = TrainRequest(0, users, shared, **learning_rates(cfg))
            t0 = time.perf_counter()
            if mode == "straightforward":
                _straightforward(worker, req)
            else:
                worker.train(req)
            times.append(time.perf_counter() - t0)
        out[f"{mode}_s"] = round(min(times), 3)
    out["workload"] = workload(cfg, worker, users)
    out["speedup_vs_one_by_one"] = round(out["one_by_one_s"] / out["batched_s"], 1)
    out["speedup_vs_straightforward"] = round(out["straightforward_s"] / out["batched_s"], 1)
    return out
