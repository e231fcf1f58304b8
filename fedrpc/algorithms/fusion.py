"""Group fusion model (GFMFR step 5e), its training, and the teacher (step 5f).

For group k and item i the model builds three tokens in R^d,
    h_g = P_g z_k,   h_t = P_t T[i],   h_v = P_v V[i],
and a fusion module maps them to F_k[i] in R^d. It is trained with MSE against the
group targets C_bar_k[i]; the teacher is g_k = sigmoid(F_k w2_k + b2_k).

A missing modality (mask False) zeroes that token before and after projection and is
excluded where the module weighs tokens (sum, gate, attention key padding), so it never
produces NaN even if the missing feature row holds NaN. The group token is always
present. All modules work per (k, i) pair: nothing mixes the items of a minibatch.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

log = logging.getLogger(__name__)

N_TOKENS = 3  # (group, text, image)


# ------------------------------------------------------------------ fusion modules
# Every module maps tokens [B, 3, d] (missing ones already zero) and mask [B, 3]
# (True = present) to [B, d].
class SumFusion(nn.Module):
    """F = h_g + h_t + h_v (missing tokens contribute 0)."""

    def __init__(self, d: int):
        super().__init__()

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return (tokens * mask.unsqueeze(-1)).sum(dim=1)


class MLPFusion(nn.Module):
    """F = W_b ReLU(W_a [h_g; h_t; h_v] + a) + b   (3d -> 2d -> d)."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(N_TOKENS * d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.net(tokens.flatten(1))

    def grid(self, h_g: Tensor, h_t: Tensor, h_v: Tensor) -> Tensor:
        """The same function on every (group, item) pair: [G', d] x [B, d] -> [G', B, d].

        W_a [h_g; h_t; h_v] = W_a,g h_g + W_a,tv [h_t; h_v]: the first layer splits into
        a per-group and a per-item product, added with broadcasting, so its cost grows
        with G' + B, not G' x B."""
        first, second = self.net[0], self.net[2]
        d = h_g.shape[1]
        a_g = h_g @ first.weight[:, :d].t()                                      # [G', 2d]
        a_i = torch.addmm(first.bias, torch.cat([h_t, h_v], 1), first.weight[:, d:].t())
        return second(torch.relu(a_g.unsqueeze(1) + a_i.unsqueeze(0)))


class GateFusion(nn.Module):
    """F = sum_j a_j h_j,  a = softmax over present tokens of W [h_g; h_t; h_v] + b."""

    def __init__(self, d: int):
        super().__init__()
        self.gate = nn.Linear(N_TOKENS * d, N_TOKENS)

    def gates(self, tokens: Tensor, mask: Tensor) -> Tensor:
        logits = self.gate(tokens.flatten(1)).masked_fill(~mask, float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return (self.gates(tokens, mask).unsqueeze(-1) * tokens).sum(dim=1)


def _default_heads(d: int) -> int:
    return next(h for h in (4, 2, 1) if d % h == 0)


class AttentionFusion(nn.Module):
    """Self-attention over the 3 tokens of ONE (k, i) pair (sequence length 3, batch =
    pairs), missing tokens as key padding; H = LayerNorm(X + MHA(X)); F = W mean_{present} H_j.
    """

    def __init__(self, d: int, n_heads: Optional[int] = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, n_heads or _default_heads(d), batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, d)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        att, _ = self.attn(tokens, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        h = self.norm(tokens + att) * mask.unsqueeze(-1)
        pooled = h.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)
        return self.out(pooled)


class MoEFusion(nn.Module):
    """F = sum_e r_e F_e over experts (sum, mlp, gate, attention), with the router
    r = softmax(W [h_g; h_t; h_v] + b) applied exactly once."""

    EXPERTS = ("sum", "mlp", "gate", "attention")

    def __init__(self, d: int, n_heads: Optional[int] = None):
        super().__init__()
        self.experts = nn.ModuleList([SumFusion(d), MLPFusion(d), GateFusion(d),
                                      AttentionFusion(d, n_heads)])
        self.router = nn.Linear(N_TOKENS * d, len(self.experts))

    def router_weights(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return torch.softmax(self.router(tokens.flatten(1)), dim=-1)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        outs = torch.stack([e(tokens, mask) for e in self.experts], dim=1)  # [B, E, d]
        return (self.router_weights(tokens, mask).unsqueeze(-1) * outs).sum(dim=1)


FUSIONS = {"sum": SumFusion, "mlp": MLPFusion, "gate": GateFusion,
           "attention": AttentionFusion, "moe": MoEFusion}


def make_fusion(name: str, d: int, n_heads: Optional[int] = None) -> nn.Module:
    """The fusion module called `name` (one of FUSIONS) for latent size d."""
    if name not in FUSIONS:
        raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {name!r}")
    if name in ("attention", "moe"):
        return FUSIONS[name](d, n_heads)
    return FUSIONS[name](d)


# ----------------------------------------------------------------- the group model
class GroupFusion(nn.Module):
    """Persistent group fusion model: z_k, projections P_g, P_t, P_v, fusion module."""

    def __init__(self, n_groups: int, text_dim: int, image_dim: int, latent_dim: int,
                 fusion: str = "mlp", group_dim: Optional[int] = None,
                 n_heads: Optional[int] = None):
        super().__init__()
        group_dim = group_dim or latent_dim
        self.n_groups, self.text_dim, self.image_dim = n_groups, text_dim, image_dim
        self.latent_dim, self.fusion_name = latent_dim, fusion
        self.group_emb = nn.Embedding(n_groups, group_dim)
        nn.init.normal_(self.group_emb.weight, std=0.1)
        self.proj_group = nn.Linear(group_dim, latent_dim)
        self.proj_text = nn.Linear(text_dim, latent_dim)
        self.proj_image = nn.Linear(image_dim, latent_dim)
        self.fusion = make_fusion(fusion, latent_dim, n_heads)

    def _check(self, T: Tensor, V: Tensor) -> None:
        if T.dim() != 2 or T.shape[1] != self.text_dim:
            raise ValueError(f"GroupFusion: T must be [I, {self.text_dim}], got {tuple(T.shape)}")
        if V.dim() != 2 or V.shape[1] != self.image_dim:
            raise ValueError(f"GroupFusion: V must be [I, {self.image_dim}], got {tuple(V.shape)}")
        if T.shape[0] != V.shape[0]:
            raise ValueError(f"GroupFusion: T has {T.shape[0]} items, V has {V.shape[0]}")

    def tokens(self, group_idx: Tensor, item_idx: Tensor, T: Tensor, V: Tensor,
               text_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor]:
        """Tokens [B, 3, d] (missing ones zero) and their presence mask [B, 3]."""
        self._check(T, V)
        ones = torch.ones(item_idx.shape[0], dtype=torch.bool, device=item_idx.device)
        m_t = ones if text_mask is None else text_mask[item_idx]
        m_v = ones if image_mask is None else image_mask[item_idx]
        t = torch.where(m_t.unsqueeze(-1), T[item_idx], 0.0)  # zero before projecting:
        v = torch.where(m_v.unsqueeze(-1), V[item_idx], 0.0)  # NaN rows never reach grads
        h_t = self.proj_text(t) * m_t.unsqueeze(-1)
        h_v = self.proj_image(v) * m_v.unsqueeze(-1)
        h_g = self.proj_group(self.group_emb(group_idx))
        return torch.stack([h_g, h_t, h_v], dim=1), torch.stack([ones, m_t, m_v], dim=1)

    def forward(self, group_idx: Tensor, item_idx: Tensor, T: Tensor, V: Tensor,
                text_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None
                ) -> Tensor:
        """F_k[i] for the pairs (group_idx[b], item_idx[b]): [B, d]."""
        tokens, mask = self.tokens(group_idx, item_idx, T, V, text_mask, image_mask)
        return self.fusion(tokens, mask)

    def grid(self, group_idx: Tensor, item_idx: Tensor, T: Tensor, V: Tensor,
             text_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None,
             zeroed: bool = False) -> Tensor:
        """F_k[i] for every pair of group_idx [G'] x item_idx [B]: [G', B, d], equal to
        `forward` on those pairs. Each item's features are projected once, not once per
        group; the MLP fusion's first layer splits the same way (MLPFusion.grid).
        `zeroed`: T and V already hold zeros in their missing rows (`zero_missing`), so
        the gathered rows need no masking before projection."""
        self._check(T, V)
        n = item_idx.shape[0]
        ones = torch.ones(n, dtype=torch.bool, device=item_idx.device)
        m_t = ones if text_mask is None else text_mask.index_select(0, item_idx)
        m_v = ones if image_mask is None else image_mask.index_select(0, item_idx)
        t, v = T.index_select(0, item_idx), V.index_select(0, item_idx)
        if not zeroed:
            t = torch.where(m_t.unsqueeze(-1), t, 0.0)
            v = torch.where(m_v.unsqueeze(-1), v, 0.0)
        h_t = self.proj_text(t) * m_t.unsqueeze(-1)
        h_v = self.proj_image(v) * m_v.unsqueeze(-1)
        h_g = self.proj_group(self.group_emb(group_idx))
        if isinstance(self.fusion, MLPFusion):
            return self.fusion.grid(h_g, h_t, h_v)
        g = group_idx.shape[0]
        tokens = torch.stack([h_g.unsqueeze(1).expand(g, n, -1), h_t.expand(g, n, -1),
                              h_v.expand(g, n, -1)], dim=2).reshape(g * n, N_TOKENS, -1)
        mask = torch.stack([ones, m_t, m_v], dim=1).expand(g, n, N_TOKENS)
        return self.fusion(tokens, mask.reshape(g * n, N_TOKENS)).reshape(g, n, -1)


def zero_missing(features: Tensor, mask: Optional[Tensor]) -> Tensor:
    """`features` with the rows of missing items (mask False) set to zero, NaN rows
    included; the tensor itself when nothing is missing."""
    if mask is None or bool(mask.all()):
        return features
    return torch.where(mask.unsqueeze(-1), features, 0.0)


Masks = Optional[tuple[Optional[Tensor], Optional[Tensor]]]


@torch.no_grad()
def fused_items(model: GroupFusion, T: Tensor, V: Tensor, masks: Masks,
                group_ids: Union[Tensor, Sequence[int]], batch_size: int = 8192) -> Tensor:
    """F [len(group_ids), I, d]: F[j, i] = model(group_ids[j], i), no grad, in blocks of
    about `batch_size` pairs (all groups x a block of items)."""
    text_mask, image_mask = masks if masks is not None else (None, None)
    groups = torch.as_tensor(group_ids, dtype=torch.long, device=T.device).reshape(-1)
    n_items = T.shape[0]
    if groups.numel() == 0 or n_items == 0:
        return T.new_zeros((groups.numel(), n_items, model.latent_dim))
    step = max(1, batch_size // groups.numel())
    T, V = zero_missing(T, text_mask), zero_missing(V, image_mask)
    was_training = model.training
    model.eval()
    try:
        out = [model.grid(groups, torch.arange(s, min(s + step, n_items), device=T.device),
                          T, V, text_mask, image_mask, zeroed=True)
               for s in range(0, n_items, step)]
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------- training
def make_fusion_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    """Adam over the fusion model; the caller keeps it across rounds."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def _epoch(model, optimizer, T, V, targets, groups, order, n_steps, masks):
    """One pass over all pairs of `groups` x items, in `n_steps` minibatches of all the
    groups x a block of the items in `order` (T and V with their missing rows zeroed);
    returns (mean loss, finite?)."""
    total, count = 0.0, 0
    for items in torch.tensor_split(order, n_steps):
        if items.numel() == 0:
            continue
        loss = F_.mse_loss(model.grid(groups, items, T, V, *masks, zeroed=True),
                           targets.index_select(1, items))
        if not torch.isfinite(loss):
            return float("nan"), False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pairs = groups.numel() * items.numel()
        total += float(loss.detach()) * pairs
        count += pairs
    return total / max(count, 1), True


def train_fusion(model: GroupFusion, optimizer: torch.optim.Optimizer, T: Tensor, V: Tensor,
                 targets: Tensor, group_ok: Tensor, epochs: int,
                 time_budget_s: Optional[float], batch_size: int, seed: int,
                 text_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None
                 ) -> dict:
    """Minimise mean_{(k,i)} ||F_k[i] - targets[k, i]||^2 / d over all items i and the
    groups k with group_ok[k]: Adam steps on minibatches, each holding every such group
    and a block of items, the items shuffled each epoch by a torch.Generator seeded by
    `seed`.

    An epoch takes ceil(pairs / batch_size) steps, as many as minibatches of
    `batch_size` random pairs would, with blocks of about batch_size / G' items (G' = the
    groups with group_ok), so each block's item features are projected once for all its
    groups (GroupFusion.grid) instead of once per pair.

    Stops after `epochs`, or (checked after each epoch, so at least one runs) once
    `time_budget_s` seconds have passed, or if a loss turns non-finite (that batch is
    not applied). Returns dict(losses=[per-epoch mean], epochs_run, seconds, pairs,
    nonfinite). Deterministic given the seed except where the time budget cuts it.
    """
    if targets.shape[:2] != (model.n_groups, T.shape[0]):
        raise ValueError(f"train_fusion: targets must be [{model.n_groups}, {T.shape[0]}, d], "
                         f"got {tuple(targets.shape)}")
    if not bool(torch.isfinite(targets).all()):
        raise ValueError("train_fusion: targets contain NaN/inf (use group_targets' guards)")
    start = time.perf_counter()
    dev = T.device
    groups = torch.nonzero(torch.as_tensor(group_ok, device=dev).reshape(-1)).reshape(-1)
    n_items = T.shape[0]
    pairs = groups.numel() * n_items
    n_steps = min(n_items, -(-pairs // max(1, batch_size)))
    targets = targets[groups]               # [G', I, d]: indexed once, not every step
    T, V = zero_missing(T, text_mask), zero_missing(V, image_mask)     # once, not every step
    gen = torch.Generator().manual_seed(int(seed))
    losses, nonfinite = [], False
    model.train()
    for _ in range(epochs if pairs else 0):
        order = torch.randperm(n_items, generator=gen).to(dev)
        loss, ok = _epoch(model, optimizer, T, V, targets, groups, order, n_steps,
                          (text_mask, image_mask))
        if not ok:
            nonfinite = True
            log.warning("fusion training: non-finite loss at epoch %d; stopping", len(losses))
            break
        losses.append(loss)
        if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
            break
    return dict(losses=losses, epochs_run=len(losses), seconds=time.perf_counter() - start,
                pairs=int(pairs), nonfinite=nonfinite)


# ----------------------------------------------------------------------- teacher
def teacher_logits(F: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """F_k[i] . w_out_k + b_out_k: [G, I], the logits of `teacher_preferences`.

    F [G, I, d], w_out [G, d] and b_out [G] (or [G, 1]): each group's averaged output
    layer. Raises ValueError on non-finite inputs rather than returning NaN.
    """
    b = b_out.reshape(-1)
    if F.dim() != 3 or w_out.shape != (F.shape[0], F.shape[2]) or b.numel() != F.shape[0]:
        raise ValueError(f"teacher_preferences: shapes F{tuple(F.shape)}, "
                         f"w_out{tuple(w_out.shape)}, b_out{tuple(b_out.shape)} disagree")
    for name, x in (("F", F), ("w_out", w_out), ("b_out", b)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"teacher_preferences: {name} contains NaN/inf")
    return torch.einsum("gid,gd->gi", F, w_out) + b.unsqueeze(-1)


def teacher_preferences(F: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """g_k[i] = clamp(sigmoid(F_k[i] . w_out_k + b_out_k), 1e-7, 1 - 1e-7): [G, I]."""
    return torch.sigmoid(teacher_logits(F, w_out, b_out)).clamp(1e-7, 1.0 - 1e-7)
