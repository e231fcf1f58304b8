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

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import FedConfig, GFMFRConfig
from .data.sampling import TRAIN_NEGATIVES, negatives_for_users, user_rng
from .models.backbones import Backbone, FedRAP
from .state import ClientStore
from .strategy import distill

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


@dataclass
class ClientBatch:
    """What N clients train on this round, in user-id order."""
    users: np.ndarray                       # [N] global user ids
    items: np.ndarray                       # [N, S_max, B] item ids (0 where padding)
    labels: np.ndarray                      # [N, S_max, B] float32
    valid: np.ndarray                       # [N, S_max, B] bool
    steps: np.ndarray                       # [N] steps of each client
    n_samples: np.ndarray                   # [N] samples per epoch
    n_items: int


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
    B, S = s.batch_size, int(steps.max(initial=0))
    items = np.zeros((len(users), S, B), dtype=np.int64)
    labels = np.zeros((len(users), S, B), dtype=np.float32)
    valid = np.zeros((len(users), S, B), dtype=bool)
    for c, u in enumerate(users.tolist()):
        it = np.concatenate([pos[c], negs[c]])
        y = np.concatenate([np.ones(len(pos[c]), np.float32), np.zeros(len(negs[c]), np.float32)])
        rng = user_rng(s.seed, s.round, u, SHUFFLE)
        for e in range(s.epochs):
            order = rng.permutation(len(it))
            rows = slice(e * per_epoch[c], (e + 1) * per_epoch[c])
            # an epoch's minibatches are contiguous: fill them flat, padding stays zero
            items[c, rows].reshape(-1)[:len(it)] = it[order]
            labels[c, rows].reshape(-1)[:len(it)] = y[order]
            valid[c, rows].reshape(-1)[:len(it)] = True
    return ClientBatch(users, items, labels, valid, steps, n_samples, n_items)


@dataclass
class TrainOutput:
    shared: dict[str, Tensor]           # [N, ...] each client's trained shared params
                                        # (and its backbone's group_only private params)
    loss: Tensor                        # [N] mean base loss over the client's steps
    kl: Tensor                          # [N] mean KL over the client's steps (0 if none)
    n_samples: np.ndarray


def _sgd_rows(table: Tensor, flat: Tensor, grad: Tensor, valid: Tensor, lr: float,
              wd: float) -> None:
    """SGD on rows `flat` [K] of `table` viewed as [M * I, d], with gradients `grad` [K, d].

    Gradients of a repeated row add up; weight decay applies once to each row that a
    valid sample touched (padding carries zero gradient and no decay).
    """
    d = table.shape[-1]
    view = table.view(-1, d)
    uniq, inv = torch.unique(flat, return_inverse=True)
    g = torch.zeros(len(uniq), d, dtype=grad.dtype, device=grad.device).index_add_(0, inv, grad)
    touched = torch.zeros(len(uniq), dtype=grad.dtype, device=grad.device).index_add_(
        0, inv, valid.to(grad.dtype)) > 0
    old = view.index_select(0, uniq)
    decay = torch.where(touched, wd, 0.0).to(grad.dtype).unsqueeze(1)
    view.index_copy_(0, uniq, old - lr * (g + decay * old))


def train_clients(backbone: Backbone, global_shared: dict[str, Tensor], state: ClientStore,
                  batch: ClientBatch, s: LocalSettings, teacher: Optional[Tensor] = None,
                  groups: Optional[Tensor] = None) -> TrainOutput:
    """Local training of the clients in `batch`; updates their private state in place.

    teacher [G, I]: the groups' preference g_k (None in round 0 / without fusion);
    groups [N]: each client's group id (-1 = none: no distillation for that client).
    """
    N = len(batch.users)
    dev = state.device
    order = np.argsort(-batch.steps, kind="stable")          # most steps first
    steps_sorted = batch.steps[order]
    ord_t = torch.from_numpy(order)
    slots = state.slots(batch.users)[ord_t].to(dev)          # private-storage rows
    items = torch.from_numpy(batch.items[order]).to(dev)
    labels = torch.from_numpy(batch.labels[order]).to(dev)
    valid = torch.from_numpy(batch.valid[order]).to(dev)
    grp = (groups[ord_t] if groups is not None else torch.full((N,), -1, dtype=torch.long)).to(dev)
    teacher = teacher.to(dev) if teacher is not None else None

    # every client starts from the global shared parameters
    shared = {p.name: global_shared[p.name].to(dev).unsqueeze(0).repeat(
        N, *([1] * global_shared[p.name].dim())) for p in backbone.shared()}
    # each parameter's storage and the storage row of each (sorted) client
    own = torch.arange(N, device=dev)
    stores = {p.name: (shared[p.name], own) if p.shared else (state.private[p.name], slots)
              for p in backbone.params()}
    tables = {p.name: stores[p.name] for p in backbone.params() if p.table}
    dense_store = {p.name: stores[p.name] for p in backbone.params() if not p.table}
    ratio = state.ratio[slots].clone()
    sum_base = torch.zeros(N, dtype=torch.float64, device=dev)
    sum_kl = torch.zeros(N, dtype=torch.float64, device=dev)
    n_items, d = batch.n_items, backbone.d

    for step in range(int(steps_sorted[0]) if N else 0):
        n = int(np.searchsorted(-steps_sorted, -step, side="left"))  # clients with steps > step
        it, y, v = items[:n, step], labels[:n, step], valid[:n, step]
        flat = {name: (owner[:n].unsqueeze(1) * n_items + it).reshape(-1)
                for name, (_, owner) in tables.items()}
        rows = {name: store.view(-1, d).index_select(0, flat[name]).view(n, -1, d).requires_grad_(True)
                for name, (store, _) in tables.items()}
        dense = {name: store.index_select(0, owner[:n]).requires_grad_(True)
                 for name, (store, owner) in dense_store.items()}
        logits = backbone.logits(rows, dense)
        vf = v.float()
        cnt = vf.sum(1).clamp(min=1)
        bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * vf).sum(1) / cnt
        reg = backbone.regulariser(rows, dense, v, s.round)
        base = bce if reg is None else bce + reg
        loss = base
        if teacher is not None:                 # GFMFR's client half
            term, kl, ratio[:n] = distill(logits, it, grp[:n], teacher, ratio[:n], vf, base,
                                          s.round, s.total_rounds, s.ema_decay, s.max_ratio)
            loss = base + term
            sum_kl[:n] += kl.double()
        sum_base[:n] += base.detach().double()
        leaves = list(rows.values()) + list(dense.values())
        # a minibatch of n < batch_size samples steps with n / batch_size of the rate, so a
        # sample's step does not depend on how much data its client holds: with the mean
        # alone, a client with 25 samples took 10x the step of a full batch's sample, and
        # the distillation term (which keeps logits off saturation) then diverged
        step = (cnt / s.batch_size).clamp(max=1.0)
        grads = torch.autograd.grad((loss * step).sum(), leaves)
        with torch.no_grad():
            vflat = v.reshape(-1)
            for (name, (store, _)), g in zip(tables.items(), grads[:len(rows)]):
                lr = s.lr_item if name in shared else s.lr_private_item
                _sgd_rows(store, flat[name], g.reshape(-1, d), vflat, lr, s.weight_decay)
            for (name, p), g in zip(dense.items(), grads[len(rows):]):
                store, owner = dense_store[name]
                store.index_copy_(0, owner[:n], p.detach() - s.lr * (g + s.weight_decay * p.detach()))

    state.ratio[slots] = ratio
    inv = torch.from_numpy(np.argsort(order, kind="stable")).to(dev)
    steps_t = torch.from_numpy(np.maximum(steps_sorted, 1)).double().to(dev)
    cpu = lambda t: t.to("cpu")        # uploads cross between ranks on the CPU
    # a backbone without a shared head also hands over its private head, for grouping
    # and the group teacher only (the worker drops it when GFMFR is off)
    heads = {k: state.private[k][slots] for k in backbone.group_only}
    return TrainOutput(shared={k: cpu(v[inv]) for k, v in (shared | heads).items()},
                       loss=cpu((sum_base / steps_t)[inv].float()),
                       kl=cpu((sum_kl / steps_t)[inv].float()), n_samples=batch.n_samples)
