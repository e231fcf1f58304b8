"""The transport interface and the byte ledger: every message is counted here, once.

A transport moves one request to each worker and brings back one reply per worker.
`exchange` records, for each message: round, kind, direction, the rank pair, payload
bytes (tensors and arrays), wire bytes (the serialised size, where the transport
measures it) and the per-client logical bytes the message stands for.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


class WorkerError(RuntimeError):
    """A worker failed, timed out or died; the message names its rank."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"worker rank {rank}: {message}")
        self.rank = rank


@dataclass
class Record:
    round: int
    kind: str                 # train | eval | hello | shutdown
    direction: str            # down (server -> worker) | up (worker -> server)
    src: int
    dst: int
    payload: int
    wire: Optional[int]
    clients: Optional[np.ndarray]   # logical bytes per client, None for control messages
    seconds: float


class ByteLedger:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def add(self, rec: Record) -> None:
        self.records.append(rec)

    def round_summary(self, round_: int) -> dict:
        """Logical per-client bytes by kind and direction, and physical bytes per rank pair."""
        recs = [r for r in self.records if r.round == round_]
        logical: dict[str, dict] = {}
        for key in sorted({(r.kind, r.direction) for r in recs if r.clients is not None}):
            per = np.concatenate([r.clients for r in recs
                                  if (r.kind, r.direction) == key and r.clients is not None])
            if len(per):
                logical[f"{key[0]}_{key[1]}"] = {"clients": int(len(per)), "mean": float(per.mean()),
                                                 "max": int(per.max()), "total": int(per.sum())}
        physical: dict[str, dict] = {}
        for r in recs:
            pair = physical.setdefault(f"{r.src}->{r.dst}", {"payload": 0, "wire": 0, "messages": 0})
            pair["payload"] += r.payload
            pair["wire"] += r.wire if r.wire is not None else 0
            pair["messages"] += 1
        measured = all(r.wire is not None for r in recs)
        total = {"payload": sum(r.payload for r in recs),
                 "wire": sum(r.wire for r in recs) if measured and recs else None}
        return {"logical": logical, "physical": physical, "physical_total": total}


def _client_bytes(msg) -> Optional[np.ndarray]:
    fn = getattr(msg, "client_bytes", None)
    return fn() if fn is not None else None


class Transport(ABC):
    """Moves messages between the server (rank 0) and the worker ranks."""

    can_rejoin = True    # a worker that failed a request can still answer the next one

    def __init__(self) -> None:
        self.ledger = ByteLedger()

    @property
    @abstractmethod
    def worker_ranks(self) -> list[int]:
        ...

    @abstractmethod
    def _send_all(self, requests: dict[int, Any], timeout: float, tolerate: bool = False
                  ) -> dict[int, Any]:
        """Deliver each request; return {rank: (reply, wire bytes down, wire bytes up)}.
        A rank that fails raises WorkerError at once; with `tolerate`, its entry is the
        WorkerError instead and the other ranks are still waited for."""

    def exchange(self, round_: int, kind: str, requests: dict[int, Any],
                 timeout: float, failures: Optional[dict] = None) -> dict[int, Any]:
        """Send each worker its request and return {rank: reply}. A failing rank raises
        WorkerError; when a `failures` dict is given, failing ranks are put there
        ({rank: WorkerError}) and the replies of the others are returned."""
        t0 = time.perf_counter()
        results = self._send_all(requests, timeout, failures is not None)
        dt = time.perf_counter() - t0
        replies = {}
        for rank, req in requests.items():
            if isinstance(results[rank], WorkerError):
                failures[rank] = results[rank]
                self.ledger.add(Record(round_, kind, "down", 0, rank, _payload(req), None,
                                       _client_bytes(req), dt))
                continue
            reply, wire_down, wire_up = results[rank]
            self.ledger.add(Record(round_, kind, "down", 0, rank, _payload(req), wire_down,
                                   _client_bytes(req), dt))
            self.ledger.add(Record(round_, kind, "up", rank, 0, _payload(reply), wire_up,
                                   _client_bytes(reply), dt))
            replies[rank] = reply
        return replies

    def close(self, graceful: bool = True) -> None:
        """Release the transport (workers stop)."""


def _payload(msg) -> int:
    fn = getattr(msg, "payload_bytes", None)
    return int(fn()) if fn is not None else 0
