"""Federated recommendation backbones, written for many clients at once.

Every parameter is stacked over clients: a client's table `T` is `[N, I, d]` (N clients)
and a dense parameter is `[N, *shape]`. A backbone declares which parameters are
*shared* (downloaded, trained, uploaded, aggregated) and which are *private* (never leave
the client), and which are *tables* (indexed by item; only the rows of a minibatch take
part in a step). Its forward works on the gathered rows of one minibatch per client.

Backbones (score = sigmoid(logit)):
- fedrap:   (the original FedRAP, Li et al., ICLR 2024) logit = w_u . (P_u[i] + C[i]) + b_u
            shared C only; private affine head (w_u, b_u) and item table P_u.
            Regulariser -alpha * MSE(P_u[B], C[B]) + beta * mean|C[B]|.
            No shared head: with GFMFR the client also uploads (w_u, b_u) for grouping
            and the group teacher only (`group_only`); they are never aggregated.
- fedrap_mlp: (the GFMFR reference code's variant) logit = w2 . ReLU(W1 [e_u ; P_u[i] + C[i]] + b1) + b2
            shared C, W1, b1, w2, b2; private e_u, P_u; the same regulariser.
- fedncf:   logit = w2 . ReLU(W1 [e_u ; Q[i]] + b1) + b2; shared Q, W1, b1, w2, b2;
            private e_u.
- fedavgmf: (FCF) logit = (e_u + w) . Q[i] + b; shared Q, w, b; private e_u.
- pfedrec:  logit = (h_u + w) . Q[i] + c_u + b; shared Q, w, b; private score head
            (h_u, c_u).
For fedavgmf and pfedrec the shared (w, b) is a global preference head: the part of
the score every client shares. Each backbone names its *head* (what the server groups
clients by) and its *output layer* (w_out, b_out) that turns an item embedding into a
preference; the group-fusion teacher uses it as g_k = sigmoid(F_k w_out + b_out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple          # per-client shape; "I" stands for the number of items
    shared: bool
    table: bool = False   # first dim indexes items
    init: str = "normal"  # normal | zeros | ones | xavier
    std: float = 0.01

    def full_shape(self, n_items: int) -> tuple:
        return tuple(n_items if s == "I" else s for s in self.shape)


def _init(p: Param, n: int, n_items: int, gen: torch.Generator) -> Tensor:
    shape = (n, *p.full_shape(n_items))
    if p.init == "zeros":
        return torch.zeros(shape)
    if p.init == "ones":
        return torch.ones(shape)
    if p.init == "xavier":
        fan_out, fan_in = p.shape[-2], p.shape[-1]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return torch.randn(shape, generator=gen) * p.std


class Backbone:
    name = ""
    head: tuple[str, ...] = ()        # shared dense params the server groups clients by
    output: tuple[str, str] = ("", "")  # (w_out [d], b_out [1]) for the teacher
    item_table = ""                   # the shared item table the fusion targets
    group_only: tuple[str, ...] = ()  # private params uploaded for grouping/teacher only
    # SGD rates used when fed.lr / fed.lr_item / fed.lr_private_item are left empty
    rates = {"lr": 0.05, "lr_item": 16.0, "lr_private_item": 0.5}

    def item_map_width(self) -> int:
        """Outputs of the per-client linear map applied to each sample's item vector (its
        matrix products dominate a training step): 1 for a user-vector dot product."""
        return 1

    def __init__(self, d: int):
        self.d = d

    def params(self) -> list[Param]:
        raise NotImplementedError

    def logits(self, rows: dict[str, Tensor], dense: dict[str, Tensor]) -> Tensor:
        """rows: table params gathered for a minibatch [N, B, d]; dense: [N, ...] -> [N, B]."""
        raise NotImplementedError

    def regulariser(self, rows, dense, valid: Tensor, weight) -> Tensor | None:
        """Extra per-client loss [N] (None = none); `valid` [N, B] marks real samples;
        `weight` = regulariser_weight(round) (a float, or a 0-d tensor when compiled)."""
        return None

    def regulariser_weight(self, round_: int) -> float:
        """The regulariser's weight at a round (its annealing schedule)."""
        return 1.0

    def group_logits(self, F: Tensor, head: dict[str, Tensor]) -> Tensor:
        """A group's preference logits over items from fused item embeddings F [G, I, d]
        and the group's averaged shared dense parameters head[name] [G, ...]: the
        backbone's own scoring with no private part (no user vector). [G, I]."""
        raise NotImplementedError

    def score_all(self, shared: dict[str, Tensor], private: dict[str, Tensor]) -> Tensor:
        """Logits of every item for n clients: global shared params (no client dim) and
        the clients' private params [n, ...] -> [n, I]."""
        n = next(iter(private.values())).shape[0]
        rows, dense = {}, {}
        for p in self.params():
            v = shared[p.name].unsqueeze(0).expand(n, *shared[p.name].shape) if p.shared \
                else private[p.name]
            (rows if p.table else dense)[p.name] = v
        return self.logits(rows, dense)

    # -- helpers -----------------------------------------------------------------
    def shared(self) -> list[Param]:
        return [p for p in self.params() if p.shared]

    def private(self) -> list[Param]:
        return [p for p in self.params() if not p.shared]

    def init_shared(self, n_items: int, seed: int) -> dict[str, Tensor]:
        """The global shared parameters at round 0 (no client dim)."""
        gen = torch.Generator().manual_seed(seed)
        return {p.name: _init(p, 1, n_items, gen)[0] for p in self.shared()}

    def init_private(self, n_items: int, seed: int, user: int,
                     tables: bool = True) -> dict[str, Tensor]:
        """A client's private parameters, drawn from its own (seed, user) stream.
        `tables=False` leaves out the item tables (drawn only where a later parameter's
        draws follow theirs in the stream), so the rest costs nothing per item."""
        state = np.random.SeedSequence([seed, user, 0xC11E]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(state))
        params, out = self.private(), {}
        for j, p in enumerate(params):
            if p.table and not tables:
                if p.init != "zeros" and any(not q.table for q in params[j + 1:]):
                    _init(p, 1, n_items, gen)            # keep the stream's position
                continue
            out[p.name] = _init(p, 1, n_items, gen)[0]
        return out


def _mlp_logits(e: Tensor, item_vec: Tensor, dense: dict[str, Tensor]) -> Tensor:
    """w2 . ReLU(W1 [e ; x] + b1) + b2 for e [N, d], x [N, B, d]."""
    W1 = dense["W1"]                                   # [N, d, 2d]
    d = e.shape[-1]
    user_part = torch.bmm(W1[:, :, :d], e.unsqueeze(-1)).squeeze(-1)          # [N, d]
    h = torch.bmm(item_vec, W1[:, :, d:].transpose(1, 2))                    # [N, B, d]
    h = torch.relu(h + (user_part + dense["b1"]).unsqueeze(1))
    return torch.bmm(h, dense["w2"].unsqueeze(-1)).squeeze(-1) + dense["b2"]  # [N, B]


class _MLPScorer(Backbone):
    """Backbones scoring with a shared MLP over [user vector ; item vector]."""
    head = ("W1", "b1", "w2", "b2")
    output = ("w2", "b2")

    def item_map_width(self) -> int:
        return self.d          # the item half of W1

    def group_logits(self, F, head):
        return _mlp_logits(torch.zeros(F.shape[0], self.d, device=F.device), F, head)


class _DotScorer(Backbone):
    """Backbones scoring (private user part + shared w) . Q[i] + b."""
    user_vector = ""                  # the private user part
    head = ("w", "b")
    output = ("w", "b")
    item_table = "Q"
    # the user vector's gradient is a mean over its minibatch: at lr 0.05 a client's
    # vector barely moves in a round and the model stays at popularity
    rates = {"lr": 5.0, "lr_item": 64.0, "lr_private_item": 0.5}

    def group_logits(self, F, head):
        return torch.bmm(F, head["w"].unsqueeze(-1)).squeeze(-1) + head["b"]

    def score_all(self, shared, private):
        """One matrix product over all items: (user part + w) Q^T + b (+ c_u)."""
        out = (private[self.user_vector] + shared["w"]) @ shared["Q"].T + shared["b"]
        return out + private["c"] if "c" in private else out


class _IndependenceRegulariser(Backbone):
    """FedRAP's regulariser on a private item table P and the shared table C."""
    takes_alpha_beta = True

    def __init__(self, d: int, alpha: float = 0.1, beta: float = 0.1):
        super().__init__(d)
        self.alpha, self.beta = alpha, beta

    def regulariser_weight(self, round_):
        # FedRAP anneals both weights from their initial values: tanh(round/10) * w0.
        return math.tanh(round_ / 10.0)

    def regulariser(self, rows, dense, valid, weight):
        vf = valid.float()
        n = (vf.sum(1) * self.d).clamp(min=1)
        diff = rows["P"] - rows["C"]
        mse = ((diff * diff).sum(-1) * vf).sum(1) / n
        l1 = (rows["C"].abs().sum(-1) * vf).sum(1) / n
        return weight * (self.beta * l1 - self.alpha * mse)


class FedRAP(_IndependenceRegulariser):
    """The original FedRAP: a private affine head over P_u[i] + C[i]; only C is shared."""
    name = "fedrap"
    item_table = "C"
    head = ("w", "b")
    output = ("w", "b")
    group_only = ("w", "b")
    # measured on ML-100K (README, "Learning rates"): the head's gradient is a mean over
    # its minibatch, so it needs a large rate; P_u at the shared table's rate (64)
    # memorises the training items and ranks held-out ones below popularity
    rates = {"lr": 5.0, "lr_item": 64.0, "lr_private_item": 0.5}

    def params(self):
        d = self.d
        return [Param("C", ("I", d), True, table=True, std=0.1),
                Param("w", (d,), False, std=0.1), Param("b", (1,), False, init="zeros"),
                Param("P", ("I", d), False, table=True, init="zeros")]

    def logits(self, rows, dense):
        x = rows["P"] + rows["C"]
        return torch.bmm(x, dense["w"].unsqueeze(-1)).squeeze(-1) + dense["b"]

    def score_all(self, shared, private):
        """w_u . C[i] for all items as one matrix product, plus w_u . P_u[i]."""
        w = private["w"]
        own = torch.bmm(private["P"], w.unsqueeze(-1)).squeeze(-1)
        return w @ shared["C"].T + own + private["b"]

    def group_logits(self, F, head):
        return torch.bmm(F, head["w"].unsqueeze(-1)).squeeze(-1) + head["b"]


class FedRAPMLP(_IndependenceRegulariser, _MLPScorer):
    """The GFMFR reference code's FedRAP: an MLP over [e_u ; P_u[i] + C[i]]."""
    name = "fedrap_mlp"
    item_table = "C"

    def params(self):
        d = self.d
        return [Param("C", ("I", d), True, table=True), Param("W1", (d, 2 * d), True, init="xavier"),
                Param("b1", (d,), True, init="zeros"), Param("w2", (d,), True, std=0.1),
                Param("b2", (1,), True, init="zeros"),
                Param("e", (d,), False), Param("P", ("I", d), False, table=True)]

    def logits(self, rows, dense):
        return _mlp_logits(dense["e"], rows["P"] + rows["C"], dense)


class FedNCF(_MLPScorer):
    name = "fedncf"
    item_table = "Q"

    def params(self):
        d = self.d
        return [Param("Q", ("I", d), True, table=True), Param("W1", (d, 2 * d), True, init="xavier"),
                Param("b1", (d,), True, init="zeros"), Param("w2", (d,), True, std=0.1),
                Param("b2", (1,), True, init="zeros"), Param("e", (d,), False)]

    def logits(self, rows, dense):
        return _mlp_logits(dense["e"], rows["Q"], dense)


class FedAvgMF(_DotScorer):
    name = "fedavgmf"
    user_vector = "e"

    def params(self):
        d = self.d
        return [Param("Q", ("I", d), True, table=True, std=0.1), Param("w", (d,), True, init="zeros"),
                Param("b", (1,), True, init="zeros"), Param("e", (d,), False, std=0.1)]

    def logits(self, rows, dense):
        u = dense["e"] + dense["w"]
        return torch.bmm(rows["Q"], u.unsqueeze(-1)).squeeze(-1) + dense["b"]


class PFedRec(_DotScorer):
    name = "pfedrec"
    user_vector = "h"

    def params(self):
        d = self.d
        return [Param("Q", ("I", d), True, table=True, std=0.1), Param("w", (d,), True, init="zeros"),
                Param("b", (1,), True, init="zeros"), Param("h", (d,), False, std=0.1),
                Param("c", (1,), False, init="zeros")]

    def logits(self, rows, dense):
        u = dense["h"] + dense["w"]
        return torch.bmm(rows["Q"], u.unsqueeze(-1)).squeeze(-1) + dense["b"] + dense["c"]


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "fedrap": FedRAP, "fedrap_mlp": FedRAPMLP, "fedncf": FedNCF, "fedavgmf": FedAvgMF,
    "pfedrec": PFedRec}


def make_backbone(name: str, d: int, alpha: float = 0.1, beta: float = 0.1) -> Backbone:
    """Backbone `name` with latent size d; alpha, beta weigh FedRAP's regulariser."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    cls = BACKBONES[name]
    return cls(d, alpha, beta) if getattr(cls, "takes_alpha_beta", False) else cls(d)
