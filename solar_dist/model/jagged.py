"""Jagged <-> padded conversions used at the boundary between TorchRec (jagged) and the dense tower.

Rows are stored per request in order, so a (B, N) boolean mask built from the lengths selects exactly the
jagged values in row-major order: `padded[mask] = values` and `values = padded[mask]` are exact inverses and
differentiable (index_put / index).
"""
from __future__ import annotations

import torch


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True for valid rows (valid rows first)."""
    max_len = int(lengths.max()) if max_len is None and lengths.numel() else (max_len or 0)
    ar = torch.arange(max_len, device=lengths.device)
    return ar[None, :] < lengths[:, None]


def jagged_to_padded(values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """values (T, *F) with per-request `lengths` (B,) -> padded (B, N, *F) zeros-filled, mask (B, N)."""
    if int(lengths.sum()) != values.shape[0]:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but values has {values.shape[0]} rows")
    mask = lengths_to_mask(lengths, max_len)
    out = values.new_zeros((lengths.numel(), mask.shape[1]) + tuple(values.shape[1:]))
    out[mask] = values
    return out, mask


def padded_to_jagged(padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return padded[mask]


def positions_from_end(lengths: torch.Tensor) -> torch.Tensor:
    """For jagged rows in chronological order: 0 for each request's newest event, 1 for the one before ..."""
    offsets = torch.cumsum(lengths, 0)
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    idx = torch.arange(int(lengths.sum()), device=lengths.device)
    return offsets[seg] - 1 - idx


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
