"""Property tests of compact_interests (design §1, §5.2, §5.3, §5.5, §5.8) against the reference twin."""
from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solar_dist.ops import compact_interests, compact_interests_ex
from solar_dist.ops.reference import ref_compact_interests

from ._helpers import gapped_user, jagged_batch, low_rank_user

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64]


def _tols(dtype):
    return (2e-4, 1e-4) if dtype == torch.float32 else (1e-9, 1e-9)


@st.composite
def batches(draw, max_b=3, max_n=24, max_d=12):
    D = draw(st.integers(2, max_d))
    B = draw(st.integers(1, max_b))
    N = draw(st.integers(1, max_n))
    lengths = [draw(st.integers(0, N)) for _ in range(B)]
    r = draw(st.integers(1, D))
    seed = draw(st.integers(0, 2 ** 16))
    return lengths, N, D, r, seed


@SETTINGS
@given(batches(), st.sampled_from(DTYPES), st.sampled_from(["exact", "gram", "randomized"]),
       st.sampled_from(["sqrt_n", "none"]))
def test_matches_reference(case, dtype, method, scale):
    """Fast path == reference (per-user torch.linalg.svd) on jagged gapped batches: z, alive, mass, sigma.
    This is also §5.5 (gram, randomized and exact agree where the spectrum has a gap)."""
    lengths, N, D, r, seed = case
    g = torch.Generator().manual_seed(seed)
    h, mask = jagged_batch(lengths, N, D, g, dtype=dtype)
    it = compact_interests_ex(h, mask, r, method, scale, power_iters=2)
    z_ref, alive_ref, mass_ref, sig_ref, _ = ref_compact_interests(h, mask, r, scale=scale)
    assert it.z.dtype == dtype and it.z.shape == (len(lengths), r, D)
    assert torch.equal(it.alive, alive_ref)
    assert torch.all(it.z[~it.alive] == 0)
    rtol, atol = _tols(dtype)
    scale_z = z_ref.abs().amax().clamp_min(1e-30)
    torch.testing.assert_close(it.z.double() / scale_z, z_ref / scale_z, rtol=rtol * 10, atol=atol * 10)
    torch.testing.assert_close(it.mass.double(), mass_ref, rtol=rtol * 10, atol=atol * 10)
    torch.testing.assert_close(it.sigma.double() / scale_z, sig_ref / scale_z, rtol=rtol * 10, atol=atol * 10)


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 40), st.integers(0, 2 ** 16), st.sampled_from(["exact", "gram", "randomized"]))
def test_lossless_low_rank_float32(D, N, seed, method):
    """§5.2: for rank(H) <= r, ‖U_r Z − H‖/‖H‖ <= 1e-5 in float32 (U_r Z = H V_r V_rᵀ)."""
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, min(N, D) + 1, (1,), generator=g))
    r = int(torch.randint(k, D + 1, (1,), generator=g))
    h = low_rank_user(N, D, k, g).to(torch.float32)[None]
    mask = torch.ones(1, N, dtype=torch.bool)
    z, alive = compact_interests(h, mask, r, method, scale="none")
    assert int(alive.sum()) == k
    v = z[alive] / z[alive].norm(dim=-1, keepdim=True)               # (k, D) right singular vectors
    rec = (h[0] @ v.T) @ v
    err = (rec - h[0]).norm() / h[0].norm()
    assert err <= 1e-5, float(err)


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_permutation_and_padding_invariance(method, dtype):
    """§5.3: permuting the behaviours (and where the padding sits) and garbage in padded rows change nothing."""
    g = torch.Generator().manual_seed(3)
    h, mask = jagged_batch([9, 14, 0, 3], 16, 8, g, dtype=dtype)
    z, alive = compact_interests(h, mask, 5, method)
    perm = torch.randperm(16, generator=g)
    z2, alive2 = compact_interests(h[:, perm], mask[:, perm], 5, method)
    h3 = h.clone()
    h3[~mask] = float("nan")
    h3[0, -1] = float("inf")
    z3, alive3 = compact_interests(h3, mask, 5, method)
    rtol, atol = _tols(dtype)
    for zz, aa in ((z2, alive2), (z3, alive3)):
        assert torch.equal(aa, alive)
        torch.testing.assert_close(zz, z, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_dead_components(method, dtype):
    """Components beyond rank(H), beyond n_valid and of H = 0 are dead and exactly zero; alive ones match r=k."""
    g = torch.Generator().manual_seed(5)
    D, N = 10, 30
    h = torch.zeros(4, N, D, dtype=torch.float64)
    mask = torch.zeros(4, N, dtype=torch.bool)
    h[0, :25] = low_rank_user(25, D, 3, g)          # rank 3
    mask[0, :25] = True
    h[1, :2] = gapped_user(2, D, g)                 # n_valid = 2 < r
    mask[1, :2] = True
    mask[2, :7] = True                              # H = 0 on valid rows
    # user 3: no valid rows
    h = h.to(dtype)
    z, alive = compact_interests(h, mask, 6, method)
    assert alive.sum(1).tolist() == [3, 2, 0, 0]
    assert torch.all(z[~alive] == 0)
    z3, alive3 = compact_interests(h, mask, 3, method)
    rtol, atol = _tols(dtype)
    torch.testing.assert_close(z[0, :3], z3[0], rtol=rtol * 10, atol=atol * 10)


@SETTINGS
@given(batches(max_b=4), st.sampled_from(DTYPES), st.sampled_from(["exact", "gram", "randomized"]))
def test_jagged_each_user_alone(case, dtype, method):
    """§5.8: each user's result equals that user run alone (without padding)."""
    lengths, N, D, r, seed = case
    g = torch.Generator().manual_seed(seed)
    h, mask = jagged_batch(lengths, N, D, g, dtype=dtype)
    z, alive = compact_interests(h, mask, r, method)
    rtol, atol = _tols(dtype)
    for b, n in enumerate(lengths):
        zb, ab = compact_interests(h[b:b + 1, :n], mask[b:b + 1, :n], r, method)
        assert torch.equal(ab[0], alive[b])
        torch.testing.assert_close(zb[0], z[b], rtol=rtol * 10, atol=atol * 10 * float(z[b].abs().max().clamp_min(1)))


def test_sign_convention_and_scale():
    g = torch.Generator().manual_seed(11)
    h, mask = jagged_batch([20, 13], 20, 6, g)
    z, alive = compact_interests(h, mask, 4, "exact")
    s = (h * mask[..., None]).sum(1)
    assert torch.all((z * s[:, None]).sum(-1) >= 0)
    zn, _ = compact_interests(h, mask, 4, "exact", scale="none")
    torch.testing.assert_close(z * torch.tensor([20.0, 13.0], dtype=z.dtype).sqrt()[:, None, None], zn)
    # row i = σ_i v_iᵀ: norms are the singular values
    sv = torch.linalg.svdvals(h[1, :13])
    torch.testing.assert_close(zn[1].norm(dim=-1), sv[:4])


def test_mass_orthogonal_clusters():
    """m_i = (1ᵀu_i)²/n equals the cluster share when the behaviours form orthogonal clusters (design §1)."""
    D = 6
    protos = torch.eye(D, dtype=torch.float64)[:3] * torch.tensor([[3.0], [2.0], [1.0]], dtype=torch.float64)
    sizes = [5, 9, 16]   # σ_i = |p_i|·√size_i: 3√5=6.7, 2·3=6, 4 — distinct
    h = torch.cat([protos[i].expand(sizes[i], D) for i in range(3)])[None]
    mask = torch.ones(1, 30, dtype=torch.bool)
    it = compact_interests_ex(h, mask, 3, "exact")
    order = it.z[0].abs().argmax(-1)  # which prototype each interest points to
    expect = torch.tensor([sizes[i] / 30 for i in order.tolist()], dtype=torch.float64)
    torch.testing.assert_close(it.mass[0], expect)
    assert torch.all(it.mass >= 0) and torch.all(it.mass <= 1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(rank=0), "rank"), (dict(rank=9), "rank"), (dict(rank=2.0), "rank"),
    (dict(method="svd"), "method"), (dict(scale="mean"), "scale"), (dict(basis_grad="stop"), "basis_grad"),
    (dict(mask=torch.ones(2, 5, dtype=torch.bool)), "mask"), (dict(mask=torch.ones(2, 7)), "mask"),
    (dict(h=torch.ones(2, 7)), "h"), (dict(h=torch.ones(2, 7, 8, dtype=torch.long)), "h"),
    (dict(tol=-1.0), "tol"), (dict(oversample=-1), "oversample"), (dict(power_iters=-2), "power_iters"),
])
def test_bad_arguments_raise(kwargs, name):
    args = dict(h=torch.randn(2, 7, 8), mask=torch.ones(2, 7, dtype=torch.bool), rank=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        compact_interests(args.pop("h"), args.pop("mask"), args.pop("rank"), **args)


def test_randomized_deterministic():
    g = torch.Generator().manual_seed(2)
    h, mask = jagged_batch([12, 7], 12, 9, g, dtype=torch.float32)
    a = compact_interests(h, mask, 3, "randomized")[0]
    b = compact_interests(h, mask, 3, "randomized")[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("power_iters", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_methods_agree_full_rank_gapped(power_iters, dtype):
    """§5.5 where randomized is truly approximate (full rank, l = r + p < D): gram, randomized (q >= 1) and exact
    agree on an input with a spectral gap."""
    g = torch.Generator().manual_seed(21)
    h = gapped_user(300, 40, g, ratio=1.5)[None].to(dtype)
    mask = torch.ones(1, 300, dtype=torch.bool)
    z_ex, a_ex = compact_interests(h, mask, 8, "exact")
    for method in ("gram", "randomized"):
        z, a = compact_interests(h, mask, 8, method, power_iters=power_iters, oversample=8)
        assert torch.equal(a, a_ex)
        tol = 1e-4 if dtype == torch.float32 else 1e-6
        torch.testing.assert_close(z, z_ex, rtol=tol, atol=tol * float(z_ex.abs().max()))


def test_half_precision_inputs():
    g = torch.Generator().manual_seed(22)
    h, mask = jagged_batch([10, 6], 10, 8, g, dtype=torch.float32)
    z32, a32 = compact_interests(h, mask, 3, "randomized")
    zb, ab = compact_interests(h.bfloat16(), mask, 3, "randomized")
    assert zb.dtype == torch.bfloat16 and torch.equal(ab, a32)
    torch.testing.assert_close(zb.float(), z32, rtol=3e-2, atol=3e-2 * float(z32.abs().max()))
