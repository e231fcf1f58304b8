"""The dense protocol (the paper's): every client uploads every shared parameter whole.

Bytes per client: (sum of the uploaded parameters' sizes) x the precision's bytes per
value; for an item table, I * d * b whatever the client trained on. It reveals which
items a client trained on: training changes only the rows of its minibatches (weight
decay included), every other row comes back bit-identical to what the server sent.
"""
from __future__ import annotations

from torch import Tensor

from .codec import UploadCodec


class Dense(UploadCodec):
    name = "dense"

    def encode(self, sent: dict[str, Tensor], trained: dict[str, Tensor]) -> dict:
        return self.precision.encode_all(trained)

    def decode(self, sent: dict[str, Tensor], upload: dict, n: int) -> dict[str, Tensor]:
        for k, v in upload.items():
            if not isinstance(v, Tensor):
                raise ValueError(f"{k}: {type(v).__name__} sent, the dense protocol sends tensors")
            self.precision.check(v, k)
        return self.precision.decode_all(upload)

    @staticmethod
    def client_bytes(sizes: dict[str, int], value_bytes: int) -> int:
        """The formula: values of every uploaded parameter (`sizes`: name -> values)."""
        return sum(sizes.values()) * value_bytes
