"""Server-side aggregation of the clients' shared parameters (GFMFR step 5a).

Pure functions of tensors: no I/O, no global state. The caller stacks each uploaded
parameter over the participating clients in a fixed order (sorted by user id), so the
reduction below is bit-identical whatever the packing of clients on workers.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor


def _normalised_weights(weights: Tensor, n: int) -> Tensor:
    """Check `weights` ([N], finite, >= 0, positive sum) and return w / sum(w) in float64."""
    w = torch.as_tensor(weights).detach().to(torch.float64).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"mean_aggregate: weights has {w.numel()} entries, expected N={n}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("mean_aggregate: weights must be finite (got NaN or inf)")
    if bool((w < 0).any()):
        raise ValueError("mean_aggregate: weights must be >= 0")
    total = w.sum()
    if float(total) <= 0.0:
        raise ValueError("mean_aggregate: weights must have a positive sum")
    return w / total


def mean_aggregate(uploads: Mapping[str, Tensor],
                   weights: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Average each stacked upload over clients.

    `uploads[name]` is `[N, ...]`, one slice per participating client (caller's order,
    sorted by user id). Returns `{name: mean_n x_n}`, or with `weights` (e.g. sample
    counts) the weighted mean `sum_n (w_n / sum_m w_m) x_n`. The weights are normalised
    in float64 and cast to each value's dtype; the result keeps each value's dtype and
    device. Deterministic for a given input order.

    Raises ValueError for no uploads, N == 0, mismatched N, non-float values, or
    non-finite / negative / zero-sum weights.
    """
    if not uploads:
        raise ValueError("mean_aggregate: no uploads to aggregate")
    sizes = {name: int(v.shape[0]) if v.dim() > 0 else -1 for name, v in uploads.items()}
    n = next(iter(sizes.values()))
    if n <= 0:
        raise ValueError("mean_aggregate: N == 0 participating clients (or a 0-d value)")
    if any(s != n for s in sizes.values()):
        raise ValueError(f"mean_aggregate: uploads disagree on N (first dim): {sizes}")
    w = None if weights is None else _normalised_weights(weights, n)
    out: dict[str, Tensor] = {}
    for name, value in uploads.items():
        if not value.is_floating_point():
            raise ValueError(f"mean_aggregate: upload {name!r} has dtype {value.dtype}, "
                             "expected a floating-point tensor")
        if w is None:
            out[name] = value.mean(dim=0)
        else:
            wv = w.to(device=value.device, dtype=value.dtype)
            out[name] = torch.tensordot(wv, value, dims=1)
    return out
