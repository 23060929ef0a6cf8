"""SVD-Attention ops (design: shared/design/svd_attention.md).

- :func:`compact_interests` / :func:`compact_interests_ex`: the r compact interests Z = U_rᵀH of each user.
- :class:`SVDAttention` and baselines (:class:`ExactAttention`, :class:`LinearAttention`,
  :class:`TruncatedAttention`, :class:`OracleAttention`), :func:`make_attention`.
- :mod:`solar_dist.ops.collectives`: differentiable all-reduce and byte counter for sequence parallelism.
- :mod:`solar_dist.ops.reference`: slow reference twin (tests / oracle only).
"""
from .attention import (
    ATTENTION_KINDS,
    ExactAttention,
    LinearAttention,
    OracleAttention,
    SVDAttention,
    TruncatedAttention,
    make_attention,
    masked_softmax,
)
from .collectives import COMM_STATS, CommStats, all_reduce_sum, sp_bytes_per_call
from .interests import BASIS_GRADS, METHODS, SCALES, Interests, compact_interests, compact_interests_ex, default_tol

__all__ = [
    "compact_interests",
    "compact_interests_ex",
    "Interests",
    "default_tol",
    "METHODS",
    "SCALES",
    "BASIS_GRADS",
    "SVDAttention",
    "ExactAttention",
    "LinearAttention",
    "TruncatedAttention",
    "OracleAttention",
    "make_attention",
    "ATTENTION_KINDS",
    "masked_softmax",
    "COMM_STATS",
    "CommStats",
    "all_reduce_sum",
    "sp_bytes_per_call",
]
