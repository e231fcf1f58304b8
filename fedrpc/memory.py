"""Peak resident memory of this process, for the per-rank figures in rounds.jsonl."""
from __future__ import annotations

import dataclasses
import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB: VmHWM from /proc/self/status
    on Linux, else getrusage's ru_maxrss (KiB on Linux and BSD, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def with_peak_rss(reply):
    """`reply` with its `peak_rss_mb` field set to this process's peak (replies without
    that field pass unchanged)."""
    if not dataclasses.is_dataclass(reply):
        return reply
    if "peak_rss_mb" not in {f.name for f in dataclasses.fields(reply)}:
        return reply
    return dataclasses.replace(reply, peak_rss_mb=peak_rss_mb())
