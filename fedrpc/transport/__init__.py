"""Transports: the one place where messages cross between server and workers."""
from .base import ByteLedger, Record, Transport, WorkerError
from .local import LocalTransport

__all__ = ["ByteLedger", "LocalTransport", "Record", "Transport", "WorkerError"]
