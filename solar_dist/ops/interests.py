"""Compact interests Z = U_rᵀH = Σ_r V_rᵀ of a jagged batch of behaviour sequences (design §1, §3, §4).

Public entry points: :func:`compact_interests` (``(z, alive)``) and :func:`compact_interests_ex`
(:class:`Interests` with ``mass`` and ``sigma`` too).

How it is computed (all three ``method`` values share steps 2-4):

1. A basis of right singular vectors.  ``exact``: ``torch.linalg.svd`` of the valid rows (float64).
   ``gram``: ``eigh`` (float64) of G = HᵀH (D×D, all-reduced under sequence parallelism).
   ``randomized``: Halko et al. range finder: Y = H X with X = Ω (fixed-seed Gaussian D×l, l = min(D, r+p)),
   then ``power_iters`` times X ← orth(HᵀY), Y = H X (QR of D×l only); Rayleigh-Ritz through B = QᵀH with
   Q = orth(Y) never formed: B = C0ᵀ(HᵀY)ᵀ, C0 = E Θ^{-1/2} from YᵀY = EΘEᵀ (float64; numerically null
   directions of Y dropped), then eigh(B Bᵀ).  2q+2 passes over H, O(N·D·l·(2q+2)); under sequence
   parallelism only HᵀY (D×l), YᵀY (l×l), row sums and counts are all-reduced.
2. Singular values.  For ``gram`` the top-r values are refined as ‖H v_i‖ (avoids the √eps floor of the
   squared spectrum, so dead components of a rank-deficient H are recognised reliably in float32).
3. Dead components: σ_i ≤ tol·σ_1, σ_1 = 0 (H = 0 or no valid rows), or i ≥ min(n_valid, D).  Their rows of z
   are exactly zero.  Sign: z_i·(Σ_j h_j) ≥ 0.  Scale ``sqrt_n``: z / √max(n_valid, 1).
4. Backward (custom autograd): with U_r = H V_r Σ_r⁻¹, Y = Z̄ V_l, F_ij = 1/(σ_i² − σ_j²) made safe as
   d/(d² + ε) (ε = (1e-6·σ_1²)², zero on the diagonal, for dead i and for equal values),
   Ã = Y∘F, A = Ã·diag(σ_l):

       H̄ = U_r (Z̄ + A Σ_l V_lᵀ) + H (V_l Ãᵀ) Σ_r V_rᵀ

   which is the exact SVD derivative of Z when every singular value outside the l computed ones is zero
   (``exact`` and ``gram`` use the full basis, l = min(N, D) resp. D, so it is exact for every H with a gap;
   ``randomized`` is exact for rank(H) ≤ l).  No D×D eigh backward, no N·D² product: O(N·D·r).
   ``basis_grad="detach"``: H̄ = U_r Z̄ (U_r constant, gradient through Z = U_rᵀH only).

Sequence parallelism (``sp_group``): rows of H are contiguous per-rank chunks of each user's sequence; only
N-independent sums are all-reduced (see :mod:`solar_dist.ops.collectives`); gradients are all-reduced in
backward, so outputs and gradients match the single-process op.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .collectives import _raw_all_reduce, all_reduce_sum_nograd

__all__ = [
    "Interests",
    "compact_interests",
    "compact_interests_ex",
    "prefix_interests",
    "default_tol",
    "METHODS",
    "SCALES",
    "BASIS_GRADS",
]

METHODS = ("exact", "gram", "randomized")
SCALES = ("sqrt_n", "none")
BASIS_GRADS = ("full", "detach")

#: relative size of the regulariser of the 1/(σ_i²−σ_j²) gap terms: ε = (GAP_EPS·σ_1²)²
GAP_EPS = 1e-6
#: prefix_interests' gradient into the Gram sums: "full" (eigenvalues and eigenvectors), "eigenvalues" (the basis
#: V held constant: z_i = σ_i v_i moves along v_i only, no 1/(λ_i − λ_k) terms)
PREFIX_GRADS = ("full", "eigenvalues")
#: smallest default dead-component threshold of prefix_interests (σ from eigenvalues of a float64 Gram)
GRAM_TOL_FLOOR = 1e-7
#: seed of the randomized range finder's test matrix Ω (identical on every rank)
OMEGA_SEED = 0x5EED


class Interests(NamedTuple):
    """Result of :func:`compact_interests_ex`.

    z:     (B, r, D) interests (signed, scaled); dead rows exactly zero.
    alive: (B, r) bool, False for dead components.
    mass:  (B, r) m_i = (1ᵀu_i)²/n_valid ∈ [0, 1], 0 for dead components (differentiable).
    sigma: (B, r) singular values of the valid rows of H (unscaled, no gradient), 0 for dead components.
    """

    z: torch.Tensor
    alive: torch.Tensor
    mass: torch.Tensor
    sigma: torch.Tensor


def default_tol(dtype: torch.dtype) -> float:
    """Default relative threshold for dead components: 1e-4 in float32/16 (about 1000·eps, above the
    numerical noise of the null singular values of a rank-deficient H), 1e-10 in float64."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _validate(h, mask, rank, method, scale, basis_grad, tol, oversample, power_iters, sp_group):
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise ValueError(f"h must be a 3-d tensor (B, N, D), got {getattr(h, 'shape', type(h))}")
    if not h.is_floating_point():
        raise ValueError(f"h must be a floating-point tensor, got dtype {h.dtype}")
    B, N, D = h.shape
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must be a bool tensor of shape (B, N) = {(B, N)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not (1 <= rank <= D):
        raise ValueError(f"rank must be an int with 1 <= rank <= D (= {D}), got {rank!r}")
    _check_choice("method", method, METHODS)
    _check_choice("scale", scale, SCALES)
    _check_choice("basis_grad", basis_grad, BASIS_GRADS)
    if tol is not None and (not isinstance(tol, (int, float)) or not (0.0 <= float(tol) < 1.0)
                            or math.isnan(float(tol))):
        raise ValueError(f"tol must be a float in [0, 1) or None, got {tol!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"oversample must be an int >= 0, got {oversample!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
    if sp_group is not None and method == "exact":
        raise ValueError("method must be one of ['gram', 'randomized'] when sp_group is given "
                         "('exact' needs all rows on one rank), got 'exact'")


_OMEGA_CACHE: dict = {}


def _omega(D: int, ell: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Gaussian test matrix Ω (D×l) from a fixed-seed generator: identical on every rank and every call."""
    key = (D, ell, dtype, str(device))
    om = _OMEGA_CACHE.get(key)
    if om is None:
        g = torch.Generator(device="cpu")
        g.manual_seed(OMEGA_SEED)
        om = torch.randn(D, ell, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        _OMEGA_CACHE[key] = om
    return om


class _single_thread:
    """Run small LAPACK calls (eigh / qr of D×D or l×l matrices) on one thread: multi-threaded MKL LAPACK on
    tiny matrices is slower, and on a loaded machine pathologically so (measured: eigh of 4×128×128 took 3.6 s
    with 2 threads, 8 ms with 1)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)
        return False


def _eigh_desc(a: torch.Tensor):
    if a.device.type == "cpu":
        with _single_thread():
            lam, vec = torch.linalg.eigh(a)
    else:
        lam, vec = torch.linalg.eigh(a)
    return lam.flip(-1), vec.flip(-1)


def _orth(m: torch.Tensor) -> torch.Tensor:
    if m.device.type == "cpu":
        with _single_thread():
            return torch.linalg.qr(m).Q
    return torch.linalg.qr(m).Q


def _alive(sigma_r: torch.Tensor, n_valid: torch.Tensor, tol: float, D: int) -> torch.Tensor:
    """(…, r) live components: σ_i > tol·σ_1, σ_1 > 0, i < min(n_valid, D), finite."""
    s1 = sigma_r[..., :1]
    idx = torch.arange(sigma_r.shape[-1], device=sigma_r.device)
    limit = n_valid.to(sigma_r.dtype).clamp_max(D)
    return (sigma_r > tol * s1) & (s1 > 0) & (idx < limit[..., None]) & torch.isfinite(sigma_r)


def _signed_scaled(z_raw: torch.Tensor, alive: torch.Tensor, s: torch.Tensor, n_valid: torch.Tensor, scale: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """z_raw (…, r, D) unsigned interests, s (…, D) row sums, n_valid (…) counts -> (z, mass): the sign
    convention z_i · Σ_j h_j >= 0 (piecewise constant: no gradient), the √n scale, and the mass
    m_i = (1ᵀu_i)²/n with 1ᵀu_i = s·v_i/σ_i = (s·z_raw_i)/σ_i²."""
    dt = z_raw.dtype
    proj = (z_raw * s[..., None, :]).sum(-1)                             # (…, r) = σ_i v_i·s
    sign = torch.where(proj.detach() < 0, -1.0, 1.0).to(dt)
    n_safe = n_valid.clamp_min(1.0)
    lam = (z_raw * z_raw).sum(-1)
    lam_safe = torch.where(alive, lam, torch.ones_like(lam))
    mass = torch.where(alive, ((proj / lam_safe).square() / n_safe[..., None]).clamp(0.0, 1.0),
                       torch.zeros_like(lam))
    c = n_safe.rsqrt().to(dt)[..., None, None] if scale == "sqrt_n" else torch.ones((), dtype=dt,
                                                                                      device=z_raw.device)
    return z_raw * (sign[..., None] * c), mass


class _InterestsCore(torch.autograd.Function):
    """(h, mask) -> z_raw (B,r,D) = σ_i v_iᵀ (unsigned, unscaled, dead rows 0), sigma (B,r), alive (B,r),
    s (B,D) = Σ_valid h_j, n (B,) valid counts — all totals over the sp group.

    Masking, row sums and counts live inside the Function so that the backward writes dL/dh in one batched
    product (no separate passes over the (B,N,D) tensor for the mask and the row sums)."""

    @staticmethod
    def forward(ctx, h, mask, rank, method, tol, oversample, power_iters, full_grad, group):
        B, N, D = h.shape
        dt = h.dtype
        r = rank
        f64 = torch.float64
        all_valid = bool(mask.all())
        hm = h if all_valid else torch.where(mask[..., None], h, torch.zeros((), dtype=dt, device=h.device))
        n_local = mask.sum(1, keepdim=True).to(dt)
        s_local = None
        if method == "exact":
            H64 = hm.to(f64)
            _, S, Vh = torch.linalg.svd(H64, full_matrices=False)       # S (B,k), k = min(N, D)
            V_l = Vh.mT                                                  # (B,D,k)
            sig_l = S
            k = S.shape[-1]
            if k < r:                                                    # pad: components beyond min(N,D)
                sig_l = torch.cat([sig_l, sig_l.new_zeros(B, r - k)], -1)
                V_l = torch.cat([V_l, V_l.new_zeros(B, D, r - k)], -1)
            sigma_r = sig_l[:, :r]
            V_r = V_l[..., :r]
            U_r = None
            s_local = hm.sum(1)
            packed = all_reduce_sum_nograd(torch.cat([s_local, n_local], -1), group)
        elif method == "gram":
            G = hm.mT @ hm                                               # (B,D,D)
            s_local = hm.sum(1)
            packed = all_reduce_sum_nograd(torch.cat([s_local, n_local], -1), group)
            G = all_reduce_sum_nograd(G, group)
            lam, V_l = _eigh_desc(G.to(f64))
            sig_l = lam.clamp_min(0).sqrt()
            V_r = V_l[..., :r]
            P = hm @ V_r.to(dt)                                          # (B,N,r)
            sq = all_reduce_sum_nograd(P.to(f64).square().sum(1), group)  # ‖H v_i‖²
            sigma_r = sq.sqrt()
            sig_l = torch.cat([sigma_r, sig_l[:, r:]], -1)
            U_r = P
        else:  # randomized: Halko et al. range finder, Rayleigh-Ritz through B = QᵀH without forming Q
            ell = min(D, r + oversample)
            X = _omega(D, ell, dt, h.device)
            # (fusing the row sums into the first product as Hᵀ[Y, 1] was measured slower: odd GEMM width)
            s_local = hm.sum(1)
            packed = all_reduce_sum_nograd(torch.cat([s_local, n_local], -1), group)
            for it in range(power_iters + 1):
                Y = hm @ X                                               # (B,N,l) = H X
                M = all_reduce_sum_nograd(hm.mT @ Y, group)              # (B,D,l) = Hᵀ Y
                if it < power_iters:
                    X = _orth(M)
            # Q = Y R⁻¹ (orthonormal basis of span Y) is never formed: with YᵀY = E Θ Eᵀ (float64, exact for the
            # stored Y), C0 = E_k Θ_k^{-1/2} over the numerically non-null directions, B = QᵀH = C0ᵀ Mᵀ (k×D).
            Y64 = Y.to(f64)
            TY = all_reduce_sum_nograd(Y64.mT @ Y64, group)              # (B,l,l)
            theta, E = _eigh_desc(TY)
            floor = (1e-5 if dt != f64 else 1e-13) ** 2
            keep = theta > floor * theta[:, :1].clamp_min(0)
            C0 = E * torch.where(keep, theta.clamp_min(torch.finfo(f64).tiny).rsqrt(),
                                 torch.zeros_like(theta))[:, None, :]    # (B,l,l), zero columns where dropped
            Bm = C0.mT @ M.to(f64).mT                                    # (B,l,D) = QᵀH
            lam, Ut = _eigh_desc(Bm @ Bm.mT)                             # B Bᵀ = Ũ Σ² Ũᵀ
            sig_l = lam.clamp_min(0).sqrt()
            ok = sig_l > (tol * sig_l[:, :1])
            inv_l = torch.where(ok, 1.0 / torch.where(ok, sig_l, torch.ones_like(sig_l)), torch.zeros_like(sig_l))
            V_l = (Bm.mT @ Ut) * inv_l[:, None, :]                       # (B,D,l); 0 for negligible components
            sig_l = torch.where(ok, sig_l, torch.zeros_like(sig_l))
            V_r = V_l[..., :r]
            sigma_r = torch.cat([sig_l, sig_l.new_zeros(B, max(0, r - ell))], -1)[:, :r]
            U_r = Y @ (C0 @ Ut[..., :r]).to(dt) * sigma_r.to(dt)[:, None, :]  # (B,N,r) = H V_r (unnormalised)
        s = packed[:, :D]
        n_valid = packed[:, D]
        alive = _alive(sigma_r, n_valid, tol, D)
        sig_alive = torch.where(alive, sigma_r, torch.zeros_like(sigma_r))
        z_raw = (sig_alive[..., None] * V_r.mT)                          # (B,r,D) float64
        z_raw = torch.where(alive[..., None], z_raw, torch.zeros_like(z_raw)).to(dt)
        if U_r is None:
            U_r = hm @ V_r.to(dt)
        inv = torch.where(alive, 1.0 / torch.where(alive, sigma_r, torch.ones_like(sigma_r)),
                          torch.zeros_like(sigma_r))
        U_r = U_r * inv.to(dt)[:, None, :]                               # (B,N,r), 0 for dead and padded rows
        ctx.full_grad = full_grad
        ctx.group = group
        ctx.rank = r
        sig_l = sig_l.clone()
        sig_l[:, :r] = sig_alive
        ctx.save_for_backward(hm, mask, U_r, V_l, sig_l, alive, z_raw)
        ctx.mark_non_differentiable(alive, n_valid)
        return z_raw, sig_alive.to(dt), alive, s, n_valid

    @staticmethod
    def backward(ctx, gz, gsig, galive, gs, gn):
        hm, mask, U_r, V_l, sig_l, alive, z_raw = ctx.saved_tensors
        dt = hm.dtype
        B, N, D = hm.shape
        r = ctx.rank
        gz = torch.zeros_like(z_raw) if gz is None else gz
        gs = hm.new_zeros(B, D) if gs is None else gs
        if ctx.group is not None:
            # Z and s are replicated on every rank and each rank's loss uses them: dL/dZ = Σ_p dL_p/dZ
            flat = _raw_all_reduce(torch.cat([gz.reshape(B, r * D), gs], -1).detach().clone(), ctx.group,
                                   backward=True)
            gz, gs = flat[:, :r * D].reshape(B, r, D), flat[:, r * D:]
        zb = torch.where(alive[..., None], gz, torch.zeros_like(gz))
        # row-sum gradient s̄ on the valid rows, as one more column of the final product (only when non-zero,
        # i.e. when the mass is used: keeps the GEMM width at r resp. 2r otherwise)
        with_s = bool(gs.ne(0).any())
        J_s = [mask[..., None].to(dt)] if with_s else []
        C_s = [gs[:, None, :].to(dt)] if with_s else []
        if not ctx.full_grad:
            J = torch.cat([U_r] + J_s, -1)
            C = torch.cat([zb.to(dt)] + C_s, 1)
            return J @ C, None, None, None, None, None, None, None, None
        f64 = torch.float64
        zb64 = zb.to(f64)
        lam = sig_l.square()                                             # (B,l)
        Y = zb64 @ V_l                                                   # (B,r,l)
        d = lam[:, :r, None] - lam[:, None, :]                           # (B,r,l)
        eps = (GAP_EPS * lam[:, :1, None]).square() + torch.finfo(f64).tiny
        F = d / (d.square() + eps)
        ell = lam.shape[-1]
        eye = torch.eye(r, ell, dtype=torch.bool, device=F.device)
        F = F.masked_fill(eye, 0.0)
        F = torch.where(alive[..., None], F, torch.zeros_like(F))
        At = Y * F                                                       # Ã (B,r,l)
        A = At * sig_l[:, None, :]
        Z_l = sig_l[..., None] * V_l.mT                                  # (B,l,D)
        C1 = zb64 + A @ Z_l                                              # (B,r,D)
        Mv = V_l @ At.mT                                                 # (B,D,r)
        Hm = hm @ Mv.to(dt)                                              # (B,N,r)
        J = torch.cat([U_r, Hm] + J_s, -1)                               # (B,N,2r(+1))
        C = torch.cat([C1.to(dt), z_raw] + C_s, 1)                       # (B,2r(+1),D)
        return J @ C, None, None, None, None, None, None, None, None


def compact_interests_ex(h: torch.Tensor, mask: torch.Tensor, rank: int, method: str = "exact",
                         scale: str = "sqrt_n", *, basis_grad: str = "full", tol: Optional[float] = None,
                         oversample: int = 8, power_iters: int = 2, sp_group=None) -> Interests:
    """Compact interests with mass and singular values.  See :func:`compact_interests` for the arguments."""
    _validate(h, mask, rank, method, scale, basis_grad, tol, oversample, power_iters, sp_group)
    if h.dtype in (torch.float16, torch.bfloat16):
        # half precision: factorise in float32 (the op is O(N·D·r); the cast is one pass), return h's dtype
        out = compact_interests_ex(h.float(), mask, rank, method, scale, basis_grad=basis_grad, tol=tol,
                                   oversample=oversample, power_iters=power_iters, sp_group=sp_group)
        return Interests(out.z.to(h.dtype), out.alive, out.mass.to(h.dtype), out.sigma.to(h.dtype))
    tol_v = default_tol(h.dtype) if tol is None else float(tol)
    # the factorisation runs in h's own precision even inside an autocast region (bf16 GEMMs would break the
    # dead-component test and the eigen solver); the attention around it may still be autocast
    with torch.autocast(device_type=h.device.type, enabled=False):
        z_raw, sigma, alive, s, n_valid = _InterestsCore.apply(h, mask, rank, method, tol_v, oversample,
                                                               power_iters, basis_grad == "full", sp_group)
    z, mass = _signed_scaled(z_raw, alive, s, n_valid, scale)
    return Interests(z, alive, mass, sigma.detach())


def compact_interests(h: torch.Tensor, mask: torch.Tensor, rank: int, method: str = "exact",
                      scale: str = "sqrt_n", *, basis_grad: str = "full", tol: Optional[float] = None,
                      oversample: int = 8, power_iters: int = 2, sp_group=None):
    """The r compact interests of each user's valid behaviour rows.

    Args:
        h: (B, N, D) float behaviour representations; rows where ``mask`` is False are ignored (may hold
            garbage, even NaN).
        mask: (B, N) bool, True = valid row.  Users may have any number of valid rows (0 included).
        rank: r, 1 <= r <= D.
        method: "exact" (torch.linalg.svd, reference), "gram" (eigh of HᵀH), "randomized" (range finder
            with ``oversample`` extra columns and ``power_iters`` power iterations).
        scale: "sqrt_n" (divide by √n_valid) or "none".
        basis_grad: "full" (backprop through the basis, gap terms bounded) or "detach" (U_r constant).
        tol: relative threshold for dead components (σ_i <= tol·σ_1); None = :func:`default_tol` of h's dtype.
        sp_group: torch.distributed group for sequence parallelism (rows of h = this rank's chunk).

    Returns:
        z: (B, r, D) interests Z = U_rᵀH = Σ_r V_rᵀ (row i = σ_i v_iᵀ, signed so z_i·Σ_j h_j >= 0, scaled);
            dead rows exactly zero.
        alive: (B, r) bool, False for dead components.
    """
    out = compact_interests_ex(h, mask, rank, method, scale, basis_grad=basis_grad, tol=tol,
                               oversample=oversample, power_iters=power_iters, sp_group=sp_group)
    return out.z, out.alive


class _GramInterestsCore(torch.autograd.Function):
    """(G (M,D,D) float64 Gram matrices, n (M,) row counts) -> z_raw (M,r,D) = σ_i v_iᵀ (unsigned, unscaled,
    dead rows 0), sigma (M,r), alive (M,r): the interests of any H with HᵀH = G.

    Backward in terms of G (eigh derivative restricted to the r kept components, gap terms bounded as in
    _InterestsCore): with Y = Z̄ V (r×D over the full basis), F_ik = d/(d² + ε), d = λ_i − λ_k (0 for i = k
    and for dead i), Ḡ = V K V_rᵀ with K_ki = σ_i Y_ik F_ik (k ≠ i) and K_ii = Y_ii / (2σ_i), returned
    symmetrised. Exact wherever λ_1..λ_r are simple and above the null space, whatever the rank of G."""

    @staticmethod
    def forward(ctx, G, n, rank, tol, dt, eig_only=False):
        M, D, _ = G.shape
        r = rank
        lam, V = _eigh_desc(G)
        sig = lam[:, :r].clamp_min(0).sqrt()
        alive = _alive(sig, n, tol, D)
        sig = torch.where(alive, sig, torch.zeros_like(sig))
        z_raw = torch.where(alive[..., None], sig[..., None] * V[..., :r].mT, torch.zeros((), dtype=G.dtype,
                                                                                          device=G.device))
        ctx.save_for_backward(lam, V, sig, alive)
        ctx.rank = r
        ctx.eig_only = eig_only
        ctx.mark_non_differentiable(alive)
        return z_raw.to(dt), sig.to(dt), alive

    @staticmethod
    def backward(ctx, gz, gsig, galive):
        lam, V, sig, alive = ctx.saved_tensors
        r = ctx.rank
        if gz is None:
            return None, None, None, None, None, None
        zb = torch.where(alive[..., None], gz.to(lam.dtype), torch.zeros((), dtype=lam.dtype, device=lam.device))
        Y = zb @ V                                                       # (M,r,D): z̄_i · v_k
        half = torch.where(alive, 0.5 / torch.where(alive, sig, torch.ones_like(sig)), torch.zeros_like(sig))
        if ctx.eig_only:  # V constant: dσ_i = v_iᵀ dG v_i / (2σ_i), so Ḡ = V_r diag(z̄_i·v_i / (2σ_i)) V_rᵀ
            Vr = V[..., :r]
            return (Vr * (torch.diagonal(Y[..., :r], dim1=-2, dim2=-1) * half)[:, None, :]) @ Vr.mT, \
                None, None, None, None, None
        lam_r = torch.where(alive, lam[:, :r], torch.zeros_like(sig))
        d = lam_r[:, :, None] - lam[:, None, :]                          # (M,r,D)
        eps = (GAP_EPS * lam[:, :1, None].clamp_min(0)).square() + torch.finfo(lam.dtype).tiny
        F = d / (d.square() + eps)
        eye = torch.eye(r, lam.shape[-1], dtype=torch.bool, device=F.device)
        F = torch.where(alive[..., None] & ~eye, F, torch.zeros_like(F))
        Kt = sig[..., None] * Y * F                                      # (M,r,D) = Kᵀ off the diagonal
        diag = torch.diag_embed(torch.diagonal(Y[..., :r], dim1=-2, dim2=-1) * half)   # K_ii = Y_ii / (2σ_i)
        Kt = Kt + torch.cat([diag, Y.new_zeros(*Y.shape[:-1], Y.shape[-1] - r)], -1)
        Gb = V @ Kt.mT @ V[..., :r].mT                                   # (M,D,D)
        return 0.5 * (Gb + Gb.mT), None, None, None, None, None


def prefix_interests(h: torch.Tensor, mask: torch.Tensor, rank: int, chunk: int, scale: str = "sqrt_n", *,
                     tol: Optional[float] = None, needed: Optional[torch.Tensor] = None,
                     grad: str = "full") -> Interests:
    """The interests of every prefix [0, j·chunk) of each sequence, j = 1 .. ceil(N/chunk) − 1, in
    O(N·D² + (N/chunk)·D³) instead of recomputing each prefix (O(N²/chunk·D·r)).

    Everything the interests depend on is a prefix sum: Z = Σ_r V_rᵀ comes from the eigen-decomposition of
    G = HᵀH, the sign convention from the row sum s, the mass and the √n scale from s and the count n. So the
    per-chunk Gram matrices (float64, which keeps the null spectrum at ~1e-8·σ_1, far below `tol`) are summed
    cumulatively and each boundary pays one D×D eigh; backward flows through the same sums. Equals
    `compact_interests_ex(h[:, :j·chunk], mask[:, :j·chunk], rank, "exact", scale)` for every j (its
    reference twin; tests/ops/test_prefix_interests.py). `grad` (PREFIX_GRADS): "full" backpropagates through
    eigenvalues and eigenvectors (gap terms bounded); "eigenvalues" holds the eigenvectors constant, so the
    gradient reaches the tokens through the interests' lengths σ_i only (forward unchanged).

    `tol`: None = max(default_tol(dtype), 1e-7), since σ comes from eigenvalues of a float64 Gram matrix.
    `needed` (B, P) bool: only these prefixes are factorised; the others come back with no live interest (z 0,
    alive False). The caller passes the chunks that hold a query: in a batch of skewed lengths most boundaries
    lie beyond their sequence's end, and the eigh is the op's cost (on CUDA, for D > 32, one matrix at a time).
    Returns Interests with a prefix axis: z (B, P, r, D), alive / mass / sigma (B, P, r), P = ceil(N/chunk) − 1.
    Rows where `mask` is False are ignored (they may hold anything finite)."""
    _validate(h, mask, rank, "gram", scale, "full", tol, 0, 0, None)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    _check_choice("grad", grad, PREFIX_GRADS)
    B, N, D = h.shape
    P = max(0, -(-N // chunk) - 1)
    dt = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    # a Gram matrix resolves singular values down to ~√eps_64 ≈ 1.5e-8·σ_1 only: float64 inputs get tol 1e-7
    tol_v = max(default_tol(dt), GRAM_TOL_FLOOR) if tol is None else float(tol)
    if P == 0:
        zero = h.new_zeros(B, 0, rank)
        return Interests(h.new_zeros(B, 0, rank, D).to(dt), zero.bool(), zero.to(dt), zero.to(dt))
    if needed is not None and (needed.shape != (B, P) or needed.dtype != torch.bool):
        raise ValueError(f"needed must be a ({B}, {P}) bool tensor (batch, prefix), got {tuple(needed.shape)} "
                         f"{needed.dtype}")
    with torch.autocast(device_type=h.device.type, enabled=False):
        if needed is None or bool(needed.all()):
            z, alive, mass, sigma = _prefix_from_grams(h, mask, rank, chunk, P, scale, tol_v, dt, None, grad)
        else:  # the Gram sums of the users with a needed prefix, the eigh of the needed prefixes only
            users = needed.any(1).nonzero().squeeze(1)
            z_u, alive_u, mass_u, sigma_u = _prefix_from_grams(h[users], mask[users], rank, chunk, P, scale, tol_v,
                                                               dt, needed[users], grad)
            z, alive, mass, sigma = _scatter_rows(B, users, z_u, alive_u, mass_u, sigma_u)
    if h.dtype != dt:
        return Interests(z.to(h.dtype), alive, mass.to(h.dtype), sigma.detach().to(h.dtype))
    return Interests(z, alive, mass, sigma.detach())


def _prefix_from_grams(h: torch.Tensor, mask: torch.Tensor, rank: int, chunk: int, P: int, scale: str, tol: float,
                       dt: torch.dtype, needed: Optional[torch.Tensor] = None, grad: str = "full"):
    """prefix_interests' computation: cumulative float64 Gram matrices, row sums and counts of the P boundary
    prefixes, then one eigh per prefix (per `needed` prefix when given; the others stay zero and dead)."""
    B, _, D = h.shape
    f64 = torch.float64
    hm = torch.where(mask[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
    hc = hm[:, : P * chunk].to(f64).reshape(B, P, chunk, D)
    G = torch.cumsum(hc.mT @ hc, 1).reshape(B * P, D, D)                # Gram of [0, j·chunk), j = 1..P
    s = torch.cumsum(hc.sum(2), 1)                                       # (B,P,D) row sums
    n = torch.cumsum(mask[:, : P * chunk].reshape(B, P, chunk).sum(2), 1).to(f64)  # (B,P)
    if needed is None:
        z_raw, sigma, alive = _GramInterestsCore.apply(G, n.reshape(-1), rank, tol, dt, grad == "eigenvalues")
    else:
        idx = needed.reshape(-1).nonzero().squeeze(1)
        z_n, sig_n, alive_n = _GramInterestsCore.apply(G[idx], n.reshape(-1)[idx], rank, tol, dt,
                                                           grad == "eigenvalues")
        z_raw, sigma, alive = _scatter_rows(B * P, idx, z_n, sig_n, alive_n)
    z_raw, sigma, alive = z_raw.view(B, P, rank, D), sigma.view(B, P, rank), alive.view(B, P, rank)
    z, mass = _signed_scaled(z_raw, alive, s.to(dt), n.to(dt), scale)
    return z, alive, mass, sigma


def _scatter_rows(rows: int, idx: torch.Tensor, *tensors: torch.Tensor) -> tuple:
    """Each tensor's rows placed at `idx` of a zero (False) tensor with `rows` rows (differentiable)."""
    return tuple(t.new_zeros(rows, *t.shape[1:]).index_copy(0, idx, t) for t in tensors)
