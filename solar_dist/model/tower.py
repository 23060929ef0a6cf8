"""The SOLAR tower: the dense part of the model, trained by DeepSpeed.

history embeddings (+ recency buckets)
  -> L pre-norm residual blocks [attention of the tokens over the layer's r interests, FFN]
  -> candidate attention: each candidate attends to the last layer's interests AND the last k events, in one
     softmax (svd_attention.md §8)
  -> optional set layer (candidates attend to the candidate set's own interests)
  -> scorer MLP -> one logit per candidate.

`mode="states"` (next-item training at every position): the same blocks run causally (ops/causal.py: each
position attends to the interests of the prefix before its chunk plus a sliding window of its own last events,
with a learned per-head offset bias), and the tower returns one state per history position; the trainer scores
items by the dot product of a state with their embeddings (SASRec-style). No recency buckets there: a
position's distance from the end of the sequence would tell it how much future follows.

The attention kind is one config switch (`model.attention`): `svd` or the baselines `sdpa`, `linear`,
`truncate`, `oracle`, all behind the same call. Under sequence parallelism each rank holds a contiguous chunk
of every history: the attention op combines N-independent sums over the `sp_group`, and the recent window is
assembled by a differentiable all-reduce of a (B, k, D) tensor; candidates may be split over the ranks too.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..ops import make_attention
from ..ops.causal import causal_attention
from ..ops.collectives import all_reduce_sum
from .jagged import jagged_to_padded, lengths_to_mask, positions_from_end


def recency_bucket(pos_from_end: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log-spaced buckets of 'events ago': 0,1,2-3,4-7,... so that recent order matters and old order
    does not (the interests carry the old history)."""
    b = torch.floor(torch.log2(pos_from_end.float() + 1.0)).long()
    return b.clamp_(0, num_buckets - 1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


#: model.attention -> kind of ops/causal.py
CAUSAL_KIND = {"svd": "svd", "sdpa": "exact", "truncate": "truncate"}


def _attention(cfg: ModelConfig, dim: int) -> nn.Module:
    return make_attention(
        cfg.attention, dim, cfg.num_heads, cfg.rank, svd_method=cfg.svd_method,
        interest_scale=cfg.interest_scale, basis_grad=cfg.basis_grad, mass_bias=cfg.mass_bias,
        oversample=cfg.oversample, power_iters=cfg.power_iters, truncate_k=cfg.truncate_k,
    )


class SolarBlock(nn.Module):
    """Pre-norm residual block: tokens attend to the interests of the (normalised) layer input, then FFN.
    `causal=True`: the block runs ops/causal.py instead (next-item training at every position)."""

    def __init__(self, cfg: ModelConfig, dim: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _attention(cfg, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, cfg.ffn_mult, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.causal = causal
        if causal:
            # additive score bias per head for window offsets 0..w-1 and one for older events
            self.causal_kind = CAUSAL_KIND.get(cfg.attention)
            if self.causal_kind is None:
                raise ValueError(f"model.attention={cfg.attention!r} has no causal form; choose one of "
                                 f"{sorted(CAUSAL_KIND)}")
            self.window = cfg.truncate_k if cfg.attention == "truncate" else cfg.causal_window
            self.rel_bias = nn.Parameter(torch.zeros(cfg.num_heads, self.window + 1))
            self.causal_prefix = cfg.causal_prefix
            self.far_bias = cfg.interest_far_bias and self.causal_kind == "svd"
            self.interest_grad = cfg.interest_grad if self.causal_kind == "svd" else "full"
            self.window_mode = cfg.causal_window_mode if self.causal_kind == "svd" else "sliding"

    def forward(self, x: torch.Tensor, mask: torch.Tensor, sp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        h = self.norm1(x)
        if self.causal:
            a = causal_attention(self.attn, h, mask, self.window, self.rel_bias, self.causal_kind, self.causal_prefix,
                                 far_bias=self.far_bias, interest_grad=self.interest_grad,
                                 window_mode=self.window_mode)
        else:
            a = self.attn(h, h, mask, query_mask=mask, sp_group=sp_group)
        x = x + self.drop(a)
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x * mask[..., None]


class SolarTower(nn.Module):
    """`head="rank"`: the ranking tower (candidates attend to the history; MLP scorer).
    `head="states"`: the causal tower for next-item training at every position (`states`); it has only the
    input projection, the causal blocks and the output norm (no parameter that the mode never uses)."""

    def __init__(self, cfg: ModelConfig, dim: int, head: str = "rank") -> None:
        super().__init__()
        if head not in ("rank", "states"):
            raise ValueError(f"head must be 'rank' or 'states', got {head!r}")
        self.cfg = cfg
        self.dim = dim
        self.head = head
        causal = head == "states"
        self.in_proj = nn.Linear(dim, dim)
        if not causal:
            self.recency = nn.Embedding(cfg.position_buckets, dim)
        self.blocks = nn.ModuleList([SolarBlock(cfg, dim, causal=causal) for _ in range(cfg.depth)])
        self.out_norm = nn.LayerNorm(dim)
        self.in_drop = nn.Dropout(cfg.dropout)
        if causal:
            return
        self.cand_proj = nn.Linear(2 * dim, dim)
        self.recent_slot = nn.Embedding(max(cfg.recent_k, 1), dim)
        self.cand_attn = _attention(cfg, dim)
        self.use_recent = cfg.attention == "svd" and cfg.recent_k > 0
        self.set_attn = _attention(cfg, dim) if cfg.set_layer else None
        self.set_norm = nn.LayerNorm(dim) if cfg.set_layer else None
        layers: List[nn.Module] = []
        width = 4 * dim
        for h in cfg.scorer_hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.scorer = nn.Sequential(*layers)
        nn.init.normal_(self.recency.weight, std=0.02)
        nn.init.normal_(self.recent_slot.weight, std=0.02)

    # ------------------------------------------------------------------------------------------------
    def _recent_window(self, memory: torch.Tensor, mask: torch.Tensor, pos_from_end: torch.Tensor,
                       sp_group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, k, D) tokens of the last k events (slot 0 = newest) and their validity mask.

        Each rank scatters the rows it holds; under sp a sum all-reduce assembles the window (size B·k·D,
        independent of N)."""
        k = self.cfg.recent_k
        B, N, D = memory.shape
        sel = mask & (pos_from_end < k)
        b_idx, n_idx = sel.nonzero(as_tuple=True)
        slot = pos_from_end[b_idx, n_idx]
        window = memory.new_zeros(B, k, D)
        window = window.index_put((b_idx, slot), memory[b_idx, n_idx])
        filled = memory.new_zeros(B, k)
        filled = filled.index_put((b_idx, slot), torch.ones_like(slot, dtype=memory.dtype))
        if sp_group is not None:
            window = all_reduce_sum(window, sp_group)
            filled = all_reduce_sum(filled, sp_group)
        window = window + self.recent_slot.weight[None, :k]
        return window, filled > 0.5

    def states(self, hist: torch.Tensor, hist_lengths: torch.Tensor) -> torch.Tensor:
        """Causal per-position states (T, D), jagged like hist: state t depends on events <= t only."""
        x, mask = jagged_to_padded(self.in_proj(hist), hist_lengths)
        x = self.in_drop(x) * mask[..., None]
        for block in self.blocks:
            x = block(x, mask, None)
        return self.out_norm(x)[mask]

    def forward(
        self,
        hist: torch.Tensor,
        hist_lengths: torch.Tensor,
        cand: Optional[torch.Tensor] = None,
        cand_lengths: Optional[torch.Tensor] = None,
        user: Optional[torch.Tensor] = None,
        *,
        hist_pos_from_end: Optional[torch.Tensor] = None,
        sp_group: Optional[dist.ProcessGroup] = None,
        mode: str = "rank",
    ) -> torch.Tensor:
        """hist (T, D) jagged by hist_lengths (B,); cand (Tc, D) jagged by cand_lengths; user (B, D).
        `hist_pos_from_end` (T,): each event's distance from its request's newest event (computed from the
        lengths when not given; under sp the caller passes the global figure). Returns logits (Tc,).
        `mode="states"`: only hist is used; returns the causal states (T, D) (see `states`)."""
        if mode != self.head:
            raise ValueError(f"this tower was built with head={self.head!r}; mode={mode!r} needs head={mode!r}")
        if mode == "states":
            if sp_group is not None:
                raise ValueError("mode='states' runs whole sequences on one rank; sp_group must be None")
            return self.states(hist, hist_lengths)
        if cand is None or cand_lengths is None or user is None:
            raise ValueError("mode='rank' needs cand, cand_lengths and user")
        if hist_pos_from_end is None:
            hist_pos_from_end = positions_from_end(hist_lengths)
        x = self.in_proj(hist) + self.recency(recency_bucket(hist_pos_from_end, self.cfg.position_buckets))
        x, mask = jagged_to_padded(x, hist_lengths)
        pos, _ = jagged_to_padded(hist_pos_from_end, hist_lengths)
        for block in self.blocks:
            x = block(x, mask, sp_group)
        memory = self.out_norm(x) * mask[..., None]

        c, cmask = jagged_to_padded(cand, cand_lengths)
        u = user[:, None, :].expand(-1, c.shape[1], -1)
        q = self.cand_proj(torch.cat([c, u], dim=-1))
        extra, extra_mask = None, None
        if self.use_recent:
            extra, extra_mask = self._recent_window(memory, mask, pos, sp_group)
        a = self.cand_attn(q, memory, mask, query_mask=cmask, extra_kv=extra, extra_mask=extra_mask,
                           sp_group=sp_group)
        if self.set_attn is not None:
            # candidates are split over sp ranks exactly like history rows, so the same op applies
            s = self.set_norm(q + a)
            a = a + self.set_attn(s, s, cmask, query_mask=cmask, sp_group=sp_group)
        feats = torch.cat([a, q, a * q, u], dim=-1)
        logits = self.scorer(feats).squeeze(-1)
        return logits[cmask]

