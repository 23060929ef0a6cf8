"""Ranking metrics of next-item evaluation: the 0-based rank of the one relevant item per query, and HR@k,
NDCG@k and MRR from it. Ties count against the target (rank = number of other candidates scoring >= it), so
a constant model scores zero rather than being lucky. Pure torch (no TorchRec / DeepSpeed), so tools that
train the tower alone share the exact same definitions."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch

from ..model.jagged import segment_ids


def rank_metrics(ranks: np.ndarray | torch.Tensor, k: int = 10) -> Dict[str, float]:
    """0-based ranks of the single relevant item per query -> HR@k, NDCG@k, MRR (untruncated) averages."""
    r = torch.as_tensor(ranks, dtype=torch.float64)
    if r.numel() == 0:
        return {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan"), "mrr": float("nan"), "count": 0.0}
    return {**{name: float(v.mean()) for name, v in per_request_metrics(r, k).items()}, "count": float(r.numel())}


def per_request_metrics(ranks: torch.Tensor, k: int) -> Dict[str, torch.Tensor]:
    """HR@k, NDCG@k and reciprocal rank of each request from its target's rank (0 = first), float64."""
    r = ranks.double()
    hit = (r < k).double()
    return {f"hr@{k}": hit, f"ndcg@{k}": hit / torch.log2(r + 2.0), "mrr": 1.0 / (r + 1.0)}


def metric_sums(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """(hit sum, ndcg sum, rr sum, count) for summing over batches and ranks."""
    m = per_request_metrics(ranks, k)
    return torch.stack([m[f"hr@{k}"].sum(), m[f"ndcg@{k}"].sum(), m["mrr"].sum(),
                        torch.tensor(float(ranks.numel()), dtype=torch.float64)])


def sums_to_metrics(s: Sequence[float], k: int) -> Dict[str, float]:
    n = max(s[3], 1.0)
    return {f"hr@{k}": s[0] / n, f"ndcg@{k}": s[1] / n, "mrr": s[2] / n, "count": s[3]}


def jagged_target_ranks(logits: torch.Tensor, labels: torch.Tensor, cand_lengths: torch.Tensor) -> torch.Tensor:
    """Per request: number of other candidates whose logit is >= the positive's (ties count against it).
    Every request must hold exactly one positive label."""
    seg = segment_ids(cand_lengths)
    B = cand_lengths.numel()
    pos = labels > 0.5
    npos = torch.zeros(B, dtype=torch.long).index_add(0, seg, pos.long())
    if not bool((npos == 1).all()):
        bad = int(torch.nonzero(npos != 1)[0])
        raise ValueError(f"request {bad} of the batch has {int(npos[bad])} positive labels; next-item "
                         f"evaluation needs exactly one")
    target = torch.zeros(B, dtype=logits.dtype).index_add(0, seg, torch.where(pos, logits, torch.zeros_like(logits)))
    ge = (logits >= target[seg]) & ~pos
    return torch.zeros(B, dtype=torch.long).index_add(0, seg, ge.long())


def dense_target_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """scores (B, I); target (B,) column of the relevant item; exclude (B, I) bool (items not ranked; the
    target column is never excluded). Returns the number of ranked non-target items scoring >= the target."""
    B = scores.shape[0]
    rows = torch.arange(B)
    t = scores[rows, target]
    keep = ~exclude
    keep[rows, target] = False  # the target is not counted against itself
    return ((scores >= t[:, None]) & keep).sum(1)

