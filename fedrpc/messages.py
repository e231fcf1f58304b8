"""Typed messages between the server (rank 0) and the workers, and their byte sizes.

One message per worker per phase carries the work of all its participating clients.
Each message knows two sizes:
- `payload_bytes()`: the bytes of its tensors and arrays as sent between ranks (shared
  parameters once per worker, teacher rows once per group present there);
- `client_bytes()`: per client, what that client's device would send or receive in a
  real deployment (GFMFR.md section 5): down = shared parameters + its group's
  preference vector g_k; up = its trained shared parameters.
The transport records both (DESIGN principle 4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .rows import stack

FLOAT_BYTES = 4
LOSS_UNIT = 2.0 ** -40     # per-client losses travel summed, in fixed point of this unit


def fixed_sum(values: Tensor) -> int:
    """The sum of per-client values in units of LOSS_UNIT: each value rounded to the unit
    first, so the sum is exact and does not depend on how clients are split over workers.
    Non-finite values count as 0 (their uploads are rejected at admission)."""
    v = torch.nan_to_num(values.double(), nan=0.0, posinf=0.0, neginf=0.0)
    return sum(int(x) for x in torch.round(v / LOSS_UNIT).tolist())


def nbytes(obj) -> int:
    """Bytes of the tensors / arrays / scalars inside `obj` (recursively)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, (int, float)):
        return 8
    fn = getattr(obj, "payload_bytes", None)     # an encoded upload (strategy codecs)
    return int(fn()) if fn is not None else 0


def _per_client(shared: dict[str, Tensor]) -> int:
    """Bytes of one client's copy of the shared parameters (no client dim)."""
    return sum(v.numel() * v.element_size() for v in shared.values())


@dataclass(frozen=True)
class Hello:
    """Server -> worker at start-up: which users do you host?"""


@dataclass(frozen=True)
class HelloReply:
    rank: int
    users: np.ndarray          # global ids of the clients hosted there
    item_ids: np.ndarray       # the public item catalogue (original ids, contiguous order)
    id_base: int
    id_space: int

    def payload_bytes(self) -> int:
        return nbytes(self.users) + nbytes(self.item_ids) + 16


@dataclass(frozen=True)
class TrainRequest:
    """Train these clients from the global shared parameters for one round."""
    round: int
    users: np.ndarray                    # [N] participating clients on this worker
    shared: dict[str, Tensor]            # global shared parameters
    lr: float
    lr_item: float
    lr_private_item: float
    teacher: Optional[Tensor] = None     # [G', I] preference vectors of the groups here
    teacher_row: Optional[np.ndarray] = None  # [N] row of `teacher` per client, -1 = none

    def payload_bytes(self) -> int:
        return nbytes(self.users) + nbytes(self.shared) + nbytes(self.teacher) \
            + nbytes(self.teacher_row) + 16

    def client_bytes(self) -> np.ndarray:
        """Per client: shared parameters + its group's g_k (I floats) when it has one."""
        base = _per_client(self.shared)
        if self.teacher is None:
            return np.full(len(self.users), base, dtype=np.int64)
        g = self.teacher.shape[1] * self.teacher.element_size()
        return base + np.where(self.teacher_row >= 0, g, 0).astype(np.int64)


@dataclass(frozen=True)
class TrainReply:
    """The uploads of a worker's participating clients. `shared` holds them as the upload
    codec encoded them (fed.protocol, fed.precision; dense [N, ...] tensors once the
    server decoded them). Only what the server uses travels per client: `n_samples` only
    with fed.aggregation=samples; base loss and KL only as sums over the clients here."""
    round: int
    users: np.ndarray                    # [N], sorted
    shared: dict                         # name -> [N, ...] tensor or an encoded upload
    n_samples: Optional[np.ndarray]      # [N] training samples per epoch, or None
    loss_sum: int = 0                    # sum of the clients' mean base loss (LOSS_UNIT)
    kl_sum: int = 0                      # sum of their mean distillation KL (LOSS_UNIT)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0             # the worker process's peak resident memory

    def payload_bytes(self) -> int:
        return nbytes(self.users) + nbytes(self.shared) + nbytes(self.n_samples) + 16 + 16

    def client_bytes(self) -> np.ndarray:
        """Per client: its upload as the codec encoded it (each codec's formula), plus its
        sample count when it is sent (the loss sums are diagnostics of the worker)."""
        per = np.zeros(len(self.users), dtype=np.int64)
        for v in self.shared.values():
            fn = getattr(v, "client_bytes", None)
            per += fn() if fn is not None else v[0].numel() * v.element_size()
        if self.n_samples is not None:
            per += self.n_samples.itemsize
        return per


@dataclass(frozen=True)
class EvalRequest:
    """Evaluate every hosted client with the latest global shared parameters."""
    round: int
    shared: dict[str, Tensor]
    splits: tuple = ("valid", "test")
    n_clients: int = 0                    # clients hosted by the receiving worker
    content: Optional[Tensor] = None      # [I, r] content vectors (gfmfr.profile_weight)
    profile_weight: float = 0.0

    def payload_bytes(self) -> int:
        extra = 0 if self.content is None else nbytes(self.content) + 8
        return nbytes(self.shared) + 16 + extra

    def client_bytes(self) -> np.ndarray:
        """Per client: the latest shared parameters it scores with (and the content
        vectors its profile is formed from)."""
        return np.full(self.n_clients, _per_client(self.shared) + nbytes(self.content),
                       dtype=np.int64)


@dataclass(frozen=True)
class EvalReply:
    round: int
    sums: dict = field(default_factory=dict)   # split -> metric sums (incl. "users")
    n_clients: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0                   # the worker process's peak resident memory

    def payload_bytes(self) -> int:
        return sum(8 * len(v) for v in self.sums.values()) + 16


@dataclass(frozen=True)
class CheckpointRequest:
    """Write the hosted clients' state after `completed` rounds to `path` (a round at or
    after it that has not completed is rolled back first)."""
    completed: int
    path: str

    def payload_bytes(self) -> int:
        return len(self.path.encode()) + 8


@dataclass(frozen=True)
class CheckpointReply:
    path: str
    sha256: str
    bytes: int
    clients: int
    seconds: float = 0.0

    def payload_bytes(self) -> int:
        return len(self.path.encode()) + len(self.sha256) + 24


@dataclass(frozen=True)
class RestoreRequest:
    """Load the hosted clients' state from these client files (earlier files win)."""
    paths: tuple

    def payload_bytes(self) -> int:
        return sum(len(p.encode()) for p in self.paths)


@dataclass(frozen=True)
class RestoreReply:
    restored: int               # hosted clients found in the files
    hosted: int

    def payload_bytes(self) -> int:
        return 16


@dataclass(frozen=True)
class Shutdown:
    """Server -> worker: the run is over."""


def stack_sorted(replies: list[TrainReply]) -> TrainReply:
    """The (decoded) replies of all workers as one, clients sorted by user id (fixed
    reduction order).

    `replies` is emptied: each worker's uploads are released as soon as they are copied
    into the stacked ones, so with no other reference to the replies the server's peak
    is the uploads plus one worker's part, not two copies of every upload (Rows.cat).
    One worker's replies, already sorted, are taken as they are (no copy)."""
    users = np.concatenate([r.users for r in replies])
    order = np.argsort(users, kind="stable")
    ord_t = torch.from_numpy(order)
    n_samples = (None if replies[0].n_samples is None
                 else np.concatenate([r.n_samples for r in replies])[order])
    head = (replies[0].round, users[order])
    tail = (n_samples, sum(r.loss_sum for r in replies), sum(r.kl_sum for r in replies),
            max(r.seconds for r in replies))
    parts = {k: [r.shared[k] for r in replies] for k in replies[0].shared}
    replies.clear()                      # from here `parts` alone holds the uploads
    shared = {k: stack(parts.pop(k), ord_t) for k in list(parts)}
    return TrainReply(*head, shared, *tail)


# ---------------------------------------------------------------------- control (transports)
@dataclass(frozen=True)
class Abort:
    """Server -> worker: the run failed elsewhere; stop now (non-gracefully)."""
    reason: str


@dataclass(frozen=True)
class RemoteFailure:
    """Worker -> server: handling the request raised; the worker logged the traceback."""
    kind: str                  # exception type name
    message: str
