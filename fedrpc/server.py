"""The server (rank 0): the round loop of GFMFR.

    sample -> send -> collect -> admit -> aggregate -> group -> fuse -> teach  -> log
                                                   (evaluate, alongside)   -> checkpoint

The workers evaluate the aggregated model while the server groups and fuses
(runtime.overlap_eval), unless fusion changes that model (gfmfr.content_prior > 0).

(fed.protocol=secagg adds a second upload phase after grouping: masked item tables,
of which the server learns only per-set sums; fedrpc/strategy/secagg.py.)

The server holds the item content features, the `ServerState` (global shared
parameters, groups, the fusion model, the history) and the strategy (`GFMFR`) that
decides each step. It never holds interactions or private parameters: it learns the
catalogue and which clients exist from the workers' Hello replies, and sees only uploads
of shared parameters and metric sums.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor, wait
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, to_dict
from .data import Catalogue
from .messages import (LOSS_UNIT, CheckpointRequest, EvalRequest, Hello, HelloReply,
                       RestoreRequest)
from .memory import peak_rss_mb
from .metrics import COLD, add_sums, finalize
from .reporting import RunDir
from .state import (SERVER_FILE, ServerState, check_compatible, checkpoint_dir, manifest_of,
                    prune, result_config, save_atomic, write_manifest)
from .strategy import GFMFR, sample_participants
from .transport import Transport, WorkerError

log = logging.getLogger(__name__)


@dataclass
class ContentFeatures:
    """Item features on the server, rows in catalogue order."""
    text: Optional[torch.Tensor]
    image: Optional[torch.Tensor]
    text_mask: Optional[torch.Tensor]
    image_mask: Optional[torch.Tensor]
    info: dict = field(default_factory=dict)

    def standardised(self) -> dict[str, torch.Tensor]:
        """The modalities some item has, as float64 [I, dim] with each column at zero
        mean and unit variance over the items that have the modality (items without it:
        all zeros): "text", "image", and "text+image" (the two side by side) when both."""
        def one(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
            x = x.double()
            mu, sd = x[present].mean(0), x[present].std(0).clamp_min(1e-12)
            return torch.where(present[:, None], (x - mu) / sd, torch.zeros((), dtype=x.dtype))
        sets = {name: one(x, m) for name, x, m in (("text", self.text, self.text_mask),
                                                   ("image", self.image, self.image_mask))
                if m is not None and bool(m.any())}
        if len(sets) == 2:
            sets["text+image"] = torch.cat([sets["text"], sets["image"]], 1)
        return sets

    def combined(self, which: str = "all") -> tuple[str, Optional[torch.Tensor]]:
        """One of `standardised`'s sets and its name: with `which` "all" the widest
        ("text+image" when both modalities exist), with "text" or "image" that modality
        alone; ("none", None) when no item has it."""
        sets = self.standardised()
        if which != "all":
            return (which, sets[which]) if which in sets else ("none", None)
        if not sets:
            return "none", None
        name = "text+image" if "text+image" in sets else next(iter(sets))
        return name, sets[name]


class RoundFailed(RuntimeError):
    """A worker failed in a round and the failure policy ends the run; the message names
    the rank (and where the last complete round was checkpointed)."""


class Stopped(RuntimeError):
    """The run was stopped by a signal after a checkpoint (exit code 75: resume with
    run.resume=auto)."""

    def __init__(self, signame: str, completed: int, folder: Optional[Path]):
        where = f"checkpoint {folder}" if folder else "no round completed, nothing to resume"
        super().__init__(f"stopped by {signame} after {completed} round(s); {where}")
        self.signame, self.completed, self.folder = signame, completed, folder


class Server:
    def __init__(self, cfg: Config, transport: Transport, features: Optional[ContentFeatures],
                 device: torch.device | str = "cpu"):
        """`device`: where the group fusion model trains (features are moved there)."""
        self.cfg, self.transport = cfg, transport
        self.strategy = GFMFR(cfg, features, device)
        hello = transport.exchange(-1, "hello", {r: Hello() for r in transport.worker_ranks},
                                   cfg.runtime.startup_timeout_s)
        self.hosts = {r: h.users for r, h in hello.items()}
        self.catalogue = _one_catalogue(hello)
        self.users = np.sort(np.concatenate(list(self.hosts.values())))
        if len(self.users) == 0:
            raise RoundFailed("the workers host no clients: the data has no users")
        self.lost: dict[int, str] = {}      # worker ranks that failed and cannot rejoin
        shared = self.strategy.backbone.init_shared(self.catalogue.n_items, cfg.run.seed)
        self.state = ServerState(shared, np.full(int(self.users.max()) + 1, -1, dtype=np.int64))
        self.checkpoint_folder: Optional[Path] = None   # the newest written or resumed
        self.peak_rss: dict[int, float] = {}   # rank -> its latest reported peak RSS (MiB)

    @property
    def features(self) -> Optional[ContentFeatures]:
        return self.strategy.features

    @features.setter
    def features(self, value: Optional[ContentFeatures]) -> None:
        self.strategy.features = value

    @property
    def backbone(self):
        return self.strategy.backbone

    # ------------------------------------------------------------------ one round
    def run_round(self, r: int) -> dict:
        cfg, st, t = self.cfg, self.state, {}
        rec: dict = {"round": r}
        failures: Optional[dict] = {} if cfg.runtime.on_worker_failure == "skip" else None
        start = time.perf_counter()

        # --- sample participants and send each worker its clients' instruction
        tic = time.perf_counter()
        participants = sample_participants(self.users, cfg, r)
        requests = self.strategy.train_requests(st, self._live_hosts(), participants, r)
        replies = self.transport.exchange(r, "train", requests, cfg.runtime.round_timeout_s,
                                          failures)
        t["train"] = time.perf_counter() - tic

        # --- admit the uploads that may be averaged, then aggregate them
        tic = time.perf_counter()
        rec["loss"] = _mean_losses([replies[k] for k in sorted(replies)])
        self._peak_rss(replies)
        admitted = self.strategy.admit(st, [replies.pop(k) for k in sorted(replies)], r)
        up = admitted.up          # the uploads as received are freed once admitted
        rec["clients"] = int(len(up.users)) if up is not None else 0
        if admitted.rejected:
            rec["rejected"] = {k: len(v) for k, v in admitted.rejected.items()}
        if up is not None:
            self.strategy.aggregate(st, up)
        t["aggregate"] = time.perf_counter() - tic

        # --- secagg: group, then the second upload phase (masked tables, per-set sums)
        labels = sums = None
        if self.strategy.secure and up is not None:
            tic = time.perf_counter()
            if cfg.gfmfr.enabled:
                labels = self.strategy.group(st, up, r)
            t["group"] = time.perf_counter() - tic
            tic = time.perf_counter()
            sums, rec["secagg"] = self._secure_upload(r, up, labels, failures)
            t["upload"] = time.perf_counter() - tic

        # --- group clients, fuse content per group, derive the teacher; evaluate
        # (federated: only metric sums come back), on the workers while the server fuses
        # when the evaluated model is final before fusion
        gfmfr = cfg.gfmfr.enabled and up is not None
        due = self._eval_due(r)
        pending = None
        if due and gfmfr and self._overlap_eval():
            pool = ThreadPoolExecutor(1, thread_name_prefix="fedrpc-eval")
            pending = pool.submit(self._timed_evaluate, r, failures)
            pool.shutdown(wait=False)           # the thread ends with its one call
        try:
            if gfmfr:
                rec["gfmfr"] = self.strategy.group_fuse_teach(st, up, r, t, labels, sums)
        except BaseException:
            if pending is not None:             # never leave an exchange in flight
                wait([pending])
            raise
        if pending is not None:
            rec["metrics"], t["eval"] = pending.result()
        elif due:
            rec["metrics"], t["eval"] = self._timed_evaluate(r, failures)
        if failures:
            rec["failures"] = self._lose(failures, requests, r)
        t["total"] = time.perf_counter() - start      # wall time: phases may overlap
        rec["seconds"] = {k: round(v, 4) for k, v in t.items()}
        rec["bytes"] = self.transport.ledger.round_summary(r)
        rec["peak_rss_mb"] = self._peak_rss({})
        return rec

    def _peak_rss(self, replies: dict) -> dict[str, float]:
        """Peak resident memory per rank (MiB): this process's, and each worker's latest
        report (train and eval replies carry it; in-process workers report this process)."""
        for rank, reply in replies.items():
            self.peak_rss[rank] = max(self.peak_rss.get(rank, 0.0),
                                      getattr(reply, "peak_rss_mb", 0.0))
        return {str(k): v for k, v in sorted({0: peak_rss_mb(), **self.peak_rss}.items())}

    def _secure_upload(self, r: int, up, labels,
                       failures: Optional[dict]) -> tuple[dict, dict]:
        """Phase 2 of secagg: relay the sets' public keys, sum the masked uploads."""
        hosts = {k: v for k, v in self._live_hosts().items() if k not in (failures or {})}
        reqs, sets = self.strategy.mask_requests(hosts, up, labels, r)
        phase2: Optional[dict] = {} if failures is not None else None
        replies = self.transport.exchange(r, "upload", reqs, self.cfg.runtime.round_timeout_s,
                                          phase2)
        lost = [reqs[k].users for k in (phase2 or {})]
        if phase2:
            failures.update(phase2)
        return self.strategy.secure_aggregate(self.state, replies, sets, lost, r)

    def _live_hosts(self) -> dict[int, np.ndarray]:
        return {r: u for r, u in self.hosts.items() if r not in self.lost}

    def _lose(self, failures: dict, requests: dict, r: int) -> list[dict]:
        """Record the ranks that failed this round (skip policy) and their clients."""
        out = []
        for rank, err in sorted(failures.items()):
            lost = requests[rank].users if rank in requests else np.empty(0, np.int64)
            out.append({"rank": rank, "clients_lost": int(len(lost)), "error": str(err)})
            log.warning("round %d: %s; %d client(s) left out of this round "
                        "(runtime.on_worker_failure=skip)", r, err, len(lost))
            if not self.transport.can_rejoin:
                self.lost[rank] = str(err)
        return out

    # ------------------------------------------------------------------ evaluation
    def _eval_due(self, r: int) -> bool:
        e = self.cfg.eval
        return (r + 1) % e.interval == 0 or r == self.cfg.fed.rounds - 1

    def _overlap_eval(self) -> bool:
        """Whether this round's evaluation may run while the server groups and fuses."""
        return (self.cfg.runtime.overlap_eval and self.transport.concurrent
                and not self.strategy.fusion_changes_model)

    def _timed_evaluate(self, r: int, failures: Optional[dict]) -> tuple[dict, float]:
        tic = time.perf_counter()
        return self._evaluate(r, failures), time.perf_counter() - tic

    def _evaluate(self, r: int, failures: Optional[dict] = None) -> dict:
        shared = self.strategy.precision.encode_all(self.state.shared)
        content = self.strategy.profile_content()
        reqs = {rank: EvalRequest(r, shared, ("valid", "test"), len(users), content,
                                  self.cfg.gfmfr.profile_weight if content is not None else 0.0)
                for rank, users in self._live_hosts().items() if rank not in (failures or {})}
        replies = self.transport.exchange(r, "eval", reqs, self.cfg.runtime.round_timeout_s,
                                          failures)
        self._peak_rss(replies)
        out = {}
        for which in ("valid", "test"):
            total: dict = {}
            for rank in sorted(replies):
                total = add_sums(total, replies[rank].sums[which])
            out[which] = finalize(total)
        return out

    # ------------------------------------------------------------------ checkpoints
    def result_config(self) -> dict:
        """The config values and data facts a checkpoint must share with a run resuming it."""
        items = np.ascontiguousarray(self.catalogue.item_ids)
        return result_config(self.cfg, {
            "catalogue_sha256": hashlib.sha256(items.tobytes()).hexdigest(),
            "clients": int(len(self.users))})

    def checkpoint(self, completed: int, server_sd: Optional[dict] = None) -> Path:
        """Write the state after `completed` rounds: the server's (`server_sd`, default its
        current state) and every live worker's clients (each rank writes its own file;
        a round not completed is rolled back there first); the manifest last."""
        t0 = time.perf_counter()
        folder = checkpoint_dir(self.cfg.run.out_dir, completed)
        folder.mkdir(parents=True, exist_ok=True)
        files = {SERVER_FILE: save_atomic(server_sd or self.state.state_dict(),
                                          folder / SERVER_FILE)}
        reqs = {rank: CheckpointRequest(completed, str(folder / f"clients-rank{rank}.pt"))
                for rank in self._live_hosts()}
        failures: dict = {}
        replies = self.transport.exchange(-1, "checkpoint", reqs,
                                          self.cfg.runtime.round_timeout_s, failures)
        for rank, err in failures.items():
            if self.transport.can_rejoin:
                raise err
            self.lost[rank] = str(err)
            log.warning("checkpoint: %s; its clients continue from the newest checkpoint "
                        "that has them", err)
        client_files = []
        for rank in sorted(replies):
            name = Path(replies[rank].path).name
            files[name] = {"sha256": replies[rank].sha256, "bytes": replies[rank].bytes}
            client_files.append(f"{folder.name}/{name}")
        if self.lost and self.checkpoint_folder is not None:
            # clients of lost ranks continue from the newest checkpoint that has them
            prev = manifest_of(self.checkpoint_folder)
            client_files += [f for f in prev.get("client_files", []) if f not in client_files]
        write_manifest(folder, completed, self.result_config(), files, client_files,
                       {"lost_ranks": sorted(self.lost)})
        self.checkpoint_folder = folder
        prune(self.cfg.run.out_dir, self.cfg.run.keep_checkpoints)
        log.info("checkpoint after round %d: %s (%.1f MB, %.2f s)", completed - 1, folder,
                 sum(f["bytes"] for f in files.values()) / 1e6, time.perf_counter() - t0)
        return folder

    def resume(self, manifest: dict) -> None:
        """Continue from a checkpoint (read_checkpoint's manifest): server state from its
        server file, every worker's clients from its client files."""
        t0 = time.perf_counter()
        check_compatible(manifest, self.result_config())
        folder = Path(manifest["folder"])
        sd = torch.load(folder / SERVER_FILE, weights_only=True)
        self.state.load_state_dict(sd, self.strategy.fusion_model)
        root = folder.parent
        paths = tuple(str(root / rel) for rel in manifest["client_files"])
        replies = self.transport.exchange(-1, "restore", {r: RestoreRequest(paths)
                                                          for r in self._live_hosts()},
                                          self.cfg.runtime.startup_timeout_s)
        restored = sum(rep.restored for rep in replies.values())
        if restored < len(self.users):
            log.warning("resume: %d of %d clients found in the checkpoint; the others start "
                        "from their initial state", restored, len(self.users))
        self.checkpoint_folder = folder
        log.info("resumed from %s: %d round(s) complete (%.2f s)", folder, self.state.round,
                 time.perf_counter() - t0)


def _mean_losses(replies: list) -> dict:
    """The round's mean base loss and KL over the clients that replied (each worker
    sends only their sums, in fixed point: exact whatever the number of workers)."""
    n = sum(len(rep.users) for rep in replies)
    if not n:
        return {"base": None, "kl": None}
    return {"base": sum(rep.loss_sum for rep in replies) * LOSS_UNIT / n,
            "kl": sum(rep.kl_sum for rep in replies) * LOSS_UNIT / n}


def _one_catalogue(hello: dict[int, HelloReply]) -> Catalogue:
    first = hello[min(hello)]
    for h in hello.values():
        if not np.array_equal(h.item_ids, first.item_ids):
            raise RuntimeError(f"worker rank {h.rank} reports a different item catalogue "
                               f"than rank {first.rank}: the ranks read different data")
    return Catalogue(first.item_ids, first.id_base, first.id_space)


# ---------------------------------------------------------------------- the run
def best_rounds(history: list[dict], k: int) -> dict:
    """Test metrics at the best validation round (by NDCG@k), and the reference code's
    convention: the mean of the tests at the best-val-HR@k and best-val-NDCG@k rounds.
    With data.split=cold_items the rounds are selected by the cold-item metrics
    (cold:NDCG@k, cold:HR@k): every held-out item is cold, and ranked among all items
    they are near zero for every model, so they cannot tell rounds apart."""
    evals = [h for h in history if "metrics" in h]
    if not evals:
        return {}
    pre = selection_prefix(evals, k)
    by_ndcg = max(evals, key=lambda h: (h["metrics"]["valid"][f"{pre}NDCG@{k}"], -h["round"]))
    by_hr = max(evals, key=lambda h: (h["metrics"]["valid"][f"{pre}HR@{k}"], -h["round"]))
    ref = {m: (by_ndcg["metrics"]["test"][m] + by_hr["metrics"]["test"][m]) / 2
           for m in by_ndcg["metrics"]["test"] if m != "users"}
    return {"best_round": by_ndcg["round"], "selected_by": f"valid {pre}NDCG@{k}",
            "valid": by_ndcg["metrics"]["valid"], "test": by_ndcg["metrics"]["test"],
            "reference_convention": {
                "description": f"mean of test at best-valid-{pre}HR@{k} round "
                               f"({by_hr['round']}) and best-valid-{pre}NDCG@{k} round "
                               f"({by_ndcg['round']})",
                "test": ref}}


class StopSignals:
    """SIGTERM, SIGUSR1 (what SLURM sends before a preemption) and SIGINT (Ctrl-C) ask the
    run to stop: the current round finishes, a checkpoint is written, every rank shuts
    down. A second Ctrl-C stops at once, without a checkpoint."""
    NAMES = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = name
            log.warning("%s: the current round finishes, then a checkpoint is written and the "
                        "run stops (Ctrl-C again: stop now, no checkpoint)", name)


def run_rounds(server: Server, run_dir: RunDir, progress: bool = True,
               stop: Optional[StopSignals] = None) -> dict:
    """The federation from `server.state.round` on: rounds with evaluation, early
    stopping, records, checkpoints and a summary."""
    from tqdm import tqdm

    cfg, st = server.cfg, server.state
    k, every = cfg.eval.ks[0], cfg.run.checkpoint_every
    run_dir.start_records(st.round)
    stopped_early = _early_stop(st.history, k, cfg.eval.patience)
    todo = [] if stopped_early else range(st.round, cfg.fed.rounds)
    bar = tqdm(todo, desc="rounds", initial=st.round, total=cfg.fed.rounds,
               disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    for r in bar:
        before = st.snapshot()                # the last complete round, should this fail
        try:
            rec = server.run_round(r)
        except WorkerError as e:
            raise _round_failed(server, run_dir, r, before, e) from e
        st.round = r + 1
        st.history.append(rec)
        run_dir.append(rec)
        bar.set_postfix_str(_progress_line(rec, k))
        # with a progress bar the line is already on screen
        log.log(logging.DEBUG if progress else logging.INFO, "round %d %s", r, _progress_line(rec, k))
        stopped_early = _early_stop(st.history, k, cfg.eval.patience)
        last = st.round == cfg.fed.rounds or stopped_early
        requested = stop is not None and stop.requested
        if (every and (st.round % every == 0 or last)) or requested or server.lost:
            server.checkpoint(st.round)
        if server.lost:
            raise RoundFailed(
                f"{'; '.join(server.lost.values())}. runtime.on_worker_failure=skip: round "
                f"{r} finished without it, but a lost rank cannot rejoin over "
                f"{server.transport.name}: checkpoint {server.checkpoint_folder}; resume with "
                f"run.resume=auto (any number of workers)")
        if requested:
            raise Stopped(stop.requested, st.round, server.checkpoint_folder)
        if stopped_early:
            log.info("early stop at round %d: no better valid %sNDCG@%d for %d evaluations",
                     r, selection_prefix(st.history, k), k, cfg.eval.patience)
            break
    summary = {"config": to_dict(cfg), "rounds_run": len(st.history),
               "stopped_early": stopped_early, "seconds": time.perf_counter() - t_start,
               **best_rounds(st.history, k),
               "features": server.features.info if server.features else None,
               "seconds_per_round_by_phase": _mean_phases(st.history)}
    run_dir.write_summary(summary)
    return summary


def selection_prefix(history: list[dict], k: int) -> str:
    """'cold:' where the evaluated rounds of `history` rank among cold items too
    (data.split=cold_items), whose validation metrics then select rounds (best_rounds,
    early stopping); '' otherwise."""
    valid = next((h["metrics"]["valid"] for h in history if "metrics" in h), {})
    return COLD if f"{COLD}NDCG@{k}" in valid else ""


def _early_stop(history: list[dict], k: int, patience: int) -> bool:
    """No better validation NDCG@k (cold:NDCG@k on a cold-item split) for `patience`
    evaluations (0 = never)."""
    evals = [h["metrics"]["valid"] for h in history if "metrics" in h]
    if not patience or not evals:
        return False
    pre = selection_prefix(history, k)
    scores = [m[f"{pre}NDCG@{k}"] for m in evals]
    best = int(np.argmax(scores))             # the first best
    return len(scores) - 1 - best >= patience


def _round_failed(server: Server, run_dir: RunDir, r: int, before: dict,
                  e: WorkerError) -> RoundFailed:
    """Record the failure; checkpoint the last complete round (abort policy)."""
    run_dir.append({"round": r, "failure": {"rank": e.rank, "error": str(e),
                                            "policy": server.cfg.runtime.on_worker_failure}})
    if not server.transport.can_rejoin:
        server.lost[e.rank] = str(e)
    folder = server.checkpoint_folder
    if r > 0 and (folder is None or folder != checkpoint_dir(server.cfg.run.out_dir, r)):
        try:
            folder = server.checkpoint(r, before)
        except Exception as ce:               # the failure itself is what must be reported
            log.error("could not checkpoint round %d after the failure: %s", r - 1, ce)
    where = (f"; the last complete round is in checkpoint {folder}: resume with "
             f"run.resume=auto" if folder else "; no round completed, nothing to resume")
    return RoundFailed(f"{e}{where}")


def _mean_phases(history: list[dict]) -> dict:
    keys = sorted({k for h in history for k in h["seconds"]})
    return {k: round(float(np.mean([h["seconds"].get(k, 0.0) for h in history])), 4)
            for k in keys}


def _progress_line(rec: dict, k: int) -> str:
    parts = [f"loss {rec['loss']['base']:.4f}"]
    if rec["loss"]["kl"]:
        parts.append(f"kl {rec['loss']['kl']:.4f}")
    if "metrics" in rec:
        v, te = rec["metrics"]["valid"], rec["metrics"]["test"]
        parts.append(f"val HR@{k} {v[f'HR@{k}']:.4f} NDCG@{k} {v[f'NDCG@{k}']:.4f}")
        parts.append(f"test HR@{k} {te[f'HR@{k}']:.4f} NDCG@{k} {te[f'NDCG@{k}']:.4f}")
    lg = rec["bytes"]["logical"]          # train and secagg's upload phase, no eval
    down = sum(lg.get(k, {}).get("mean", 0) for k in ("train_down", "upload_down")) / 1e6
    upb = sum(lg.get(k, {}).get("mean", 0) for k in ("train_up", "upload_up")) / 1e6
    parts.append(f"client MB down {down:.3f} up {upb:.3f}")
    parts.append(f"{rec['seconds']['total']:.2f}s")
    return " | ".join(parts)
