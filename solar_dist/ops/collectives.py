"""Differentiable collectives for sequence parallelism of SVD-Attention (design §4).

Sequence parallelism splits each user's behaviour rows H over the P ranks of a group. Every factorisation
in :mod:`solar_dist.ops.interests` needs only *sums over rows* (HᵀH, sketch products HᵀHX, the Rayleigh-Ritz
Gram matrix (HX)ᵀ(HX), Σ_j h_j, valid-row counts), so one all-reduce(sum) of an N-independent tensor per
quantity is all the communication there is.

Gradient of the all-reduce.  Let every rank p hold x_p and receive y = Σ_q x_q (the same y on every rank).
Each rank computes its own local loss L_p(y) and the total loss is L = Σ_p L_p.  Then

    ∂L/∂x_q = Σ_p ∂L_p/∂y · ∂y/∂x_q = Σ_p ∂L_p/∂y

i.e. the backward of all-reduce(sum) is all-reduce(sum) of the incoming gradients.  (It is *not* identity: that
would be right only if one rank alone held the loss.)  ``tests/ops/test_sequence_parallel.py`` checks that
outputs and input gradients on P ranks equal the single-process ones.

Every all-reduce issued through this module is counted in :data:`COMM_STATS` (bytes and calls, forward and
backward separately), so tests and benchmarks can check that the communication per call is independent of N.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "CommStats",
    "COMM_STATS",
    "all_reduce_sum",
    "all_reduce_sum_nograd",
    "broadcast_nograd",
    "sp_world_size",
    "sp_bytes_per_call",
]


@dataclass
class CommStats:
    """Counter of the all-reduce traffic issued by solar_dist.ops (per process).

    ``bytes_all_reduced`` counts the payload of each all-reduce once (the tensor size in bytes, what one rank
    contributes), ``calls`` the number of collective calls; ``*_backward`` are the subsets issued during
    backward.  ``reset()`` zeroes everything; ``snapshot()`` returns a dict copy.
    """

    bytes_all_reduced: int = 0
    calls: int = 0
    bytes_backward: int = 0
    calls_backward: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int, backward: bool = False) -> None:
        with self._lock:
            self.bytes_all_reduced += int(nbytes)
            self.calls += 1
            if backward:
                self.bytes_backward += int(nbytes)
                self.calls_backward += 1

    def reset(self) -> None:
        with self._lock:
            self.bytes_all_reduced = 0
            self.calls = 0
            self.bytes_backward = 0
            self.calls_backward = 0

    def snapshot(self) -> dict:
        return {
            "bytes_all_reduced": self.bytes_all_reduced,
            "calls": self.calls,
            "bytes_backward": self.bytes_backward,
            "calls_backward": self.calls_backward,
        }


#: process-wide counter of all collectives issued by solar_dist.ops
COMM_STATS = CommStats()


def sp_world_size(group) -> int:
    """World size of a sequence-parallel group (1 when ``group`` is None)."""
    if group is None:
        return 1
    return dist.get_world_size(group)


def _raw_all_reduce(t: torch.Tensor, group, backward: bool = False) -> torch.Tensor:
    t = t.contiguous()
    COMM_STATS.add(t.numel() * t.element_size(), backward=backward)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_sum_nograd(t: torch.Tensor, group) -> torch.Tensor:
    """All-reduce(sum) outside autograd (returns a new tensor; identity when ``group`` is None)."""
    if group is None:
        return t
    with torch.no_grad():
        return _raw_all_reduce(t.detach().clone(), group)


def broadcast_nograd(t: torch.Tensor, group, src_rank_in_group: int = 0) -> torch.Tensor:
    """Broadcast from the group's ``src_rank_in_group`` (counted as one call)."""
    if group is None:
        return t
    t = t.detach().clone().contiguous()
    COMM_STATS.add(t.numel() * t.element_size())
    src = dist.get_global_rank(group, src_rank_in_group) if hasattr(dist, "get_global_rank") else src_rank_in_group
    dist.broadcast(t, src=src, group=group)
    return t


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        return _raw_all_reduce(x.detach().clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # total loss = Σ_p L_p(y) and y = Σ_q x_q  ⇒  dL/dx_q = Σ_p dL_p/dy  (all-reduce of the gradients)
        return _raw_all_reduce(grad.detach().clone(), ctx.group, backward=True), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce(sum): forward y = Σ_p x_p on every rank, backward all-reduce of grads.

    Identity (no communication) when ``group`` is None or has one rank.
    """
    if group is None:
        return x
    return _AllReduceSum.apply(x, group)


def sp_bytes_per_call(batch: int, dim: int, rank: int, method: str = "randomized", *, oversample: int = 8,
                      power_iters: int = 2, element_size: int = 4, backward: bool = False) -> int:
    """Bytes all-reduced by one ``compact_interests`` call under sequence parallelism (per rank).

    Independent of the sequence length N by construction.  Matches what :data:`COMM_STATS` records
    (forward; with ``backward=True`` the backward all-reduce of the gradients of Z and Σ h_j is added).
    Counts: row sums + valid counts (D+1), then
      - gram:       HᵀH (D²) and the refined ‖H v_i‖² (r),
      - randomized: (q+1) sketch products HᵀY (D·l each) and YᵀY (l², float64), l = min(D, r+p),
      - exact:      not supported under sp (raises).
    All small quantities are reduced in float64 (8 bytes) where noted in the implementation.
    """
    b = batch
    total = b * (dim + 1) * element_size                       # [Σ h_j, n_valid]
    if method == "gram":
        total += b * dim * dim * element_size                  # HᵀH
        total += b * rank * 8                                  # ‖H v_i‖² (float64)
    elif method == "randomized":
        ell = min(dim, rank + oversample)
        total += (power_iters + 1) * b * dim * ell * element_size  # HᵀY sketches
        total += b * ell * ell * 8                                # YᵀY, float64
    else:
        raise ValueError(f"method must be one of 'gram', 'randomized' under sequence parallelism, got {method!r}")
    if backward:
        total += b * (rank * dim + dim) * element_size         # one all-reduce of [dL/dZ, dL/d(Σ h_j)]
    return total
