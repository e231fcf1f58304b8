"""Transports: the one place where messages cross between server and workers."""
from .base import ByteLedger, Record, Transport, WorkerError
from .local import LocalTransport

__all__ = ["ByteLedger", "LocalTransport", "Record", "RpcTransport", "Transport", "WorkerError"]


def __getattr__(name):
    # RpcTransport imports torch.distributed.rpc: only when asked for
    if name == "RpcTransport":
        from .rpc import RpcTransport
        return RpcTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
