"""The transport interface and the byte ledger: every message is counted here, once.

A transport moves one request to each worker and brings back one reply per worker.
Each process of a federation holds one transport, which owns its own lifecycle:

    t.start()                    join the other ranks (bounded); start-up seconds
    server (rank 0):  t.exchange(...) for every phase, then t.close(graceful, reason):
                      Shutdown to every worker, or Abort(reason) on an error path
    worker (ranks >= 1): t.serve(worker) answers the server until Shutdown or Abort
    t.stop(graceful)             leave the federation (bounded); False when it was not clean
    t.abort(code, message)       last resort after an unclean stop: say why, end the process

`exchange` records, for each message: round, kind, direction, the rank pair, payload
bytes (tensors and arrays), wire bytes (the serialised size, where the transport
measures it) and the per-client logical bytes the message stands for.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

import numpy as np

from ..messages import RemoteFailure

log = logging.getLogger(__name__)


def rank_name(rank: int) -> str:
    """The name of a rank in logs, errors and transports: "server" or "worker<rank>"."""
    return "server" if rank == 0 else f"worker{rank}"


class RunError(RuntimeError):
    """A rank of the federation failed; the message names it. (Exit code 1.)"""


class WorkerError(RuntimeError):
    """A worker failed, timed out or died; the message names its rank."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"worker rank {rank}: {message}")
        self.rank = rank


@dataclass
class Record:
    round: int
    kind: str                 # train | upload (secagg's second phase) | eval | hello | ...
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

    name = "transport"
    can_rejoin = True    # a worker that failed a request can still answer the next one
    concurrent = True    # the server may exchange from a second thread while it computes

    def __init__(self) -> None:
        self.ledger = ByteLedger()
        self._where, self._kind = "", ""      # the exchange in progress, for errors

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> float:
        """Join the federation; the seconds it took."""
        return 0.0

    def serve(self, worker: Any = None, error: Optional[BaseException] = None
              ) -> tuple[bool, str]:
        """Worker side: answer the server's requests with `worker` (or with `error`, when
        building the worker failed) until the server ends the run. (True, "") after
        Shutdown; (False, why) after Abort or when the server is lost."""
        raise NotImplementedError(f"the {self.name} transport has no worker side")

    def stop(self, graceful: bool = True) -> bool:
        """Leave the federation; True when it ended cleanly within its bound."""
        return True

    def abort(self, code: int, message: str) -> NoReturn:
        """Last resort when `stop` could not end cleanly: say why, end this process."""
        report_error(message)
        os._exit(code)

    def describe(self) -> dict:
        """What the run summary records about this transport."""
        return {"transport": self.name}

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
        self._where = f"round {round_}, {kind}" if round_ >= 0 else kind
        self._kind = kind
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

    def _late(self, timeout: float, why: str = "") -> str:
        """The error of a worker that did not answer the current exchange in time."""
        key = "runtime.round_timeout_s" if self._kind in ("train", "upload", "eval") \
            else "runtime.startup_timeout_s"
        return f"no reply within {timeout:g} s ({key}){why} ({self._where})"

    def close(self, graceful: bool = True, reason: str = "") -> None:
        """Server side: end the workers' part; graceful: Shutdown to each and wait for its
        acknowledgement; otherwise Abort(reason) to each, with a bounded wait."""


def report_error(message: str) -> None:
    """The one-line error a failing rank prints before it ends, with all logs flushed."""
    print(f"fedrpc: error: {message}", file=sys.stderr, flush=True)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:
            pass
    sys.stdout.flush()


def answer(worker: Any, error: Optional[BaseException], msg: Any) -> tuple[Any, bool]:
    """A worker's reply to `msg` and whether handling it raised. A failure goes back to
    the server as data (RemoteFailure); its traceback is logged here, on the worker."""
    if error is not None:                      # building the worker failed
        return RemoteFailure(type(error).__name__, str(error)), False
    try:
        return worker.handle(msg), False
    except Exception as e:
        log.error("handling %s failed:\n%s", type(msg).__name__, traceback.format_exc())
        return RemoteFailure(type(e).__name__, str(e)), True


def aborted(failed: bool, reason: str) -> str:
    """Why a worker stops when the server sends Abort(reason)."""
    return ("failed (traceback above); " if failed else "") + \
        f"the server stopped the run: {reason}"


def _payload(msg) -> int:
    fn = getattr(msg, "payload_bytes", None)
    return int(fn()) if fn is not None else 0
