"""Starting a federation: ranks, roles, the server's features, the workers, a transport.

`run(cfg)` runs the whole federation. With `fed.transport: local` the server and its
workers live in this process. Otherwise a launcher (torchrun, srun, mpiexec) starts one
process per rank; `RankInfo.from_env()` reads which one this is: rank 0 is the server,
ranks 1..W-1 are workers. Each process then runs `run_ranks(cfg, info)`:

    transport = the one fed.transport names; transport.start()  (bounded)
    server: Server over the transport -> features (rank 0 only) -> rounds -> close -> stop
    worker: Worker(shard of users) -> transport.serve(worker) until Shutdown -> stop

Nothing here is transport-specific: each transport owns its start-up, its worker side
and its shutdown (fedrpc/transport).

Failures: a worker that raises, dies or does not answer within runtime.round_timeout_s
stops the run; the server tells the other workers to stop (Abort), every rank leaves
the transport non-gracefully with a bounded wait and exits non-zero, and the message names
the rank that failed. A worker whose server disappears notices it by its heartbeat.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Mapping, NoReturn, Optional

import numpy as np
import torch

from .config import Config, ConfigError
from .data import Catalogue, load_item_content
from .data.types import DataError
from .memory import keep_freed_memory
from .reporting import RunDir
from .server import ContentFeatures, RoundFailed, Server, StopSignals, Stopped, run_rounds
from .state import find_checkpoint
from .transport import LocalTransport, RunError, Transport, WorkerError, rank_name
from .worker import Worker

log = logging.getLogger(__name__)
__all__ = ["RankInfo", "RunError", "launch_info", "run", "run_local", "run_ranks"]


# ---------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the federation, as its launcher described it."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]   # rendezvous of fed.transport=rpc; None: not known yet
    master_port: Optional[int]
    launcher: str            # torchrun | env | slurm | mpi
    run_id: str = ""         # shared by the ranks of one launch only ('' = unknown)

    @property
    def role(self) -> str:
        return "server" if self.rank == 0 else "worker"

    @property
    def name(self) -> str:
        """"server" or "worker<rank>" (fedrpc.transport.rank_name)."""
        return rank_name(self.rank)

    @property
    def init_method(self) -> str:
        if self.master_addr is None or self.master_port is None:
            raise ConfigError(f"{self.launcher}: no MASTER_ADDR/MASTER_PORT for rank "
                              f"{self.rank}")
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> Optional["RankInfo"]:
        """Rank and world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK), SLURM (SLURM_PROCID,
        SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID) or MPI (OMPI_COMM_WORLD_*,
        PMI_RANK/PMI_SIZE); None when no launcher set them. The master address and port
        come from MASTER_ADDR/MASTER_PORT, else (SLURM) the first host of the step and a
        port derived from the job id, else (all ranks on one node) 127.0.0.1 and no port;
        None where none of these applies (`launch_info` fills them in over MPI)."""
        env = os.environ if env is None else env
        found = _launcher_ranks(env)
        if found is None:
            return None
        launcher, rank, world, local, all_local = found
        addr = env.get("MASTER_ADDR") or _default_master_addr(env, launcher, all_local, world)
        port = _int_env(env, "MASTER_PORT") if env.get("MASTER_PORT") else \
            _default_master_port(env)
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"MASTER_PORT={port}: must be a TCP port in 1..65535")
        if not 0 <= rank < world:
            raise ConfigError(f"{launcher}: rank {rank} is outside world size {world}")
        return cls(rank, world, local, addr, port, launcher, launch_id(env))


def launch_id(env: Mapping[str, str]) -> str:
    """An id every rank of one launch shares and another launch does not: FEDRPC_RUN_ID,
    torchrun's run id, or SLURM's job and step ('' when the launcher gives none; under
    mpiexec rank 0 then broadcasts one). The RPC rendezvous refuses ranks of another
    launch, e.g. two jobs started with the same MASTER_PORT."""
    if env.get("FEDRPC_RUN_ID"):
        return env["FEDRPC_RUN_ID"]
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    return ""


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r}: not an integer") from None


def _launcher_ranks(env: Mapping[str, str]):
    """(launcher, rank, world, local rank, all ranks on this node?) or None."""
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        rank = _int_env(env, "RANK")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        world = _int_env(env, "WORLD_SIZE")
        lw = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None
        return launcher, rank, world, local, lw == world
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        world = _int_env(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env
                         else "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
        return "slurm", _int_env(env, "SLURM_PROCID"), world, local, nodes == "1"
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        world = _int_env(env, "OMPI_COMM_WORLD_SIZE")
        local = _int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK") \
            if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        lw = env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
        return "mpi", _int_env(env, "OMPI_COMM_WORLD_RANK"), world, local, lw == str(world)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        world = _int_env(env, "PMI_SIZE")
        local = _int_env(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0
        lw = env.get("MPI_LOCALNRANKS")
        return "mpi", _int_env(env, "PMI_RANK"), world, local, lw == str(world)
    return None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ConfigError(f"SLURM node list {nodelist!r}: cannot read its first host")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _default_master_addr(env, launcher: str, all_local: bool, world: int) -> Optional[str]:
    if launcher == "slurm":
        nodes = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                 or env.get("SLURM_NODELIST"))
        if nodes:
            return first_slurm_host(nodes)
    if all_local or world == 1:
        return "127.0.0.1"
    return None


def _default_master_port(env) -> Optional[int]:
    """A port every rank of a SLURM job derives alike from its job id (no fixed port)."""
    if env.get("SLURM_JOB_ID"):
        h = int(hashlib.sha1(f"SLURM_JOB_ID={env['SLURM_JOB_ID']}".encode()).hexdigest(), 16)
        return 20000 + h % 30000
    return None


_HOW = {"rpc": "start one process per rank, e.g. launchers/local.sh <config> or torchrun "
               "--standalone --nproc_per_node=3 -m fedrpc run <config> fed.transport=rpc",
        "mpi": "start one process per rank, e.g. mpiexec -n 3 python -m fedrpc run <config> "
               "fed.transport=mpi (or srun --mpi=pmi2 -n 3 ...)"}


def launch_info(transport: str, env: Optional[Mapping[str, str]] = None) -> RankInfo:
    """This process's RankInfo for fed.transport=rpc|mpi, or a ConfigError that says how
    to launch. For rpc under mpiexec (or srun --mpi=pmi2 outside a job id) without
    MASTER_ADDR/MASTER_PORT, rank 0 picks them and broadcasts them over MPI."""
    info = RankInfo.from_env(env)
    how = _HOW[transport]
    if info is None:
        raise ConfigError(f"fed.transport: {transport} needs a launcher (no RANK/WORLD_SIZE, "
                          "SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_RANK/SIZE or "
                          f"PMI_RANK/PMI_SIZE in the environment): {how}")
    if info.world_size < 2:
        raise ConfigError(f"fed.transport: {transport} needs at least 2 ranks (rank 0 = server, "
                          f"ranks 1.. = workers) but {info.launcher} started "
                          f"{info.world_size}: {how}")
    if transport != "rpc" or (info.master_addr and info.master_port and info.run_id):
        return info
    if info.launcher == "mpi" and env is None:
        from .transport.mpi import broadcast_endpoint
        addr, port, run_id = broadcast_endpoint(info.world_size)
        return replace(info, master_addr=info.master_addr or addr,
                       master_port=info.master_port or port, run_id=info.run_id or run_id)
    if info.master_addr and info.master_port:
        return info
    missing = " and ".join(k for k, v in (("MASTER_ADDR", info.master_addr),
                                          ("MASTER_PORT", info.master_port)) if not v)
    raise ConfigError(f"fed.transport: rpc: {missing} not set and not derivable ({info.launcher}"
                      f" launcher: no SLURM_JOB_ID, no MPI to share them): export "
                      f"MASTER_ADDR=<host of rank 0> and MASTER_PORT=<free port> for every "
                      f"rank, or launch with torchrun, srun or mpiexec")


def rank_device(device: str, local_rank: int = 0, rank: int = 0) -> torch.device:
    """run.device for a rank: auto = cuda:LOCAL_RANK when GPUs exist, else cpu (a
    one-process run is rank 0, local rank 0)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cpu" or (device == "auto" and n == 0):
        return torch.device("cpu")
    if n == 0:
        raise ConfigError(f"run.device: {device} but rank {rank} sees no GPU; "
                          f"use run.device=cpu or auto")
    if device in ("auto", "cuda"):
        return torch.device("cuda", local_rank % n)
    return torch.device(device)


def server_features(cfg: Config, catalogue: Catalogue) -> ContentFeatures:
    """Item content -> feature tensors on the server (the encoder runs here, and only here)."""
    from .encoders import encode_content

    content = load_item_content(cfg, catalogue)
    f = encode_content(content, cfg.encoder, progress=cfg.run.progress)
    n = catalogue.n_items
    text = torch.from_numpy(f.text) if f.text is not None else torch.zeros(n, 1)
    image = torch.from_numpy(f.image) if f.image is not None else torch.zeros(n, 1)
    return ContentFeatures(text, image, torch.from_numpy(np.asarray(f.text_mask, bool)),
                           torch.from_numpy(np.asarray(f.image_mask, bool)), f.info)


def open_run(cfg: Config) -> tuple[RunDir, Optional[dict]]:
    """Before any data is loaded: the checkpoint to resume (if any) and the locked output
    folder (bad paths, a busy folder, an earlier run's records: one-line errors)."""
    manifest = find_checkpoint(cfg)
    run_dir = RunDir(cfg.run.out_dir).open(cfg.run.overwrite, manifest is not None,
                                           cfg.run.resume)
    return run_dir, manifest


def serve_rounds(cfg: Config, server: Server, run_dir: RunDir, manifest: Optional[dict]) -> dict:
    """The server's part once the workers answered Hello: content features (rank 0 only),
    the resumed state, then the rounds; SIGTERM/SIGUSR1/SIGINT stop after a checkpoint."""
    check_population(cfg, server.users)
    with StopSignals() as stop:
        if cfg.gfmfr.uses_content:            # content is read and encoded on rank 0
            server.features = server_features(cfg, server.catalogue)
        if manifest is not None:
            server.resume(manifest)
        return run_rounds(server, run_dir, cfg.run.progress, stop)


def check_population(cfg: Config, users: np.ndarray) -> None:
    """Say what happens when the config asks for more than the data has."""
    n = len(users)
    if cfg.fed.clients_per_round > n:
        log.warning("fed.clients_per_round=%d but the data has %d clients: all of them take "
                    "part in every round", cfg.fed.clients_per_round, n)
    if cfg.gfmfr.enabled and cfg.gfmfr.groups > n:
        raise ConfigError(f"gfmfr.groups: {cfg.gfmfr.groups} groups but only {n} clients; "
                          f"use at most {n}")


def run_local(cfg: Config) -> dict:
    """Server and `fed.workers` workers in this process, over the in-process transport."""
    from .data import load_interactions

    run_dir, manifest = open_run(cfg)
    transport = None
    try:
        inter = load_interactions(cfg)  # read once; each worker keeps only its shard's use
        if cfg.fed.workers > inter.n_users:
            raise ConfigError(f"fed.workers: {cfg.fed.workers} workers but the data has "
                              f"{inter.n_users} users; use at most {inter.n_users}")
        device = rank_device(cfg.run.device)
        workers = {rank: Worker(cfg, rank, cfg.fed.workers, inter, device)
                   for rank in range(1, cfg.fed.workers + 1)}
        transport = LocalTransport(workers)
        server = Server(cfg, transport, None, device)
        return serve_rounds(cfg, server, run_dir, manifest)
    finally:
        if transport is not None:
            transport.close()
        run_dir.close()


# ---------------------------------------------------------------------- ranks run
def make_transport(cfg: Config, info: RankInfo) -> Transport:
    """The transport fed.transport names, for this rank."""
    rt = cfg.runtime
    if cfg.fed.transport == "rpc":
        from .transport.rpc import RpcTransport
        return RpcTransport(info.rank, info.world_size, info.init_method,
                            rt.startup_timeout_s, rt.round_timeout_s, info.run_id)
    if cfg.fed.transport == "mpi":
        from .transport.mpi import MpiTransport
        return MpiTransport(info.rank, info.world_size, rt.startup_timeout_s,
                            rt.round_timeout_s)
    raise ConfigError(f"fed.transport: {cfg.fed.transport!r} does not run as separate ranks")


def run_ranks(cfg: Config, info: Optional[RankInfo] = None) -> Optional[dict]:
    """This process's part of a federation: the summary on the server, None on workers."""
    info = info or launch_info(cfg.fed.transport)
    _tag_logs(info)
    _watch_launcher(info)
    device = rank_device(cfg.run.device, info.local_rank, info.rank)
    log.debug("%s: rank %d of %d (%s), local rank %d, master %s:%s, device %s (tensors "
              "cross between ranks on the CPU)", info.name, info.rank, info.world_size,
              info.launcher, info.local_rank, info.master_addr, info.master_port, device)
    transport = make_transport(cfg, info)
    startup_s = transport.start()
    if info.rank == 0:
        return _run_server(cfg, info, transport, startup_s, device)
    _run_worker(cfg, info, transport, device)
    return None


LAUNCHER_POLL_S = 1.0


def _watch_launcher(info: RankInfo) -> None:
    """A rank notices when its launcher (torchrun, mpiexec, srun) is gone: the launcher's
    death re-parents this process. The rank then acts as on SIGTERM: the server finishes
    the round, checkpoints and shuts the workers down; a worker whose server is gone too
    stops by its heartbeat. No rank runs on as an orphan."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_S)
        log.warning("%s: the launcher (PID %d) is gone; stopping", info.name, parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _tag_logs(info: RankInfo) -> None:
    """Prefix log lines with the rank's name; workers log warnings only unless -v."""
    root = logging.getLogger()
    for h in root.handlers:
        fmt = getattr(h.formatter, "_fmt", None) or "%(levelname)s %(name)s: %(message)s"
        if "[%s]" % info.name not in fmt:
            h.setFormatter(logging.Formatter(fmt.replace("%(levelname)s",
                                                         f"[{info.name}] %(levelname)s", 1)))
    if info.rank != 0 and root.getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("fedrpc").setLevel(logging.WARNING)


def _run_server(cfg: Config, info: RankInfo, transport: Transport, startup_s: float,
                device: torch.device) -> dict:
    if cfg.fed.workers != 1:
        log.info("fed.workers=%d applies to the local transport; over %s the %d worker "
                 "ranks host the clients", cfg.fed.workers, transport.name,
                 info.world_size - 1)
    run_dir = None
    try:
        run_dir, manifest = open_run(cfg)
        server = Server(cfg, transport, None, device)  # Hello: which users live where
        summary = serve_rounds(cfg, server, run_dir, manifest)
        transport.close(graceful=True)                 # Shutdown to every worker
        summary["runtime"] = _runtime_record(info, startup_s, transport)
        run_dir.write_summary(summary)
    except Stopped:                                    # checkpointed: a clean shutdown
        transport.close(graceful=True)
        transport.stop(graceful=True)
        raise
    except BaseException as e:
        _fail_server(transport, e)
    finally:
        if run_dir is not None:
            run_dir.close()
    if not transport.stop(graceful=True):
        log.warning("%s shutdown was not clean; the run itself completed", transport.name)
    return summary


def _fail_server(transport: Transport, e: BaseException) -> NoReturn:
    """Abort the workers, leave the transport without waiting for peers, raise the named
    error (or end the process with it when the transport cannot be left cleanly)."""
    if isinstance(e, (WorkerError, RoundFailed)):
        msg = str(e)
    else:
        msg = f"server (rank 0): {type(e).__name__}: {e}"
        if not isinstance(e, (ConfigError, DataError, KeyboardInterrupt)):
            log.error("the server failed", exc_info=e)
    transport.close(graceful=False, reason=msg)
    if not transport.stop(graceful=False):
        transport.abort(1, msg)
    if isinstance(e, (ConfigError, DataError, KeyboardInterrupt)):
        raise e
    raise RunError(msg) from e


def _ignore_stop_signals(info: RankInfo) -> None:
    """A worker rank outlives SIGTERM/SIGUSR1/SIGINT (a launcher or SLURM sends them to
    every rank): the server finishes the round, has every rank write its checkpoint and
    then shuts the workers down. A worker whose server is gone stops by its heartbeat."""
    def note(signum, frame):
        log.info("worker rank %d: %s received; the server stops the run after a checkpoint",
                 info.rank, signal.Signals(signum).name)
    if threading.current_thread() is threading.main_thread():
        for name in StopSignals.NAMES:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), note)


def _run_worker(cfg: Config, info: RankInfo, transport: Transport,
                device: torch.device) -> None:
    _ignore_stop_signals(info)
    try:
        worker = Worker(cfg, info.rank, info.world_size - 1, device=device)  # its shard only
    except Exception as e:                                     # the server's Hello reports it
        log.error("worker rank %d could not start: %s: %s", info.rank, type(e).__name__, e)
        ok, reason = transport.serve(None, error=e)
    else:
        ok, reason = transport.serve(worker)
    if ok:
        if not transport.stop(graceful=True):
            log.warning("worker rank %d: %s shutdown was not clean", info.rank, transport.name)
        return
    msg = f"worker rank {info.rank}: {reason}"
    if not transport.stop(graceful=False):
        transport.abort(1, msg)
    raise RunError(msg)


def _runtime_record(info: RankInfo, startup_s: float, transport: Transport) -> dict:
    control = [r for r in transport.ledger.records if r.round < 0]
    return {**transport.describe(), "launcher": info.launcher,
            "world_size": info.world_size, "workers": info.world_size - 1,
            "startup_seconds": round(startup_s, 3),
            "control_messages": {"count": len(control),
                                 "payload": sum(r.payload for r in control),
                                 "wire": sum(r.wire or 0 for r in control)}}


# ---------------------------------------------------------------------- dispatch
def run(cfg: Config) -> Optional[dict]:
    """Run the federation (`fed.transport`): the summary, or None on a worker rank."""
    if cfg.runtime.keep_freed_memory:
        keep_freed_memory()
    if cfg.fed.transport == "local":
        found = _launcher_ranks(os.environ) if "RANK" in os.environ else None
        if found is not None and found[2] > 1:
            raise ConfigError(f"fed.transport: local, but {found[0]} started {found[2]} ranks "
                              f"(each would run the whole federation): add fed.transport=rpc")
        return run_local(cfg)
    if cfg.fed.transport in ("rpc", "mpi"):
        return run_ranks(cfg)
    raise ConfigError(f"fed.transport: {cfg.fed.transport!r} is not supported by this runtime")
