"""This process's memory: its peak resident size, for the per-rank figures in
rounds.jsonl, and how it hands freed memory back (`keep_freed_memory`)."""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import resource
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
KEEP_SETTINGS = {
    _M_MMAP_THRESHOLD: 32 * 2 ** 20,  # blocks up to 32 MiB (glibc's largest) from the heap
    _M_TRIM_THRESHOLD: 2 ** 31 - 1,   # free memory at a heap's top handed back beyond 2 GiB
    _M_TOP_PAD: 2 ** 30,              # a heap grows by 1 GiB more than asked (untouched)
    _M_ARENA_MAX: 1,                  # every thread allocates from the one kept heap
}
_kept = False


def keep_freed_memory() -> bool:
    """Keep freed memory in this process for reuse instead of handing it back to the
    system at once (runtime.keep_freed_memory). By default glibc serves blocks of 128 KiB
    and more from fresh mmap pages and unmaps them on free, and a thread's heap is
    handed back when empty: a training step's tensors of a few MiB then start as
    untouched pages that the kernel faults in and zeroes, 4 KiB at a time, every step
    (ML-100K, FedRAP-MLP + GFMFR: about 1.6 million page faults and 3 s of system time a
    round). With glibc's mmap threshold at its largest (32 MiB), trimming only beyond
    2 GiB, a 1 GiB top pad and one arena, freed blocks are reused (tens of thousands of
    faults a round). Blocks over 32 MiB still come from mmap.

    The arithmetic is unchanged (same numbers); the resident size stays near its peak
    instead of shrinking between steps. Returns whether the settings took effect; where
    the C library is not glibc (musl, macOS) nothing is changed and it returns False."""
    global _kept
    if _kept:
        return True
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = all([mallopt(k, v) == 1 for k, v in KEEP_SETTINGS.items()])
    if not _kept:
        log.debug("mallopt refused some of %s; freed memory may be handed back as before",
                  KEEP_SETTINGS)
    return _kept


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
