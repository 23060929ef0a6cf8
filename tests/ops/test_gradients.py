"""Gradients of compact_interests / SVDAttention (design §3, §5.6)."""
from __future__ import annotations

import pytest
import torch

from solar_dist.ops import compact_interests, compact_interests_ex, make_attention
from solar_dist.ops.reference import ref_compact_interests

from ._helpers import gapped_user, jagged_batch, low_rank_user


def _gapped_batch(seed=0, lengths=(9, 6), N=9, D=6):
    g = torch.Generator().manual_seed(seed)
    h, mask = jagged_batch(list(lengths), N, D, g, dtype=torch.float64, ratio=1.8)
    return h.requires_grad_(), mask


@pytest.mark.parametrize("method", ["exact", "gram"])
@pytest.mark.parametrize("scale", ["sqrt_n", "none"])
def test_gradcheck_full(method, scale):
    """float64 gradcheck of z and mass (basis_grad="full") on jagged inputs with a spectral gap."""
    h, mask = _gapped_batch()

    def f(x):
        it = compact_interests_ex(x, mask, 3, method, scale)
        return it.z, it.mass

    assert torch.autograd.gradcheck(f, (h,), atol=1e-6, rtol=1e-4)


def test_gradcheck_full_rank_equal_d():
    """r = D: every component is in the r kept ones (no truncation)."""
    h, mask = _gapped_batch(seed=1, lengths=(8, 8), N=8, D=4)
    assert torch.autograd.gradcheck(lambda x: compact_interests(x, mask, 4, "gram")[0], (h,), atol=1e-6, rtol=1e-4)


def test_gradcheck_randomized_low_rank():
    """randomized is exact for rank(H) <= r + oversample, so is its gradient."""
    g = torch.Generator().manual_seed(4)
    h = torch.stack([low_rank_user(8, 6, 3, g), low_rank_user(8, 6, 2, g)]).requires_grad_()
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 7:] = False
    f = lambda x: compact_interests(x, mask, 2, "randomized", oversample=2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (h,), atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_detach_is_projection_gradient(method):
    """basis_grad="detach": the gradient is that of Z = U_rᵀH with U_r held constant."""
    h, mask = _gapped_batch(seed=2)
    w = torch.randn(2, 3, 6, dtype=torch.float64)
    z = compact_interests(h, mask, 3, method, basis_grad="detach")[0]
    g, = torch.autograd.grad((z * w).sum(), h)
    # expected: U_r from the reference, Z = sign·c·U_rᵀ H
    zr, alive, _, sig, V = ref_compact_interests(h.detach(), mask, 3)
    exp = torch.zeros_like(g)
    for b in range(2):
        n = int(mask[b].sum())
        Hu = h.detach()[b, :n]
        U = Hu @ V[b] / sig[b].clamp_min(1e-300)        # signs already in V (aligned with Σh)
        exp[b, :n] = U @ (w[b] / n ** 0.5)
    torch.testing.assert_close(g, exp)


@pytest.mark.parametrize("method", ["gram", "randomized"])
def test_fast_gradients_match_exact(method):
    """gram (any H with a gap) and randomized (rank <= r + p) gradients equal exact's."""
    g = torch.Generator().manual_seed(9)
    if method == "gram":
        h, mask = jagged_batch([20, 11], 20, 8, g)
    else:
        h = torch.stack([low_rank_user(20, 8, 4, g), low_rank_user(20, 8, 3, g)])
        mask = torch.ones(2, 20, dtype=torch.bool)
    h.requires_grad_()
    w = torch.randn(2, 4, 8, dtype=torch.float64)
    grads = []
    for m in ("exact", method):
        it = compact_interests_ex(h, mask, 4, m)
        grads.append(torch.autograd.grad((it.z * w).sum() + it.mass.sum(), h)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-7, atol=1e-9)


def _degenerate_cases(D=8, N=12):
    g = torch.Generator().manual_seed(7)
    cases = {}
    cases["zero"] = torch.zeros(N, D, dtype=torch.float64)
    cases["identical_rows"] = gapped_user(1, D, g).expand(N, D).clone()
    cases["rank_lt_r"] = low_rank_user(N, D, 2, g)
    Q = torch.linalg.qr(torch.randn(N, 4, generator=g, dtype=torch.float64)).Q
    W = torch.linalg.qr(torch.randn(D, 4, generator=g, dtype=torch.float64)).Q
    cases["repeated_sv"] = 3.0 * Q @ W.T                      # four equal singular values
    cases["huge"] = gapped_user(N, D, g) * 1e6
    cases["tiny"] = gapped_user(N, D, g) * 1e-6
    cases["one_row"] = torch.cat([gapped_user(1, D, g), torch.zeros(N - 1, D, dtype=torch.float64)])
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
@pytest.mark.parametrize("basis_grad", ["full", "detach"])
def test_finite_on_degenerate_inputs(dtype, method, basis_grad):
    """§5.6: finite outputs and gradients on H = 0, identical rows, rank < r, repeated singular values, 1e6 and
    1e-6 magnitudes, a user with no valid rows — through the interests and through SVDAttention."""
    cases = _degenerate_cases()
    names = list(cases)
    h = torch.stack([cases[k] for k in names] + [torch.randn(12, 8, dtype=torch.float64)]).to(dtype)
    mask = torch.ones(h.shape[:2], dtype=torch.bool)
    mask[names.index("one_row"), 1:] = False
    mask[-1] = False                                          # no valid rows (garbage content)
    h.requires_grad_()
    torch.manual_seed(0)
    for mass_bias in (False, True):
        att = make_attention("svd", 8, 2, 4, svd_method=method, basis_grad=basis_grad, mass_bias=mass_bias).to(dtype)
        q = torch.randn(h.shape[0], 3, 8, dtype=dtype, requires_grad=True)
        it = compact_interests_ex(h, mask, 4, method, basis_grad=basis_grad)
        out = att(q, h, mask)
        assert torch.isfinite(it.z).all() and torch.isfinite(it.mass).all() and torch.isfinite(out).all()
        loss = out.square().sum() + (it.z * torch.randn_like(it.z)).sum() + it.mass.sum()
        gh, gq = torch.autograd.grad(loss, (h, q))
        assert torch.isfinite(gh).all() and torch.isfinite(gq).all()
        assert torch.all(gh[-1] == 0)                         # masked rows get zero gradient
    it = compact_interests_ex(h, mask, 4, method)
    alive = it.alive.sum(1).tolist()
    assert alive[names.index("zero")] == 0 and alive[-1] == 0
    assert alive[names.index("identical_rows")] == 1 and alive[names.index("rank_lt_r")] == 2
    assert alive[names.index("one_row")] == 1 and alive[names.index("repeated_sv")] == 4
