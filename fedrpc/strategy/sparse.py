"""The sparse protocol: of the item table, a client uploads only the rows it changed,
with their indices; every other uploaded parameter goes whole (as in dense.py). The
dense protocol's item table travels between ranks in the same form (`DenseRows`), with
its own formula for the logical bytes.

Rows a client did not change are bit-identical to what the server sent, so the server
rebuilds the client's full table exactly: at fp32 a sparse run gives the same numbers
as a dense one. Bytes per client for the item table (d values a row, b bytes a value):

    4 (row count, int32) + k * (4 (row index, int32) + d * b)

k = the rows it changed = the items in its minibatches this round (positives and sampled
negatives). The indices ARE those items: this protocol tells the server which items
each client trained on (so does dense, from the unchanged rows; secure aggregation is
the protocol that hides them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..rows import Rows
from .codec import UploadCodec

INDEX_BYTES = 4          # int32 row indices and row counts


@dataclass(frozen=True)
class SparseRows:
    """The changed rows of N clients' [I, d] tables, clients in order."""
    counts: Tensor           # [N] int32 rows per client
    index: Tensor            # [K] int32 row ids, K = counts.sum(), ascending per client
    values: Tensor           # [K, d] the rows, at the transfer precision

    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.counts, self.index, self.values))

    def client_bytes(self) -> np.ndarray:
        """Per client: the formula above."""
        d, b = self.values.shape[1], self.values.element_size()
        return INDEX_BYTES + self.counts.numpy().astype(np.int64) * (INDEX_BYTES + d * b)


@dataclass(frozen=True)
class DenseRows(SparseRows):
    """The dense protocol's upload of the item table: logically each client's whole
    [I, d] table (the formula: I * d * b bytes per client). Between ranks only the rows a
    client trained travel; the server rebuilds every other row exactly, since it is
    what it sent."""
    n_items: int = 0

    def client_bytes(self) -> np.ndarray:
        d, b = self.values.shape[1], self.values.element_size()
        return np.full(len(self.counts), self.n_items * d * b, dtype=np.int64)


def encode_rows(rows: Rows, precision, changed_only: bool, cls=SparseRows, **extra) -> SparseRows:
    """The wire form of `rows` at the transfer precision (only the rows whose value
    differs from the base's, with `changed_only`)."""
    rows = rows.changed() if changed_only else rows
    return cls(rows.counts.to(torch.int32), rows.index.to(torch.int32),
               precision.encode(rows.values), **extra)


def decode_rows(sp, precision, base: Tensor, n: int, name: str, cls=SparseRows) -> Rows:
    """`Rows` over `base` from a wire form; ValueError when malformed."""
    if not isinstance(sp, cls):
        raise ValueError(f"{name}: {type(sp).__name__} sent, expected {cls.__name__}")
    precision.check(sp.values, name)
    if sp.counts.dtype != torch.int32 or sp.index.dtype != torch.int32:
        raise ValueError(f"{name}: row counts and indices must be int32")
    rows = Rows(sp.counts.long(), sp.index.long(), precision.decode(sp.values), base)
    try:
        rows.check(n)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return rows


class Sparse(UploadCodec):
    name = "sparse"

    def encode(self, sent: dict[str, Tensor], trained: dict) -> dict:
        out = self.precision.encode_all({k: v for k, v in trained.items()
                                         if k != self.item_table})
        out[self.item_table] = encode_rows(trained[self.item_table], self.precision, True)
        return out

    def decode(self, sent: dict[str, Tensor], upload: dict, n: int) -> dict:
        out = self.decode_dense({k: v for k, v in upload.items() if k != self.item_table})
        out[self.item_table] = decode_rows(upload.get(self.item_table), self.precision,
                                           sent[self.item_table], n, self.item_table)
        return out


@dataclass(frozen=True)
class QuantizedRows:
    """The sparse_int8 protocol's item table: N clients' changed rows, each row's change
    from the row sent as int8 with one fp32 scale (its largest absolute change)."""
    counts: Tensor           # [N] int32 rows per client
    index: Tensor            # [K] int32 row ids, ascending per client
    q: Tensor                # [K, d] int8: round(127 * change / scale)
    scale: Tensor            # [K] float32

    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.counts, self.index, self.q, self.scale))

    def client_bytes(self) -> np.ndarray:
        """Per client: 4 (row count) + k * (4 (index) + d (int8 values) + 4 (scale))."""
        d = self.q.shape[1]
        return INDEX_BYTES + self.counts.numpy().astype(np.int64) * (INDEX_BYTES + d + 4)


class SparseInt8(UploadCodec):
    """sparse, with each changed row's change quantised to int8 (per-row scale): a value's
    error is at most scale / 254. Other uploads go at fed.precision."""
    name = "sparse_int8"

    def encode(self, sent: dict[str, Tensor], trained: dict) -> dict:
        out = self.precision.encode_all({k: v for k, v in trained.items()
                                         if k != self.item_table})
        rows = trained[self.item_table].changed()
        change = rows.values - rows.base.index_select(0, rows.index)
        scale = change.abs().amax(1) if len(change) else torch.zeros(0)
        q = torch.round(change * (127.0 / scale.clamp(min=1e-30)).unsqueeze(1))
        out[self.item_table] = QuantizedRows(rows.counts.to(torch.int32),
                                             rows.index.to(torch.int32),
                                             q.to(torch.int8), scale.float())
        return out

    def decode(self, sent: dict[str, Tensor], upload: dict, n: int) -> dict:
        out = self.decode_dense({k: v for k, v in upload.items() if k != self.item_table})
        up, base = upload.get(self.item_table), sent[self.item_table]
        if not isinstance(up, QuantizedRows):
            raise ValueError(f"{self.item_table}: {type(up).__name__} sent, expected "
                             f"QuantizedRows")
        if (up.q.dtype != torch.int8 or up.scale.dtype != torch.float32
                or up.counts.dtype != torch.int32 or up.index.dtype != torch.int32
                or tuple(up.q.shape) != (len(up.index), base.shape[1])
                or tuple(up.scale.shape) != (len(up.index),)
                or not bool(torch.isfinite(up.scale).all())):
            raise ValueError(f"{self.item_table}: inconsistent quantised rows")
        index = up.index.long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= base.shape[0]):
            raise ValueError(f"{self.item_table}: a row index outside [0, {base.shape[0]})")
        values = base.index_select(0, index) + up.q.float() * (up.scale / 127.0).unsqueeze(1)
        rows = Rows(up.counts.long(), index, values, base)
        try:
            rows.check(n)
        except ValueError as e:
            raise ValueError(f"{self.item_table}: {e}") from None
        out[self.item_table] = rows
        return out
