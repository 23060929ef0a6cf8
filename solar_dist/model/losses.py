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
