"""Client-side local training, batched across clients (DESIGN principle 8).

A round of local training for N clients runs as one loop over *steps*: at step s every
client that still has a minibatch left trains on its own s-th minibatch, all in one set
of tensor operations. Per-client semantics are kept exactly:
- each client starts from the global shared parameters and its own private ones;
- its samples are its training positives plus `num_negatives` fresh negatives each, drawn
  from its (seed, round, user) stream among the items outside its training positives;
  its epochs are shuffled by its own stream;
- its loss is the mean over its own minibatch, and a minibatch of n < batch_size samples
  steps with n / batch_size of the learning rate (a sample's step does not depend on how
  many samples its client holds); its SGD step touches only its own
  parameters: dense parameters, and the table rows of its minibatch (weight decay applies
  to the parameters that take part in the step, as with the L1/MSE terms);
- the distillation weight keeps a per-client EMA ratio.
Training the clients one at a time (`batched=False`) runs the same code with N = 1.

Clients are ordered by their number of steps (most first), so the clients active at step
s are always a prefix: a step slices, it never gathers clients.
"""
from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental import _config as shape_config

from .config import FedConfig, GFMFRConfig
from .data.sampling import TRAIN_NEGATIVES, negatives_for_users, user_rng
from .models.backbones import Backbone, FedRAP
from .rows import Rows
from .state import ClientStore
from .strategy import distill, distill_weight

_FED, _GFMFR = FedConfig(), GFMFRConfig()  # defaults come from the config, in one place
_RATES = FedRAP.rates                      # the default backbone's

SHUFFLE = 3  # purpose id of the per-client shuffling stream


@dataclass
class LocalSettings:
    """What one round of local training needs (the worker fills it from the config and
    the server's request; see fed.* and gfmfr.* for the meaning of each field)."""
    epochs: int = _FED.local_epochs
    batch_size: int = _FED.batch_size
    num_negatives: int = _FED.num_negatives
    lr: float = _RATES["lr"]
    lr_item: float = _RATES["lr_item"]
    lr_private_item: float = _RATES["lr_private_item"]
    weight_decay: float = _FED.weight_decay
    seed: int = 0
    round: int = 0
    total_rounds: int = 1
    ema_decay: float = _GFMFR.ema_decay
    max_ratio: float = _GFMFR.max_ratio
    compile: bool = False            # runtime.compile: each whole step by torch.compile


@dataclass
class ClientBatch:
    """What N clients train on this round, clients in user-id order.

    Each client's table rows are packed: client c owns packed rows
    offsets[c] .. offsets[c + 1] - 1, one per distinct item of its samples (`items`,
    ascending within the client); `rows` names a sample's packed row (row K, one past
    the last, is padding).

    Samples are stored step-major, without the steps a client does not take: `order`
    sorts the clients by their number of steps (most first), so the clients that train
    at step s are the first `active(s)` of that order, and step s is the block
    rows[step_start[s]:step_start[s + 1]] of active(s) x B samples, client order[p] at
    p * B .. p * B + B - 1 (slots past its samples are padding)."""
    users: np.ndarray                       # [N] global user ids
    rows: np.ndarray                        # [T] packed row of each sample slot
    labels: np.ndarray                      # [T] float32
    valid: np.ndarray                       # [T] bool
    step_start: np.ndarray                  # [S_max + 1] first slot of each step
    order: np.ndarray                       # [N] clients by steps, most first (stable)
    steps: np.ndarray                       # [N] steps of each client
    n_samples: np.ndarray                   # [N] samples per epoch
    n_items: int
    counts: np.ndarray                      # [N] distinct items (packed rows) per client
    items: np.ndarray                       # [K] item id of each packed row
    batch_size: int

    def active(self, step: int) -> int:
        """How many clients train at `step` (a prefix of `order`)."""
        return (self.step_start[step + 1] - self.step_start[step]) // self.batch_size

    def minibatch(self, c: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Client c's (position in `users`) minibatch at `step`: item ids, labels."""
        p = int(np.flatnonzero(self.order == c)[0])
        at = slice(self.step_start[step] + p * self.batch_size,
                   self.step_start[step] + (p + 1) * self.batch_size)
        v = self.valid[at]                  # real samples never name the padding row
        return self.items[self.rows[at][v]], self.labels[at][v]

    def row_writers(self) -> list[tuple[Tensor, Tensor]]:
        """For every step, the samples that write its table rows, as positions within the
        step's block (-1 = none, so that no list is shorter than 2: a compiled step then
        never meets the sizes 0 and 1 that torch.compile specialises on):
        - single [U]: the samples whose row no other sample of the step names;
        - multi [M, R]: for each row named by several samples, those samples down its
          column in step order (row 0: the first occurrences), padded with -1.
        Padding samples write nothing. A client's samples of one step are one block, and
        its rows are its own, so a row's samples within a step are all one client's."""
        B, pad = self.batch_size, len(self.items)         # padding samples name row K
        # each block's samples sorted by (row, position): a row's samples end up together,
        # first occurrence first (rows < 2^54, positions < B)
        bits = max(1, int(B - 1).bit_length())
        blocks = self.rows.reshape(-1, B)
        srt = np.sort((blocks << bits) | np.arange(B), axis=1).reshape(-1)
        row = srt >> bits
        slot = np.repeat(np.arange(len(blocks)) * B, B) + (srt & ((1 << bits) - 1))
        real = row != pad
        row, ts = row[real], slot[real]
        blk = ts // B
        start = np.flatnonzero(np.r_[True, (row[1:] != row[:-1]) | (blk[1:] != blk[:-1])]) \
            if len(ts) else np.zeros(0, np.int64)
        size = np.diff(np.r_[start, len(ts)])
        bounds = np.searchsorted(ts[start], self.step_start)
        out = []
        for s in range(len(self.step_start) - 1):
            a, b, first = bounds[s], bounds[s + 1], self.step_start[s]
            st, sz = start[a:b], size[a:b]
            single = ts[st[sz == 1]] - first
            many = sz > 1
            m = max(2, int(sz.max(initial=0)))
            pos = st[many][:, None] + np.arange(m)
            inside = np.arange(m) < sz[many][:, None]
            multi = np.where(inside, ts[np.minimum(pos, len(ts) - 1)] - first, -1)
            single = np.concatenate([single, np.full(max(0, 2 - len(single)), -1)])
            multi = np.concatenate([multi, np.full((max(0, 2 - len(multi)), m), -1)])
            out.append((torch.from_numpy(single.astype(np.int64)),
                        torch.from_numpy(np.ascontiguousarray(multi.T, dtype=np.int64))))
        return out

    def samples(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """All of client c's samples over its steps, in training order: items, labels."""
        parts = [self.minibatch(c, s) for s in range(int(self.steps[c]))]
        return (np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
                np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32))


def build_client_batches(users: np.ndarray, train_indptr: np.ndarray, train_items: np.ndarray,
                         n_items: int, s: LocalSettings) -> ClientBatch:
    """Each client's minibatches for all its epochs: positives + fresh negatives, shuffled.

    Negatives come from the items outside the client's training positives. Held-out
    (validation / test) items are unknown to training and may be drawn: excluding them
    would leak them, since a model with per-user item rows (FedRAP's P_u) would learn that
    the only items never pushed down are the held-out ones.
    """
    pos = [train_items[train_indptr[u]:train_indptr[u + 1]] for u in users.tolist()]
    counts = np.array([len(p) * s.num_negatives for p in pos], dtype=np.int64)
    negs = negatives_for_users(s.seed, s.round, users, n_items, train_indptr, train_items,
                               counts, TRAIN_NEGATIVES)
    n_samples = np.array([len(p) + len(q) for p, q in zip(pos, negs)], dtype=np.int64)
    per_epoch = -(-n_samples // s.batch_size)
    steps = per_epoch * s.epochs
    samples = [np.concatenate([p, q]) for p, q in zip(pos, negs)]
    distinct = [np.unique(it, return_inverse=True) for it in samples]
    n_rows = np.array([len(d[0]) for d in distinct], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_rows)])
    B, S = s.batch_size, int(steps.max(initial=0))
    order = np.argsort(-steps, kind="stable")
    place = np.empty(len(users), dtype=np.int64)             # client -> its place in order
    place[order] = np.arange(len(users))
    active = np.searchsorted(-steps[order], -np.arange(S), side="left")  # steps > s
    step_start = np.concatenate([[0], np.cumsum(active * B)]).astype(np.int64)
    where, what, label = [], [], []
    for c, u in enumerate(users.tolist()):
        row = offsets[c] + distinct[c][1].reshape(-1)
        y = np.concatenate([np.ones(len(pos[c]), np.float32), np.zeros(len(negs[c]), np.float32)])
        rng = user_rng(s.seed, s.round, u, SHUFFLE)
        perm = np.stack([rng.permutation(len(row)) for _ in range(s.epochs)])  # [E, n]
        # an epoch's minibatches are consecutive steps, filled in sample order
        k = np.arange(len(row))
        step = np.arange(s.epochs)[:, None] * per_epoch[c] + k // B
        where.append((step_start[step] + place[c] * B + k % B).reshape(-1))
        what.append(row[perm].reshape(-1))
        label.append(y[perm].reshape(-1))
    T = int(step_start[-1])
    rows = np.full(T, offsets[-1], dtype=np.int64)            # padding: row K
    labels = np.zeros(T, dtype=np.float32)
    valid = np.zeros(T, dtype=bool)
    if where:
        at = np.concatenate(where)
        rows[at], labels[at], valid[at] = np.concatenate(what), np.concatenate(label), True
    items = (np.concatenate([d[0] for d in distinct]) if len(distinct)
             else np.zeros(0, np.int64)).astype(np.int64)
    return ClientBatch(users, rows, labels, valid, step_start, order, steps, n_samples,
                       n_items, n_rows, items, B)


@dataclass
class TrainOutput:
    shared: dict                        # each client's trained shared params: [N, ...]
                                        # tensors, the item table as `Rows` over the
                                        # global table (and the backbone's group_only
                                        # private params)
    loss: Tensor                        # [N] mean base loss over the client's steps
    kl: Tensor                          # [N] mean KL over the client's steps (0 if none)
    n_samples: np.ndarray
    private: dict = None                # name -> [K, d] trained private-table rows
                                        # (the batch's packed rows)


def _sgd_rows(table: Tensor, flat: Tensor, grad: Tensor, old: Tensor, lr: float,
              wd: float) -> None:
    """SGD on rows `flat` [K] of `table` [R, d]: `grad` [K, d] the samples' gradients,
    `old` [K, d] the rows' values before the step.

    Gradients of a repeated row add up; weight decay applies once to each row a sample
    touched (a row touched m times takes 1/m of it from each). Padding samples point at
    the table's last row, padding's own (never returned), with zero gradients: they need
    no filtering, and every other row sums the same terms in the same order. One
    scatter-add into the table: no sort, no temporary per distinct row.
    """
    g = grad
    if wd:
        m = torch.bincount(flat, minlength=table.shape[0]).index_select(0, flat)
        g = g.addcmul_(old, (wd / m.to(g.dtype)).unsqueeze(1))
    table.index_add_(0, flat, g, alpha=-lr)


def _objective(backbone: Backbone, batch_size: int, ema_decay: float, max_ratio: float,
               rows: dict, dense: dict, y: Tensor, v: Tensor, reg_w, teacher=None,
               items=None, group=None, ratio=None, dist_w=None):
    """One local step's objective for n clients' minibatches: (the sum over clients of
    their scaled losses, to differentiate; base losses [n]; with a teacher also KL [n]
    and the updated distillation ratios [n]). Pure: no state changes."""
    logits = backbone.logits(rows, dense)
    vf = v.float()
    cnt = vf.sum(1).clamp(min=1)
    bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * vf).sum(1) / cnt
    reg = backbone.regulariser(rows, dense, v, reg_w)
    base = bce if reg is None else bce + reg
    # a minibatch of n < batch_size samples steps with n / batch_size of the rate, so a
    # sample's step does not depend on how much data its client holds: with the mean
    # alone, a client with 25 samples took 10x the step of a full batch's sample, and
    # the distillation term (which keeps logits off saturation) then diverged
    step_scale = (cnt / batch_size).clamp(max=1.0)
    if teacher is None:
        return (base * step_scale).sum(), base
    term, kl, ratio = distill(logits, items, group, teacher, ratio, vf, base, dist_w,
                              ema_decay, max_ratio)
    return ((base + term) * step_scale).sum(), base, kl, ratio


def _eager_step(backbone: Backbone, batch_size: int, ema_decay: float, max_ratio: float,
                tables: dict, dense_store: dict, owner: dict, flat: Tensor, y: Tensor,
                v: Tensor, single, multi, lr: dict, wd: float, reg_w, *teach):
    """One local step for n clients, uncompiled: gather the minibatches' table rows
    (`flat`) and the clients' dense parameters (`owner`), `_objective`'s loss and
    gradients by autograd, and the SGD step, written in place into `tables` and
    `dense_store` (`single`, `multi`: unused, see `_compiled_step`). Returns
    `_objective`'s outputs after the loss."""
    n, d = y.shape[0], backbone.d
    rows = {k: t.index_select(0, flat).view(n, -1, d).requires_grad_(True)
            for k, t in tables.items()}
    dense = {k: store.index_select(0, owner[k]).requires_grad_(True)
             for k, store in dense_store.items()}
    objective, *aux = _objective(backbone, batch_size, ema_decay, max_ratio, rows, dense, y,
                                 v, reg_w, *teach)
    grads = torch.autograd.grad(objective, list(rows.values()) + list(dense.values()))
    with torch.no_grad():
        for (k, table), g in zip(tables.items(), grads[:len(rows)]):
            _sgd_rows(table, flat, g.reshape(-1, d), rows[k].detach().reshape(-1, d), lr[k], wd)
        for (k, p), g in zip(dense.items(), grads[len(rows):]):
            dense_store[k].index_copy_(0, owner[k], p.detach() - lr[k] * (g + wd * p.detach()))
    return aux


def _compiled_step(backbone: Backbone, batch_size: int, ema_decay: float, max_ratio: float,
                   tables: dict, dense_store: dict, owner: dict, flat: Tensor, y: Tensor,
                   v: Tensor, single: Tensor, multi: Tensor, lr: dict, wd: Tensor, reg_w,
                   teacher=None, items=None, group=None, ratio=None, dist_w=None):
    """One whole local step for n clients, written to be compiled as one graph: gather
    the minibatches' table rows and the clients' dense parameters, `_objective`'s loss
    and gradients (torch.func), and the SGD step, written in place into `tables` and
    `dense_store`. Returns `_objective`'s outputs after the loss.

    The step is `_sgd_rows`' arithmetic with the row gradients summed per row first:
    each row named by the step is written once (`single`, `multi`: the samples that name
    it, see ClientBatch.row_writers), so the update needs no scatter-add, whose compiled
    form adds atomically, in an order that changes from run to run. Sums are in sample
    order within the row; they differ from the uncompiled step's by float rounding."""
    n, d = y.shape[0], backbone.d
    rows = {k: t.index_select(0, flat).view(n, -1, d) for k, t in tables.items()}
    dense = {k: store.index_select(0, owner[k]) for k, store in dense_store.items()}

    def loss(rows, dense):
        out = _objective(backbone, batch_size, ema_decay, max_ratio, rows, dense, y, v,
                         reg_w, teacher, items, group, ratio, dist_w)
        return out[0], out[1:]

    (g_rows, g_dense), (_, aux) = torch.func.grad_and_value(loss, argnums=(0, 1), has_aux=True)(
        rows, dense)
    pad = tables[next(iter(tables))].shape[0] - 1 if tables else 0   # padding's row
    writer = torch.cat([single, multi[0]])
    real = writer >= 0
    at = torch.where(real, flat.index_select(0, writer.clamp(min=0)), pad)
    for k, table in tables.items():
        old, g = rows[k].reshape(-1, d), g_rows[k].reshape(-1, d)
        # [M, R, d] summed over its first dimension: vector loops along the rows' d
        gm = torch.where((multi >= 0).unsqueeze(-1), g.index_select(
            0, multi.clamp(min=0).reshape(-1)).view(*multi.shape, d), 0.0).sum(0)
        total = torch.cat([g.index_select(0, single.clamp(min=0)), gm])
        o = old.index_select(0, writer.clamp(min=0))
        new = torch.where(real.unsqueeze(1), o - lr[k] * (total + wd * o), 0.0)
        table.index_put_((at,), new)          # padding's row is written its zero
    for k, store in dense_store.items():
        p = dense[k]
        store.index_copy_(0, owner[k], p - lr[k] * (g_dense[k] + wd * p))
    return aux


_COMPILED: dict = {}


def has_cxx_compiler() -> bool:
    """Whether torch.compile can build CPU kernels here (a C++ compiler on PATH)."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def compiled_step(backbone: Backbone, s: LocalSettings):
    """`_compiled_step` bound to this backbone and the settings' constants, compiled by
    torch.compile (dynamic shapes: one graph serves every number of clients; built once
    per process and backbone configuration)."""
    # a backbone's behaviour is its class and its attributes (d, FedRAP's alpha and beta)
    key = (type(backbone), tuple(sorted(vars(backbone).items())), s.batch_size,
           s.ema_decay, s.max_ratio)
    if key not in _COMPILED:
        if not has_cxx_compiler():
            raise RuntimeError("runtime.compile=true needs a C++ compiler on PATH for "
                               "torch.compile's CPU kernels (c++, g++ or clang++); install "
                               "one or set runtime.compile=false")
        # fullgraph: a step that could not be compiled whole is an error, never a
        # silent fall back to slower eager code
        compiled = torch.compile(functools.partial(_compiled_step, backbone, s.batch_size,
                                                   s.ema_decay, s.max_ratio),
                                 dynamic=True, fullgraph=True)

        def step(*args):
            # no size tied to another because they were equal when first traced (the
            # first step's n clients and the N of the dense store): one graph for all
            with shape_config.patch(use_duck_shape=False):
                return compiled(*args)
        _COMPILED[key] = step
    return _COMPILED[key]


def train_clients(backbone: Backbone, global_shared: dict[str, Tensor], state: ClientStore,
                  batch: ClientBatch, s: LocalSettings, teacher: Optional[Tensor] = None,
                  groups: Optional[Tensor] = None, store_tables: bool = True) -> TrainOutput:
    """Local training of the clients in `batch`; updates their private state in place
    (with `store_tables=False`, the trained private-table rows come back in
    `TrainOutput.private` for the caller to store, e.g. once for several batches).

    teacher [G, I]: the groups' preference g_k (None in round 0 / without fusion);
    groups [N]: each client's group id (-1 = none: no distillation for that client).

    Item tables train on the packed rows of the clients' own items only: the shared
    table's rows start from the global table, the private table's from the store; no
    client ever holds a copy of a whole table.
    """
    N = len(batch.users)
    dev = state.device
    order = batch.order                                       # most steps first
    steps_sorted = batch.steps[order]
    ord_t = torch.from_numpy(order)
    slots = state.slots(batch.users)[ord_t].to(dev)          # private-storage rows
    rows_of = torch.from_numpy(batch.rows).to(dev)           # step-major, see ClientBatch
    labels = torch.from_numpy(batch.labels).to(dev)
    valid = torch.from_numpy(batch.valid).to(dev)
    grp = (groups[ord_t] if groups is not None else torch.full((N,), -1, dtype=torch.long)).to(dev)
    teacher = teacher.to(dev) if teacher is not None else None
    item_of = torch.from_numpy(np.append(batch.items, 0)).to(dev)   # padding row: item 0
    items_t = torch.from_numpy(batch.items).to(dev)
    d = backbone.d
    pad = torch.zeros(1, d, device=dev)

    # packed tables [K + 1, d] (the last row is padding's); dense params [N, ...]
    tables, dense_store = {}, {}
    for p in backbone.params():
        if p.table:
            start = (global_shared[p.name].to(dev).index_select(0, items_t) if p.shared else
                     state.table_rows(p.name, batch.users, batch.counts, batch.items))
            tables[p.name] = torch.cat([start, pad])
        elif p.shared:
            v = global_shared[p.name].to(dev)
            dense_store[p.name] = v.unsqueeze(0).repeat(N, *([1] * v.dim()))
        else:
            dense_store[p.name] = state.private[p.name]
    own = torch.arange(N, device=dev)
    owner = {name: (own if name in global_shared else slots) for name in dense_store}
    ratio = state.ratio[slots].clone()
    sum_base = torch.zeros(N, dtype=torch.float64, device=dev)
    sum_kl = torch.zeros(N, dtype=torch.float64, device=dev)

    reg_w, dist_w = backbone.regulariser_weight(s.round), distill_weight(s.round, s.total_rounds)
    lr = {name: s.lr_item if name in global_shared else s.lr_private_item for name in tables}
    lr.update({name: s.lr for name in dense_store})
    wd = s.weight_decay
    if s.compile:
        step_fn, writers = compiled_step(backbone, s), batch.row_writers()
        # numbers as tensors: one compiled graph for every round and rate
        as_t = lambda x: torch.tensor(x, device=dev)
        reg_w, dist_w, wd, lr = as_t(reg_w), as_t(dist_w), as_t(wd), {k: as_t(x) for k, x in lr.items()}
    else:
        step_fn = functools.partial(_eager_step, backbone, s.batch_size, s.ema_decay, s.max_ratio)
    for step in range(int(steps_sorted[0]) if N else 0):
        n = batch.active(step)                              # clients with steps > step
        at = slice(int(batch.step_start[step]), int(batch.step_start[step + 1]))
        flat, y, v = rows_of[at], labels[at].view(n, -1), valid[at].view(n, -1)
        single, multi = (w.to(dev) for w in writers[step]) if s.compile else (None, None)
        own_n = {k: o[:n] for k, o in owner.items()}
        per_client = [flat, y, v]
        if teacher is not None:                 # GFMFR's client half
            per_client += [item_of.index_select(0, flat).view(n, -1), grp[:n], ratio[:n]]
        if s.compile:
            # the per-client inputs as copies, not views: torch.compile guards on a view's
            # base, and would compile again for inputs that are not views. A lone client
            # (n = 1, a size torch.compile specialises a graph to) runs twice, in the graph
            # of every other step, so that its numbers never depend on whether it trains
            # alone: its copy's rows are written by no one, and its dense parameters are
            # written twice with equal values
            own = (lambda t: torch.cat([t, t])) if n == 1 else (lambda t: t.clone())
            per_client = [own(t) for t in per_client]
            own_n = {k: own(o) for k, o in own_n.items()}
        flat, y, v, *clients_teach = per_client
        teach = (teacher, *clients_teach, dist_w) if teacher is not None else ()
        out = step_fn(tables, dense_store, own_n, flat, y, v, single, multi, lr, wd, reg_w,
                      *teach)
        out = [o[:n] for o in out]
        sum_base[:n] += out[0].detach().double()
        if teacher is not None:
            sum_kl[:n] += out[1].double()
            ratio[:n] = out[2]

    state.ratio[slots] = ratio
    cpu = lambda t: t.to("cpu")        # uploads cross between ranks on the CPU
    counts_t = torch.from_numpy(batch.counts)
    out, private = {}, {}
    for p in backbone.params():
        if p.table and p.shared:
            out[p.name] = Rows(counts_t, torch.from_numpy(batch.items),
                               cpu(tables[p.name][:-1]), global_shared[p.name].cpu())
        elif p.table:
            private[p.name] = tables[p.name][:-1]
            if store_tables:
                state.put_rows(p.name, batch.users, batch.counts, batch.items, private[p.name])
    inv = torch.from_numpy(np.argsort(order, kind="stable")).to(dev)
    for name in global_shared:
        if name not in out:
            out[name] = cpu(dense_store[name][inv])
    # a backbone without a shared head also hands over its private head, for grouping
    # and the group teacher only (the worker drops it when GFMFR is off)
    for k in backbone.group_only:
        out[k] = cpu(state.private[k][slots][inv])
    steps_t = torch.from_numpy(np.maximum(steps_sorted, 1)).double().to(dev)
    return TrainOutput(shared=out, loss=cpu((sum_base / steps_t)[inv].float()),
                       kl=cpu((sum_kl / steps_t)[inv].float()), n_samples=batch.n_samples,
                       private=private)
