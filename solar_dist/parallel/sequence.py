"""Sequence parallelism: split every request of a batch over the sp ranks of its group, and put it back.

Rank j of an sp group of size P keeps, for every request, the contiguous chunk
    [floor(n·j/P), floor(n·(j+1)/P))
of its n history events and, the same way, a chunk of its candidates. Chunks may be empty (n < P). Every
rank keeps all B requests (so TorchRec sees the same batch size everywhere) and the user features. The
tower receives each local event's *global* distance from the newest event, so recency features do not
depend on P; SVD-Attention combines N-independent sums over the group (ops/), the recent window is a
(B, k, D) all-reduce, and the listwise loss normalises over the whole candidate set (model/losses.py).
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..data.batch import Batch
from ..model.jagged import positions_from_end


def chunk_bounds(lengths: torch.Tensor, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request [start, end) of chunk `rank` of `size`."""
    return lengths * rank // size, lengths * (rank + 1) // size


def _ranges(offsets: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Flat indices of the rows offsets[b]+starts[b] ... +lens[b]-1 for every b."""
    total = int(lens.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    first = torch.cumsum(lens, 0) - lens
    within = torch.arange(total) - first[seg]
    return offsets[seg] + starts[seg] + within


def split_for_sp(batch: Batch, sp_rank: int, sp: int) -> Batch:
    """This sp rank's share of `batch` (see module docstring). Identity when sp == 1."""
    if sp == 1:
        return batch
    if not 0 <= sp_rank < sp:
        raise ValueError(f"sp_rank={sp_rank} must be in [0, {sp})")
    hl, cl = batch.hist_lengths, batch.cand_lengths
    h_off = torch.cumsum(hl, 0) - hl
    c_off = torch.cumsum(cl, 0) - cl
    hs, he = chunk_bounds(hl, sp_rank, sp)
    cs, ce = chunk_bounds(cl, sp_rank, sp)
    h_idx = _ranges(h_off, hs, he - hs)
    c_idx = _ranges(c_off, cs, ce - cs)
    pos = positions_from_end(hl)[h_idx]

    keys: List[str] = list(batch.features.keys())
    values, lengths = [], []
    for key in keys:
        jt = batch.features[key]
        if key.startswith("hist_"):
            values.append(jt.values()[h_idx])
            lengths.append(he - hs)
        else:
            values.append(jt.values()[c_idx])
            lengths.append(ce - cs)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int32)
    )
    return replace(
        batch,
        features=features,
        hist_lengths=he - hs,
        cand_lengths=ce - cs,
        labels=batch.labels[c_idx],
        probs=batch.probs[c_idx] if batch.probs is not None else None,
        hist_ts=batch.hist_ts[h_idx] if batch.hist_ts is not None else None,
        hist_pos_from_end=pos,
    )


@torch.no_grad()
def gather_candidates(local: torch.Tensor, local_lengths: torch.Tensor, group: dist.ProcessGroup,
                      sp: int) -> torch.Tensor:
    """Inverse of the candidate split for per-candidate values (e.g. logits at evaluation): every rank gets
    the values of all candidates in the original order."""
    if sp == 1:
        return local
    counts = torch.tensor([local.numel()], dtype=torch.long)
    all_counts = [torch.zeros_like(counts) for _ in range(sp)]
    dist.all_gather(all_counts, counts, group=group)
    width = int(max(c.item() for c in all_counts))
    padded = torch.zeros(width, dtype=local.dtype)
    padded[: local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in range(sp)]
    dist.all_gather(parts, padded, group=group)
    lens = [torch.zeros_like(local_lengths) for _ in range(sp)]
    dist.all_gather(lens, local_lengths.contiguous(), group=group)
    per_rank = [p[: int(c.item())].split(l.tolist()) for p, c, l in zip(parts, all_counts, lens)]
    out = [per_rank[r][b] for b in range(local_lengths.numel()) for r in range(sp)]
    return torch.cat(out) if out else local
