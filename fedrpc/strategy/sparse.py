"""The sparse protocol: of the item table, a client uploads only the rows it changed,
with their indices; every other uploaded parameter goes whole (as in dense.py).

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


class Sparse(UploadCodec):
    name = "sparse"

    def encode(self, sent: dict[str, Tensor], trained: dict[str, Tensor]) -> dict:
        out = self.precision.encode_all(trained)
        table = trained[self.item_table]                       # [N, I, d]
        changed = (table != sent[self.item_table].unsqueeze(0)).any(-1)
        who, rows = changed.nonzero(as_tuple=True)             # client-major, rows ascending
        out[self.item_table] = SparseRows(changed.sum(1).to(torch.int32),
                                          rows.to(torch.int32),
                                          self.precision.encode(table[who, rows]))
        return out

    def decode(self, sent: dict[str, Tensor], upload: dict, n: int) -> dict[str, Tensor]:
        dense = {k: v for k, v in upload.items() if k != self.item_table}
        for k, v in dense.items():
            if not isinstance(v, Tensor):
                raise ValueError(f"{k}: {type(v).__name__} sent, expected a tensor")
            self.precision.check(v, k)
        out = self.precision.decode_all(dense)
        sp, base = upload.get(self.item_table), sent[self.item_table]
        if not isinstance(sp, SparseRows):
            raise ValueError(f"{self.item_table}: {type(sp).__name__} sent, the sparse "
                             f"protocol sends its changed rows")
        self.precision.check(sp.values, self.item_table)
        counts = sp.counts.long()
        if (tuple(counts.shape) != (n,) or int(counts.sum()) != len(sp.index)
                or tuple(sp.values.shape) != (len(sp.index), base.shape[1])
                or (len(sp.index) and not (0 <= int(sp.index.min()) and
                                           int(sp.index.max()) < base.shape[0]))):
            raise ValueError(f"{self.item_table}: inconsistent sparse rows")
        table = base.unsqueeze(0).repeat(n, 1, 1)
        who = torch.repeat_interleave(torch.arange(n), counts)
        table[who, sp.index.long()] = self.precision.decode(sp.values)
        out[self.item_table] = table
        return out
