"""Federation state as objects, and checkpoints of it.

- `ServerState` (rank 0): rounds completed, the global shared parameters, groups and
  their alignment, the teacher, the group-fusion model and its optimiser, the per-round
  history. `state_dict()` / `load_state_dict()`.
- `ClientStore` (each worker): the private state of the clients it hosts (private
  parameters, the EMA ratio of the distillation weight), one row per user. Its
  `state_dict()` is keyed by user id, so a checkpoint written by W workers loads into any
  other number of workers. Training a round keeps an undo copy of the participants' rows
  until the server settles the round (`settle`): a round that failed on some rank is
  rolled back, so a checkpoint is always the state after a *complete* round.

Checkpoints live under `<run.out_dir>/checkpoints/round-NNNNNN/`: `server.pt`, one
`clients-rankR.pt` per worker (each rank writes its own, in parallel), and
`manifest.json`, written last, naming every file with its SHA-256 and the configuration
values that affect results. A folder without a manifest, or whose files do not match
their hashes, is not a checkpoint. Every file is written atomically (temporary file,
fsync, rename).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .config import Config, ConfigError, to_dict
from .rows import Rows, membership

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SERVER_FILE = "server.pt"

# Keys that do not change a run's numbers: where it runs, how it is logged, checkpointed
# or packed. Every other key must match for a checkpoint to be resumed.
NOT_AFFECTING = ("run.out_dir", "run.progress", "run.device", "run.resume",
                 "run.checkpoint_every", "run.keep_checkpoints", "run.overwrite",
                 "fed.transport", "fed.workers", "fed.batched", "fed.batch_clients",
                 "eval.batch_users",
                 "runtime.", "encoder.cache", "encoder.cache_dir", "encoder.device",
                 "encoder.text.batch_size", "encoder.image.batch_size")


# ---------------------------------------------------------------------- server state
@dataclass
class ServerState:
    """What the server knows between rounds (never interactions or private parameters)."""
    shared: dict[str, Tensor]
    group_of_user: np.ndarray                  # [U] last group per user, -1 = never grouped
    round: int = 0                             # rounds completed = the next round to run
    prev_users: Optional[np.ndarray] = None    # last round's grouped clients and labels
    prev_labels: Optional[np.ndarray] = None
    teacher: Optional[Tensor] = None           # [G, I] g_k for the next round
    warned_lopsided: bool = False
    fusion: Optional[torch.nn.Module] = None   # the persistent group-fusion model
    fusion_opt: Optional[torch.optim.Optimizer] = None
    history: list[dict] = field(default_factory=list)   # one record per completed round

    def state_dict(self) -> dict:
        return {"round": self.round, "shared": dict(self.shared),
                "group_of_user": torch.from_numpy(self.group_of_user),
                "prev_users": _t(self.prev_users), "prev_labels": _t(self.prev_labels),
                "teacher": self.teacher, "warned_lopsided": self.warned_lopsided,
                "fusion": self.fusion.state_dict() if self.fusion is not None else None,
                "fusion_opt": self.fusion_opt.state_dict() if self.fusion_opt is not None else None,
                "history": json.dumps(self.history)}

    def load_state_dict(self, sd: dict, build_fusion=None) -> None:
        """Restore from `state_dict()` output; `build_fusion(state)` creates the fusion
        model and optimiser (the strategy knows how) before their states are loaded."""
        self.round = int(sd["round"])
        self.shared = {k: v.clone() for k, v in sd["shared"].items()}
        self.group_of_user = sd["group_of_user"].numpy().copy()
        self.prev_users, self.prev_labels = _np(sd["prev_users"]), _np(sd["prev_labels"])
        self.teacher = None if sd["teacher"] is None else sd["teacher"].clone()
        self.warned_lopsided = bool(sd["warned_lopsided"])
        self.history = json.loads(sd["history"])
        if sd["fusion"] is not None:
            if self.fusion is None:
                build_fusion(self)
            self.fusion.load_state_dict(sd["fusion"])
            self.fusion_opt.load_state_dict(sd["fusion_opt"])

    def snapshot(self) -> dict:
        """A deep copy of the state dict (the state before a round, kept in memory so a
        failed round can be checkpointed as the last complete one)."""
        return copy.deepcopy(self.state_dict())


def _t(a: Optional[np.ndarray]) -> Optional[Tensor]:
    return None if a is None else torch.from_numpy(np.asarray(a))


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.numpy().copy()


# ---------------------------------------------------------------------- client store
@dataclass
class ClientStore:
    """Private state of the clients a worker hosts (rows follow `users`, sorted).

    Dense private parameters (user vectors, heads) are [M, ...] tensors. A private item
    table is stored sparsely: only the rows a client has trained, keyed by
    slot * I + item (ascending); every other row is the client's initial value,
    regenerated on demand from its own stream (zeros for most backbones). Memory grows
    with the rows clients touch, plus the drawn initial tables kept within
    `initial_cache_mb` (random ones only: fedrap_mlp's P_u).
    """
    users: np.ndarray
    private: dict[str, Tensor]          # dense private params, [M, ...] each
    ratio: Tensor                       # [M] EMA of L_base / KL; NaN = not yet set
    tables: dict = field(default_factory=dict)   # name -> (keys int64 [nnz], values [nnz, d])
    n_items: int = 0
    backbone: Any = None
    seed: int = 0
    device: torch.device = torch.device("cpu")
    _undo: Optional[tuple] = None       # (round, slots, dense rows, ratio, tables) before training
    initial_cache_mb: float = 0.0       # memory for keeping drawn initial tables (see _initial)
    _init: dict = field(default_factory=dict)    # name -> (values [C, I, d], drawn [C] bool)

    @classmethod
    def create(cls, backbone, users: np.ndarray, n_items: int, seed: int,
               device: torch.device | str = "cpu",
               initial_cache_mb: float = 0.0) -> "ClientStore":
        """Dense private parameters drawn on the CPU from each user's own stream (so they
        do not depend on the device or the packing), then kept on `device`; private
        tables start empty (every row at its initial value). `initial_cache_mb`: memory
        for keeping the initial tables once drawn (runtime.initial_cache_mb)."""
        per_user = [backbone.init_private(n_items, seed, int(u), tables=False) for u in users]
        private = {p.name: torch.stack([pu[p.name] for pu in per_user]).to(device)
                   if len(per_user) else torch.zeros((0, *p.shape)).to(device)
                   for p in backbone.private() if not p.table}
        tables = {p.name: (np.empty(0, np.int64), torch.zeros(0, backbone.d, device=device))
                  for p in backbone.private() if p.table}
        return cls(users, private, torch.full((len(users),), float("nan"), device=device),
                   tables, n_items, backbone, seed, torch.device(device),
                   initial_cache_mb=initial_cache_mb)

    def slots(self, users: np.ndarray) -> Tensor:
        idx = np.searchsorted(self.users, users)
        if np.any(idx >= len(self.users)) or np.any(self.users[np.minimum(idx, len(self.users) - 1)] != users):
            raise KeyError("some users are not hosted here")
        return torch.from_numpy(idx.astype(np.int64))

    # -- private tables -------------------------------------------------------------
    def _keys(self, users: np.ndarray, counts: np.ndarray, items: np.ndarray) -> np.ndarray:
        slots = self.slots(users).numpy()
        return np.repeat(slots, counts) * self.n_items + items

    def table_rows(self, name: str, users: np.ndarray, counts: np.ndarray,
                   items: np.ndarray) -> Tensor:
        """[K, d] rows of private table `name`: for users[j], its rows at the next
        counts[j] of `items` (trained value where stored, else its initial value)."""
        keys = self._keys(users, counts, items)
        out = self._initial(name, users, counts, items)
        stored_keys, values = self.tables[name]
        hit, pos = membership(stored_keys, keys)
        if hit.any():
            out[torch.from_numpy(np.nonzero(hit)[0]).to(self.device)] = \
                values[torch.from_numpy(pos[hit]).to(self.device)]
        return out

    def _initial(self, name: str, users: np.ndarray, counts: np.ndarray,
                 items: np.ndarray) -> Tensor:
        """[K, d] initial rows of table `name`: for users[j], its rows at the next counts[j]
        of `items`. A client's initial table is its stream's draw of all I rows (the
        stream cannot skip to a row). The first clients (by slot) whose tables fit in
        `initial_cache_mb` keep them once drawn, so training and evaluation do not draw
        them again each round; the others are drawn on every call. Same values either
        way."""
        p = next(q for q in self.backbone.private() if q.name == name)
        if p.init == "zeros":
            return torch.zeros(len(items), self.backbone.d, device=self.device)
        slots = self.slots(users).numpy()
        values, drawn = self._initial_cache(name)
        kept = slots < len(drawn)
        new = np.nonzero(kept)[0]
        for j in new[~drawn[slots[new]]]:
            values[slots[j]] = self._draw(name, int(users[j]))
            drawn[slots[j]] = True
        if kept.all():                      # one gather from the kept tables
            at = np.repeat(slots * self.n_items, counts) + items
            return values.view(-1, self.backbone.d).index_select(0, torch.from_numpy(at).to(self.device))
        starts = np.concatenate([[0], np.cumsum(counts)])
        parts = [(values[slots[j]] if kept[j] else self._draw(name, int(u)))[
            torch.from_numpy(items[starts[j]:starts[j + 1]]).to(self.device)]
            for j, u in enumerate(users)]
        return torch.cat(parts) if parts else torch.zeros(0, self.backbone.d, device=self.device)

    def _draw(self, name: str, user: int) -> Tensor:
        """User `user`'s initial table `name` [I, d], drawn from its stream."""
        return self.backbone.init_private(self.n_items, self.seed, user)[name].to(self.device)

    def _initial_cache(self, name: str) -> tuple[Tensor, np.ndarray]:
        """(values [C, I, d], drawn [C]): kept initial tables of the first C slots, C as
        many as fit in initial_cache_mb (allocated on first use; rows filled when drawn)."""
        if name not in self._init:
            per_client = self.n_items * self.backbone.d * 4
            c = min(len(self.users), int(self.initial_cache_mb * 2 ** 20 // max(per_client, 1)))
            self._init[name] = (torch.empty(c, self.n_items, self.backbone.d, device=self.device),
                                np.zeros(c, dtype=bool))
        return self._init[name]

    def put_rows(self, name: str, users: np.ndarray, counts: np.ndarray, items: np.ndarray,
                 values: Tensor) -> None:
        """Store trained rows (replacing any stored value of the same user and item):
        one merge of two sorted key lists into a new store (the old one is kept intact
        for a round's undo)."""
        keys = self._keys(users, counts, items)
        order = np.argsort(keys, kind="stable")
        if not np.all(order == np.arange(len(keys))):     # users given out of order
            keys = keys[order]
            values = values[torch.from_numpy(order).to(values.device)]
        old_keys, old_values = self.tables[name]
        kept = np.nonzero(~membership(keys, old_keys)[0])[0]
        old_kept = old_keys[kept]
        # where each goes in the merged, sorted store (the two key sets are disjoint)
        at_new = np.searchsorted(old_kept, keys) + np.arange(len(keys))
        at_old = np.searchsorted(keys, old_kept) + np.arange(len(old_kept))
        merged = np.empty(len(keys) + len(old_kept), dtype=np.int64)
        merged[at_new], merged[at_old] = keys, old_kept
        out = torch.empty(len(merged), old_values.shape[1], dtype=old_values.dtype,
                          device=self.device)
        dev = lambda a: torch.from_numpy(a).to(self.device)
        out.index_copy_(0, dev(at_new), values.detach().to(self.device, old_values.dtype))
        if len(kept):
            out.index_copy_(0, dev(at_old), old_values.index_select(0, dev(kept)))
        self.tables[name] = (merged, out)

    def _drop(self, name: str, slots: np.ndarray) -> None:
        """Forget the stored rows of the clients at `slots` (back to initial values)."""
        keys, values = self.tables[name]
        keep = ~np.isin(keys // max(self.n_items, 1), slots)
        self.tables[name] = (keys[keep], values[torch.from_numpy(np.nonzero(keep)[0]).to(self.device)])

    def dense_tables(self, slots: Tensor) -> dict[str, Tensor]:
        """{name: [n, I, d]} the full private tables of the clients at `slots` (evaluation
        builds them per batch of users): initial values, then each client's stored rows
        (a slice of the store per client, no search over items)."""
        slots_np = slots.cpu().numpy().astype(np.int64)
        users = self.users[slots_np]
        n, i = len(users), self.n_items
        out = {}
        for name, (keys, values) in self.tables.items():
            lo = np.searchsorted(keys, slots_np * i)
            hi = np.searchsorted(keys, (slots_np + 1) * i)
            counts = hi - lo
            pos = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) \
                + np.arange(int(counts.sum()))
            dest = np.repeat(np.arange(n) * i, counts) + keys[pos] % i
            full = self._initial(name, users, np.full(n, i), np.tile(np.arange(i), n))
            full[torch.from_numpy(dest).to(self.device)] = \
                values[torch.from_numpy(pos).to(self.device)]
            out[name] = full.view(n, i, -1)
        return out

    def stored_rows(self) -> int:
        return sum(len(k) for k, _ in self.tables.values())

    # -- a round's undo copy --------------------------------------------------------
    def begin_round(self, round_: int, users: np.ndarray) -> None:
        """Remember the rows `users` train on in round `round_` until it is settled
        (private tables are replaced, never changed in place: the old ones are kept)."""
        self.settle(round_)                       # an earlier round is complete by now
        slots = self.slots(users).to(self.device)
        self._undo = (round_, slots, {k: v[slots].clone() for k, v in self.private.items()},
                      self.ratio[slots].clone(), dict(self.tables))

    def settle(self, completed: int) -> None:
        """`completed` rounds are complete on the server: keep a trained round below it,
        roll back one at or above it (it failed somewhere)."""
        if self._undo is None:
            return
        round_, slots, rows, ratio, tables = self._undo
        if round_ >= completed:
            for k, v in rows.items():
                self.private[k][slots] = v
            self.ratio[slots] = ratio
            self.tables = tables
            log.info("round %d did not complete: its local training is rolled back", round_)
        self._undo = None

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Keyed by user id: dense rows per user; table rows as (counts per user, item
        ids, values)."""
        tables = {}
        for name, (keys, values) in self.tables.items():
            slot, item = np.divmod(keys, self.n_items) if len(keys) else (keys, keys)
            tables[name] = {"counts": torch.from_numpy(np.bincount(slot, minlength=len(self.users))
                                                       .astype(np.int64)),
                            "items": torch.from_numpy(item.astype(np.int64)),
                            "values": values.cpu()}
        return {"users": torch.from_numpy(self.users), "ratio": self.ratio.cpu(),
                "private": {k: v.cpu() for k, v in self.private.items()}, "tables": tables}

    def load_rows(self, files: list[Path]) -> int:
        """Take this store's users' rows from client files (earlier files win where a
        user appears twice); returns how many users were restored."""
        todo = np.ones(len(self.users), dtype=bool)
        for f in files:
            sd = torch.load(f, mmap=True, weights_only=True)
            if set(sd["private"]) != set(self.private) or set(sd.get("tables", {})) != set(self.tables):
                raise ValueError(
                    f"{f}: private parameters {sorted(sd['private'])} and tables "
                    f"{sorted(sd.get('tables', {}))}, this backbone has {sorted(self.private)} "
                    f"and {sorted(self.tables)} (a checkpoint from another backbone, or from a "
                    f"fedrpc that stored private item tables densely): it cannot be resumed")
            theirs = sd["users"].numpy()
            if len(theirs) == 0:
                continue
            pos = np.minimum(np.searchsorted(theirs, self.users), len(theirs) - 1)
            hit = todo & (theirs[pos] == self.users)
            if not hit.any():
                continue
            mine = torch.from_numpy(np.nonzero(hit)[0]).to(self.device)
            src = torch.from_numpy(pos[hit])
            for k in self.private:
                self.private[k][mine] = sd["private"][k].index_select(0, src).to(self.device)
            self.ratio[mine] = sd["ratio"].index_select(0, src).to(self.device)
            for name, t in sd.get("tables", {}).items():
                self._drop(name, np.nonzero(hit)[0])
                rows = Rows(t["counts"], t["items"], t["values"],
                            torch.zeros(self.n_items, self.backbone.d))[src]
                self.put_rows(name, self.users[hit], rows.counts.numpy(), rows.index.numpy(),
                              rows.values)
            todo &= ~hit
        return int((~todo).sum())


# ---------------------------------------------------------------------- files
def save_atomic(obj: Any, path: Path) -> dict:
    """torch.save `obj` to `path` atomically; returns {"sha256", "bytes"} of the file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(out_dir: Path | str, completed: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"round-{completed:06d}"


# ---------------------------------------------------------------------- compatibility
def result_config(cfg: Config, data: dict) -> dict:
    """The configuration values that affect a run's numbers, flattened, plus what the
    server knows of the data (`data`: catalogue hash and number of clients)."""
    flat: dict = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            if not any(key == n or (n.endswith(".") and key.startswith(n))
                       for n in NOT_AFFECTING):
                flat[key] = node

    walk("", to_dict(cfg))
    flat.update({f"data.{k}": v for k, v in data.items()})
    return flat


def incompatibility(saved: dict, current: dict, keys=None) -> list[str]:
    """Keys whose values differ between a checkpoint's result config and this run's
    (among `keys` when given)."""
    keys = set(saved) | set(current) if keys is None else keys
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def describe_differences(saved: dict, current: dict, diff: list[str]) -> str:
    """'key (value there, value here), ...' for the first five keys of `diff`."""
    shown = ", ".join(f"{k} ({saved.get(k)!r} there, {current.get(k)!r} here)"
                      for k in diff[:5])
    return shown + (f" and {len(diff) - 5} more" if len(diff) > 5 else "")


# ---------------------------------------------------------------------- manifests
def write_manifest(folder: Path, completed: int, result_cfg: dict, files: dict,
                   client_files: list[str], extra: Optional[dict] = None) -> None:
    """The manifest makes `folder` a checkpoint: written last, atomically.
    `files`: name -> {"sha256", "bytes"} for the files in this folder; `client_files`:
    the client files to restore from, relative to the checkpoints root, earlier first."""
    digest = hashlib.sha256(json.dumps(result_cfg, sort_keys=True).encode()).hexdigest()
    manifest = {"round": completed, "config": result_cfg, "config_sha256": digest,
                "files": files, "client_files": client_files, **(extra or {})}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_checkpoint(folder: Path) -> dict:
    """The manifest of checkpoint `folder` after checking every file it names against its
    hash (ValueError naming what is wrong)."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise ValueError(f"{folder}: no {MANIFEST} (an incomplete checkpoint)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mf}: not valid JSON ({e})") from None
    root = folder.parent
    named = {f"{folder.name}/{n}": v for n, v in manifest["files"].items()}
    for rel in manifest["client_files"]:
        if rel not in named:
            other = read_manifest_files(root / rel.split("/")[0])
            named[rel] = other.get(rel)
    for rel, meta in named.items():
        path = root / rel
        if meta is None or not path.is_file():
            raise ValueError(f"{path}: missing")
        if path.stat().st_size != meta["bytes"] or file_sha256(path) != meta["sha256"]:
            raise ValueError(f"{path}: does not match its hash (truncated or corrupt)")
    manifest["folder"] = str(folder)
    return manifest


def manifest_of(folder: Path) -> dict:
    """The manifest of `folder` as written ({} when there is none or it is unreadable)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_manifest_files(folder: Path) -> dict:
    m = manifest_of(folder)
    return {f"{folder.name}/{n}": v for n, v in m.get("files", {}).items()}


def checkpoints(out_dir: Path | str) -> list[Path]:
    """Checkpoint folders under out_dir, newest first (complete or not)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-")),
                  reverse=True)


def find_checkpoint(cfg: Config) -> Optional[dict]:
    """The checkpoint run.resume names: "auto" = the newest complete one under
    run.out_dir (a corrupt one is skipped with a warning; None when there is none), or a
    checkpoint folder (an error when it is not complete)."""
    resume = cfg.run.resume
    if not resume:
        return None
    if resume != "auto":
        folder = Path(resume)
        try:
            return read_checkpoint(folder)
        except ValueError as e:
            raise ConfigError(f"run.resume: {e}") from None
    for folder in checkpoints(cfg.run.out_dir):
        try:
            return read_checkpoint(folder)
        except ValueError as e:
            log.warning("skipping checkpoint %s: %s", folder.name, e)
    log.info("run.resume=auto: no checkpoint under %s; starting at round 0",
             Path(cfg.run.out_dir) / "checkpoints")
    return None


def check_compatible(manifest: dict, current: dict) -> None:
    diff = incompatibility(manifest["config"], current)
    if diff:
        raise ConfigError(f"run.resume: checkpoint {manifest['folder']} was written with a "
                          f"different configuration: "
                          + describe_differences(manifest["config"], current, diff))


def prune(out_dir: Path | str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and the folders their manifests use;
    remove older ones (0 = keep all)."""
    if keep <= 0:
        return
    folders = checkpoints(out_dir)
    complete = [f for f in folders if (f / MANIFEST).is_file()]
    kept = complete[:keep]
    used = {f.name for f in kept}
    for f in kept:
        used |= {rel.split("/")[0] for rel in manifest_of(f).get("client_files", [])}
    newest = kept[-1].name if kept else ""
    for f in folders:
        if f.name not in used and f.name < newest:
            shutil.rmtree(f, ignore_errors=True)

