"""`fedrpc bench train` and `fedrpc bench round` (its notes are further down, above
`_gemm_gflops`).

`fedrpc bench train`: seconds of one round of local training on the same clients, in
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
from .memory import keep_freed_memory
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
            it, y = (torch.from_numpy(a) for a in batch.minibatch(0, step))
            rows = {p.name: params[p.name][it].unsqueeze(0) for p in bb.params() if p.table}
            dense = {p.name: params[p.name].unsqueeze(0) for p in bb.params() if not p.table}
            logits = bb.logits(rows, dense)
            loss = F.binary_cross_entropy_with_logits(logits[0], y)
            reg = bb.regulariser(rows, dense, torch.ones(1, len(it), dtype=torch.bool),
                                  bb.regulariser_weight(s.round))
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


def workload(cfg: Config, worker: Worker, users: np.ndarray, measure: bool = True) -> dict:
    """What one round of local training computes: sample-steps, padded slots, the
    matrix-product FLOP, and the time those FLOP take at this machine's bmm throughput
    (a lower bound for any batching of this backbone)."""
    s, d = worker.settings(TrainRequest(0, users, {}, **learning_rates(cfg))), cfg.fed.latent_dim
    b = build_client_batches(users, worker.split.train_indptr, worker.split.train_items,
                             worker.n_items, s)
    slots = int(b.steps.sum()) * s.batch_size
    k = worker.backbone.item_map_width()
    gflop = slots * 6 * d * k / 1e9   # 3 products (forward, 2 backward) x 2 FLOP per MAC
    if not measure:
        return {"matmul_gflop": gflop}
    gflops = _bmm_gflops(min(len(users), BMM_CLIENTS), s.batch_size, d, k)
    return {"sample_steps": int(b.valid.sum()), "slots": slots, "steps": int(b.steps.sum()),
            "matmul_gflop": round(gflop, 1), "bmm_gflops": round(gflops, 1),
            "matmul_floor_s": round(gflop / gflops, 2)}


def bench_train(cfg: Config, n_clients: int = 0, repeats: int = 1) -> dict:
    if cfg.runtime.keep_freed_memory:
        keep_freed_memory()
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


# ===================================================================== bench round
"""`fedrpc bench round`: the phases of whole rounds in this process, against their floors.

Each phase's *floor* is a roofline lower bound on this machine: the larger of
    FLOP / (measured float32 matrix-product throughput, torch.mm at 2048 x 1024 x 256)
    bytes / (measured memory bandwidth, a large float32 tensor summed: read-only)
where FLOP and bytes are the least the phase must compute and touch whatever the code:
- train:     the matrix products of local training (`workload`, the same count as
             `fedrpc bench train`: 6 d k FLOP per minibatch slot).
- aggregate: reading every upload of the shared parameters once.
- group:     reading the uploaded item tables once (group targets) and the head features
             once, plus one product of the standardised heads [N, F] with a block of
             k = (PCA components kept) vectors (2 N F k FLOP: no PCA keeping k components
             can do less than one such pass).
- fusion:    the fusion model's training (gfmfr.fusion_epochs passes over every (group,
             item) pair: forward 2 and backward 4 FLOP per multiply-add of its linear
             layers; the projections of the fixed item features need no input gradient,
             so 4 FLOP per multiply-add, once per item and epoch, and the MLP fusion's
             first layer splits into a per-item and a per-group part) plus the teacher.
- eval:      scoring every item for every client (2 d k FLOP per (user, item) beyond the
             user part) and reading every client's private parameters and the scores.
The ratio seconds / floor says how far a phase is from what the arithmetic allows. Both
rates are the best of several short windows; on a machine shared with other jobs a phase
can still run slower than its floor says, never faster (a ratio below 1 means the rates
were measured while something else was running).
"""


PROBES = 8   # best of this many short windows: a busy machine slows some, not the peak


def _best_rate(op, work: float, seconds: float = 0.15) -> float:
    """The highest rate (work / s) of `op` over PROBES windows of `seconds`."""
    op()
    best = 0.0
    for _ in range(PROBES):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            op()
            reps += 1
        best = max(best, work * reps / (time.perf_counter() - t0))
    return best


def _gemm_gflops() -> float:
    a, b = torch.randn(2048, 1024), torch.randn(1024, 256)
    return _best_rate(lambda: torch.mm(a, b), 2 * 2048 * 1024 * 256) / 1e9


def _read_gbps() -> float:
    x = torch.ones(64 * 2 ** 20)          # 256 MB, beyond any cache
    return _best_rate(x.sum, x.numel() * 4) / 1e9


def _fusion_flop(model, n_items: int, n_groups: int, epochs: int) -> float:
    """Least FLOP of `epochs` passes of fusion training over n_groups x n_items pairs,
    plus the teacher's forward pass over every pair."""
    from torch import nn
    d = model.latent_dim
    proj_macs = n_items * (model.text_dim + model.image_dim) * d
    pairs = n_groups * n_items
    if model.fusion_name == "mlp":
        first, second = model.fusion.net[0], model.fusion.net[2]
        item_macs = n_items * 2 * d * first.out_features      # text and image columns
        pair_macs = pairs * (first.out_features + second.in_features * second.out_features)
        pair_macs -= pairs * first.out_features               # the broadcast add is no MAC
    else:
        item_macs = 0
        pair_macs = pairs * sum(m.in_features * m.out_features
                                for m in model.fusion.modules() if isinstance(m, nn.Linear))
    train = epochs * (4 * proj_macs + 6 * (item_macs + pair_macs))
    return float(train + 2 * (proj_macs + item_macs + pair_macs))


def _phase_work(server, workers: dict, participants: np.ndarray, rec: dict) -> dict:
    """(FLOP, bytes) per phase of the round `rec` (see the module notes above)."""
    cfg, st = server.cfg, server.state
    bb = server.backbone
    n = len(participants)
    n_items, d = server.catalogue.n_items, cfg.fed.latent_dim
    shared_numel = sum(int(v.numel()) for v in st.shared.values())
    head_numel = rec.get("gfmfr", {}).get("head_features", 0)
    work = {"aggregate": (0.0, 4.0 * n * shared_numel)}
    flop = 0.0
    for w in workers.values():
        mine = participants[np.isin(participants, w.users)]
        if len(mine):
            flop += workload(cfg, w, mine, measure=False)["matmul_gflop"] * 1e9
    work["train"] = (flop, 0.0)
    if cfg.gfmfr.enabled and "gfmfr" in rec:
        k = rec["gfmfr"].get("pca_components") or min(n, head_numel)
        work["group"] = (2.0 * n * head_numel * k,
                         4.0 * n * (n_items * d + head_numel))
        fz = server.strategy.fusion_model(st)[0]
        work["fusion"] = (_fusion_flop(fz, n_items, cfg.gfmfr.groups, cfg.gfmfr.fusion_epochs),
                          0.0)
    if "eval" in rec["seconds"]:
        k = bb.item_map_width()
        users = sum(len(w.users) for w in workers.values())
        private = sum(int(v.numel()) for w in workers.values()
                      for v in w.state.private.values())
        work["eval"] = (2.0 * users * n_items * d * k, 4.0 * (private + 2 * users * n_items))
    return work


class _Patches:
    """Temporary wrappers around the server's calls (bench only); `close()` undoes them."""

    def __init__(self):
        self._undo = []

    def wrap(self, owner, name, make):
        """owner.name = make(original) until close()."""
        own = name in vars(owner)
        old = getattr(owner, name)
        setattr(owner, name, make(old))
        self._undo.append((owner, name, old if own else None))

    def close(self) -> None:
        for owner, name, old in reversed(self._undo):
            if old is None:
                delattr(owner, name)          # the instance attribute shadowed a method
            else:
                setattr(owner, name, old)
        self._undo.clear()


MARK = "phase::"


def _mark_phases(server, patches: _Patches) -> None:
    """Mark the phases of a round for the profiler (torch.profiler.record_function)."""
    from torch.profiler import record_function
    import fedrpc.algorithms as alg

    def marked(phase_of):
        def make(old):
            def call(*a, **kw):
                with record_function(MARK + phase_of(*a, **kw)):
                    return old(*a, **kw)
            return call
        return make

    patches.wrap(server.transport, "exchange", marked(lambda r, kind, *a, **kw: kind))
    # the profiler records only the thread that started it: evaluate in that thread
    patches.wrap(server, "_overlap_eval", lambda old: lambda: False)
    for name in ("admit", "aggregate"):       # the server times both as "aggregate"
        patches.wrap(server.strategy, name, marked(lambda *a, **kw: "aggregate"))
    patches.wrap(server.strategy, "group", marked(lambda *a, **kw: "group"))
    patches.wrap(alg, "group_targets", marked(lambda *a, **kw: "group"))
    for name in ("train_fusion", "fused_items"):
        patches.wrap(alg, name, marked(lambda *a, **kw: "fusion"))
    patches.wrap(server.strategy, "teacher", marked(lambda *a, **kw: "fusion"))


def _top_ops(prof, top: int) -> dict:
    """Per phase: the `top` operators by self CPU time (ms) inside its marked calls."""
    events = list(prof.events())
    spans = [(e.name[len(MARK):], e.time_range.start, e.time_range.end)
             for e in events if e.name.startswith(MARK)]
    per: dict = {}
    for e in events:
        if e.name.startswith(MARK):
            continue
        for phase, a, b in spans:
            if a <= e.time_range.start < b:
                ops = per.setdefault(phase, {})
                c = ops.setdefault(e.name, [0.0, 0])
                c[0] += e.self_cpu_time_total / 1e3
                c[1] += 1
                break
    out = {}
    for ph, ops in per.items():
        span_ms = sum(b - a for p, a, b in spans if p == ph) / 1e3
        rows = [{"op": name, "self_ms": round(v[0], 1), "calls": v[1]}
                for name, v in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]]
        rest = span_ms - sum(v[0] for v in ops.values())
        out[ph] = rows + [{"op": "(outside torch operators: Python, numpy, sklearn)",
                           "self_ms": round(rest, 1), "calls": 1}]
    return out


def build_local(cfg: Config):
    """Server (with its content features) and workers in this process, over the local
    transport — the path of `fedrpc run` with fed.transport=local, without a run folder."""
    from .runtime import check_population, rank_device, server_features
    from .server import Server
    from .transport import LocalTransport

    if cfg.runtime.keep_freed_memory:
        keep_freed_memory()
    inter = load_interactions(cfg)
    device = rank_device(cfg.run.device)
    workers = {rank: Worker(cfg, rank, cfg.fed.workers, inter, device)
               for rank in range(1, cfg.fed.workers + 1)}
    transport = LocalTransport(workers)
    server = Server(cfg, transport, None, device)
    check_population(cfg, server.users)
    if cfg.gfmfr.uses_content:
        server.features = server_features(cfg, server.catalogue)
    return server, workers


PHASES = ("train", "aggregate", "group", "fusion", "eval")


def bench_round(cfg: Config, rounds: int = 2, profile: bool = True, top: int = 8) -> dict:
    """Run `rounds` rounds (every one evaluated) and report the last: seconds per phase,
    floor, ratio; with `profile`, one more round under torch.profiler for the top
    operators per phase (its seconds are not used: the profiler slows a round)."""
    from .strategy import sample_participants

    cfg = replace_key(cfg, "eval.interval", 1)
    cfg = replace_key(cfg, "fed.rounds", rounds + int(profile))
    server, workers = build_local(cfg)
    heads: list = []
    patches = _Patches()
    try:
        import fedrpc.algorithms as alg
        patches.wrap(alg, "group_clients", lambda old: lambda x, *a, **kw: (
            heads.append(x), old(x, *a, **kw))[1])
        recs = []
        for r in range(rounds):
            if r == rounds - 1:
                heads.clear()
            rec = server.run_round(r)
            server.state.round = r + 1
            server.state.history.append(rec)
            recs.append(rec)
        patches.close()
        last = recs[-1]
        if heads and cfg.gfmfr.enabled:
            from .algorithms.grouping import pca_components
            x = np.asarray(heads[-1]).reshape(len(heads[-1]), -1)
            last.setdefault("gfmfr", {})["pca_components"] = pca_components(
                x, cfg.gfmfr.pca or None)
            last["gfmfr"]["head_features"] = int(x.shape[1])
        participants = sample_participants(server.users, cfg, rounds - 1)
        work = _phase_work(server, workers, participants, last)
        gemm, bw = _gemm_gflops(), _read_gbps()
        phases = {}
        for ph in PHASES:
            if ph not in last["seconds"]:
                continue
            flop, byts = work.get(ph, (0.0, 0.0))
            floor = max(flop / (gemm * 1e9), byts / (bw * 1e9))
            s = last["seconds"][ph]
            phases[ph] = {"seconds": round(s, 3), "gflop": round(flop / 1e9, 2),
                          "mbytes": round(byts / 1e6, 1), "floor_s": float(f"{floor:.3g}"),
                          "ratio": round(s / floor, 1) if floor > 0 else None}
        out = {"round": rounds - 1, "clients": int(last.get("clients", 0)),
               "threads": torch.get_num_threads(), "gemm_gflops": round(gemm, 1),
               "read_gbps": round(bw, 1), "phases": phases,
               "total_s": round(last["seconds"]["total"], 3),
               "seconds_by_round": [r["seconds"] for r in recs]}
        if "gfmfr" in last:
            out["gfmfr"] = last["gfmfr"]
        if "metrics" in last:
            out["test"] = {k: round(v, 4) for k, v in last["metrics"]["test"].items()
                           if k in ("HR@10", "NDCG@10")}
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile
            patches = _Patches()
            try:
                _mark_phases(server, patches)
                with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                    server.run_round(rounds)
            finally:
                patches.close()
            out["top_ops"] = _top_ops(prof, top)
        return out
    finally:
        patches.close()
        server.transport.close()
