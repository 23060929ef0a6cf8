"""prefix_interests (ops/interests.py): the interests of every chunk-boundary prefix from running Gram sums,
against its reference twin, compact_interests_ex(method="exact") on each prefix separately."""
import pytest
import torch

from solar_dist.ops.interests import compact_interests_ex, prefix_interests


def _data(lengths, N, D, gen, rank=None, dtype=torch.float64):
    B = len(lengths)
    if rank is None:
        h = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    else:  # rows in a rank-`rank` subspace: every prefix is lossless at r >= rank
        h = torch.randn(B, N, rank, generator=gen, dtype=torch.float64) @ torch.randn(B, rank, D, generator=gen,
                                                                                     dtype=torch.float64)
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    h = torch.where(mask[..., None], h, torch.full_like(h, 7.0))  # padding content must not matter
    return h.to(dtype), mask


CASES = [  # (lengths, N, D, rank, chunk, data rank)
    ([23, 11, 3, 0], 23, 6, 3, 5, None),
    ([16, 16], 16, 8, 8, 4, None),       # r = D
    ([9, 4], 9, 5, 2, 1, None),          # one row per chunk: rank-deficient early prefixes
    ([30, 21, 12], 30, 10, 4, 6, 2),     # data of rank 2 < r: components 3, 4 dead
    ([7], 7, 4, 2, 10, None),            # chunk longer than the sequence: no prefix
]


@pytest.mark.parametrize("scale", ["sqrt_n", "none"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_per_prefix_interests(case, scale):
    lengths, N, D, r, C, data_rank = CASES[case]
    gen = torch.Generator().manual_seed(case)
    h, mask = _data(lengths, N, D, gen, data_rank)
    h.requires_grad_(True)
    it = prefix_interests(h, mask, r, C, scale)  # default tol in float64: 1e-7 (the Gram's resolution)
    P = max(0, -(-N // C) - 1)
    assert it.z.shape == (len(lengths), P, r, D) and it.alive.shape == it.mass.shape == (len(lengths), P, r)
    if P == 0:
        return
    gz = torch.randn(it.z.shape, generator=gen, dtype=torch.float64)
    gm = torch.randn(it.mass.shape, generator=gen, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((it.z * gz).sum() + (it.mass * gm).sum(), h)
    loss_ref = 0.0
    for j in range(1, P + 1):
        ref = compact_interests_ex(h[:, : j * C], mask[:, : j * C], r, "exact", scale, tol=1e-7)
        assert torch.equal(ref.alive, it.alive[:, j - 1]), j
        torch.testing.assert_close(it.z[:, j - 1], ref.z, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(it.mass[:, j - 1], ref.mass, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(it.sigma[:, j - 1], ref.sigma, atol=1e-10, rtol=1e-9)
        loss_ref = loss_ref + (ref.z * gz[:, j - 1]).sum() + (ref.mass * gm[:, j - 1]).sum()
    (g_ref,) = torch.autograd.grad(loss_ref, h)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-8, rtol=1e-6)
    assert torch.equal(g_fast[~mask], torch.zeros_like(g_fast[~mask]))


def test_float32_agrees_with_float64_and_keeps_dead_components_dead():
    """float32 input (Gram sums in float64 inside): the same interests as float64 to float32 precision, and a
    rank-2 sequence keeps components 3.. dead (the √eps floor of a float32 Gram would wake them)."""
    gen = torch.Generator().manual_seed(5)
    h, mask = _data([40, 33], 40, 16, gen, rank=2)
    a = prefix_interests(h.float(), mask, 4, 8)
    b = prefix_interests(h, mask, 4, 8)
    assert torch.equal(a.alive, b.alive) and not bool(a.alive[..., 2:].any())
    torch.testing.assert_close(a.z.double(), b.z, atol=1e-4, rtol=1e-4)


def test_degenerate_inputs():
    """All-zero and repeated rows: finite values and gradients, zero interests where nothing is alive."""
    h = torch.zeros(3, 12, 6)
    h[1] = torch.randn(6)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2] = False
    h.requires_grad_(True)
    it = prefix_interests(h, mask, 3, 4)
    (it.z.sum() + it.mass.sum()).backward()
    assert torch.isfinite(it.z).all() and torch.isfinite(h.grad).all()
    assert not bool(it.alive[0].any()) and not bool(it.alive[2].any())
    assert it.alive[1, :, 0].all() and not bool(it.alive[1, :, 1:].any())


def test_bad_inputs_are_named():
    h = torch.randn(2, 8, 4)
    mask = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="chunk"):
        prefix_interests(h, mask, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        prefix_interests(h, mask, 5, 2)
    with pytest.raises(ValueError, match="mask"):
        prefix_interests(h, mask[:, :4], 2, 2)


def test_needed_factorises_only_the_chosen_prefixes():
    """`needed`: the chosen prefixes equal the full computation (values and gradients); the others have no live
    interest. causal_attention passes the chunks that hold a query (tests/ops/test_causal.py covers that path)."""
    gen = torch.Generator().manual_seed(11)
    lengths, N, D, r, C = [23, 11, 3, 0], 23, 6, 3, 5
    h, mask = _data(lengths, N, D, gen)
    h.requires_grad_(True)
    P = -(-N // C) - 1
    needed = torch.arange(1, P + 1)[None, :] * C < torch.tensor(lengths)[:, None]  # chunk j holds a query
    needed[0, 1] = False                                                        # and one arbitrary gap
    full = prefix_interests(h, mask, r, C)
    part = prefix_interests(h, mask, r, C, needed=needed)
    assert int(needed.sum()) == 5 and not part.alive[~needed].any()
    for t in (part.z, part.mass, part.sigma):
        assert torch.equal(t[~needed], torch.zeros_like(t[~needed]))
    assert torch.equal(part.alive[needed], full.alive[needed])
    for a, b in ((part.z, full.z), (part.mass, full.mass), (part.sigma, full.sigma)):
        torch.testing.assert_close(a[needed], b[needed], atol=1e-12, rtol=1e-12)
    gz = torch.randn(full.z.shape, generator=gen, dtype=torch.float64) * needed[..., None, None]
    (g_part,) = torch.autograd.grad((part.z * gz).sum() + part.mass[needed].sum(), h)
    (g_full,) = torch.autograd.grad((full.z * gz).sum() + full.mass[needed].sum(), h)
    torch.testing.assert_close(g_part, g_full, atol=1e-12, rtol=1e-10)
    none = prefix_interests(h, mask, r, C, needed=torch.zeros_like(needed))  # nothing to factorise
    assert not none.alive.any() and torch.equal(none.z, torch.zeros_like(none.z))
    with pytest.raises(ValueError, match="needed must be a"):
        prefix_interests(h, mask, r, C, needed=needed[:, :-1])


@pytest.mark.parametrize("case", [0, 1, 3])
def test_eigenvalue_gradient_holds_the_basis_constant(case):
    """grad="eigenvalues": the same interests; the gradient is that of z_i = sqrt(v_iᵀ G v_i) v_i with each
    prefix's eigenvectors v_i taken as constants (autograd through a plain per-prefix eigh, reference twin),
    and it differs from the full gradient (which also moves the basis)."""
    from solar_dist.ops.interests import _signed_scaled

    lengths, N, D, r, C, data_rank = CASES[case]
    gen = torch.Generator().manual_seed(40 + case)
    h, mask = _data(lengths, N, D, gen, data_rank)
    h.requires_grad_(True)
    it = prefix_interests(h, mask, r, C, grad="eigenvalues")
    full = prefix_interests(h, mask, r, C)
    torch.testing.assert_close(it.z, full.z, atol=0, rtol=0)
    assert torch.equal(it.alive, full.alive)
    P = it.z.shape[1]
    gz = torch.randn(it.z.shape, generator=gen, dtype=torch.float64)
    gm = torch.randn(it.mass.shape, generator=gen, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((it.z * gz).sum() + (it.mass * gm).sum(), h)
    (g_full,) = torch.autograd.grad((full.z * gz).sum() + (full.mass * gm).sum(), h)
    hm = torch.where(mask[..., None], h, torch.zeros_like(h))
    loss_ref = 0.0
    for j in range(1, P + 1):
        H = hm[:, : j * C]
        G = H.mT @ H
        V = torch.linalg.eigh(G.detach()).eigenvectors.flip(-1)[..., :r]        # constants
        lam = torch.einsum("bdi,bde,bei->bi", V, G, V)                           # = λ_i, differentiable in G
        alive = it.alive[:, j - 1]
        z_raw = torch.where(alive[..., None], lam.clamp_min(0).sqrt()[..., None] * V.mT, torch.zeros((),
                            dtype=h.dtype))
        n = mask[:, : j * C].sum(1).to(h.dtype)
        z, mass = _signed_scaled(z_raw, alive, H.sum(1), n, "sqrt_n")
        torch.testing.assert_close(z, it.z[:, j - 1], atol=1e-10, rtol=1e-9)
        loss_ref = loss_ref + (z * gz[:, j - 1]).sum() + (mass * gm[:, j - 1]).sum()
    (g_ref,) = torch.autograd.grad(loss_ref, h)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-8, rtol=1e-6)
    assert not torch.allclose(g_fast, g_full, atol=1e-6)
    with pytest.raises(ValueError, match="grad"):
        prefix_interests(h, mask, r, C, grad="detach")
