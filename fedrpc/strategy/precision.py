"""Transfer precision (`fed.precision`): the float format shared parameters, uploads and
the group teacher travel in, in both directions.

The server keeps its state in fp32 and clients train in fp32; only what crosses is cast.
A value sent at fp16/bf16 is what the receiver gets, so both sides reason about the same
numbers: the server knows exactly which table a client started from (`round_trip`).
Bytes per value: fp32 4, fp16 2, bf16 2.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    def __init__(self, name: str = "fp32"):
        if name not in DTYPES:
            raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(DTYPES)}")
        self.name, self.dtype = name, DTYPES[name]
        self.bytes = torch.empty(0, dtype=self.dtype).element_size()

    def encode(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """The tensor as sent (floating tensors cast; None and integer tensors as they are)."""
        if t is None or not t.is_floating_point():
            return t
        return t.to(self.dtype)

    def decode(self, t: Optional[Tensor]) -> Optional[Tensor]:
        """The fp32 tensor the receiver computes with."""
        if t is None or not t.is_floating_point():
            return t
        return t.to(torch.float32)

    def round_trip(self, t: Optional[Tensor]) -> Optional[Tensor]:
        return self.decode(self.encode(t))

    def encode_all(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.encode(v) for k, v in tensors.items()}

    def decode_all(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.decode(v) for k, v in tensors.items()}

    def check(self, t: Tensor, what: str) -> None:
        """An upload in any other float format is malformed (ValueError)."""
        if t.is_floating_point() and t.dtype != self.dtype:
            raise ValueError(f"{what}: {t.dtype} sent, fed.precision={self.name} expects "
                             f"{self.dtype}")
