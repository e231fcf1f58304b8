"""Starting a federation: building the server's features, the workers and a transport.

`run(cfg)` runs the whole federation. With `fed.transport: local` the server and its
workers live in this process; the RPC runtime starts one process per rank instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data import Catalogue, load_item_content
from .server import ContentFeatures, Server, run_rounds
from .transport import LocalTransport
from .worker import Worker

log = logging.getLogger(__name__)


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


def run_local(cfg: Config) -> dict:
    """Server and `fed.workers` workers in this process, over the in-process transport."""
    from .data import load_interactions

    inter = load_interactions(cfg)  # read once; each worker keeps only its shard's use
    workers = {rank: Worker(cfg, rank, cfg.fed.workers, inter)
               for rank in range(1, cfg.fed.workers + 1)}
    transport = LocalTransport(workers)
    try:
        server = Server(cfg, transport, None)
        if cfg.gfmfr.enabled:
            server.features = server_features(cfg, server.catalogue)
        return run_rounds(server, Path(cfg.run.out_dir), cfg.run.progress)
    finally:
        transport.close()


def run(cfg: Config) -> dict:
    if cfg.fed.transport == "local":
        return run_local(cfg)
    raise NotImplementedError("fed.transport=rpc: start the ranks with torchrun")
