"""`fedrpc bench scale`: one round with every client taking part, on generated data of a
given size, for several worker counts, each as real processes.

For each worker count W the federation runs as its own processes: W + 1 torch RPC
ranks on 127.0.0.1 (rank 0 the server), or with `transport="local"` one process
hosting the server and W in-process workers. Each process reads its own peak resident
memory, and the round's record (rounds.jsonl) carries it per rank, with the seconds per
phase and the byte ledger's logical and physical bytes; this module reads that record.
Every process it starts runs under a hard timeout and is killed by its PID (and its
process group) when it outlives it or when the run fails.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import Config, load_config

log = logging.getLogger(__name__)

PHASES = ("train", "aggregate", "group", "fusion", "eval")
DEFAULT_TIMEOUT_S = 1800.0
KILL_GRACE_S = 10.0


def scale_overrides(users: int, items: int, mean_interactions: int) -> list[str]:
    """The dotted overrides of a scale run: this data size, one round, every client."""
    return ["data.format=synthetic", f"data.synthetic.users={users}",
            f"data.synthetic.items={items}",
            f"data.synthetic.mean_interactions={mean_interactions}",
            f"data.synthetic.min_interactions={min(8, mean_interactions)}",
            "fed.rounds=1", "fed.client_fraction=1.0", "fed.clients_per_round=0",
            "eval.interval=1", "run.progress=false", "run.checkpoint_every=0",
            "run.overwrite=true"]


# ---------------------------------------------------------------------- the data
def data_figures(cfg: Config) -> dict:
    """Generate the data here once (as each worker rank will): its size, how long it took,
    and the round's training work, sample-steps = local epochs x training interactions x
    (1 + negatives per positive), the positives and negatives each client trains on."""
    from .data import load_interactions, split_of
    t0 = time.perf_counter()
    inter = load_interactions(cfg)
    gen_s = time.perf_counter() - t0
    split = split_of(cfg, inter)
    n_train = int(split.train_indptr[-1])
    f = cfg.fed
    return {"users": int(inter.n_users), "items": int(inter.n_items),
            "interactions": int(len(inter)), "train_interactions": n_train,
            "mean_interactions": round(len(inter) / inter.n_users, 2),
            "generate_and_split_s": round(gen_s, 2),
            "sample_steps": f.local_epochs * n_train * (1 + f.num_negatives)}


# ---------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    """End the processes started here (each leads its own process group) by their ids."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
    for p in procs:
        try:
            p.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("bench scale: PID %d did not end after SIGKILL", p.pid)


def _rank_envs(workers: int, transport: str) -> list[dict]:
    """The environment of each process: loopback only, a thread count that shares the
    cores among the ranks (unless OMP_NUM_THREADS is set), no inherited launcher ranks."""
    n = workers + 1 if transport == "rpc" else 1
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                         "MASTER_ADDR", "MASTER_PORT")}
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    base.update({"TP_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"})
    if transport != "rpc":
        return [base]
    port = str(_free_port())
    return [{**base, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in range(n)]


def run_federation(config: Optional[str], overrides: Sequence[str], out: Path, workers: int,
                   transport: str = "rpc", timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """One federation as processes of `fedrpc run`; its round record (raises RuntimeError
    naming the rank and its log's tail when a process fails or the timeout passes)."""
    if not config:
        raise ValueError("bench scale needs a config file (e.g. configs/scale.yaml)")
    out.mkdir(parents=True, exist_ok=True)
    args = [*overrides, f"run.out_dir={out}", f"fed.transport={transport}",
            f"fed.workers={workers if transport == 'local' else 1}"]
    argv = [sys.executable, "-m", "fedrpc", "run", config, *args]
    procs: list[subprocess.Popen] = []
    logs = []
    t0 = time.monotonic()
    with _terminate_as_exit() as stopper:
        try:
            for r, env in enumerate(_rank_envs(workers, transport)):
                logs.append(out / f"rank{r}.log")
                with open(logs[-1], "wb") as f, stopper.start():
                    procs.append(subprocess.Popen(argv, env=env, stdout=f,
                                                  stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            _wait(procs, logs, t0 + timeout_s)
        finally:
            _kill(procs)
    rec = [json.loads(line) for line in open(out / "rounds.jsonl")][-1]
    rec["wall_s"] = round(time.monotonic() - t0, 2)
    return rec


class _Stopper:
    """SIGTERM as SystemExit, held back while a rank is being started: a signal that
    arrived between the fork and Popen's return would leave a rank nobody records, so
    none can kill it."""

    def __init__(self) -> None:
        self.starting, self.pending = False, None

    def __call__(self, signum, frame) -> None:
        if self.starting:
            self.pending = signum
            return
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def start(self):
        self.starting = True
        try:
            yield
        finally:
            self.starting = False
        if self.pending is not None:
            raise SystemExit(128 + self.pending)


@contextlib.contextmanager
def _terminate_as_exit():
    """While inside, SIGTERM ends this process through its `finally` blocks, which kill
    the ranks it started (by default it would end at once and leave them to their
    launcher watch). Yields a `_Stopper`: start each rank inside its `start()`."""
    stopper = _Stopper()
    if threading.current_thread() is not threading.main_thread():
        yield stopper
        return
    before = signal.signal(signal.SIGTERM, stopper)
    try:
        yield stopper
    finally:
        signal.signal(signal.SIGTERM, before)


def _wait(procs: list, logs: list, deadline: float) -> None:
    """Until every process ended; the first failure (or the deadline) raises."""
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            r, c = bad[0]
            raise RuntimeError(f"bench scale: rank {r} exited with {c}; {logs[r]}:\n"
                               + _tail(logs[r]))
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench scale: timed out; killed PIDs "
                               f"{[p.pid for p in procs if p.poll() is None]}; rank 0 log:\n"
                               + _tail(logs[0]))
        time.sleep(0.2)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:]


# ---------------------------------------------------------------------- figures
def figures(rec: dict, data: dict, workers: int, transport: str) -> dict:
    """What one worker count gives: seconds per phase, throughput, memory, bytes."""
    sec = rec.get("seconds", {})
    rss = {str(k): float(v) for k, v in rec.get("peak_rss_mb", {}).items()}
    b = rec["bytes"]
    logical_total = sum(v["total"] for v in b["logical"].values())
    train = sec.get("train", 0.0)
    return {"workers": workers, "transport": transport, "clients": rec.get("clients"),
            "seconds": {**{p: sec.get(p, 0.0) for p in PHASES},
                        **{k: v for k, v in sec.items() if k not in PHASES}},
            "wall_s": rec.get("wall_s"),
            "sample_steps_per_s": round(data["sample_steps"] / train, 1) if train else None,
            "peak_rss_mb": rss,
            # one process holds every rank under the local transport: count it once
            "peak_rss_total_mb": round(sum(rss.values()) if transport == "rpc"
                                       else max(rss.values(), default=0.0), 1),
            "bytes": {"logical_total": int(logical_total),
                      "logical_per_client": {k: round(v["mean"], 1)
                                             for k, v in b["logical"].items()},
                      "physical_payload": b["physical_total"]["payload"],
                      "physical_wire": b["physical_total"]["wire"]}}


def bench_scale(config: Optional[str], overrides: Sequence[str], users: int, items: int,
                mean_interactions: int, workers: Sequence[int] = (1,), transport: str = "rpc",
                out_root: Optional[Path] = None,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Figures for each worker count (see the module docstring); `overrides` after the
    scale's own ones, so a caller may change e.g. the backbone."""
    if transport not in ("rpc", "local"):
        raise ValueError(f"bench scale: transport {transport!r}; use rpc or local")
    ov = [*scale_overrides(users, items, mean_interactions), *overrides]
    cfg = load_config(config, ov)
    data = data_figures(cfg)
    root = Path(out_root) if out_root else Path(tempfile.mkdtemp(prefix="fedrpc-scale-"))
    runs = []
    for w in workers:
        log.info("bench scale: %d users x %d items, %d worker(s) over %s", users, items, w,
                 transport)
        rec = run_federation(config, ov, root / f"w{w}", w, transport, timeout_s)
        runs.append(figures(rec, data, w, transport))
    return {"data": data, "backbone": cfg.fed.backbone, "gfmfr": cfg.gfmfr.enabled,
            "local_epochs": cfg.fed.local_epochs, "out": str(root), "runs": runs}


# ---------------------------------------------------------------------- printing
def format_report(r: dict) -> str:
    d = r["data"]
    lines = [f"data: {d['users']:,} users x {d['items']:,} items, {d['interactions']:,} "
             f"interactions ({d['mean_interactions']} per user), generated and split in "
             f"{d['generate_and_split_s']} s; {d['sample_steps']:,} client sample-steps per "
             f"round ({r['local_epochs']} local epoch(s)); backbone {r['backbone']}, "
             f"GFMFR {'on' if r['gfmfr'] else 'off'}",
             f"{'workers':>7} {'train':>8} {'aggr':>7} {'group':>7} {'fusion':>7} "
             f"{'eval':>7} {'steps/s':>10} {'RSS sum MB':>10}  {'logical B':>13} "
             f"{'physical B':>13}  peak RSS per rank (MB)"]
    for x in r["runs"]:
        s, b = x["seconds"], x["bytes"]
        ranks = " ".join(f"{k}:{v:.0f}" for k, v in x["peak_rss_mb"].items())
        if x["transport"] == "local":
            ranks += " (one process: server and workers together)"
        lines.append(f"{x['workers']:>7} {s['train']:>8.2f} {s['aggregate']:>7.2f} "
                     f"{s['group']:>7.2f} {s['fusion']:>7.2f} {s['eval']:>7.2f} "
                     f"{x['sample_steps_per_s'] or 0:>10,.0f} {x['peak_rss_total_mb']:>10,.0f}  "
                     f"{b['logical_total']:>13,} {b['physical_payload']:>13,}  {ranks}")
    lines.append("seconds per phase of the round; logical = what the client devices send and "
                 "receive, physical = payload between ranks (rounds.jsonl under "
                 f"{r['out']})")
    return "\n".join(lines)
