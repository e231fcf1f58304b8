"""`fedrpc bench train`: seconds of one round of local training, batched across clients
vs one client at a time, on the same clients in the same process."""
from __future__ import annotations

import time

import numpy as np
import torch

from .config import Config
from .data import load_interactions
from .messages import TrainRequest
from .worker import Worker


def bench_train(cfg: Config, n_clients: int = 0, repeats: int = 1) -> dict:
    inter = load_interactions(cfg)
    users = np.arange(inter.n_users) if not n_clients else np.arange(min(n_clients, inter.n_users))
    out = {"clients": int(len(users)), "local_epochs": cfg.fed.local_epochs,
           "threads": torch.get_num_threads()}
    for mode, batched in (("batched", True), ("one_by_one", False)):
        cfg.fed.batched = batched
        times = []
        for _ in range(repeats):
            worker = Worker(cfg, 1, 1, inter)
            shared = worker.backbone.init_shared(inter.n_items, cfg.run.seed)
            req = TrainRequest(0, users, shared, cfg.fed.lr, cfg.fed.lr_item,
                               cfg.fed.lr_private_item)
            t0 = time.perf_counter()
            worker.train(req)
            times.append(time.perf_counter() - t0)
        out[f"{mode}_s"] = round(min(times), 3)
    out["speedup"] = round(out["one_by_one_s"] / out["batched_s"], 1)
    return out
