"""Upload codecs: how a client's trained shared parameters travel to the server.

A protocol is a codec the strategy uses: the worker encodes its clients' trained
parameters (`encode`), the server decodes them back to dense fp32 tensors before
admission and aggregation (`decode`). Each encoded form knows its per-client bytes, the
codec's analytic formula, which the byte ledger records as the logical upload
(DESIGN principle 4; tests check the two are equal).

    fed.protocol   dense (dense.py) | sparse, sparse_int8 (sparse.py) | secagg (secagg.py: two phases,
                   the server learns per-group sums only)
    fed.precision  fp32 | fp16 | bf16 (precision.py), composable with either protocol
"""
from __future__ import annotations

from torch import Tensor

from .precision import Precision


class UploadCodec:
    """Encode [N, ...] trained tensors on the worker, decode them on the server."""
    name = ""

    def __init__(self, precision: Precision, item_table: str):
        self.precision, self.item_table = precision, item_table

    def encode(self, sent: dict[str, Tensor], trained: dict) -> dict:
        """`sent`: the fp32 parameters the clients started from (as received);
        `trained`: [N, ...] per client, the item table as `Rows` over the table sent.
        Returns what goes into the TrainReply."""
        raise NotImplementedError

    def decode(self, sent: dict[str, Tensor], upload: dict, n: int) -> dict:
        """What the upload stands for: [n, ...] fp32 tensors, the item table as fp32
        `Rows` over the table sent. `sent`: the fp32 parameters the server sent (as the
        clients received them). A malformed upload: ValueError."""
        raise NotImplementedError

    def decode_dense(self, upload: dict) -> dict[str, Tensor]:
        """Uploads sent as plain tensors at the transfer precision, decoded to fp32."""
        for k, v in upload.items():
            if not isinstance(v, Tensor):
                raise ValueError(f"{k}: {type(v).__name__} sent, expected a tensor")
            self.precision.check(v, k)
        return self.precision.decode_all(upload)


def make_codec(protocol: str, precision: str, item_table: str) -> UploadCodec:
    from .dense import Dense
    from .secagg import SecAgg
    from .sparse import Sparse, SparseInt8
    codecs = {c.name: c for c in (Dense, Sparse, SparseInt8, SecAgg)}
    if protocol not in codecs:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(codecs)}")
    return codecs[protocol](Precision(precision), item_table)
