"""Causal attention of a sequence over its own past: next-item training at every position (design §7).

In ranking every candidate comes after the history, so SVD-Attention may summarise the whole history. When
every position t of a sequence predicts event t+1 (SASRec-style training, one pass per user instead of one
sample per cut point), position t may only see events <= t. Three kinds, one signature
(`causal_attention(attn, x, mask, window, rel_bias, kind)`), all with the projections of an attention module:

  ``svd``       chunked-causal SVD-Attention. The sequence is cut into chunks of `window` (= C) positions.
                Position t in chunk j = t // C attends, in one softmax, to
                  * the r compact interests of the prefix [0, jC) (see `prefix` below for how), and
                  * the exact tokens of the sliding window [t-C+1, t] (itself included), with a learned
                    per-head bias for each offset t-s in [0, C).
                With ``far_bias`` the interests, which stand for the events older than the window, get the
                learned bias of offset `window`, as the ``exact`` kind gives its older tokens.
                The window overlaps the prefix: events in [t-C+1, jC) enter both the interests and the window.
                ``window_mode="chunks"`` removes that double count: position t sees the interests of [0, (j-1)C)
                and the exact tokens of chunks j-1 and j up to t (the last C..2C-1 events; offsets >= C get the
                far bias, as in ``exact``). It costs the same (the window scores already span both chunks) and
                equals ``exact`` on every sequence of at most 2C events.
                Nothing at or after the chunk boundary jC enters the interests, and nothing after t enters the
                window, so no event after t reaches position t (tests check gradients are exactly zero).
                Cost per user: O(N·C·D) for the windows plus the interests of N/C prefixes. By default
                (``prefix="cumulative"``) these come from running sums of per-chunk Gram matrices, one D×D
                eigh per boundary: O(N·D² + (N/C)·D³), linear in N. ``prefix="recompute"`` factorises each
                prefix with the module's svd_method instead, O(N²/C·D·r).
  ``exact``     the baseline: exact causal softmax over all s <= t; offsets < C get the same learned bias,
                older ones one shared "far" bias. O(N²·D) time; long sequences run in query blocks with
                activation checkpointing (EXACT_BLOCK_SCORES), so memory does not grow as B·h·N².
  ``truncate``  the window alone (the last C events): last-k truncation.

At the last position of a sequence (what evaluation uses) ``svd`` sees the interests of every event before the
last chunk plus the last C events exactly: the ranking tower's "interests + recent window" (design §8).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .interests import prefix_interests

CAUSAL_KINDS = ("svd", "exact", "truncate")
CAUSAL_PREFIXES = ("cumulative", "recompute")
#: which exact tokens position t in chunk j sees beside the interests: "sliding" [t-C+1, t] with the interests of
#: [0, jC) (the two overlap); "chunks" chunks j-1 and j up to t with the interests of [0, (j-1)C) (no overlap)
WINDOW_MODES = ("sliding", "chunks")
#: what the loss's gradient reaches through the interests (svd kind): "full"; "eigenvalues" (cumulative prefix:
#: the eigenvectors held constant, ops/interests.PREFIX_GRADS); "none" (the interests enter as constants: their
#: keys and values still train the k/v projections, but nothing flows back into the tokens they summarise)
INTEREST_GRADS = ("full", "eigenvalues", "none")


def _check(attn, x: torch.Tensor, mask: torch.Tensor, window: int, rel_bias: Optional[torch.Tensor], kind: str):
    if kind not in CAUSAL_KINDS:
        raise ValueError(f"kind must be one of {list(CAUSAL_KINDS)}, got {kind!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != attn.dim:
        raise ValueError(f"x must have shape (B, N, {attn.dim}), got {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(x.shape[:2]) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got "
                         f"{tuple(getattr(mask, 'shape', ()))} {getattr(mask, 'dtype', '')}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if rel_bias is not None and tuple(rel_bias.shape) != (attn.num_heads, window + 1):
        raise ValueError(f"rel_bias must have shape (num_heads, window + 1) = {(attn.num_heads, window + 1)}, "
                         f"got {tuple(rel_bias.shape)}")
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("mask must mark a left-aligned prefix of valid positions in every row (padding only at "
                         "the end): causal positions are the row's own order")


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    return t.view(*t.shape[:-1], h, t.shape[-1] // h)


def causal_attention(attn, x: torch.Tensor, mask: torch.Tensor, window: int,
                     rel_bias: Optional[torch.Tensor] = None, kind: str = "svd", prefix: str = "cumulative",
                     far_bias: bool = False, interest_grad: str = "full", window_mode: str = "sliding") -> torch.Tensor:
    """x (B, N, D): queries, keys and values are the sequence's own tokens; mask (B, N) left-aligned valid
    positions. `attn`: an attention module (its q/k/v/out projections, heads and, for ``svd``, `interests`).
    `rel_bias` (h, window + 1): additive score bias per head for offsets 0..window-1, last entry for older
    tokens (``exact``), and for the interests with `far_bias` (``svd``). `prefix` (``svd``): ``cumulative``
    computes the prefix interests from running Gram sums (ops/interests.prefix_interests; basis_grad must be
    "full"); ``recompute`` calls the module's `interests` (its svd_method) on each prefix. `interest_grad`
    (INTEREST_GRADS, ``svd``): how much of the gradient flows back through the interests; the forward is the
    same for all three. `window_mode` (WINDOW_MODES, ``svd``): "sliding" or "chunks" (see the module docstring).
    Returns (B, N, D);
    padded positions are zero."""
    _check(attn, x, mask, window, rel_bias, kind)
    if far_bias and rel_bias is None:
        raise ValueError("far_bias=True adds rel_bias[:, window] to the interests' scores; rel_bias is None")
    if prefix not in CAUSAL_PREFIXES:
        raise ValueError(f"prefix must be one of {list(CAUSAL_PREFIXES)}, got {prefix!r}")
    if interest_grad not in INTEREST_GRADS:
        raise ValueError(f"interest_grad must be one of {list(INTEREST_GRADS)}, got {interest_grad!r}")
    if window_mode not in WINDOW_MODES:
        raise ValueError(f"window_mode must be one of {list(WINDOW_MODES)}, got {window_mode!r}")
    if window_mode != "sliding" and kind != "svd":
        raise ValueError(f"window_mode={window_mode!r} splits the history between the interests and the window; "
                         f"kind={kind!r} has no interests (use window_mode='sliding')")
    if kind == "svd" and interest_grad == "eigenvalues" and prefix != "cumulative":
        raise ValueError("interest_grad='eigenvalues' holds the Gram eigenvectors constant and needs "
                         f"prefix='cumulative', got prefix={prefix!r}")
    if kind == "svd" and prefix == "cumulative" and attn.basis_grad != "full":
        raise ValueError(f"prefix='cumulative' differentiates through the basis (basis_grad='full'); the module "
                         f"has basis_grad={attn.basis_grad!r}: use prefix='recompute'")
    if kind == "exact":
        return _exact(attn, x, mask, window, rel_bias)
    B, N, D = x.shape
    h, dh, C = attn.num_heads, attn.head_dim, window
    nC = max(1, -(-N // C))
    Np = nC * C
    if Np != N:
        x = F.pad(x, (0, 0, 0, Np - N))
        mask = F.pad(mask, (0, Np - N))
    xm = x * mask[..., None].to(x.dtype)
    q = _heads(attn.q_proj(xm), h).view(B, nC, C, h, dh)
    k = _heads(attn.k_proj(xm), h).view(B, nC, C, h, dh)
    v = _heads(attn.v_proj(xm), h).view(B, nC, C, h, dh)
    mc = mask.view(B, nC, C)
    # window keys of chunk j: chunks j-1 and j (2C tokens), band-masked to offsets 0..C-1
    zk, zm = k.new_zeros(B, 1, C, h, dh), mc.new_zeros(B, 1, C)
    kw = torch.cat([torch.cat([zk, k[:, :-1]], 1), k], 2)                 # (B,nC,2C,h,dh)
    vw = torch.cat([torch.cat([zk, v[:, :-1]], 1), v], 2)
    mw = torch.cat([torch.cat([zm, mc[:, :-1]], 1), mc], 2)                # (B,nC,2C)
    a = torch.arange(C, device=x.device)
    b = torch.arange(2 * C, device=x.device)
    off = a[:, None] + C - b[None, :]                                      # t - s, (C, 2C)
    chunks = window_mode == "chunks"
    band = (off >= 0) if chunks else (off >= 0) & (off < C)  # chunks: every key of chunk j-1 and j up to t
    scale = 1.0 / math.sqrt(dh)
    s_win = torch.einsum("bjqhe,bjkhe->bjhqk", q, kw) * scale             # (B,nC,h,C,2C)
    if rel_bias is not None:  # offsets >= C (chunks only) get the far slot
        s_win = s_win + rel_bias[:, off.clamp(0, C)].to(s_win.dtype)[None, None]
    m_win = band[None, None, None] & mw[:, :, None, None, :]              # (B,nC,1,C,2C)
    if kind == "svd":
        r = attn.rank
        # chunk j reads the boundary jC (sliding) or (j-1)C (chunks): chunks shifts every prefix one chunk later
        lag = 2 if chunks else 1
        if prefix == "cumulative":  # every prefix [0, jC) from running Gram sums: O(N·D² + N/C·D³)
            # only boundaries whose reading chunk holds a query: in a batch of skewed lengths most lie past the end
            needed = F.pad(mc[:, lag:].any(-1), (0, lag - 1)) if nC > 1 else mc.new_zeros(B, 0)
            it = prefix_interests(xm, mask, r, C, attn.interest_scale, tol=attn.tol, needed=needed,
                                  grad="eigenvalues" if interest_grad == "eigenvalues" else "full")
            z = torch.cat([x.new_zeros(B, 1, r, D), it.z.to(x.dtype)], 1)  # (B,nC,r,D); chunk 0 has no past
            alive = torch.cat([mask.new_zeros(B, 1, r), it.alive], 1)
            if attn.mass_bias:
                bias = torch.cat([x.new_zeros(B, 1, r), attn.interest_bias(it).to(x.dtype)], 1)
        else:  # recompute each prefix with the module's own method (randomized / gram / exact)
            zs, alives, biases = [x.new_zeros(B, r, D)], [mask.new_zeros(B, r)], [x.new_zeros(B, r)]
            for j in range(1, nC):  # interests of the prefix [0, jC): rows at or after jC never enter
                if j > nC - lag:  # read by no chunk (chunks mode: the last boundary): left empty
                    zs.append(zs[0])
                    alives.append(alives[0])
                    biases.append(biases[0])
                    continue
                it = attn.interests(xm[:, : j * C], mask[:, : j * C])
                zs.append(it.z.to(x.dtype))
                alives.append(it.alive)
                biases.append(attn.interest_bias(it).to(x.dtype) if attn.mass_bias else biases[0])
            z, alive, bias = torch.stack(zs, 1), torch.stack(alives, 1), torch.stack(biases, 1)
        if chunks:  # chunk j gets the prefix [0, (j-1)C): one more chunk of the past goes to the window
            z, alive = F.pad(z[:, :-1], (0, 0, 0, 0, 1, 0)), F.pad(alive[:, :-1], (0, 0, 1, 0))
            if attn.mass_bias:
                bias = F.pad(bias[:, :-1], (0, 0, 1, 0))
        if interest_grad == "none":
            z = z.detach()
            if attn.mass_bias:
                bias = bias.detach()
        ki = _heads(attn.k_proj(z), h)                                     # (B,nC,r,h,dh)
        vi = _heads(attn.v_proj(z), h)
        s_int = torch.einsum("bjqhe,bjrhe->bjhqr", q, ki) * scale          # (B,nC,h,C,r)
        if attn.mass_bias:
            s_int = s_int + bias[:, :, None, None, :]
        if far_bias:  # the interests summarise the events older than the window: exact's "far" bias, per head
            s_int = s_int + rel_bias[:, C].to(s_int.dtype)[None, None, :, None, None]
        m_int = alive[:, :, None, None, :].expand(B, nC, 1, C, r)
        s = torch.cat([s_int, s_win], -1).masked_fill(~torch.cat([m_int, m_win], -1), torch.finfo(s_win.dtype).min)
        p = torch.softmax(s, -1)
        o = torch.einsum("bjhqr,bjrhe->bjqhe", p[..., :r], vi) + torch.einsum("bjhqk,bjkhe->bjqhe", p[..., r:], vw)
    else:
        p = torch.softmax(s_win.masked_fill(~m_win, torch.finfo(s_win.dtype).min), -1)
        o = torch.einsum("bjhqk,bjkhe->bjqhe", p, vw)
    y = attn.out_proj(o.reshape(B, Np, D))
    return (y * mask[..., None].to(y.dtype))[:, :N]


#: exact kind: at most this many attention scores per query block; larger problems run block by block with
#: activation checkpointing, so memory stays O(B·N·D + EXACT_BLOCK_SCORES) instead of O(B·h·N²)
EXACT_BLOCK_SCORES = 1 << 25


def _exact_block(qb, kp, vp, keep, rel_bias, lo: int, window: int):
    """Outputs of queries lo..lo+Q-1 over keys 0..K-1 (K = the block's last query + 1)."""
    t = torch.arange(lo, lo + qb.shape[2], device=qb.device)
    off = t[:, None] - torch.arange(kp.shape[2], device=qb.device)[None, :]
    s = torch.matmul(qb, kp.transpose(-1, -2)) / math.sqrt(qb.shape[-1])
    if rel_bias is not None:
        s = s + rel_bias[:, off.clamp(0, window)].to(s.dtype)[None]
    s = s.masked_fill(~((off >= 0)[None, None] & keep[:, None, None, :]), torch.finfo(s.dtype).min)
    return torch.matmul(torch.softmax(s, -1), vp)


def _exact(attn, x, mask, window, rel_bias):
    B, N, D = x.shape
    h, dh = attn.num_heads, attn.head_dim
    xm = x * mask[..., None].to(x.dtype)
    q = _heads(attn.q_proj(xm), h).transpose(1, 2)                        # (B,h,N,dh)
    k = _heads(attn.k_proj(xm), h).transpose(1, 2)
    v = _heads(attn.v_proj(xm), h).transpose(1, 2)
    block = max(16, EXACT_BLOCK_SCORES // max(1, B * h * N))
    if block >= N:
        o = _exact_block(q, k, v, mask, rel_bias, 0, window)
    else:  # query blocks see only keys up to their last query; each block is recomputed in backward
        outs = []
        for lo in range(0, N, block):
            hi = min(N, lo + block)
            args = (q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, :hi], rel_bias, lo, window)
            outs.append(checkpoint(_exact_block, *args, use_reentrant=False) if torch.is_grad_enabled()
                        else _exact_block(*args))
        o = torch.cat(outs, 2)
    y = attn.out_proj(o.transpose(1, 2).reshape(B, N, D))
    return y * mask[..., None].to(y.dtype)
