"""GFMFR's logic in one home (a strategy in the Flower sense).

Server half: which clients train each round and at which rates, which uploads are
admitted, how they are averaged, how clients are grouped, how the group-fusion model
turns content into per-group item embeddings, and the teacher g_k derived from them.
Client half: the distillation term KL(q || p) with its per-client scale (`distill`),
which the generic local trainer calls when a round carries a teacher.

The round loop (server.py) calls these methods in order on a `ServerState`; everything
here is a function of the state, the uploads, the config and seeds.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import algorithms as alg
from ..config import Config
from ..messages import TrainReply, TrainRequest, stack_sorted
from ..models import BACKBONES, Backbone, make_backbone
from ..rows import Rows
from .codec import UploadCodec, make_codec
from .secagg import PUBKEY, MaskedSums, MaskRequest, from_ring, secure_sets

log = logging.getLogger(__name__)
SAMPLING = 0x5A  # purpose id of the participant-sampling stream


# ---------------------------------------------------------------------- construction
def make_backbone_from(cfg: Config) -> Backbone:
    f = cfg.fed
    return make_backbone(f.backbone, f.latent_dim, f.alpha, f.beta)


def upload_codec(cfg: Config, backbone: Backbone) -> UploadCodec:
    """The codec of fed.protocol at fed.precision (workers encode, the server decodes)."""
    return make_codec(cfg.fed.protocol, cfg.fed.precision, backbone.item_table)


def learning_rates(cfg: Config) -> dict[str, float]:
    """fed.lr, fed.lr_item, fed.lr_private_item, each the backbone's rate when empty."""
    rates = BACKBONES[cfg.fed.backbone].rates
    return {k: (rates[k] if getattr(cfg.fed, k) is None else getattr(cfg.fed, k)) for k in rates}


def sample_participants(users: np.ndarray, cfg: Config, round_: int) -> np.ndarray:
    f = cfg.fed
    n = f.clients_per_round or max(1, int(round(f.client_fraction * len(users))))
    if n >= len(users):
        return users.copy()
    rng = np.random.default_rng([cfg.run.seed, round_, SAMPLING])
    return np.sort(rng.choice(users, size=n, replace=False))


# ---------------------------------------------------------------------- client half
def distill_weight(round_: int, total_rounds: int) -> float:
    """The distillation schedule cos(pi t / 2T) at round t of T."""
    return math.cos(math.pi * round_ / (2 * max(total_rounds, 1)))


def distill(logits: Tensor, items: Tensor, group: Tensor, teacher: Tensor, ratio: Tensor,
            weights: Tensor, base: Tensor, schedule, ema_decay: float,
            max_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """The distillation term of N clients' minibatches.

    logits, items, weights [N, B] (weights 1 for real samples, 0 for padding); group [N]
    (-1 = no group: no term); teacher [G, I]; ratio [N] the clients' EMA of L_base / KL
    (NaN = not yet set); base [N] their base losses. Returns (lambda_t * KL [N] to add to
    the loss, KL [N] for reporting (0 without a group), the updated ratios [N]), with
    lambda_t = ratio * schedule, schedule = distill_weight(t, T) (a float, or a 0-d tensor
    when compiled), and the ratio capped at max_ratio."""
    has = group >= 0
    cnt = weights.sum(1).clamp(min=1)
    q = teacher[group.clamp(min=0).unsqueeze(1), items].clamp(1e-7, 1.0)
    p = torch.sigmoid(logits).clamp(1e-7, 1 - 1e-7)
    q1 = (1 - q).clamp(min=1e-7)
    kl_el = q * (q.log() - p.log()) + q1 * (q1.log() - (1 - p).log())
    kl = (kl_el * weights).sum(1) / cnt
    cur = (base.detach() / kl.detach().clamp(min=1e-8)).clamp(max=max_ratio)
    new = torch.where(torch.isnan(ratio), cur, ema_decay * ratio + (1 - ema_decay) * cur)
    ratio = torch.where(has, new, ratio)
    lam = torch.where(has, ratio.nan_to_num(0.0) * schedule, torch.zeros_like(cur))
    return lam * kl, torch.where(has, kl.detach(), torch.zeros_like(kl)), ratio


# ---------------------------------------------------------------------- server half
@dataclass
class Admitted:
    """The uploads of a round that enter aggregation, and what was turned away."""
    up: Optional[TrainReply]           # None when nothing was admitted
    rejected: dict                     # reason -> user ids


class GFMFR:
    """The server's side of GFMFR (or of the bare backbone when gfmfr.enabled is false)."""

    def __init__(self, cfg: Config, features=None, device: torch.device | str = "cpu"):
        self.cfg, self.features = cfg, features
        self.device = torch.device(device)
        self.backbone = make_backbone_from(cfg)
        self.codec = upload_codec(cfg, self.backbone)
        self.precision = self.codec.precision
        self._profile: Optional[Tensor] = None      # profile_content's vectors,
        self._profile_made = False                  # made at its first call

    # -- requests ------------------------------------------------------------------
    def rates(self, r: int) -> dict[str, float]:
        f, rates = self.cfg.fed, learning_rates(self.cfg)
        return {"lr": rates["lr"] * f.lr_decay ** r,
                "lr_item": rates["lr_item"] * f.lr_item_decay ** r,
                "lr_private_item": rates["lr_private_item"] * f.lr_item_decay ** r}

    def train_requests(self, state, hosts: dict[int, np.ndarray], participants: np.ndarray,
                       r: int) -> dict[int, TrainRequest]:
        """One request per worker hosting participants: the global shared parameters and,
        for clients that have a group, their group's teacher row (at fed.precision)."""
        rates, out = self.rates(r), {}
        shared = self.precision.encode_all(state.shared)
        for rank, hosted in hosts.items():
            users = participants[np.isin(participants, hosted)]
            if len(users) == 0:
                continue
            teacher = rows = None
            if state.teacher is not None:
                g = state.group_of_user[users]
                present = np.unique(g[g >= 0])
                if len(present):        # clients never grouped yet train without teacher
                    rows = np.where(g >= 0, np.searchsorted(present, g), -1).astype(np.int64)
                    teacher = self.precision.encode(state.teacher[torch.from_numpy(present)])
            out[rank] = TrainRequest(r, users, shared, **rates, teacher=teacher,
                                     teacher_row=rows)
        return out

    # -- admission and aggregation -------------------------------------------------
    def admit(self, state, replies: list[TrainReply], r: int) -> Admitted:
        """Uploads that may be averaged: right shapes and dtypes, finite, and (with
        fed.max_update_norm) an update norm within that many times the round's median.
        Uploads are decoded first (fed.protocol); one the codec cannot decode is
        malformed. Every rejected client is counted and named in the log.

        `replies` is emptied as they are decoded and stacked (stack_sorted), so that the
        uploads as received are freed as soon as they are no longer needed."""
        rejected: dict[str, list[int]] = {}
        ok, expected = [], self.upload_shapes(state)
        sent = self.sent(state)
        while replies:
            rep = replies.pop(0)
            n = len(rep.users)
            try:
                rep = self.decode(rep, sent)
            except ValueError as e:
                log.warning("round %d: undecodable upload: %s", r, e)
                rejected.setdefault("shape_or_dtype", []).extend(rep.users.tolist())
                continue
            if set(rep.shared) != set(expected) or any(
                    rep.shared[k].dtype != dt or tuple(rep.shared[k].shape) != (n, *shape)
                    for k, (shape, dt) in expected.items()):
                rejected.setdefault("shape_or_dtype", []).extend(rep.users.tolist())
            elif n:
                ok.append(rep)
        rep = None                            # `ok` alone holds the decoded uploads
        if not ok:
            return Admitted(None, _logged(rejected, r))
        up = stack_sorted(ok)
        n = len(up.users)
        delta = torch.zeros(n, dtype=torch.float64)
        finite = torch.ones(n, dtype=torch.bool)
        for k, v in up.shared.items():
            if isinstance(v, Rows):           # the item table: rows over the table sent
                finite &= v.finite()
                delta += v.sq_dist(state.shared[k]).nan_to_num(posinf=0.0)
                continue
            flat = v.reshape(n, -1)
            finite &= torch.isfinite(flat).all(1)
            if k in state.shared:             # a group-only head has no global value
                delta += (flat - state.shared[k].reshape(1, -1)).double().pow(2).nan_to_num(
                    posinf=0.0).sum(1)
        keep = finite.clone()
        if not finite.all():
            rejected.setdefault("nonfinite", []).extend(up.users[~finite.numpy()].tolist())
        m = self.cfg.fed.max_update_norm
        if m and finite.any():
            norm = delta.sqrt()
            limit = m * float(norm[finite].median())
            big = finite & (norm > limit)
            if big.any():
                rejected.setdefault("update_norm", []).extend(up.users[big.numpy()].tolist())
                keep &= ~big
        if not keep.any():
            return Admitted(None, _logged(rejected, r))
        if not keep.all():
            up = _select(up, keep.numpy())
        return Admitted(up, _logged(rejected, r))

    def sent(self, state) -> dict[str, Tensor]:
        """The shared parameters as the clients received them this round (fp32)."""
        return {k: self.precision.round_trip(v) for k, v in state.shared.items()}

    def decode(self, rep: TrainReply, sent: dict[str, Tensor]) -> TrainReply:
        """A worker's reply with its uploads decoded to dense fp32 tensors."""
        if self.cfg.fed.aggregation == "samples" and (
                rep.n_samples is None or rep.n_samples.shape != rep.users.shape):
            raise ValueError("fed.aggregation=samples needs each client's sample count")
        shared = self.codec.decode(sent, rep.shared, len(rep.users))
        return TrainReply(rep.round, rep.users, shared, rep.n_samples, rep.loss_sum,
                          rep.kl_sum, rep.seconds)

    def upload_shapes(self, state) -> dict[str, tuple]:
        """Each uploaded parameter's per-client shape and dtype: the shared parameters,
        and with GFMFR a backbone's group-only head (what the server groups by)."""
        out = {k: (tuple(v.shape), v.dtype) for k, v in state.shared.items()}
        if self.secure:                  # the table comes masked, in the second phase
            del out[self.backbone.item_table]
            out[PUBKEY] = ((32,), torch.uint8)
        if self.cfg.gfmfr.enabled:
            n_items = state.shared[self.backbone.item_table].shape[0]
            for p in self.backbone.private():
                if p.name in self.backbone.group_only:
                    out[p.name] = (p.full_shape(n_items), torch.float32)
        return out

    def aggregate(self, state, up: TrainReply) -> None:
        weights = (torch.from_numpy(up.n_samples).double()
                   if self.cfg.fed.aggregation == "samples" else None)
        # under secagg the item table is not among them: it comes as per-set sums
        present = {p.name: up.shared[p.name] for p in self.backbone.shared()
                   if p.name in up.shared and not isinstance(up.shared[p.name], Rows)}
        mean = alg.mean_aggregate(present, weights) if present else {}
        for k, v in up.shared.items():      # item tables: base + mean of the row changes
            if isinstance(v, Rows):
                total, wsum = v.weighted_sums(weights=weights)
                mean[k] = (total[0] / wsum[0]).to(v.base.dtype)
        state.shared = {k: mean.get(k, v) for k, v in state.shared.items()}

    @property
    def secure(self) -> bool:
        return self.cfg.fed.protocol == "secagg"

    @property
    def fusion_changes_model(self) -> bool:
        """Whether group_fuse_teach changes the global shared parameters (the content
        prior does); if not, the round's model is final once aggregated."""
        return bool(self.cfg.gfmfr.enabled and self.cfg.gfmfr.content_prior)

    # -- secure group aggregation (secagg.py) --------------------------------------
    def mask_requests(self, hosts: dict[int, np.ndarray], up: TrainReply,
                      labels: Optional[np.ndarray], r: int) -> tuple[dict, dict]:
        """Phase 2's requests (per worker) and the sets: {set id: groups it holds}."""
        n_groups = self.cfg.gfmfr.groups if labels is not None else 1
        lab = labels if labels is not None else np.zeros(len(up.users), dtype=np.int64)
        set_of, groups_of = secure_sets(lab, n_groups, self.cfg.gfmfr.min_group_size)
        members = {s: up.users[set_of == s] for s in groups_of}
        keys = {s: up.shared[PUBKEY][torch.from_numpy(set_of == s)] for s in groups_of}
        out = {}
        for rank, hosted in hosts.items():
            mine = np.isin(up.users, hosted) & (set_of >= 0)
            if mine.any():
                sets = set(set_of[mine].tolist())
                out[rank] = MaskRequest(r, up.users[mine], set_of[mine],
                                        {s: members[s] for s in sets},
                                        {s: keys[s] for s in sets})
        return out, {s: (groups_of[s], members[s]) for s in groups_of}

    def secure_aggregate(self, state, replies: dict[int, MaskedSums], sets: dict,
                         failed: list, r: int) -> tuple[dict, dict]:
        """Sum each set's masked uploads (masks cancel); a set with a member on a worker
        that failed in phase 2 is abandoned. Updates the global item table with the mean
        over complete sets; returns {set id: (groups, members, mean table)} and a record."""
        bb = self.backbone
        shape = tuple(state.shared[bb.item_table].shape)
        total = {s: torch.zeros(shape, dtype=torch.int64) for s in sets}
        for rank in sorted(replies):
            for s, part in zip(replies[rank].set_ids.tolist(), replies[rank].sums):
                total[s] += part.to(torch.int64)
        done, abandoned = {}, []
        for s, (groups, members) in sets.items():
            if any(np.isin(members, lost).any() for lost in failed):   # users per failed rank
                abandoned.append(s)
            else:
                done[s] = (groups, members, from_ring(total[s]))
        n = sum(len(m) for _, m, _ in done.values())
        if n:
            table = sum(v for _, _, v in done.values()) / n
            state.shared = {**state.shared, bb.item_table: table.float()}
        rec = {"sets": len(sets), "set_sizes": [int(len(m)) for _, m in sets.values()],
               "abandoned_sets": len(abandoned),
               "clients_abandoned": int(sum(len(sets[s][1]) for s in abandoned))}
        if abandoned:
            log.warning("round %d: secagg: %d set(s) abandoned (a worker failed between the "
                        "phases; no dropout recovery): the table averages the other sets",
                        r, len(abandoned))
        return {s: (g, m, v / len(m)) for s, (g, m, v) in done.items()}, rec

    def secure_targets(self, state, sums: dict) -> tuple[Tensor, dict]:
        """group_targets from per-set means: a group that is a set of its own (small
        groups possibly merged in) takes its set's mean; every other group the mean over
        all complete sets (group_targets' fallback for groups below min_group_size)."""
        g = self.cfg.gfmfr
        table = state.shared[self.backbone.item_table]
        targets = table.unsqueeze(0).repeat(g.groups, 1, 1)
        fallback = set(range(g.groups))
        present = torch.zeros(g.groups, dtype=torch.bool)
        for s, (groups, _, mean) in sums.items():
            if s < g.groups:                  # set id = its (first) group; g.groups = rest
                targets[s] = mean.float()
                fallback.discard(s)
            present[list(groups)] = True
        return targets, {"n_excluded_nonfinite": 0, "n_excluded_outlier": 0,
                         "fallback": sorted(fallback), "group_ok": present}

    # -- grouping, fusion, teacher -------------------------------------------------
    def group(self, state, up: TrainReply, r: int) -> np.ndarray:
        """Each admitted client's group, from its uploaded head (aligned with the last
        round's groups)."""
        g, bb = self.cfg.gfmfr, self.backbone
        head = torch.cat([up.shared[n].reshape(len(up.users), -1) for n in bb.head], 1)
        labels = alg.group_clients(head.double().numpy(), g.groups, g.clustering,
                                   g.pca or None, seed=self.cfg.run.seed * 1000 + r)
        labels = alg.align_groups(state.prev_users, state.prev_labels, up.users, labels,
                                  g.groups)
        state.prev_users, state.prev_labels = up.users, labels
        state.group_of_user[up.users] = labels
        return labels

    def group_fuse_teach(self, state, up: TrainReply, r: int, t: dict,
                         labels: Optional[np.ndarray] = None,
                         sums: Optional[dict] = None) -> dict:
        """`labels`: the groups when already formed this round; `sums`: secagg's per-set
        means (the targets then come from them, not from per-client tables)."""
        g, bb = self.cfg.gfmfr, self.backbone
        tic = time.perf_counter()
        if labels is None:
            labels = self.group(state, up, r)
        if self.secure:
            targets, info = self.secure_targets(state, sums or {})
        else:
            targets, info = alg.group_targets(up.shared[bb.item_table], labels, g.groups,
                                              g.min_group_size, g.outlier_factor)
        t["group"] = t.get("group", 0.0) + time.perf_counter() - tic

        tic = time.perf_counter()
        fz, opt = self.fusion_model(state)
        fx, dev = self.features, self.device
        text, image = fx.text.to(dev), fx.image.to(dev)
        masks = (fx.text_mask.to(dev), fx.image_mask.to(dev))
        res = alg.train_fusion(fz, opt, text, image, targets.to(dev),
                               info["group_ok"].to(dev), g.fusion_epochs,
                               g.fusion_time_budget_s or None, g.fusion_batch_size,
                               seed=self.cfg.run.seed * 1000 + r,
                               text_mask=masks[0], image_mask=masks[1])
        fused = alg.fused_items(fz, text, image, masks,
                                torch.arange(g.groups, device=dev)).to("cpu")
        state.teacher = self.teacher(state, fused, up, labels)
        sizes = np.bincount(labels, minlength=g.groups)
        shift = self.content_prior(state, fused, sizes, info["group_ok"])
        t["fusion"] = time.perf_counter() - tic
        warning = alg.lopsided_groups(sizes)
        if warning and not state.warned_lopsided:
            state.warned_lopsided = True     # once per run; every round's sizes are logged
            log.warning("round %d: %s; gfmfr.clustering=%s%s", r, warning, g.clustering,
                        " (kmeans gives balanced groups)" if g.clustering == "spectral" else "")
        return {"group_sizes": sizes.tolist(),
                "fallback_groups": list(map(int, info["fallback"])),
                "excluded_uploads": int(info["n_excluded_nonfinite"] + info["n_excluded_outlier"]),
                "fusion_loss": float(res["losses"][-1]) if res["losses"] else None,
                "fusion_epochs": int(res["epochs_run"]),
                **({"content_shift": shift} if shift is not None else {})}

    def content_prior(self, state, fused: Tensor, sizes: np.ndarray,
                      group_ok: Tensor) -> Optional[float]:
        """gfmfr.content_prior (fedrpc's extension): C <- C + beta (C_hat - C), with C_hat
        the fused embeddings of the trained groups averaged by group size. Returns the
        RMS change of a table entry (None when off)."""
        beta = self.cfg.gfmfr.content_prior
        w = torch.as_tensor(sizes, dtype=torch.float64) * group_ok.cpu().double()
        if not beta or not float(w.sum()):
            return None
        name = self.backbone.item_table
        table = state.shared[name]
        prior = torch.einsum("g,gid->id", (w / w.sum()).to(fused.dtype), fused)
        change = beta * (prior.to(table.dtype) - table)
        state.shared = {**state.shared, name: table + change}
        return float(change.pow(2).mean().sqrt())

    def teacher(self, state, fused: Tensor, up: TrainReply, labels: np.ndarray) -> Tensor:
        """g_k over all items from the fused embeddings and the group's averaged head."""
        logits = self.group_logits(state, fused, up, labels, self.cfg.gfmfr.teacher)
        return torch.sigmoid(logits).clamp(1e-7, 1 - 1e-7)

    def group_logits(self, state, E: Tensor, up: TrainReply, labels: np.ndarray,
                     kind: str) -> Tensor:
        """Each group's preference logits [G, I] over item embeddings E [G, I, d], scored
        with the group's averaged uploads: kind "output" (the output layer alone, the
        paper's formula) or "head" (the whole shared scoring head, no user part)."""
        g, bb = self.cfg.gfmfr, self.backbone
        names = bb.output if kind == "output" else bb.head
        # an empty group takes the global value (the mean upload for a group-only head)
        head = {n: _group_means(up.shared[n], labels, g.groups,
                                state.shared[n] if n in state.shared else up.shared[n].mean(0))
                for n in names}
        if kind == "output":
            w, b = (head[n] for n in bb.output)
            return alg.teacher_logits(E, w, b.reshape(-1))
        return bb.group_logits(E, head)

    def profile_content(self) -> Optional[Tensor]:
        """The content vectors the clients form their profiles from, as sent (the
        precision codec's dtype), computed once; None when gfmfr.profile_weight is 0 or
        no item has content (then said once)."""
        g = self.cfg.gfmfr
        if not g.profile_weight:
            return None
        if not self._profile_made:
            self._profile_made = True
            name, x = (self.features.combined(g.profile_features)
                       if self.features is not None else ("none", None))
            if x is None:
                log.warning("gfmfr.profile_weight=%g: no item has %s (no %s, or encoder.*."
                            "backend=none): scores have no profile term", g.profile_weight,
                            *alg.PROFILE_FEATURES[g.profile_features])
            else:
                z = alg.profile_vectors(x, g.profile_dims).float()
                log.info("content profile: %s features -> %d-dim vectors for %d items",
                         name, z.shape[1], z.shape[0])
                self._profile = self.precision.encode(z)
        return self._profile

    def fusion_model(self, state):
        """The persistent group-fusion model and its optimiser (built at first use)."""
        if state.fusion is None:
            g, fx = self.cfg.gfmfr, self.features
            torch.manual_seed(self.cfg.run.seed)
            state.fusion = alg.GroupFusion(g.groups, fx.text.shape[1], fx.image.shape[1],
                                           self.cfg.fed.latent_dim,
                                           fusion=g.fusion).to(self.device)
            state.fusion_opt = alg.make_fusion_optimizer(state.fusion, g.fusion_lr)
        return state.fusion, state.fusion_opt


def _group_means(values: Tensor, labels: np.ndarray, n_groups: int, fallback: Tensor) -> Tensor:
    """Mean of `values` [N, ...] per group -> [G, ...]; empty groups take `fallback`."""
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return torch.stack([values[lab == k].mean(0) if (lab == k).any() else fallback
                        for k in range(n_groups)])


def _select(up: TrainReply, keep: np.ndarray) -> TrainReply:
    k = torch.from_numpy(keep)
    return TrainReply(up.round, up.users[keep], {n: v[k] for n, v in up.shared.items()},
                      None if up.n_samples is None else up.n_samples[keep], up.loss_sum,
                      up.kl_sum, up.seconds)


def _logged(rejected: dict, round_: int) -> dict:
    for reason, users in rejected.items():
        shown = ", ".join(map(str, users[:10])) + (" ..." if len(users) > 10 else "")
        log.warning("round %d: %d upload(s) rejected (%s): clients %s", round_, len(users),
                    reason, shown)
    return rejected
