"""Secure group aggregation (`fed.protocol=secagg`): the server learns only per-group
sums of item tables, never one client's table.

A round has two upload phases:
1. (train) each client uploads its small heads in the clear (what the server groups
   by) and a fresh X25519 public key (32 bytes); it keeps its trained item table.
2. (upload) the server forms the secure sets: a group with at least
   m = max(2, gfmfr.min_group_size) members is a set of its own; the members of smaller
   groups form one set together, or, when they are fewer than m, join the largest set;
   with fewer than m participants in all nobody uploads (the table is not updated).
   Without GFMFR all participants form one set. The server relays to each client the
   ids and public keys of the other members of its set (counted as bytes). Each client
   uploads its table in fixed point on the ring Z_2^32 (SCALE_BITS fractional bits),
   plus, for every other member v, +PRG(s_uv) if u < v else -PRG(s_uv), with
   s_uv = SHA-256(X25519(sk_u, pk_v), round, u, v): the masks cancel exactly in the
   set's sum and one masked upload is uniformly random on the ring.
A worker hosting several members of a set adds their masked uploads before sending
(their mutual masks cancel, what crosses is still masked by the masks shared with
members elsewhere; a set whose members all live on one worker is masked by nobody
outside it, so that worker's sum is the set's plain sum, which the server learns
anyway). Physical bytes into the server: sets x I x d x 4 per worker.

Not provided: dropout recovery (Bonawitz et al.'s Shamir shares). A worker that fails
between the phases abandons the upload of every set with a member there, for the
round (recorded); the other sets are aggregated. Per-client admission checks (finite,
update norm) cannot see masked tables: they apply to the heads only, and a group sum
whose value left the ring's range (|sum| >= 2^(31 - SCALE_BITS)) wraps silently.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .codec import UploadCodec

RING = 2 ** 32
SCALE_BITS = 16
KEY_BYTES = 32
ID_BYTES = 8
PUBKEY = "_pubkey"           # the name of the public keys among a reply's uploads


def to_ring(x: Tensor) -> Tensor:
    """fp32 values -> int64 ring elements in [0, 2^32) (round to 2^-SCALE_BITS)."""
    return torch.round(x.double() * 2 ** SCALE_BITS).to(torch.int64) % RING


def from_ring(s: Tensor) -> Tensor:
    """A ring element (a sum) -> the signed value it stands for (float64)."""
    s = s.to(torch.int64) % RING
    return torch.where(s >= RING // 2, s - RING, s).double() / 2 ** SCALE_BITS


def _pair_seed(private, peer_public: bytes, round_: int, u: int, v: int) -> int:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    a, b = min(u, v), max(u, v)
    h = hashlib.sha256(shared + b"fedrpc-secagg" + np.array([round_, a, b], np.int64).tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def prg_mask(seed: int, shape: tuple) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, RING, shape, generator=g, dtype=torch.int64)


# ---------------------------------------------------------------------- messages
@dataclass(frozen=True)
class PublicKeys:
    """Phase 1: one X25519 public key per client (the item table stays on the worker)."""
    keys: Tensor                           # [N, 32] uint8

    def payload_bytes(self) -> int:
        return self.keys.numel()

    def client_bytes(self) -> np.ndarray:
        return np.full(len(self.keys), KEY_BYTES, dtype=np.int64)


@dataclass(frozen=True)
class MaskRequest:
    """Phase 2, server -> worker: the secure set of each of its participating clients and,
    per set, its members' ids and public keys (relayed)."""
    round: int
    users: np.ndarray                      # [N] clients here that upload this round
    set_of_user: np.ndarray                # [N] their set
    members: dict                          # set id -> [m] member ids (all workers)
    keys: dict                             # set id -> [m, 32] uint8 their public keys

    def payload_bytes(self) -> int:
        return int(self.users.nbytes + self.set_of_user.nbytes
                   + sum(v.nbytes for v in self.members.values())
                   + sum(v.numel() for v in self.keys.values()))

    def client_bytes(self) -> np.ndarray:
        """Per client: the ids and keys of the other members of its set."""
        m = np.array([len(self.members[int(s)]) for s in self.set_of_user], dtype=np.int64)
        return (m - 1) * (ID_BYTES + KEY_BYTES)


@dataclass(frozen=True)
class MaskedSums:
    """Phase 2, worker -> server: per set, the sum of its members' masked uploads here."""
    round: int
    users: np.ndarray                      # [N] the clients whose uploads are inside
    set_ids: np.ndarray                    # [S]
    sums: Tensor                           # [S, I, d] int32: ring elements' bit patterns
    seconds: float = 0.0

    def payload_bytes(self) -> int:
        return int(self.users.nbytes + self.set_ids.nbytes) + self.sums.numel() * 4

    def client_bytes(self) -> np.ndarray:
        """Per client: its own masked table, I * d ring elements of 4 bytes."""
        return np.full(len(self.users), self.sums[0].numel() * 4 if len(self.sums) else 0,
                       dtype=np.int64)


# ---------------------------------------------------------------------- the codec
class SecAgg(UploadCodec):
    name = "secagg"

    def __init__(self, precision, item_table):
        super().__init__(precision, item_table)
        self.pending = None     # worker side: (round, users, tables, private keys)

    # -- worker ------------------------------------------------------------------
    def encode(self, sent: dict[str, Tensor], trained: dict[str, Tensor]) -> dict:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        out = self.precision.encode_all({k: v for k, v in trained.items()
                                         if k != self.item_table})
        table = trained[self.item_table]                  # Rows over the table sent
        private = [X25519PrivateKey.generate() for _ in range(table.n)]
        keys = torch.tensor(np.frombuffer(b"".join(
            k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for k in private),
            dtype=np.uint8).reshape(table.n, KEY_BYTES).copy())
        self.pending = (table, private)
        out[self.item_table] = PublicKeys(keys)
        return out

    def masked_sums(self, req: MaskRequest, hosted: np.ndarray) -> MaskedSums:
        """Phase 2 for this worker's clients in `req` (`hosted`: the participants of
        phase 1 here, the rows of the pending tables)."""
        table, private = self.pending
        row = {int(u): j for j, u in enumerate(hosted)}
        here = set(int(u) for u in req.users)
        ids, sums = [], []
        for s in sorted(set(int(x) for x in req.set_of_user)):
            members, keys = req.members[s], req.keys[s]
            total = torch.zeros(table.shape[1:], dtype=torch.int64)
            for u in (int(x) for x in req.users[req.set_of_user == s]):
                total += to_ring(table.table(row[u]))
                for v, pk in zip(members.tolist(), keys):
                    if v == u or v in here:          # pairs inside this worker cancel
                        continue
                    m = prg_mask(_pair_seed(private[row[u]], bytes(pk.tolist()), req.round,
                                            u, v), tuple(table.shape[1:]))
                    total += m if u < v else RING - m
            total %= RING
            ids.append(s)
            sums.append(torch.where(total >= RING // 2, total - RING, total).to(torch.int32))
        self.pending = None
        shape = (0, *table.shape[1:])
        return MaskedSums(req.round, np.asarray(req.users), np.array(ids, dtype=np.int64),
                          torch.stack(sums) if sums else torch.zeros(shape, dtype=torch.int32))

    # -- server ------------------------------------------------------------------
    def decode(self, sent: dict[str, Tensor], upload: dict, n: int) -> dict[str, Tensor]:
        keys = upload.get(self.item_table)
        if not isinstance(keys, PublicKeys) or tuple(keys.keys.shape) != (n, KEY_BYTES):
            raise ValueError(f"{self.item_table}: secagg's first phase sends public keys")
        rest = self.decode_dense({k: v for k, v in upload.items() if k != self.item_table})
        return {**rest, PUBKEY: keys.keys}


def secure_sets(labels: np.ndarray, n_groups: int, min_size: int
                ) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Each client's secure set (-1 = no upload this round) and, per set, the groups whose
    members it holds. Sets are never smaller than max(2, min_size)."""
    m = max(2, min_size)
    sizes = np.bincount(labels, minlength=n_groups)
    big = [g for g in range(n_groups) if sizes[g] >= m]
    small = [g for g in range(n_groups) if 0 < sizes[g] < m]
    groups_of = {g: [g] for g in big}
    if small:
        if sizes[small].sum() >= m:
            groups_of[n_groups] = small              # the rest: a set of its own
        elif big:
            groups_of[max(big, key=lambda g: (sizes[g], -g))] += small
    set_of = np.full(len(labels), -1, dtype=np.int64)
    for s, gs in groups_of.items():
        set_of[np.isin(labels, gs)] = s
    return set_of, groups_of
