"""Losses over jagged candidate sets.

- BCE: per-candidate click/view labels.
- Listwise: softmax cross-entropy over each request's candidate set against the normalised labels
  (next-item training: the single positive among sampled negatives). Requests without a positive add nothing.

Both return a *sum* and a count, so the trainer can normalise by the global number of candidates / requests
across data-parallel ranks (equal gradients whatever the split).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.collectives import all_reduce_sum
from .jagged import segment_ids


@dataclass
class LossParts:
    bce_sum: torch.Tensor
    bce_count: torch.Tensor
    listwise_sum: torch.Tensor
    listwise_count: torch.Tensor


def loss_parts(logits: torch.Tensor, labels: torch.Tensor, cand_lengths: torch.Tensor, *,
               listwise: bool = True, sp_group: Optional[dist.ProcessGroup] = None) -> LossParts:
    """Loss sums over the local candidates. Under sequence parallelism (`sp_group`) each rank holds a chunk
    of every request's candidate set: the softmax normaliser and the positive mass are all-reduced over the
    group (the normaliser differentiably), and each request is counted once (on the group's first rank)."""
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    bce_sum = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")
    zero = logits.new_zeros(())
    if not listwise:
        return LossParts(bce_sum, logits.new_tensor(float(labels.numel())), zero, zero)
    seg = segment_ids(cand_lengths)
    B = cand_lengths.numel()
    # log-softmax within each request's candidate set (segment-wise, numerically stable)
    seg_max = torch.full((B,), float("-inf"), dtype=logits.dtype, device=logits.device)
    seg_max = seg_max.scatter_reduce(0, seg, logits.detach(), reduce="amax", include_self=True)
    pos = torch.zeros(B, dtype=labels.dtype, device=labels.device).index_add(0, seg, labels)
    if sp_group is not None:
        dist.all_reduce(seg_max, op=dist.ReduceOp.MAX, group=sp_group)
        dist.all_reduce(pos, group=sp_group)
    seg_max = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    z = logits - seg_max[seg]
    sumexp = torch.zeros(B, dtype=logits.dtype, device=logits.device).index_add(0, seg, z.exp())
    if sp_group is not None:
        sumexp = all_reduce_sum(sumexp, sp_group)
    lse = sumexp.clamp_min(torch.finfo(sumexp.dtype).tiny).log()
    logp = z - lse[seg]
    has_pos = pos > 0
    counted = has_pos if sp_group is None or dist.get_rank(sp_group) == 0 else torch.zeros_like(has_pos)
    target = labels / pos.clamp_min(1e-12)[seg]
    per_req = -torch.zeros(B, dtype=logits.dtype, device=logits.device).index_add(0, seg, target * logp)
    lw_sum = (per_req * has_pos).sum()
    return LossParts(bce_sum, logits.new_tensor(float(labels.numel())), lw_sum, counted.sum().to(logits.dtype))


class _CatalogueLogSumExp(torch.autograd.Function):
    """logsumexp over the catalogue of every state's scores, in row chunks: the (T, I) score matrix never
    exists whole (forward keeps only the (T,) result; backward recomputes each chunk's softmax)."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, items: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(states.shape[0], dtype=states.dtype, device=states.device)
        for lo in range(0, states.shape[0], chunk):
            out[lo: lo + chunk] = torch.logsumexp(states[lo: lo + chunk] @ items.T, 1)
        ctx.save_for_backward(states, items, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        states, items, lse = ctx.saved_tensors
        gs, gi = torch.empty_like(states), torch.zeros_like(items)
        for lo in range(0, states.shape[0], ctx.chunk):
            s = states[lo: lo + ctx.chunk]
            p = torch.exp(s @ items.T - lse[lo: lo + ctx.chunk, None]) * g[lo: lo + ctx.chunk, None]  # (c, I)
            gs[lo: lo + ctx.chunk] = p @ items
            gi.addmm_(p.T, s)
        return gs, gi, None


def catalogue_logsumexp(states: torch.Tensor, items: torch.Tensor, max_scores: int = 1 << 24) -> torch.Tensor:
    """(T,) logsumexp_i ⟨states_t, items_i⟩: the normaliser of a full-catalogue softmax (SASRec+ style
    cross-entropy), computed in chunks of at most `max_scores` scores so that memory stays O((T + I)·D +
    max_scores) instead of O(T·I) (a 25k-position batch over a 24k-item catalogue would need 2.4 GB twice).
    Reference twin: ``torch.logsumexp(states @ items.T, 1)``."""
    if states.dim() != 2 or items.dim() != 2 or states.shape[1] != items.shape[1]:
        raise ValueError(f"states (T, D) and items (I, D) must share D; got {tuple(states.shape)} and "
                         f"{tuple(items.shape)}")
    if items.shape[0] == 0:
        raise ValueError("items is empty: a softmax over an empty catalogue has no normaliser")
    if max_scores < 1:
        raise ValueError(f"max_scores={max_scores} must be positive")
    chunk = max(1, max_scores // items.shape[0])
    return _CatalogueLogSumExp.apply(states, items, chunk)
