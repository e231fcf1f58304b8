"""torch.distributed.rpc (TensorPipe) transport: the server's side and the workers' side.

Server (rank 0): `RpcTransport` sends one request to every worker at once with
`rpc.rpc_async("worker<rank>", _handle, ...)`, waits for all of them, and turns a remote
exception, a timeout or a lost connection into `WorkerError(rank, ...)` as soon as the
first one happens (it does not wait for the slow workers of a failed round).

Worker (ranks >= 1): `serve(worker)` puts the rank's `Worker` into the module-level slot
that `_handle` (the function the server calls remotely) reads; `wait_until_stopped`
blocks until the server sends `Shutdown` (or `Abort`), and meanwhile pings the server so
that a worker whose server died stops on its own.

Wire bytes. `wire_bytes(obj)` is the size of the TensorPipe message torch RPC builds for
`obj`, computed the way torch serialises it (torch/csrc/distributed/rpc):
  12 bytes (message type + id)
+ the Python pickle of the call (`PythonUDF(_handle, (msg,), {})`, plus 1 flag byte) or
  of the reply, made by torch's RPC pickler, which takes tensors out into a table;
+ the TorchScript pickle of that tensor table (dtype, sizes, strides, storage keys);
+ the bytes of every distinct *storage* behind those tensors: a view sends its whole
  storage, unless the storage is >= 8 KiB and at least twice the view, in which case
  torch clones the view first (`cloneSparseTensors`); views of one storage share it.
Not counted: TensorPipe's own framing (its message descriptor: measured 116-402 bytes
per message over the uv transport, growing with the number of tensors) and TCP/IP
headers. Checked against the bytes written to the socket (uv transport, basic channel):
the model matched to within that framing, for plain tensors, cloned views and views
that send their whole storage.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed.rpc as rpc
from torch.distributed.rpc.internal import PythonUDF, _internal_rpc_pickler

from ..messages import Shutdown
from .base import Transport, WorkerError

log = logging.getLogger(__name__)

SERVER = "server"
ABORT_TIMEOUT_S = 5.0        # how long an aborting server waits for workers to take note
HEARTBEAT_S = 2.0            # how often an idle worker checks that its server is alive


def worker_name(rank: int) -> str:
    return f"worker{rank}"


# ---------------------------------------------------------------------- control messages
@dataclass(frozen=True)
class Abort:
    """Server -> worker: the run failed elsewhere; stop now (non-gracefully)."""
    reason: str


@dataclass(frozen=True)
class RemoteFailure:
    """Worker -> server: handling the request raised; the worker logged the traceback."""
    kind: str                  # exception type name
    message: str


# ---------------------------------------------------------------------- wire bytes
_TP_HEADER = 4 + 8           # MessageType + message id payloads
_STORAGE_NAMES = torch.storage._dtype_to_storage_type_map()


def wire_bytes(obj: Any, call: bool = False) -> int:
    """Bytes torch RPC puts in the TensorPipe message for `obj`: as the arguments of a
    call to `_handle` (`call=True`, server -> worker) or as a reply (worker -> server)."""
    if call:
        data, tensors = _internal_rpc_pickler.serialize(PythonUDF(_handle, (obj,), {}))
        payload = 1 + len(data)          # + the is-async-execution flag
    else:
        data, tensors = _internal_rpc_pickler.serialize(obj)
        payload = len(data)
    sent = [_as_sent(t) for t in tensors]
    return _TP_HEADER + payload + _TensorTablePickle.size(sent) + _storage_bytes(sent)


@dataclass(frozen=True)
class _SentTensor:
    """What TensorPipe sends for one tensor of the table: its storage and its view."""
    impl: Any                  # identity of the tensor (repeats are pickled as references)
    storage: Any               # identity of the storage (shared storages are sent once)
    storage_bytes: int
    dtype: torch.dtype
    device: str
    offset: int
    sizes: tuple
    strides: tuple


def _as_sent(t: torch.Tensor) -> _SentTensor:
    if t.layout != torch.strided:
        raise ValueError(f"wire_bytes: {t.layout} tensors are not measured")
    st = t.untyped_storage()
    useful = t.numel() * t.element_size()
    if st.nbytes() >= 8 * 1024 and st.nbytes() >= 2 * useful:     # torch clones it
        strides = torch.empty_like(t, device="meta").stride()     # clone keeps dense strides
        clone = object()                                          # a new tensor and storage
        return _SentTensor(clone, clone, useful, t.dtype, str(t.device),
                           0, tuple(t.shape), tuple(strides))
    return _SentTensor(t._cdata, st._cdata, st.nbytes(), t.dtype, str(t.device),
                       t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _storage_bytes(sent: list[_SentTensor]) -> int:
    return sum({s.storage: s.storage_bytes for s in sent}.values())


class _TensorTablePickle:
    """Length of the TorchScript pickle (protocol 2) torch writes for the tensor table:
    `build_tensorlist([_rebuild_tensor_v2((storage persistent id), offset, sizes,
    strides, requires_grad, OrderedDict()), ...])`, with its memoisation of globals,
    strings, storages and tensors. tests/test_rpc.py checks it against torch's writer."""

    def __init__(self) -> None:
        self.n, self.memo = 2, 0                    # PROTO 2
        self.globals: dict = {}
        self.strings: dict = {}
        self.storages: dict = {}
        self.tensors: dict = {}

    @classmethod
    def size(cls, sent: list[_SentTensor]) -> int:
        p = cls()
        p._global("torch.jit._pickle", "build_tensorlist")
        p.n += 3                                    # MARK EMPTY_LIST MARK
        for s in sent:
            if s.impl in p.tensors:
                p._get(p.tensors[s.impl])
            else:
                p._tensor(s)
                p.tensors[s.impl] = p.memo - 1
        return p.n + 4                              # APPENDS TUPLE REDUCE STOP

    @staticmethod
    def _int(v: int) -> int:
        if 0 <= v <= 0xFF:
            return 2                                # BININT1
        if 0 <= v <= 0xFFFF:
            return 3                                # BININT2
        return 5 if -2 ** 31 <= v < 2 ** 31 else 10  # BININT | LONG1 8

    def _put(self) -> int:
        self.n += 2 if self.memo <= 0xFF else 5     # BINPUT | LONG_BINPUT
        self.memo += 1
        return self.memo - 1

    def _get(self, i: int) -> None:
        self.n += 2 if i <= 0xFF else 5             # BINGET | LONG_BINGET

    def _global(self, module: str, name: str) -> None:
        if (module, name) in self.globals:
            return self._get(self.globals[(module, name)])
        self.n += len(module) + len(name) + 3       # GLOBAL 'module\nname\n'
        self.globals[(module, name)] = self._put()

    def _string(self, s: str) -> None:
        if s in self.strings:
            return self._get(self.strings[s])
        self.n += 5 + len(s.encode())               # BINUNICODE
        self.strings[s] = self._put()

    def _tensor(self, s: _SentTensor) -> None:
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.n += 1                                 # MARK
        if s.storage in self.storages:
            self._get(self.storages[s.storage])
        else:
            self.n += 1                             # MARK
            self._string("storage")
            self._global("torch", _STORAGE_NAMES[s.dtype])
            self._string(str(len(self.storages)))
            self._string(s.device)
            self.n += self._int(s.storage_bytes // s.dtype.itemsize) + 2   # TUPLE BINPERSID
            self.storages[s.storage] = self._put()
        self.n += self._int(s.offset)
        self.n += 2 + sum(self._int(v) for v in s.sizes)                   # MARK .. TUPLE
        self.n += 2 + sum(self._int(v) for v in s.strides)
        self.n += 1                                 # NEWFALSE | NEWTRUE
        self._global("collections", "OrderedDict")
        self.n += 4                                 # EMPTY_TUPLE REDUCE TUPLE REDUCE
        self._put()


# ---------------------------------------------------------------------- server side
class RpcTransport(Transport):
    """The server's transport: one RPC per worker per exchange, all in flight at once."""
    name = "rpc"
    can_rejoin = False   # a rank that died cannot join a running RPC group again

    def __init__(self, world_size: int, control_timeout_s: float = 60.0):
        super().__init__()
        if world_size < 2:
            raise ValueError("RpcTransport needs at least one worker rank (world size >= 2)")
        self._ranks = list(range(1, world_size))
        self.control_timeout_s = control_timeout_s
        self._where, self._kind = "", ""
        self._closed = False

    @property
    def worker_ranks(self) -> list[int]:
        return list(self._ranks)

    def exchange(self, round_: int, kind: str, requests: dict[int, Any],
                 timeout: float) -> dict[int, Any]:
        self._where = f"round {round_}, {kind}" if round_ >= 0 else kind
        self._kind = kind
        return super().exchange(round_, kind, requests, timeout)

    def _send_all(self, requests, timeout, tolerate=False):
        done: queue.SimpleQueue = queue.SimpleQueue()
        futures, down, t0 = {}, {}, time.monotonic()
        out: dict = {}

        def failed(rank: int, err: WorkerError, cause=None) -> None:
            if not tolerate:
                raise err from cause
            out[rank] = err

        for rank in sorted(requests):
            down[rank] = wire_bytes(requests[rank], call=True)
            try:
                fut = rpc.rpc_async(worker_name(rank), _handle, args=(requests[rank],),
                                    timeout=timeout)
            except Exception as e:
                failed(rank, WorkerError(rank, f"cannot send ({_first_line(e)}) ({self._where})"), e)
                continue
            fut.add_done_callback(lambda _f, r=rank: done.put(r))
            futures[rank] = fut
        deadline = time.monotonic() + timeout + 10.0   # RPC's own timeout fires first
        while len(out) < len(requests):
            try:
                rank = done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                for late in sorted(set(futures) - set(out)):
                    failed(late, WorkerError(late, self._late(timeout)))
                break
            try:
                reply = futures[rank].wait()
            except Exception as e:
                failed(rank, WorkerError(rank, self._describe(e, timeout)), e)
                continue
            if isinstance(reply, RemoteFailure):
                failed(rank, WorkerError(rank, f"{reply.kind}: {reply.message} ({self._where})"))
                continue
            out[rank] = (reply, down[rank], wire_bytes(reply))
            log.debug("%s: rank %d answered after %.3f s (its own work %.3f s), wire down %d "
                      "up %d", self._where, rank, time.monotonic() - t0,
                      getattr(reply, "seconds", float("nan")), out[rank][1], out[rank][2])
        return out

    def _late(self, timeout: float) -> str:
        key = "runtime.round_timeout_s" if self._kind in ("train", "eval") \
            else "runtime.startup_timeout_s"
        return f"no reply within {timeout:g} s ({key}) ({self._where})"

    def _describe(self, e: Exception, timeout: float) -> str:
        text = str(e)
        if "timeout" in text.lower() or "timed out" in text.lower():
            return self._late(timeout)
        return f"the rank died or is unreachable: {_first_line(e)} ({self._where})"

    def close(self, graceful: bool = True, reason: str = "") -> None:
        """graceful: Shutdown to every worker and wait for each to acknowledge it;
        otherwise Abort(reason) to every worker, waiting at most ABORT_TIMEOUT_S."""
        if self._closed:
            return
        self._closed = True
        if graceful:
            self.exchange(-1, "shutdown", {r: Shutdown() for r in self._ranks},
                          self.control_timeout_s)
            return
        futures = []
        for r in self._ranks:
            try:
                futures.append(rpc.rpc_async(worker_name(r), _handle, args=(Abort(reason),),
                                             timeout=ABORT_TIMEOUT_S))
            except Exception:       # a dead rank: nothing to tell it
                pass
        for f in futures:
            try:
                f.wait()
            except Exception:
                pass


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # torch prefixes remote errors with "On WorkerInfo(...):"; keep the informative line
    lines = [l for l in lines if not l.startswith("On WorkerInfo")] or lines
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# ---------------------------------------------------------------------- worker side
class _Endpoint:
    """The worker hosted by this process, as `_handle` sees it."""

    def __init__(self) -> None:
        self.worker = None
        self.error: Optional[BaseException] = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.ok = True
        self.reason = ""
        self.failed = False            # a handler raised here
        self.startup_timeout_s = 300.0

    def stop(self, ok: bool, reason: str = "") -> None:
        if not self.stopped.is_set():
            self.ok, self.reason = ok, reason
            self.stopped.set()


_ENDPOINT = _Endpoint()


def serve(worker, startup_timeout_s: float = 300.0) -> None:
    """Make `worker` answer the server's requests from now on."""
    _ENDPOINT.worker, _ENDPOINT.startup_timeout_s = worker, startup_timeout_s
    _ENDPOINT.ready.set()


def serve_error(error: BaseException) -> None:
    """Building the worker failed: answer every request with that failure."""
    _ENDPOINT.error = error
    _ENDPOINT.ready.set()


def _handle(msg):
    """Runs on the worker rank (in an RPC thread) for every request of the server."""
    ep = _ENDPOINT
    if isinstance(msg, Abort):
        ep.stop(False, ("failed (traceback above); " if ep.failed else "")
                + f"the server stopped the run: {msg.reason}")
        return None
    if not ep.ready.wait(ep.startup_timeout_s):
        return RemoteFailure("RuntimeError", "the worker was not ready within "
                                             "runtime.startup_timeout_s")
    if ep.error is not None:
        return RemoteFailure(type(ep.error).__name__, str(ep.error))
    try:
        reply = ep.worker.handle(msg)
    except Exception as e:  # reported to the server as data; the traceback stays here
        ep.failed = True
        log.error("handling %s failed:\n%s", type(msg).__name__, traceback.format_exc())
        return RemoteFailure(type(e).__name__, str(e))
    if isinstance(msg, Shutdown):
        ep.stop(True)
    return reply


def wait_until_stopped(heartbeat_s: float = HEARTBEAT_S, ping_timeout_s: float = 60.0
                       ) -> tuple[bool, str]:
    """Block until the server sends Shutdown (-> (True, "")) or Abort, or stops answering
    pings (-> (False, why)). The pings are builtin ops: they need no Python on the server."""
    ep, ping = _ENDPOINT, None
    while not ep.stopped.wait(heartbeat_s):
        if ping is not None and ping.done():
            try:
                ping.wait()
            except Exception as e:
                if ep.stopped.is_set():
                    break
                ep.stop(False, f"lost the server (rank 0): {_first_line(e)}")
                break
            ping = None
        if ping is None:
            try:
                ping = rpc.rpc_async(SERVER, torch.add, args=(torch.zeros(1), 1),
                                     timeout=ping_timeout_s)
            except Exception as e:
                ep.stop(False, f"lost the server (rank 0): {_first_line(e)}")
    return ep.ok, ep.reason
