"""Writing results: JSON files, JSONL per round, one-line metric summaries."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)


def write_json(path: Path, obj) -> None:
    """Write `obj` as JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def format_metrics(m: dict, ks: Iterable[int]) -> str:
    parts = []
    for k in ks:
        parts.append(f"HR@{k} {m[f'HR@{k}']:.4f} NDCG@{k} {m[f'NDCG@{k}']:.4f}")
    return " | ".join(parts)


class RunDir:
    """`run.out_dir` while a run uses it: locked against a second run, its records
    (rounds.jsonl, summary.json, checkpoints/) never silently replaced or mixed.

    `open()` checks the folder before any data is loaded: a path that is a file or not
    writable, a folder another live run holds (its PID is named), or the finished records
    of an earlier run (replace them with run.overwrite=true, continue them with
    run.resume=auto) are one-line errors."""
    RECORDS = ("rounds.jsonl", "summary.json")

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir)
        self.rounds = self.path / "rounds.jsonl"
        self._lock: Optional[int] = None

    def open(self, overwrite: bool = False, resuming: bool = False, resume: str = ""):
        from .config import ConfigError

        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"run.out_dir: {p} is a file, not a folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run.out_dir: cannot create {p} ({e.strerror})") from None
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"run.out_dir: {p} is not writable")
        self._take_lock()
        old = [n for n in self.RECORDS if (p / n).is_file() and (p / n).stat().st_size]
        if old and not resuming and not overwrite:
            if resume == "auto":
                log.warning("run.resume=auto: %s has records but no checkpoint to continue "
                            "from; they are replaced", p)
            else:
                self.close()
                raise ConfigError(f"run.out_dir: {p} holds the records of an earlier run "
                                  f"({', '.join(old)}): set run.overwrite=true to replace "
                                  f"them, run.resume=auto to continue that run, or choose "
                                  f"another run.out_dir")
        if not resuming:
            for n in self.RECORDS:
                (p / n).unlink(missing_ok=True)
            if overwrite:
                shutil.rmtree(p / "checkpoints", ignore_errors=True)
        return self

    def _take_lock(self) -> None:
        from .config import ConfigError

        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"run.out_dir: {self.path} is in use by another run (PID "
                              f"{other}); wait for it or choose another run.out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd

    def start_records(self, completed: int) -> None:
        """Keep the records of the rounds before `completed` (a resumed run appends from
        there; lines of rounds after the checkpoint are dropped, failure records kept)."""
        if not self.rounds.is_file():
            return
        recs = [json.loads(line) for line in self.rounds.read_text().splitlines() if line.strip()]
        keep = [r for r in recs if r["round"] < completed or "failure" in r]
        tmp = self.rounds.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        os.replace(tmp, self.rounds)

    def append(self, rec: dict) -> None:
        append_jsonl(self.rounds, rec)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)     # releases the lock
            self._lock = None
