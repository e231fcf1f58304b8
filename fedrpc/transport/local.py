"""In-process transport: the server calls its workers directly (same numbers as RPC)."""
from __future__ import annotations

from typing import Any

from .base import Transport, WorkerError


class LocalTransport(Transport):
    name = "local"

    def __init__(self, workers: dict[int, Any]):
        super().__init__()
        self.workers = workers

    @property
    def worker_ranks(self) -> list[int]:
        return sorted(self.workers)

    def _send_all(self, requests, timeout, tolerate=False):
        out = {}
        for rank in sorted(requests):
            try:
                out[rank] = (self.workers[rank].handle(requests[rank]), None, None)
            except Exception as e:  # a worker's failure is reported with its rank
                err = WorkerError(rank, f"{type(e).__name__}: {e}")
                if not tolerate:
                    raise err from e
                out[rank] = err
        return out
