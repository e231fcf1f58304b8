"""MPI transport (mpi4py): the server's side and the workers' side over MPI.COMM_WORLD.

Launch one process per rank with `mpiexec -n N python -m fedrpc run CONFIG
fed.transport=mpi` or `srun --mpi=pmi2 ...`; MPI's rank 0 is the server.

Messages. Each message goes as pickle protocol 5 with out-of-band buffers, the way
mpi4py's `mpi4py.util.pkl5` sends large objects: tensors and numpy arrays are not
pickled inline; their bytes travel as buffers of their own. One message is
  a header (tag MSG): 4 bytes buffer count + 8 bytes per buffer size + the pickle,
  then one MPI message per buffer (tag BUF), in order.
The wire bytes recorded in the ledger are exactly the bytes handed to MPI (header and
buffers); MPI's own envelopes and the network's headers are not counted.

Time bounds. Nothing waits on MPI without a bound: sends and receives are non-blocking
and polled (`Iprobe`, `Test`) against a deadline, the round timeout for train/eval and
the start-up timeout for control messages. A worker that raises answers with
RemoteFailure; one that does not answer in time (it hangs, or died and the launcher kept
the other ranks) is named by the server. Error paths end with `MPI.COMM_WORLD.Abort`, so
no rank is left behind; a launcher that already ends the job when one rank dies (mpiexec)
prints that rank's PID, which the server's start-up line maps to its rank.

Liveness. While the run goes on the server sends an empty heartbeat message to every
worker every HEARTBEAT_S (from a thread: MPI must grant MPI_THREAD_MULTIPLE, as mpi4py
asks by default); a worker that hears nothing from its server for long stops on its own.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import socket
import struct
import threading
import time
import uuid
from typing import Any, NoReturn, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..messages import Abort, RemoteFailure, Shutdown
from .base import Transport, WorkerError, aborted, answer, rank_name, report_error

log = logging.getLogger(__name__)

TAG_MSG, TAG_BUF, TAG_BEAT = 11, 12, 13
HEARTBEAT_S = 2.0            # how often the server tells its workers it is alive
ABORT_TIMEOUT_S = 5.0        # how long an aborting server waits for its Abort sends
LAUNCHER_GRACE_S = 0.5       # time for mpiexec/srun to forward a rank's last words
MAX_PAUSE_S = 0.005          # longest sleep between two polls


def load_mpi():
    """mpi4py's MPI module (importing it initialises MPI), or a ConfigError saying how to
    get it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError(f"fed.transport: mpi needs mpi4py and an MPI runtime ({e}): "
                          f"pip install 'fedrpc[mpi]'") from None
    return MPI


# ---------------------------------------------------------------------- serialisation
def _rebuild_tensor(buf, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if not len(memoryview(buf)):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


class _Pickler(pickle.Pickler):
    """Protocol 5; a tensor goes as (dtype, shape) inline and its bytes out of band."""

    def reducer_override(self, obj):
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        if obj.layout != torch.strided:
            raise ValueError(f"mpi transport: {obj.layout} tensors are not sent")
        t = obj.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        return _rebuild_tensor, (pickle.PickleBuffer(raw), t.dtype, tuple(t.shape))


def encode(obj: Any) -> tuple[bytes, list[memoryview]]:
    """(header, buffers) for `obj`: the pickle and its out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    f = io.BytesIO()
    _Pickler(f, protocol=5, buffer_callback=buffers.append).dump(obj)
    views = [b.raw() for b in buffers]
    sizes = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    return sizes + f.getvalue(), views


def decode(header: bytes, buffers: list) -> Any:
    n = struct.unpack_from("<I", header)[0]
    return pickle.loads(memoryview(header)[4 + 8 * n:], buffers=buffers)


def buffer_sizes(header) -> list[int]:
    n = struct.unpack_from("<I", header)[0]
    return list(struct.unpack_from(f"<{n}Q", header, 4))


def wire_bytes(obj: Any) -> int:
    """Bytes this transport hands to MPI for `obj` (header + out-of-band buffers)."""
    header, views = encode(obj)
    return len(header) + sum(v.nbytes for v in views)


# ---------------------------------------------------------------------- polling
def poll(test, deadline: float) -> bool:
    """Call `test()` until it is true (-> True) or the deadline passes (-> False)."""
    pause = 5e-5
    while not test():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, MAX_PAUSE_S)
    return True


class _Late(Exception):
    """A message did not complete before its deadline."""


# ---------------------------------------------------------------------- the transport
class MpiTransport(Transport):
    """One per rank, over MPI.COMM_WORLD: rank 0 is the server, the others workers."""

    name = "mpi"
    can_rejoin = False   # a rank that died cannot rejoin COMM_WORLD

    def __init__(self, rank: int, world_size: int, startup_timeout_s: float = 60.0,
                 round_timeout_s: float = 600.0):
        super().__init__()
        if world_size < 2:
            raise ConfigError(f"fed.transport: mpi needs at least 2 ranks (rank 0 = server, "
                              f"ranks 1.. = workers) but the launcher started {world_size}")
        self.rank, self.world_size = rank, world_size
        self.control_timeout_s = startup_timeout_s
        self.round_timeout_s = round_timeout_s
        self._closed = False
        self._beating = threading.Event()
        self._beat_thread: Optional[threading.Thread] = None
        self.ranks_at: list[tuple[int, str]] = []
        self._told_to_stop = False           # a worker that received the server's Abort
        self.MPI = None
        self.comm = None

    @property
    def worker_ranks(self) -> list[int]:
        return list(range(1, self.world_size))

    def describe(self) -> dict:
        return {"transport": self.name, "mpi_library": self.MPI.Get_library_version()
                .splitlines()[0].strip() if self.MPI else "",
                "ranks": [{"rank": r, "pid": pid, "host": host}
                          for r, (pid, host) in enumerate(self.ranks_at)]}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> float:
        """Initialise MPI, check that it sees the ranks the launcher started, learn where
        every rank runs, start the heartbeat; all of it bounded by the start-up timeout."""
        t0 = time.perf_counter()
        me = f"{rank_name(self.rank)} (rank {self.rank})"
        watchdog = threading.Timer(self.control_timeout_s, self.abort, args=(
            1, f"{me}: MPI start-up did not complete within runtime.startup_timeout_s="
               f"{self.control_timeout_s:g} s"))
        watchdog.daemon = True
        watchdog.start()
        try:
            self.MPI = load_mpi()
            self.comm = self.MPI.COMM_WORLD
            if (self.comm.Get_rank(), self.comm.Get_size()) != (self.rank, self.world_size):
                raise ConfigError(f"fed.transport: mpi: MPI sees rank {self.comm.Get_rank()} "
                                  f"of {self.comm.Get_size()} but the launcher set rank "
                                  f"{self.rank} of {self.world_size}: launch with mpiexec -n N "
                                  f"or srun --mpi=pmi2")
            where = self.comm.allgather((os.getpid(), socket.gethostname()))
        finally:
            watchdog.cancel()
        self.ranks_at = [tuple(w) for w in where]
        if self.rank == 0:
            log.info("mpi: %s", ", ".join(f"rank {r} = pid {pid} on {host}"
                                          for r, (pid, host) in enumerate(self.ranks_at)))
            self.concurrent = self.MPI.Query_thread() == self.MPI.THREAD_MULTIPLE
            if self.concurrent:
                self._beating.set()
                self._beat_thread = threading.Thread(target=self._beat, name="mpi-heartbeat",
                                                     daemon=True)
                self._beat_thread.start()
            else:
                log.warning("mpi: no MPI_THREAD_MULTIPLE: workers do not check that the "
                            "server is alive, and evaluation waits for fusion")
        return time.perf_counter() - t0

    def stop(self, graceful: bool = True) -> bool:
        """graceful: all ranks meet in a barrier (polled, bounded); True when they did.
        An MPI rank cannot leave a failed job on its own: graceful=False returns False, so
        the caller ends the whole job with `abort`."""
        self._stop_beat()
        if not graceful or self.comm is None:
            return False
        req = self.comm.Ibarrier()
        if poll(req.Test, time.monotonic() + self.control_timeout_s):
            return True
        log.warning("mpi: not every rank reached the final barrier within %g s",
                    self.control_timeout_s)
        return False

    def abort(self, code: int, message: str) -> NoReturn:
        """Say why, then end every rank of the job (MPI.COMM_WORLD.Abort). A worker the
        server told to stop leaves the Abort to the server, which is about to call it:
        its own would end the job before the server's message is out."""
        report_error(message)
        if self.MPI is None:
            os._exit(code)
        if self._told_to_stop:
            time.sleep(ABORT_TIMEOUT_S + LAUNCHER_GRACE_S)    # the server's Abort ends us
        time.sleep(LAUNCHER_GRACE_S)         # let the launcher forward the message first
        self.MPI.COMM_WORLD.Abort(code)
        os._exit(code)

    # ------------------------------------------------------------------ messages
    def _isend(self, obj: Any, dest: int) -> tuple[list, list, int]:
        """Start sending `obj`: (requests, buffers to keep alive, wire bytes)."""
        header, views = encode(obj)
        reqs = [self.comm.Isend([header, self.MPI.BYTE], dest=dest, tag=TAG_MSG)]
        reqs += [self.comm.Isend([v, self.MPI.BYTE], dest=dest, tag=TAG_BUF) for v in views]
        return reqs, [header, views], len(header) + sum(v.nbytes for v in views)

    def _try_recv(self, source: int, deadline: float) -> Optional[tuple[Any, int]]:
        """(message, wire bytes) when one from `source` has arrived, else None. Its
        buffers follow the header at once; _Late if they do not by the deadline."""
        status = self.MPI.Status()
        if not self.comm.Iprobe(source=source, tag=TAG_MSG, status=status):
            return None
        header = bytearray(status.Get_count(self.MPI.BYTE))
        self.comm.Recv([header, self.MPI.BYTE], source=source, tag=TAG_MSG)  # arrived
        bufs = [bytearray(n) for n in buffer_sizes(header)]
        reqs = [self.comm.Irecv([b, self.MPI.BYTE], source=source, tag=TAG_BUF)
                for b in bufs]
        if reqs and not poll(lambda: self.MPI.Request.Testall(reqs), deadline):
            for r in reqs:
                r.Cancel()
            raise _Late()
        return decode(bytes(header), bufs), len(header) + sum(len(b) for b in bufs)

    # ------------------------------------------------------------------ server side
    def _send_all(self, requests, timeout, tolerate=False):
        deadline = time.monotonic() + timeout
        sends, down, out = {}, {}, {}

        def failed(rank: int, err: WorkerError) -> None:
            if not tolerate:
                raise err
            out[rank] = err
            sends.pop(rank, None)

        for rank in sorted(requests):
            try:
                with self._talking_to(rank, timeout):
                    reqs, keep, down[rank] = self._isend(requests[rank], rank)
            except WorkerError as e:
                failed(rank, e)
                continue
            sends[rank] = (reqs, keep)
        pause = 5e-5
        while len(out) < len(requests) or sends:
            progressed = False
            for rank in sorted(set(requests) - set(out) | set(sends)):
                try:
                    with self._talking_to(rank, timeout):
                        if rank in sends and self.MPI.Request.Testall(sends[rank][0]):
                            del sends[rank]
                            progressed = True
                        got = None if rank in out else self._try_recv(rank, deadline)
                except WorkerError as e:
                    failed(rank, e)
                    continue
                if got is None:
                    continue
                reply, up = got
                progressed = True
                if isinstance(reply, RemoteFailure):
                    failed(rank, WorkerError(rank, f"{reply.kind}: {reply.message} ({self._where})"))
                    continue
                out[rank] = (reply, down[rank], up)
            if time.monotonic() >= deadline and (len(out) < len(requests) or sends):
                for late in sorted((set(requests) - set(out)) | set(sends)):
                    failed(late, WorkerError(late, self._late(timeout)))
                break
            pause = 5e-5 if progressed else min(2 * pause, MAX_PAUSE_S)
            if not progressed:
                time.sleep(pause)
        return out

    @contextlib.contextmanager
    def _talking_to(self, rank: int, timeout: float):
        """MPI's failures while exchanging with `rank` (e.g. it died mid-transfer) and a
        late message become a WorkerError naming it."""
        try:
            yield
        except _Late:
            raise WorkerError(rank, self._late(timeout)) from None
        except self.MPI.Exception as e:
            raise WorkerError(rank, f"the rank died or is unreachable: MPI error class "
                                    f"{e.Get_error_class()} while exchanging with it "
                                    f"({self._where})") from e

    def _late(self, timeout: float) -> str:
        return super()._late(timeout, ": it hangs or died")

    def close(self, graceful: bool = True, reason: str = "") -> None:
        """graceful: Shutdown to every worker and wait for each to acknowledge it;
        otherwise Abort(reason) to every worker, waiting at most ABORT_TIMEOUT_S."""
        if self._closed or self.comm is None:
            return
        self._closed = True
        if graceful:
            self.exchange(-1, "shutdown", {r: Shutdown() for r in self.worker_ranks},
                          self.control_timeout_s)
            return
        self._stop_beat()
        sends = [self._isend(Abort(reason), r) for r in self.worker_ranks]
        reqs = [q for s in sends for q in s[0]]
        poll(lambda: self.MPI.Request.Testall(reqs), time.monotonic() + ABORT_TIMEOUT_S)

    def _beat(self) -> None:
        empty = np.empty(0, np.uint8)
        pending: list = []
        while self._beating.is_set():
            pending = [q for q in pending if not q.Test()]
            for r in self.worker_ranks:
                pending.append(self.comm.Isend([empty, self.MPI.BYTE], dest=r, tag=TAG_BEAT))
            time.sleep(HEARTBEAT_S)

    def _stop_beat(self) -> None:
        self._beating.clear()
        if self._beat_thread is not None:
            self._beat_thread.join(HEARTBEAT_S + 1.0)
            self._beat_thread = None

    # ------------------------------------------------------------------ worker side
    def serve(self, worker=None, error: Optional[BaseException] = None) -> tuple[bool, str]:
        """Answer the server's requests until Shutdown (-> (True, "")), Abort, or silence
        from the server for longer than its heartbeat allows (-> (False, why))."""
        lost_after = max(5 * HEARTBEAT_S, min(60.0, self.round_timeout_s))
        watch = self.MPI.Query_thread() == self.MPI.THREAD_MULTIPLE
        heard, failed, pause = time.monotonic(), False, 5e-5
        empty = np.empty(0, np.uint8)
        try:
            while True:
                while self.comm.Iprobe(source=0, tag=TAG_BEAT):
                    self.comm.Recv([empty, self.MPI.BYTE], source=0, tag=TAG_BEAT)
                    heard = time.monotonic()
                try:
                    got = self._try_recv(0, time.monotonic() + self.round_timeout_s)
                except _Late:
                    return False, (f"lost the server (rank 0): a request did not arrive "
                                   f"whole within {self.round_timeout_s:g} s")
                if got is None:
                    if watch and time.monotonic() - heard > lost_after:
                        return False, (f"lost the server (rank 0): no heartbeat for "
                                       f"{lost_after:g} s")
                    time.sleep(pause)
                    pause = min(2 * pause, MAX_PAUSE_S)
                    continue
                msg, pause, heard = got[0], 5e-5, time.monotonic()
                if isinstance(msg, Abort):
                    self._told_to_stop = True
                    return False, aborted(failed, msg.reason)
                reply, raised = answer(worker, error, msg)
                failed |= raised
                reqs, keep, _ = self._isend(reply, 0)
                if not poll(lambda: self.MPI.Request.Testall(reqs),
                            time.monotonic() + self.round_timeout_s):
                    return False, (f"lost the server (rank 0): it did not take the reply "
                                   f"within {self.round_timeout_s:g} s")
                if isinstance(msg, Shutdown) and not raised:
                    return True, ""
        except KeyboardInterrupt:
            return False, "interrupted"


# ---------------------------------------------------------------------- rpc bootstrap
def broadcast_endpoint(world_size: int) -> tuple[str, int, str]:
    """For fed.transport=rpc under mpiexec or srun --mpi=pmi2: rank 0 picks a free port on
    its host and a run id, and broadcasts (address, port, run id) over MPI. The address
    is 127.0.0.1 when every rank runs on rank 0's host."""
    MPI = load_mpi()
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world_size:
        raise ConfigError(f"fed.transport: rpc: MASTER_ADDR/MASTER_PORT are not set and MPI "
                          f"sees {comm.Get_size()} ranks, not {world_size}, so it cannot share "
                          f"them: export MASTER_ADDR and MASTER_PORT for every rank")
    hosts = comm.allgather(socket.gethostname())
    endpoint = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        endpoint = ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0], port,
                    f"mpi:{uuid.uuid4().hex}")
    return comm.bcast(endpoint, root=0)
