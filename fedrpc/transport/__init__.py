"""Transports: the one place where messages cross between server and workers."""
from .base import ByteLedger, Record, RunError, Transport, WorkerError, rank_name
from .local import LocalTransport

__all__ = ["ByteLedger", "LocalTransport", "Record", "RunError", "Transport", "WorkerError",
           "rank_name"]
