"""`fedrpc encode CONFIG [overrides]`: encode the configured dataset's item content once.

Loads the catalogue and item content as the server would, runs `encode_content` through
the cache, logs a summary, writes it to `<run.out_dir>/encode_summary.json` and returns
it. A second run with the same data, model and settings is a cache hit.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

from . import encode_content

log = logging.getLogger(__name__)
SUMMARY_KEYS = ("source", "backend", "model", "weights", "dim", "items", "missing",
                "zero_rows", "seconds", "items_per_s", "encode_seconds", "cache", "cache_file",
                "device", "batch_size", "peak_rss_mb", "gpu_peak_mb")


def run_encode(cfg) -> dict:
    """Encode the item content of `cfg`'s dataset; return (and save) the summary."""
    from ..data import catalogue_of, load_interactions, load_item_content
    t0 = time.perf_counter()
    inter = load_interactions(cfg)
    content = load_item_content(cfg, catalogue_of(cfg, inter))
    t_load = time.perf_counter() - t0
    feats = encode_content(content, cfg.encoder, progress=cfg.run.progress)
    summary = {
        "items": content.n_items, "data": cfg.data.path or cfg.data.format,
        "load_seconds": round(t_load, 3), "total_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cache_dir": cfg.encoder.cache_dir if cfg.encoder.cache else None,
        "content": content.stats,
    }
    for m in ("text", "image"):
        info = feats.info[m]
        summary[m] = {k: info[k] for k in SUMMARY_KEYS if k in info}
    gpu = [summary[m]["gpu_peak_mb"] for m in ("text", "image") if summary[m].get("gpu_peak_mb")]
    summary["gpu_peak_mb"] = max(gpu) if gpu else None
    out = Path(cfg.run.out_dir) / "encode_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    for m in ("text", "image"):
        s = summary[m]
        if s.get("source") == "encoded":
            log.info("%-5s %s: dim %s, %s missing, %.1f s (%s items/s), cache %s, peak RSS %s MB",
                     m, s["backend"], s["dim"], s["missing"], s["seconds"], s["items_per_s"],
                     s["cache"], s["peak_rss_mb"])
        else:
            log.info("%-5s %s", m, s.get("source"))
    log.info("encode: %d items in %.1f s (data %.1f s), peak RSS %.0f MB%s; summary in %s",
             summary["items"], summary["total_seconds"], t_load, summary["peak_rss_mb"],
             f", GPU peak {summary['gpu_peak_mb']} MB" if summary["gpu_peak_mb"] else "", out)
    return summary
