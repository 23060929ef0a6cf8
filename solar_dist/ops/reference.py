"""Plain, obviously-correct reference twin of :mod:`solar_dist.ops` (tests and oracle only; slow).

Per-user Python loops, ``torch.linalg.svd`` in float64, explicit softmax.  No tricks, no custom autograd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ref_compact_interests", "ref_mha", "ref_svd_attention", "ref_exact_attention", "ref_causal_attention",
           "ref_reconstruct", "ref_mass"]


def ref_compact_interests(h, mask, rank, scale="sqrt_n", tol=None):
    """Reference interests: returns (z, alive, mass, sigma, V) per the definition in design §1.

    z (B,r,D) float64, alive (B,r) bool, mass (B,r), sigma (B,r), V (B,D,r) right singular vectors (0 if dead).
    """
    B, N, D = h.shape
    if tol is None:
        tol = 1e-10 if h.dtype == torch.float64 else 1e-4
    z = torch.zeros(B, rank, D, dtype=torch.float64)
    alive = torch.zeros(B, rank, dtype=torch.bool)
    mass = torch.zeros(B, rank, dtype=torch.float64)
    sigma = torch.zeros(B, rank, dtype=torch.float64)
    V = torch.zeros(B, D, rank, dtype=torch.float64)
    for b in range(B):
        Hu = h[b][mask[b]].detach().to(torch.float64).cpu()      # (n, D) valid rows only
        n = Hu.shape[0]
        if n == 0:
            continue
        U, S, Vh = torch.linalg.svd(Hu, full_matrices=False)
        s_tot = Hu.sum(0)
        k = min(rank, S.shape[0])
        s1 = S[0].item()
        for i in range(k):
            if not (s1 > 0 and S[i].item() > tol * s1):
                continue
            u, v, sv = U[:, i], Vh[i], S[i]
            if torch.dot(v, s_tot) < 0:
                u, v = -u, -v
            alive[b, i] = True
            sigma[b, i] = sv
            zi = sv * v
            if scale == "sqrt_n":
                zi = zi / math.sqrt(n)
            z[b, i] = zi
            V[b, :, i] = v
            mass[b, i] = min(1.0, (u.sum() ** 2 / n).item())
    return z, alive, mass, sigma, V


def ref_reconstruct(h, mask, rank):
    """Rank-r truncated SVD reconstruction U_r Σ_r V_rᵀ of each user's valid rows (float64, zeros at padding)."""
    B, N, D = h.shape
    out = torch.zeros(B, N, D, dtype=torch.float64)
    for b in range(B):
        idx = mask[b].nonzero().flatten()
        Hu = h[b, idx].to(torch.float64)
        if Hu.shape[0] == 0:
            continue
        U, S, Vh = torch.linalg.svd(Hu, full_matrices=False)
        k = min(rank, S.shape[0])
        out[b, idx] = (U[:, :k] * S[:k]) @ Vh[:k]
    return out


def ref_mass(h, mask, rank):
    return ref_compact_interests(h, mask, rank)[2]


def _lin(x, layer):
    w = layer.weight.to(torch.float64)
    b = layer.bias.to(torch.float64) if layer.bias is not None else None
    return F.linear(x.to(torch.float64), w, b)


def ref_mha(module, query, kv, kv_mask, kv_bias=None, query_mask=None, use_sdpa=True):
    """Multi-head attention with ``module``'s q/k/v/out projections in float64, user by user.

    kv (B,K,D) tokens, kv_mask (B,K) bool, kv_bias (B,K) additive bias.  Rows with no valid key -> 0.
    ``use_sdpa`` uses torch SDPA per user (design §5.1), otherwise an explicit softmax.
    """
    B, L, D = query.shape
    h = module.num_heads
    dh = D // h
    out = torch.zeros(B, L, D, dtype=torch.float64)
    for b in range(B):
        keep = kv_mask[b]
        if not bool(keep.any()):
            continue
        x = query[b].to(torch.float64)
        t = kv[b][keep].to(torch.float64)
        q = _lin(x, module.q_proj).view(L, h, dh).transpose(0, 1)            # (h,L,dh)
        k = _lin(t, module.k_proj).view(-1, h, dh).transpose(0, 1)
        v = _lin(t, module.v_proj).view(-1, h, dh).transpose(0, 1)
        bias = None
        if kv_bias is not None:
            bias = kv_bias[b][keep].to(torch.float64)[None, None, :].expand(h, L, -1)
        if use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            sc = q @ k.transpose(-1, -2) / math.sqrt(dh)
            if bias is not None:
                sc = sc + bias
            sc = sc - sc.max(-1, keepdim=True).values
            p = sc.exp()
            p = p / p.sum(-1, keepdim=True)
            o = p @ v
        o = o.transpose(0, 1).reshape(L, D)
        out[b] = _lin(o, module.out_proj)
    if query_mask is not None:
        out = out * query_mask[..., None].to(torch.float64)
    return out


def _cat_extra(kv, kv_mask, kv_bias, extra_kv, extra_mask):
    if extra_kv is None:
        return kv, kv_mask, kv_bias
    kv = torch.cat([kv.to(torch.float64), extra_kv.to(torch.float64)], 1)
    kv_mask = torch.cat([kv_mask, extra_mask], 1)
    if kv_bias is not None:
        kv_bias = torch.cat([kv_bias, torch.zeros(extra_kv.shape[:2], dtype=kv_bias.dtype)], 1)
    return kv, kv_mask, kv_bias


def ref_svd_attention(module, query, memory, memory_mask, query_mask=None, extra_kv=None, extra_mask=None,
                      use_sdpa=True, tol=None):
    """Reference SVD-Attention: reference interests, then standard MHA over them (+ extra tokens)."""
    z, alive, mass, _, _ = ref_compact_interests(memory, memory_mask, module.rank,
                                                 scale=module.interest_scale, tol=tol)
    bias = None
    if module.mass_bias:
        bias = torch.where(alive, mass.clamp_min(1e-30).log(), torch.zeros_like(mass))
    if extra_kv is not None and extra_mask is None:
        extra_mask = torch.ones(extra_kv.shape[:2], dtype=torch.bool)
    kv, kv_mask, kv_bias = _cat_extra(z, alive, bias, extra_kv, extra_mask)
    return ref_mha(module, query, kv, kv_mask, kv_bias, query_mask, use_sdpa=use_sdpa)


def ref_exact_attention(module, query, memory, memory_mask, query_mask=None, extra_kv=None, extra_mask=None):
    """Reference exact softmax attention over all valid memory rows (+ extra tokens)."""
    if extra_kv is not None and extra_mask is None:
        extra_mask = torch.ones(extra_kv.shape[:2], dtype=torch.bool)
    kv, kv_mask, _ = _cat_extra(memory.to(torch.float64), memory_mask, None, extra_kv, extra_mask)
    return ref_mha(module, query, kv, kv_mask, None, query_mask, use_sdpa=False)


def ref_causal_attention(module, x, mask, window, rel_bias=None, kind="svd", tol=None, far_bias=False,
                         window_mode="sliding"):
    """Reference of :func:`solar_dist.ops.causal.causal_attention`, position by position in float64.

    Position t of user b attends to: (``svd``) the reference interests of x[b, :(t // window) * window] and the
    tokens s in [t - window + 1, t]; (``truncate``) those tokens only; (``exact``) every s <= t. With
    window_mode="chunks" (``svd``) the interests of x[b, :(t // window - 1) * window] and every token from there
    to t instead. Offset t - s gets rel_bias[:, min(t - s, window)]; with `far_bias` every interest gets
    rel_bias[:, window] too."""
    B, N, D = x.shape
    h = module.num_heads
    dh = D // h
    out = torch.zeros(B, N, D, dtype=torch.float64)
    bias_tab = rel_bias.detach().to(torch.float64) if rel_bias is not None else torch.zeros(h, window + 1,
                                                                                             dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())
        xb = x[b, :n].detach().to(torch.float64)
        for t in range(n):
            split = max(0, (t // window - 1) * window)  # chunks: where the interests end and the tokens begin
            lo = 0 if kind == "exact" else split if window_mode == "chunks" else max(0, t - window + 1)
            toks = xb[lo: t + 1]
            offs = t - torch.arange(lo, t + 1)
            tok_bias = bias_tab[:, offs.clamp(max=window)]                     # (h, K)
            kv, kv_bias = toks, tok_bias
            if kind == "svd":
                start = split if window_mode == "chunks" else (t // window) * window
                if start > 0:
                    z, alive, mass, _, _ = ref_compact_interests(xb[None, :start], torch.ones(1, start, dtype=torch.bool),
                                                                 module.rank, scale=module.interest_scale, tol=tol)
                    zb = z[0][alive[0]]
                    ib = (mass[0][alive[0]].clamp_min(1e-30).log() if module.mass_bias
                          else torch.zeros(zb.shape[0], dtype=torch.float64))
                    ib = ib[None, :].expand(h, -1)
                    if far_bias:
                        ib = ib + bias_tab[:, window, None]
                    kv = torch.cat([zb, toks], 0)
                    kv_bias = torch.cat([ib, tok_bias], 1)
            q = _lin(xb[t: t + 1], module.q_proj).view(1, h, dh).transpose(0, 1)  # (h,1,dh)
            k = _lin(kv, module.k_proj).view(-1, h, dh).transpose(0, 1)          # (h,K,dh)
            v = _lin(kv, module.v_proj).view(-1, h, dh).transpose(0, 1)
            sc = q @ k.transpose(-1, -2) / math.sqrt(dh) + kv_bias[:, None, :]
            p = torch.softmax(sc, -1)
            o = (p @ v).transpose(0, 1).reshape(1, D)
            out[b, t] = _lin(o, module.out_proj)[0]
    return out
