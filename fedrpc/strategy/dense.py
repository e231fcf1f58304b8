"""The dense protocol (the paper's): every client uploads every shared parameter whole.

Bytes per client: (sum of the uploaded parameters' sizes) x the precision's bytes per
value; for an item table, I * d * b whatever the client trained on. (Between ranks the
item table travels as the rows the client trained, `sparse.DenseRows`: the server
rebuilds the rest exactly, so the numbers are the dense protocol's; the ledger's
physical bytes show what crossed.) It reveals which
items a client trained on: training changes only the rows of its minibatches (weight
decay included), every other row comes back bit-identical to what the server sent.
"""
from __future__ import annotations

from torch import Tensor

from .codec import UploadCodec
from .sparse import DenseRows, decode_rows, encode_rows


class Dense(UploadCodec):
    name = "dense"

    def encode(self, sent: dict[str, Tensor], trained: dict) -> dict:
        out = self.precision.encode_all({k: v for k, v in trained.items()
                                         if k != self.item_table})
        rows = trained[self.item_table]
        out[self.item_table] = encode_rows(rows, self.precision, False, DenseRows,
                                           n_items=int(rows.base.shape[0]))
        return out

    def decode(self, sent: dict[str, Tensor], upload: dict, n: int) -> dict:
        out = self.decode_dense({k: v for k, v in upload.items() if k != self.item_table})
        up = upload.get(self.item_table)
        if isinstance(up, DenseRows) and up.n_items != sent[self.item_table].shape[0]:
            raise ValueError(f"{self.item_table}: a table of {up.n_items} items sent")
        out[self.item_table] = decode_rows(up, self.precision, sent[self.item_table], n,
                                           self.item_table, DenseRows)
        return out

    @staticmethod
    def client_bytes(sizes: dict[str, int], value_bytes: int) -> int:
        """The formula: values of every uploaded parameter (`sizes`: name -> values)."""
        return sum(sizes.values()) * value_bytes
