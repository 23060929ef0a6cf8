"""SVD-Attention (design §2) and the baselines shipped beside it (design §6).

All modules share one constructor / forward signature::

    m = make_attention(kind, dim, num_heads, rank, **kw)
    out = m(query, memory, memory_mask, query_mask=None, extra_kv=None, extra_mask=None, sp_group=None)

- ``query`` (B, L, D): candidates (target attention) or the sequence itself (self-attention, L = N).
- ``memory`` (B, N, D): behaviour representation H, ``memory_mask`` (B, N) bool (True = valid row).
  **Assumption**: memory rows are in chronological order with the padding at the end (valid rows first per
  user).  Only :class:`TruncatedAttention` depends on the order ("last k valid rows" = the k valid rows with the
  largest positions, whatever the padding layout); the others are permutation-invariant over behaviours.
- ``extra_kv`` (B, k, D) / ``extra_mask`` (B, k): extra key/value tokens (e.g. the last k events, design §8)
  that join the *same* softmax, projected with the same W_K / W_V.
- ``query_mask`` (B, L): padded query rows output 0.  A query row whose every key is masked outputs 0.

Output (B, L, D).  The four projections are ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (nn.Linear D→D).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .collectives import COMM_STATS
from .interests import BASIS_GRADS, METHODS, SCALES, compact_interests_ex

__all__ = [
    "SVDAttention",
    "ExactAttention",
    "LinearAttention",
    "TruncatedAttention",
    "OracleAttention",
    "make_attention",
    "ATTENTION_KINDS",
    "masked_softmax",
]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask`` (True = keep); all-masked rows give all zeros (no NaN)."""
    s = scores.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def _fast_masked_softmax(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Fused softmax; masked keys get the dtype's lowest finite value, so exp underflows to exactly 0 whenever a
    row has one valid key.  Rows with no valid key come out uniform: callers must zero them (``_finish``)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, -1)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


class _AttentionBase(nn.Module):
    """Shared constructor, input checks and the small-key-set multi-head attention kernel."""

    kind = "base"

    def __init__(self, dim: int, num_heads: int, rank: int = 16, *, svd_method: str = "randomized",
                 interest_scale: str = "sqrt_n", basis_grad: str = "full", mass_bias: bool = False,
                 tol: Optional[float] = None, oversample: int = 8, power_iters: int = 2, bias: bool = True,
                 truncate_k: int = 64):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim (= {dim}), got {num_heads!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= dim):
            raise ValueError(f"rank must be an int with 1 <= rank <= dim (= {dim}), got {rank!r}")
        _check_choice("svd_method", svd_method, METHODS)
        _check_choice("interest_scale", interest_scale, SCALES)
        _check_choice("basis_grad", basis_grad, BASIS_GRADS)
        if isinstance(truncate_k, bool) or not isinstance(truncate_k, int) or truncate_k < 1:
            raise ValueError(f"truncate_k must be a positive int, got {truncate_k!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample must be an int >= 0, got {oversample!r}")
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
            raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rank = rank
        self.svd_method = svd_method
        self.interest_scale = interest_scale
        self.basis_grad = basis_grad
        self.mass_bias = bool(mass_bias)
        self.tol = tol
        self.oversample = oversample
        self.power_iters = power_iters
        self.truncate_k = truncate_k
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        #: "auto" | "folded" | "standard": kernel for small key sets (tests force both)
        self.small_kernel = "auto"
        self.last_comm_bytes = 0

    # ------------------------------------------------------------------ checks
    def _check_inputs(self, query, memory, memory_mask, query_mask, extra_kv, extra_mask):
        D = self.dim
        if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[-1] != D:
            raise ValueError(f"query must have shape (B, L, {D}), got {tuple(getattr(query, 'shape', ()))}")
        B, L, _ = query.shape
        if not isinstance(memory, torch.Tensor) or memory.dim() != 3 or memory.shape[0] != B or memory.shape[-1] != D:
            raise ValueError(f"memory must have shape ({B}, N, {D}), got {tuple(getattr(memory, 'shape', ()))}")
        N = memory.shape[1]
        if not isinstance(memory_mask, torch.Tensor) or tuple(memory_mask.shape) != (B, N) \
                or memory_mask.dtype != torch.bool:
            raise ValueError(f"memory_mask must be a bool tensor of shape {(B, N)}, got "
                             f"{tuple(getattr(memory_mask, 'shape', ()))} {getattr(memory_mask, 'dtype', '')}")
        if query_mask is not None and (tuple(query_mask.shape) != (B, L) or query_mask.dtype != torch.bool):
            raise ValueError(f"query_mask must be a bool tensor of shape {(B, L)}, got "
                             f"{tuple(query_mask.shape)} {query_mask.dtype}")
        if extra_kv is not None:
            if extra_kv.dim() != 3 or extra_kv.shape[0] != B or extra_kv.shape[-1] != D:
                raise ValueError(f"extra_kv must have shape ({B}, k, {D}), got {tuple(extra_kv.shape)}")
            if extra_mask is None:
                extra_mask = torch.ones(extra_kv.shape[:2], dtype=torch.bool, device=extra_kv.device)
            elif tuple(extra_mask.shape) != tuple(extra_kv.shape[:2]) or extra_mask.dtype != torch.bool:
                raise ValueError(f"extra_mask must be a bool tensor of shape {tuple(extra_kv.shape[:2])}, got "
                                 f"{tuple(extra_mask.shape)} {extra_mask.dtype}")
        elif extra_mask is not None:
            raise ValueError("extra_mask given without extra_kv")
        return extra_mask

    @staticmethod
    def _join(kv, kv_mask, kv_bias, extra_kv, extra_mask):
        if extra_kv is None:
            return kv, kv_mask, kv_bias
        kv = torch.cat([kv, extra_kv.to(kv.dtype)], 1)
        kv_mask = torch.cat([kv_mask, extra_mask], 1)
        if kv_bias is not None:
            kv_bias = torch.cat([kv_bias, kv_bias.new_zeros(extra_kv.shape[:2])], 1)
        return kv, kv_mask, kv_bias

    def _no_sp(self, sp_group):
        if sp_group is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support sp_group (only SVDAttention does)")

    def _full_kv(self, query, memory, memory_mask, query_mask, extra_kv, extra_mask, sp_group):
        """Baselines over the whole memory: checks, memory + extra tokens joined, masked rows zeroed."""
        self._no_sp(sp_group)
        extra_mask = self._check_inputs(query, memory, memory_mask, query_mask, extra_kv, extra_mask)
        kv, kv_mask, _ = self._join(memory, memory_mask, None, extra_kv, extra_mask)
        kv = torch.where(kv_mask[..., None], kv, torch.zeros((), dtype=kv.dtype, device=kv.device))
        return kv, kv_mask

    @staticmethod
    def _finish(y, kv_mask, query_mask):
        """Zero the rows of users with no valid key at all, and padded query rows (skipped when nothing to do)."""
        has = kv_mask.any(-1)
        if query_mask is None and bool(has.all()):
            return y
        keep = has.to(y.dtype)[:, None, None]
        if query_mask is not None:
            keep = keep * query_mask[..., None].to(y.dtype)
        return y * keep

    # ------------------------------------------------------------------ kernels
    def _attend_small(self, x, kv, kv_mask, kv_bias=None, query_mask=None):
        """Multi-head softmax attention of queries x (B,L,D) over a small key set kv (B,K,D).

        Two equivalent kernels.  ``standard``: Q = xW_Qᵀ (L·D²), scores, A·V, W_O (L·D²).  ``folded``: W_Q and
        W_O are folded into the K tokens, scores = x·[W_Q,hᵀ K_hᵀ]_h (L·D·h·K) and out = P·[V_h W_O,hᵀ]_h
        (L·h·K·D): cheaper when h·K < D + K, i.e. for r interests and few extra tokens; no (B,h,L,d_h) copies.
        """
        B, L, D = x.shape
        K = kv.shape[1]
        h, dh = self.num_heads, self.head_dim
        scale = 1.0 / math.sqrt(dh)
        kernel = self.small_kernel
        if kernel == "auto":
            kernel = "folded" if h * K < D + K else "standard"
        kp = self.k_proj(kv).view(B, K, h, dh)
        vp = self.v_proj(kv).view(B, K, h, dh)
        mask4 = kv_mask[:, None, None, :]
        all_keys = bool(kv_mask.all())
        if kernel == "folded":
            Wq = self.q_proj.weight.view(h, dh, D)
            ks = kp * scale
            A = torch.einsum("hed,bnhe->bdhn", Wq, ks).reshape(B, D, h * K)
            if self.q_proj.bias is not None:
                bq = torch.einsum("he,bnhe->bhn", self.q_proj.bias.view(h, dh), ks).reshape(B, 1, h * K)
                s = torch.baddbmm(bq, x, A)                                   # (B,L,h*K)
            else:
                s = torch.bmm(x, A)
            s = s.view(B, L, h, K)
            if kv_bias is not None:
                s = s + kv_bias[:, None, None, :]
            p = _fast_masked_softmax(s, None if all_keys else kv_mask[:, None, None, :])   # (B,L,h,K)
            Wo = self.out_proj.weight.view(D, h, dh)
            Vo = torch.einsum("bnhe,dhe->bhnd", vp, Wo).reshape(B, h * K, D)
            if self.out_proj.bias is not None:
                y = torch.baddbmm(self.out_proj.bias.expand(B, 1, D), p.reshape(B, L, h * K), Vo)
            else:
                y = torch.bmm(p.reshape(B, L, h * K), Vo)
        else:
            q = self.q_proj(x).view(B, L, h, dh).transpose(1, 2)             # (B,h,L,dh)
            s = torch.matmul(q, kp.permute(0, 2, 3, 1)) * scale               # (B,h,L,K)
            if kv_bias is not None:
                s = s + kv_bias[:, None, None, :]
            p = _fast_masked_softmax(s, None if all_keys else mask4)
            o = torch.matmul(p, vp.transpose(1, 2))                           # (B,h,L,dh)
            y = self.out_proj(o.transpose(1, 2).reshape(B, L, D))
        return self._finish(y, kv_mask, query_mask)

    def _attend_sdpa(self, x, kv, kv_mask, query_mask=None):
        """Exact attention over a large key set with torch SDPA (O(L·K) scores, fused kernel where available)."""
        B, L, D = x.shape
        K = kv.shape[1]
        h, dh = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, L, h, dh).transpose(1, 2)
        k = self.k_proj(kv).view(B, K, h, dh).transpose(1, 2)
        v = self.v_proj(kv).view(B, K, h, dh).transpose(1, 2)
        has = kv_mask.any(-1)
        m = kv_mask | ~has[:, None]                                           # avoid all-masked rows (NaN)
        if bool(m.all()):
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])
        y = self.out_proj(o.transpose(1, 2).reshape(B, L, D))
        return self._finish(y, kv_mask, query_mask)


class SVDAttention(_AttentionBase):
    """SVD-Attention: multi-head softmax attention of the queries over the user's r compact interests
    (+ optional extra tokens), design §2.  One factorisation of ``memory`` per call serves all heads and queries.

    ``last_comm_bytes``: bytes all-reduced by the last forward under ``sp_group`` (0 without); independent of N.
    """

    kind = "svd"

    def interests(self, memory, memory_mask, sp_group=None):
        return compact_interests_ex(memory, memory_mask, self.rank, self.svd_method, self.interest_scale,
                                    basis_grad=self.basis_grad, tol=self.tol, oversample=self.oversample,
                                    power_iters=self.power_iters, sp_group=sp_group)

    def interest_bias(self, it):
        """(B, r) additive score bias of the interests: log m_i with `mass_bias` (0 on dead components), else
        None."""
        if not self.mass_bias:
            return None
        return torch.where(it.alive, it.mass.clamp_min(1e-30).log(), torch.zeros_like(it.mass))

    def forward(self, query, memory, memory_mask, *, query_mask=None, extra_kv=None, extra_mask=None,
                sp_group=None):
        extra_mask = self._check_inputs(query, memory, memory_mask, query_mask, extra_kv, extra_mask)
        before = COMM_STATS.bytes_all_reduced
        it = self.interests(memory, memory_mask, sp_group)
        self.last_comm_bytes = COMM_STATS.bytes_all_reduced - before
        bias = self.interest_bias(it)
        kv, kv_mask, kv_bias = self._join(it.z.to(query.dtype), it.alive, bias, extra_kv, extra_mask)
        return self._attend_small(query, kv, kv_mask, kv_bias, query_mask)


class ExactAttention(_AttentionBase):
    """Exact softmax attention over all valid memory rows (+ extra tokens) with torch SDPA: O(L·N·D)."""

    kind = "sdpa"

    def forward(self, query, memory, memory_mask, *, query_mask=None, extra_kv=None, extra_mask=None,
                sp_group=None):
        kv, kv_mask = self._full_kv(query, memory, memory_mask, query_mask, extra_kv, extra_mask, sp_group)
        return self._attend_sdpa(query, kv, kv_mask, query_mask)


class LinearAttention(_AttentionBase):
    """Linear attention (Katharopoulos et al.): φ(x) = elu(x)+1, out = φ(Q)(φ(K)ᵀV) / φ(Q)·Σφ(K); no softmax.
    Extra tokens are appended to the key/value set.  O((L+N)·d_h·D)."""

    kind = "linear"

    def forward(self, query, memory, memory_mask, *, query_mask=None, extra_kv=None, extra_mask=None,
                sp_group=None):
        kv, kv_mask = self._full_kv(query, memory, memory_mask, query_mask, extra_kv, extra_mask, sp_group)
        B, L, D = query.shape
        K = kv.shape[1]
        h, dh = self.num_heads, self.head_dim
        q = F.elu(self.q_proj(query).view(B, L, h, dh).transpose(1, 2)) + 1          # (B,h,L,dh)
        k = F.elu(self.k_proj(kv).view(B, K, h, dh).transpose(1, 2)) + 1
        k = k * kv_mask[:, None, :, None].to(k.dtype)
        v = self.v_proj(kv).view(B, K, h, dh).transpose(1, 2)
        kvm = torch.matmul(k.transpose(-1, -2), v)                                    # (B,h,dh,dh)
        ksum = k.sum(-2)                                                              # (B,h,dh)
        num = torch.matmul(q, kvm)
        den = torch.matmul(q, ksum[..., None])
        o = num / torch.where(den > 0, den, torch.ones_like(den))
        y = self.out_proj(o.transpose(1, 2).reshape(B, L, D))
        return self._finish(y, kv_mask, query_mask)


class TruncatedAttention(_AttentionBase):
    """Exact softmax attention over the last ``truncate_k`` valid memory rows (+ extra tokens).

    "Last" = largest positions among the valid rows (memory is chronological), whatever the padding layout."""

    kind = "truncate"

    def forward(self, query, memory, memory_mask, *, query_mask=None, extra_kv=None, extra_mask=None,
                sp_group=None):
        self._no_sp(sp_group)
        extra_mask = self._check_inputs(query, memory, memory_mask, query_mask, extra_kv, extra_mask)
        B, N, D = memory.shape
        k = min(self.truncate_k, N)
        if k == 0:
            rows = memory.new_zeros(B, 0, D)
            valid = memory_mask.new_zeros(B, 0)
        else:
            pos = memory_mask.cumsum(1)                                         # 1-based index among valid
            key = torch.where(memory_mask, pos, torch.zeros_like(pos))
            vals, idx = key.topk(k, dim=1)
            valid = vals > 0
            rows = torch.gather(memory, 1, idx[..., None].expand(B, k, D))
            rows = torch.where(valid[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        kv, kv_mask, _ = self._join(rows, valid, None, extra_kv, extra_mask)
        return self._attend_small(query, kv, kv_mask, None, query_mask)


class OracleAttention(_AttentionBase):
    """U-factored exact form (test oracle, not a fast path): softmax over all N rows with keys U_r·(Z·W_K) and
    values U_r·(Z·W_V), i.e. exact attention over the rank-r reconstruction H_r = U_r Z = H V_r V_rᵀ.
    Equals :class:`ExactAttention` when rank(H) <= r.  O(L·N·D)."""

    kind = "oracle"

    def forward(self, query, memory, memory_mask, *, query_mask=None, extra_kv=None, extra_mask=None,
                sp_group=None):
        self._no_sp(sp_group)
        extra_mask = self._check_inputs(query, memory, memory_mask, query_mask, extra_kv, extra_mask)
        it = compact_interests_ex(memory, memory_mask, self.rank, self.svd_method, "none",
                                  basis_grad=self.basis_grad, tol=self.tol, oversample=self.oversample,
                                  power_iters=self.power_iters)
        nrm = it.z.norm(dim=-1, keepdim=True)
        Vr = torch.where(it.alive[..., None], it.z / torch.where(it.alive[..., None], nrm, torch.ones_like(nrm)),
                         torch.zeros_like(it.z))                                  # (B,r,D) rows v_iᵀ
        hm = torch.where(memory_mask[..., None], memory, torch.zeros((), dtype=memory.dtype, device=memory.device))
        Ur_Z = torch.matmul(torch.matmul(hm, Vr.mT), Vr)                          # U_r Z = H V_r V_rᵀ
        kv, kv_mask, _ = self._join(Ur_Z, memory_mask, None, extra_kv, extra_mask)
        return self._attend_sdpa(query, kv, kv_mask, query_mask)


ATTENTION_KINDS = {
    "svd": SVDAttention,
    "sdpa": ExactAttention,
    "linear": LinearAttention,
    "truncate": TruncatedAttention,
    "oracle": OracleAttention,
}


def make_attention(kind: str, dim: int, num_heads: int, rank: int = 16, **kw) -> _AttentionBase:
    """Build an attention module: kind ∈ {"svd", "sdpa", "linear", "truncate", "oracle"}."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind must be one of {list(ATTENTION_KINDS)}, got {kind!r}")
    return ATTENTION_KINDS[kind](dim, num_heads, rank, **kw)
