"""torch.distributed.rpc (TensorPipe) transport: the server's side and the workers' side.

`RpcTransport` is both sides. `start()` runs `rpc.init_rpc` (bounded by
runtime.startup_timeout_s: torch's own rendezvous would wait 30 minutes for a missing
rank); `stop()` runs `rpc.shutdown` with a bound (non-graceful on error paths: a graceful
shutdown hangs when a peer died).

Server (rank 0): `exchange` sends one request to every worker at once with
`rpc.rpc_async("worker<rank>", _handle, ...)`, waits for all of them, and turns a remote
exception, a timeout or a lost connection into `WorkerError(rank, ...)` as soon as the
first one happens (it does not wait for the slow workers of a failed round).

Worker (ranks >= 1): `serve(worker)` makes this transport the one `_handle` (the function
the server calls remotely, which must live at module level) answers with, then blocks
until the server sends `Shutdown` (or `Abort`), meanwhile pinging the server so that a
worker whose server died stops on its own.

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
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch
import torch.distributed.rpc as rpc
from torch.distributed.rpc.internal import PythonUDF, _internal_rpc_pickler

from ..config import ConfigError
from ..messages import Abort, RemoteFailure, Shutdown
from .base import RunError, Transport, WorkerError, aborted, answer, rank_name

log = logging.getLogger(__name__)

RUN_ID_KEY = "fedrpc/run_id"
ABORT_TIMEOUT_S = 5.0        # how long an aborting server waits for workers to take note
HEARTBEAT_S = 2.0            # how often an idle worker checks that its server is alive
SHUTDOWN_WAIT_S = 5.0        # bound on a non-graceful RPC shutdown


def tensorpipe_transports(env: Optional[Mapping[str, str]] = None) -> list[str]:
    """TensorPipe transports, in order of preference: "uv" (TCP) by default.

    TensorPipe's default prefers "shm" between ranks on one host, whose reactor thread
    busy-polls: measured here, every idle rank then burns CPU and ~270k context switches
    per second, stealing cores from training. Over "uv" an idle rank uses no CPU; tensor
    data between ranks on one host still goes through the "cma" channel (a direct copy
    between the processes), so bulk transfers keep their speed. FEDRPC_TP_TRANSPORTS
    (e.g. "shm,uv") overrides the choice."""
    env = os.environ if env is None else env
    names = [t.strip() for t in env.get("FEDRPC_TP_TRANSPORTS", "uv").split(",") if t.strip()]
    bad = sorted(set(names) - {"uv", "shm", "ibv"})
    if not names or bad:
        raise ConfigError(f"FEDRPC_TP_TRANSPORTS={env.get('FEDRPC_TP_TRANSPORTS')!r}: "
                          f"expected a comma list of uv, shm, ibv")
    return names


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


# ---------------------------------------------------------------------- the transport
class RpcTransport(Transport):
    """One per rank. Server: one RPC per worker per exchange, all in flight at once.
    Worker: answers `_handle` calls with its `Worker` until Shutdown or Abort."""

    name = "rpc"
    can_rejoin = False   # a rank that died cannot join a running RPC group again

    def __init__(self, rank: int, world_size: int, init_method: str,
                 startup_timeout_s: float = 60.0, round_timeout_s: float = 600.0,
                 run_id: str = ""):
        super().__init__()
        self.run_id = run_id
        if world_size < 2:
            raise ValueError("RpcTransport needs at least one worker rank (world size >= 2)")
        self.rank, self.world_size, self.init_method = rank, world_size, init_method
        self.control_timeout_s = startup_timeout_s
        self.round_timeout_s = round_timeout_s
        self._ranks = list(range(1, world_size))
        self._closed = False
        # worker side: what `_handle` answers with
        self.worker = None
        self.error: Optional[BaseException] = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.ok, self.reason = True, ""
        self.failed = False            # a handler raised here

    @property
    def worker_ranks(self) -> list[int]:
        return list(self._ranks)

    def describe(self) -> dict:
        return {"transport": self.name, "tensorpipe_transports": tensorpipe_transports()}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> float:
        """init_rpc bounded by the start-up timeout; afterwards RPCs default to the round
        timeout (every call of the transport also passes its own)."""
        global _SERVING
        if self.rank > 0:
            _SERVING = self            # before init_rpc: requests may come at once
        me = f"{rank_name(self.rank)} (rank {self.rank})"
        opts = rpc.TensorPipeRpcBackendOptions(init_method=self.init_method,
                                               num_worker_threads=8,
                                               rpc_timeout=self.control_timeout_s,
                                               _transports=tensorpipe_transports())
        # torch's rendezvous waits up to 30 min for missing ranks: bound it ourselves
        watchdog = threading.Timer(self.control_timeout_s, self.abort, args=(
            1, f"{me}: RPC start-up did not complete within runtime.startup_timeout_s="
               f"{self.control_timeout_s:g} s: not all {self.world_size} ranks joined at "
               f"{self.init_method}"))
        watchdog.daemon = True
        watchdog.start()
        t0 = time.perf_counter()
        try:
            if self.run_id:
                self._same_launch(me)
            with warnings.catch_warnings():   # torch's own use of a deprecated gloo API
                warnings.filterwarnings("ignore", message="You are using a Backend")
                rpc.init_rpc(rank_name(self.rank), rank=self.rank, world_size=self.world_size,
                             rpc_backend_options=opts)
        except RunError:
            raise
        except Exception as e:
            raise RunError(f"{me}: RPC start-up at {self.init_method} failed: "
                           f"{type(e).__name__}: {e}") from e
        finally:
            watchdog.cancel()
        rpc._set_rpc_timeout(self.round_timeout_s)
        return time.perf_counter() - t0

    def _same_launch(self, me: str) -> None:
        """Refuse a rendezvous that belongs to another launch (two jobs given the same
        MASTER_PORT): rank 0 publishes its run id in the rendezvous store, the other ranks
        compare it with theirs before joining."""
        import torch.distributed as dist

        store, _, _ = next(dist.rendezvous(self.init_method, rank=self.rank,
                                           world_size=self.world_size,
                                           timeout=timedelta(seconds=self.control_timeout_s)))
        # kept for the whole run: on rank 0 it serves the store init_rpc then shares
        self._store = store
        if self.rank == 0:
            store.set(RUN_ID_KEY, self.run_id)
            return
        theirs = store.get(RUN_ID_KEY).decode()
        if theirs != self.run_id:
            raise RunError(f"{me}: the rendezvous at {self.init_method} belongs to another run "
                           f"({theirs}; this launch is {self.run_id}): two jobs share "
                           f"MASTER_PORT; give each job its own port")

    def stop(self, graceful: bool = True) -> bool:
        """rpc.shutdown with a bound: True when it finished cleanly within it."""
        timeout = self.control_timeout_s if graceful else SHUTDOWN_WAIT_S
        box: dict = {}

        def target():
            try:
                if graceful:
                    rpc.shutdown(graceful=True, timeout=timeout)
                else:
                    rpc.shutdown(graceful=False)
            except Exception as e:  # e.g. a peer that died after the last round
                box["error"] = e

        th = threading.Thread(target=target, name="rpc-shutdown", daemon=True)
        th.start()
        th.join(timeout + 5.0)
        if th.is_alive():
            log.warning("RPC shutdown (graceful=%s) did not finish within %.0f s", graceful,
                        timeout + 5.0)
            return False
        if "error" in box:
            log.warning("RPC shutdown (graceful=%s): %s", graceful, box["error"])
            return False
        return True

    # ------------------------------------------------------------------ server side
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
                fut = rpc.rpc_async(rank_name(rank), _handle, args=(requests[rank],),
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
                futures.append(rpc.rpc_async(rank_name(r), _handle, args=(Abort(reason),),
                                             timeout=ABORT_TIMEOUT_S))
            except Exception:       # a dead rank: nothing to tell it
                pass
        for f in futures:
            try:
                f.wait()
            except Exception:
                pass

    # ------------------------------------------------------------------ worker side
    def serve(self, worker=None, error: Optional[BaseException] = None) -> tuple[bool, str]:
        """Answer the server's requests with `worker` (or report `error` to each) until
        Shutdown (-> (True, "")) or Abort, or until the server stops answering pings
        (-> (False, why)). The pings are builtin ops: they need no Python on the server."""
        self.worker, self.error = worker, error
        self.ready.set()
        ping_timeout_s = min(60.0, self.round_timeout_s)
        ping = None
        try:
            while not self.stopped.wait(HEARTBEAT_S):
                if ping is not None and ping.done():
                    try:
                        ping.wait()
                    except Exception as e:
                        if self.stopped.is_set():
                            break
                        self._stop(False, f"lost the server (rank 0): {_first_line(e)}")
                        break
                    ping = None
                if ping is None:
                    try:
                        ping = rpc.rpc_async(rank_name(0), torch.add, args=(torch.zeros(1), 1),
                                             timeout=ping_timeout_s)
                    except Exception as e:
                        self._stop(False, f"lost the server (rank 0): {_first_line(e)}")
        except KeyboardInterrupt:
            self._stop(False, "interrupted")
        return self.ok, self.reason

    def _stop(self, ok: bool, reason: str = "") -> None:
        if not self.stopped.is_set():
            self.ok, self.reason = ok, reason
            self.stopped.set()

    def _answer(self, msg):
        if isinstance(msg, Abort):
            self._stop(False, aborted(self.failed, msg.reason))
            return None
        if not self.ready.wait(self.control_timeout_s):
            return RemoteFailure("RuntimeError", "the worker was not ready within "
                                                 "runtime.startup_timeout_s")
        reply, raised = answer(self.worker, self.error, msg)
        self.failed |= raised
        if isinstance(msg, Shutdown) and not raised:
            self._stop(True)
        return reply


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # torch prefixes remote errors with "On WorkerInfo(...):"; keep the informative line
    lines = [l for l in lines if not l.startswith("On WorkerInfo")] or lines
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# torch RPC calls a module-level function by name: it finds the worker's transport here
_SERVING: Optional[RpcTransport] = None


def _handle(msg):
    """Runs on the worker rank (in an RPC thread) for every request of the server."""
    if _SERVING is None:
        return RemoteFailure("RuntimeError", "this rank hosts no worker")
    return _SERVING._answer(msg)
