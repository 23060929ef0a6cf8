"""Input generators and module builders shared by the ops tests."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from solar_dist.ops import make_attention


def orth(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) matrix with orthonormal columns (k <= n), float64."""
    a = torch.randn(n, k, generator=gen, dtype=torch.float64)
    return torch.linalg.qr(a).Q


def gapped_user(n: int, D: int, gen: torch.Generator, rank: int | None = None, ratio: float = 1.6,
                top: float = 10.0, offset: float = 0.5) -> torch.Tensor:
    """One user's valid rows (n, D) with a clear spectral gap everywhere: σ_i = top·ratio^(-i).

    An offset direction is mixed in so that Σ_j h_j is far from orthogonal to the singular vectors (the sign
    convention is then well conditioned)."""
    k = min(n, D) if rank is None else min(rank, n, D)
    if k == 0:
        return torch.zeros(n, D, dtype=torch.float64)
    U = orth(n, k, gen)
    V = orth(D, k, gen)
    s = top * ratio ** (-torch.arange(k, dtype=torch.float64))
    # make Σ_j h_j have a sizeable component along every v_i: flip u_i so that 1ᵀu_i >= 0 and add a common mean
    U = U * torch.where(U.sum(0) < 0, -1.0, 1.0)
    U = U + offset / max(n, 1) ** 0.5
    U = torch.linalg.qr(U).Q
    U = U * torch.where(U.sum(0) < 0, -1.0, 1.0)
    return (U * s) @ V.T


def jagged_batch(lengths, N: int, D: int, gen: torch.Generator, dtype=torch.float64, rank=None, garbage=True,
                 ratio: float = 1.6):
    """Batch (B, N, D) with user b's valid rows first (lengths[b] of them) and garbage padding."""
    B = len(lengths)
    h = torch.randn(B, N, D, generator=gen, dtype=torch.float64) * 1e3 if garbage else torch.zeros(B, N, D,
                                                                                                 dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if n:
            h[b, :n] = gapped_user(n, D, gen, rank=rank, ratio=ratio)
            mask[b, :n] = True
    return h.to(dtype), mask


def low_rank_user(n: int, D: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, D) rows of exact rank k (well conditioned)."""
    return gapped_user(n, D, gen, rank=k, ratio=1.3)


def align_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flip rows of a (B, r, D) to match b's orientation (for comparisons where the sign is ill-conditioned)."""
    s = torch.where((a * b).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(a.dtype)
    return a * s


def attention_module(kind="svd", D=8, H=2, r=3, dtype=torch.float64, seed=0, **kw):
    """make_attention(kind, D, H, r, **kw) in `dtype`, seeded, with non-zero biases so that every bias path
    is exercised."""
    torch.manual_seed(seed)
    m = make_attention(kind, D, H, r, **kw).to(dtype)
    with torch.no_grad():
        for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
            lin.bias.normal_()
    return m


@st.composite
def attn_cases(draw, max_width: int = 4, max_batch: int = 3, max_n: int = 16, max_queries: int = 5):
    """Random attention problems: heads H, width D = H·(1..max_width), B users with jagged lengths in [0, N],
    L queries, rank r <= D, k extra tokens, and a seed for attention_inputs."""
    H = draw(st.sampled_from([1, 2, 4]))
    D = H * draw(st.integers(1, max_width))
    B = draw(st.integers(1, max_batch))
    N = draw(st.integers(1, max_n))
    L = draw(st.integers(1, max_queries))
    lengths = [draw(st.integers(0, N)) for _ in range(B)]
    r = draw(st.integers(1, D))
    k = draw(st.integers(0, 3))
    return dict(H=H, D=D, B=B, N=N, L=L, lengths=lengths, r=r, k=k, seed=draw(st.integers(0, 2 ** 16)))


def attention_inputs(c, dtype=torch.float64):
    """(query, memory, memory mask, query mask, extra tokens, extra mask) for one attn_cases draw; no extra
    tokens (None, None) when k = 0."""
    g = torch.Generator().manual_seed(c["seed"])
    mem, mask = jagged_batch(c["lengths"], c["N"], c["D"], g, dtype=dtype)
    q = torch.randn(c["B"], c["L"], c["D"], generator=g, dtype=torch.float64).to(dtype)
    qmask = torch.rand(c["B"], c["L"], generator=g) < 0.8
    extra = extra_mask = None
    if c["k"]:
        extra = torch.randn(c["B"], c["k"], c["D"], generator=g, dtype=torch.float64).to(dtype)
        extra_mask = torch.rand(c["B"], c["k"], generator=g) < 0.7
    return q, mem, mask, qmask, extra, extra_mask
