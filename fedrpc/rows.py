"""Many clients' item tables, stored as the rows where each may differ from one base.

A client trains only the rows of its minibatches: every other row of its copy of the
shared item table stays what the server sent. `Rows` holds N clients' [I, d] tables that
way: client n's rows are the items `index[offsets[n]:offsets[n + 1]]` (strictly
ascending) with their `values`; every other row of its table is `base`'s. Memory and
arithmetic are proportional to the rows the clients touched, never to clients x items:
no [N, I, d] tensor is built by training, uploads, aggregation or group targets.

A `Rows` is indexed like a stacked [N, I, d] tensor over clients (`rows[idx]` keeps the
clients `idx`, a LongTensor or BoolTensor) and has `shape` (N, I, d) and `dtype`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor


CHUNK_BYTES = 1 << 21     # float64 bytes per chunk of the row reductions (4,096 rows at d = 64)
"""The reductions over rows work a chunk at a time: their float64 intermediates then stay
in the CPU's cache. Measured at ML-100K (403,256 rows, d = 64, 2 threads): the group sums
take 25 ms in chunks of 2 MB against 213 ms in chunks of 32 MB, with the same result."""


@dataclass(frozen=True)
class Rows:
    counts: Tensor            # [N] int64: rows stored per client
    index: Tensor             # [K] int64 item ids, strictly ascending within a client
    values: Tensor            # [K, d]
    base: Tensor              # [I, d]: every row not stored

    # -- layout -------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.counts)

    @property
    def shape(self) -> tuple:
        return (self.n, *self.base.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def offsets(self) -> Tensor:
        return torch.cat([self.counts.new_zeros(1), torch.cumsum(self.counts, 0)])

    def owners(self) -> Tensor:
        """[K] the client of each stored row."""
        return torch.repeat_interleave(torch.arange(self.n), self.counts)

    def __getitem__(self, idx) -> "Rows":
        """The clients `idx` (LongTensor of positions or BoolTensor [N]), in that order."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().reshape(-1)
        counts = self.counts[idx]
        pos = segment_positions(self.offsets()[idx], counts)
        return Rows(counts.clone(), self.index[pos], self.values[pos], self.base)

    @staticmethod
    def cat(parts: list["Rows"], order: Optional[Tensor] = None,
            release: bool = False) -> "Rows":
        """Clients of several `Rows` over the same base, one after the other, or with
        `order` (positions into that sequence) in that order; one copy of the rows (none
        when a single part is already in that order).

        `release`: empty `parts` as they are copied. With no other reference to them,
        each part's rows are then freed as soon as they are in the result, whose pages
        fill only as rows are copied into it: the peak is all the rows plus one part,
        not the parts and the result in full."""
        base = parts[0].base
        if len(parts) == 1 and (order is None or _is_identity(order)):
            out = parts[0]
            if release:
                parts.clear()
            return out
        counts = torch.cat([p.counts for p in parts])
        new_counts = counts if order is None else counts[order]
        # each client's rows go to the start of its place in the new order
        dest_start = torch.cumsum(new_counts, 0) - new_counts
        if order is not None:
            dest_start = torch.empty_like(counts).index_copy_(0, order, dest_start)
        k, d = int(counts.sum()), parts[0].values.shape[1]
        index = torch.empty(k, dtype=torch.int64)
        values = torch.empty(k, d, dtype=parts[0].values.dtype)   # pages filled as copied
        first = 0
        for j in range(len(parts)):
            p = parts[j]
            if release:
                parts[j] = None
            dest = segment_positions(dest_start[first:first + p.n], counts[first:first + p.n])
            index[dest] = p.index
            values.index_copy_(0, dest, p.values)
            first += p.n
            del p                            # with `release`, its rows are freed here
        if release:
            parts.clear()
        return Rows(new_counts, index, values, base)

    def check(self, n: int) -> None:
        """ValueError unless this holds n clients' rows consistently (right sizes, item ids
        in range and strictly ascending within each client)."""
        i, d = self.base.shape
        k = len(self.index)
        if (self.counts.dtype != torch.int64 or self.index.dtype != torch.int64
                or tuple(self.counts.shape) != (n,) or bool((self.counts < 0).any())
                or int(self.counts.sum()) != k or tuple(self.values.shape) != (k, d)):
            raise ValueError("inconsistent rows: counts, index and values disagree")
        if k and (int(self.index.min()) < 0 or int(self.index.max()) >= i):
            raise ValueError(f"a row index outside [0, {i})")
        if k > 1:
            same = self.owners()[1:] == self.owners()[:-1]
            if bool((same & (self.index[1:] <= self.index[:-1])).any()):
                raise ValueError("row indices not strictly ascending within a client")

    # -- values -----------------------------------------------------------------------
    def deltas(self, a: int = 0, b: Optional[int] = None) -> Tensor:
        """[b - a, d] float64: stored rows a..b-1 minus the base's rows (the difference
        of two float32 values is exact in float64)."""
        idx = self.index[a:b]
        return self.values[a:b].double() - self.base.index_select(0, idx).double()

    def _spans(self):
        """Row ranges of about CHUNK_BYTES of float64 values each."""
        k, step = len(self.index), max(1, CHUNK_BYTES // (8 * max(1, self.base.shape[1])))
        return ((a, min(a + step, k)) for a in range(0, k, step))

    def changed(self) -> "Rows":
        """Only the stored rows whose value differs from the base's."""
        keep = (self.values != self.base.index_select(0, self.index)).any(-1)
        counts = torch.zeros(self.n, dtype=torch.int64).index_add_(0, self.owners(), keep.long())
        return Rows(counts, self.index[keep], self.values[keep], self.base)

    def finite(self) -> Tensor:
        """[N] bool: client n's table has only finite values (the base is finite).

        A row with a NaN or an infinity has a non-finite sum, so only the rows whose sum
        is not finite (those, or finite rows whose sum overflows) are checked value by
        value: one read of the values instead of a [K, d] mask."""
        sums = self.values.sum(1)
        suspect = (~torch.isfinite(sums)).nonzero().reshape(-1)
        bad = torch.zeros(len(self.index), dtype=torch.bool)
        if len(suspect):
            bad[suspect] = ~torch.isfinite(self.values.index_select(0, suspect)).all(1)
        return torch.zeros(self.n, dtype=torch.int64).index_add_(
            0, self.owners(), bad.long()) == 0

    def sq_dist(self, ref: Tensor) -> Tensor:
        """[N] float64: ||table_n - ref||^2 (Frobenius), `ref` [I, d]."""
        base_row = (self.base.double() - ref.double()).pow(2).sum(1)          # [I]
        owner, per = self.owners(), torch.zeros(self.n, dtype=torch.float64)
        for a, b in self._spans():     # a row's distance in float32, sums in float64
            idx = self.index[a:b]
            diff = self.values[a:b] - ref.index_select(0, idx).to(self.values.dtype)
            stored = (diff * diff).sum(1).double()
            per.index_add_(0, owner[a:b], stored - base_row.index_select(0, idx))
        return per + base_row.sum()

    def weighted_sums(self, groups: Optional[Tensor] = None, n_groups: int = 1,
                      weights: Optional[Tensor] = None, keep: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor]:
        """Per group g: (sum over its clients of w_n * table_n [G, I, d] float64, sum of
        w_n [G] float64). `groups` [N] in [0, n_groups) (None: one group); `weights`
        [N] (None: 1); `keep` [N] bool: only these clients (None: all). Summed in the
        clients' order."""
        g = groups if groups is not None else torch.zeros(self.n, dtype=torch.long)
        w = (weights.double() if weights is not None
             else torch.ones(self.n, dtype=torch.float64))
        if keep is not None:
            w = torch.where(keep, w, 0.0)
        wsum = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, w)
        i, d = self.base.shape
        out = wsum.view(-1, 1, 1) * self.base.double().unsqueeze(0)
        owner = self.owners()
        for a, b in self._spans():
            own = owner[a:b]
            rows = None if keep is None else keep.index_select(0, own).nonzero().reshape(-1) + a
            if rows is not None and len(rows) == b - a:
                rows = None
            idx = self.index[a:b] if rows is None else self.index.index_select(0, rows)
            own = own if rows is None else owner.index_select(0, rows)
            vals = self.values[a:b] if rows is None else self.values.index_select(0, rows)
            contrib = vals.double() - self.base.index_select(0, idx).double()
            if weights is not None:
                contrib *= w.index_select(0, own).unsqueeze(1)
            out.view(-1, d).index_add_(0, g.index_select(0, own) * i + idx, contrib)
        return out, wsum

    def dense(self) -> Tensor:
        """[N, I, d]: the full tables (for small N only: tests, secure masking)."""
        out = self.base.unsqueeze(0).repeat(self.n, 1, 1)
        out[self.owners(), self.index] = self.values.to(out.dtype)
        return out

    def table(self, j: int) -> Tensor:
        """Client j's full [I, d] table."""
        off = self.offsets()
        a, b = int(off[j]), int(off[j + 1])
        out = self.base.clone()
        out[self.index[a:b]] = self.values[a:b].to(out.dtype)
        return out

    @staticmethod
    def from_dense(tables: Tensor, base: Optional[Tensor] = None) -> "Rows":
        """Rows of [N, I, d] `tables` that differ from `base` (default: zeros; a
        non-finite row always counts as differing)."""
        n, i, d = tables.shape
        base = torch.zeros(i, d, dtype=tables.dtype) if base is None else base
        changed = ~(tables == base.unsqueeze(0)).all(-1)
        who, items = changed.nonzero(as_tuple=True)
        return Rows(changed.sum(1).to(torch.int64), items, tables[who, items], base)


def cat_release(parts: list[Tensor]) -> Tensor:
    """torch.cat of `parts` along dim 0, emptying the list as each part is copied: with no
    other reference to the parts, each is freed once it is in the result, so the peak is
    the result plus one part, not the parts and the result in full."""
    out = parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    at = 0
    for j in range(len(parts)):
        part, parts[j] = parts[j], None
        out[at:at + part.shape[0]] = part
        at += part.shape[0]
        del part
    parts.clear()
    return out


def stack(parts: list, order: Optional[Tensor] = None):
    """Per-client values of several senders (item tables as `Rows`, or tensors with the
    clients along dim 0) as one, the clients in `order` if given; `parts` is emptied and
    each part freed once copied (Rows.cat, cat_release). One part in order is not copied."""
    if isinstance(parts[0], Rows):
        return Rows.cat(parts, order, release=True)
    out = parts.pop() if len(parts) == 1 else cat_release(parts)
    return out if order is None else out[order]


def _is_identity(order: Tensor) -> bool:
    return bool(torch.equal(order, torch.arange(len(order), dtype=order.dtype)))


def segment_positions(starts: Tensor, counts: Tensor) -> Tensor:
    """The positions starts[j], ..., starts[j] + counts[j] - 1 of every segment j, in order."""
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    return torch.repeat_interleave(starts, counts) + within


def membership(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `keys`: whether it is in `sorted_keys` (ascending, unique) and where."""
    pos = np.searchsorted(sorted_keys, keys)
    inside = pos < len(sorted_keys)
    hit = np.zeros(len(keys), dtype=bool)
    hit[inside] = sorted_keys[pos[inside]] == keys[inside]
    return hit, pos
