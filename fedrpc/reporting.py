"""Writing results: JSON files, JSONL per round, one-line metric summaries."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def write_json(path: Path, obj) -> None:
    """Write `obj` as JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def format_metrics(m: dict, ks: Iterable[int]) -> str:
    parts = []
    for k in ks:
        parts.append(f"HR@{k} {m[f'HR@{k}']:.4f} NDCG@{k} {m[f'NDCG@{k}']:.4f}")
    return " | ".join(parts)
