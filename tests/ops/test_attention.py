"""SVDAttention and baselines (design §2, §5.1, §5.3, §5.4, §5.8, §6, §8) against the reference twin."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solar_dist.ops import ATTENTION_KINDS, SVDAttention, make_attention
from solar_dist.ops.reference import ref_exact_attention, ref_mha, ref_svd_attention

from ._helpers import attention_inputs, attention_module, attn_cases, jagged_batch, low_rank_user

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(attn_cases(), st.sampled_from(["exact", "gram", "randomized"]), st.booleans(),
       st.sampled_from(["auto", "folded", "standard"]))
def test_equals_sdpa_over_reference_interests(c, method, mass_bias, kernel):
    """§5.1: SVDAttention == SDPA (float64) over the r tokens Z̃ computed independently by the reference,
    with extra tokens in the same softmax, query masks, mass bias, both kernels."""
    m = attention_module(D=c["D"], H=c["H"], r=c["r"], svd_method=method, mass_bias=mass_bias, seed=c["seed"])
    m.small_kernel = kernel
    q, mem, mask, qmask, extra, emask = attention_inputs(c)
    out = m(q, mem, mask, query_mask=qmask, extra_kv=extra, extra_mask=emask)
    ref = ref_svd_attention(m, q, mem, mask, query_mask=qmask, extra_kv=extra, extra_mask=emask, use_sdpa=True)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-8)


@settings(max_examples=10, deadline=None)
@given(attn_cases(), st.sampled_from(["exact", "gram", "randomized"]))
def test_float32_fast_path_vs_reference(c, method):
    m = attention_module(D=c["D"], H=c["H"], r=c["r"], svd_method=method, dtype=torch.float32, seed=c["seed"])
    q, mem, mask, qmask, extra, emask = attention_inputs(c, torch.float32)
    out = m(q, mem, mask, query_mask=qmask, extra_kv=extra, extra_mask=emask)
    ref = ref_svd_attention(m, q, mem, mask, query_mask=qmask, extra_kv=extra, extra_mask=emask)
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_output_independent_of_r(method, dtype):
    """§5.4: a rank-k input gives the same output for every r >= k (dead components are masked out)."""
    g = torch.Generator().manual_seed(1)
    D, k = 12, 3
    mem = torch.stack([low_rank_user(30, D, k, g), low_rank_user(30, D, 2, g)]).to(dtype)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 25:] = False
    q = torch.randn(2, 4, D, generator=g, dtype=torch.float64).to(dtype)
    outs = []
    for r in (k, 5, 8):
        m = attention_module(D=D, H=3, r=r, svd_method=method, dtype=dtype)
        outs.append(m(q, mem, mask))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **tol)


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_permutation_padding_and_jagged(method):
    """§5.3 and §5.8 on the module: permutation of behaviours, garbage padding, each user alone."""
    g = torch.Generator().manual_seed(2)
    mem, mask = jagged_batch([10, 4, 0, 16], 16, 8, g)
    q = torch.randn(4, 5, 8, generator=g, dtype=torch.float64)
    m = attention_module(D=8, H=2, r=4, svd_method=method, mass_bias=True)
    out = m(q, mem, mask)
    perm = torch.randperm(16, generator=g)
    torch.testing.assert_close(m(q, mem[:, perm], mask[:, perm]), out)
    mem2 = mem.clone()
    mem2[~mask] = float("nan")
    torch.testing.assert_close(m(q, mem2, mask), out)
    for b, n in enumerate([10, 4, 0, 16]):
        torch.testing.assert_close(m(q[b:b + 1], mem[b:b + 1, :n], mask[b:b + 1, :n]), out[b:b + 1])
    assert torch.all(out[2] == 0)   # user with no memory and no extra tokens -> all keys masked -> 0


def test_all_masked_rows_output_zero_and_finite_grads():
    m = attention_module(D=8, H=2, r=2)
    mem = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    qmask = torch.tensor([[True, False, True], [True, True, True]])
    extra = torch.randn(2, 2, 8, dtype=torch.float64)
    emask = torch.zeros(2, 2, dtype=torch.bool)
    out = m(q, mem, mask, query_mask=qmask, extra_kv=extra, extra_mask=emask)
    assert torch.all(out[1] == 0) and torch.all(out[0, 1] == 0) and out[0, 0].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(mem.grad).all() and torch.isfinite(q.grad).all()
    for p in m.parameters():
        assert torch.isfinite(p.grad).all()


def test_extra_tokens_only():
    """With no memory rows, the extra tokens alone form the key set (design §8)."""
    m = attention_module(D=8, H=2, r=2)
    q = torch.randn(1, 3, 8, dtype=torch.float64)
    mem = torch.zeros(1, 4, 8, dtype=torch.float64)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    extra = torch.randn(1, 3, 8, dtype=torch.float64)
    out = m(q, mem, mask, extra_kv=extra)
    ref = ref_mha(m, q, extra, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("with_extra", [False, True])
def test_exact_baseline_matches_reference(with_extra):
    g = torch.Generator().manual_seed(3)
    mem, mask = jagged_batch([7, 12, 0], 12, 8, g)
    q = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    extra = torch.randn(3, 2, 8, generator=g, dtype=torch.float64) if with_extra else None
    emask = torch.tensor([[True, False], [True, True], [False, False]]) if with_extra else None
    m = attention_module("sdpa", D=8, H=2, r=2)
    out = m(q, mem, mask, extra_kv=extra, extra_mask=emask)
    torch.testing.assert_close(out, ref_exact_attention(m, q, mem, mask, extra_kv=extra, extra_mask=emask))
    assert torch.all(out[2] == 0)


def test_oracle_equals_exact_for_low_rank():
    """The U-factored form equals exact attention when rank(H) <= r (and SVD-attention is lossless there)."""
    g = torch.Generator().manual_seed(4)
    mem = torch.stack([low_rank_user(15, 8, 3, g), low_rank_user(15, 8, 2, g)])
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 11:] = False
    q = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    ex = attention_module("sdpa", D=8, H=2, r=4)
    orc = attention_module("oracle", D=8, H=2, r=4, svd_method="exact")
    orc.load_state_dict(ex.state_dict())
    torch.testing.assert_close(orc(q, mem, mask), ex(q, mem, mask))


def test_truncate_uses_last_k_valid_rows():
    g = torch.Generator().manual_seed(5)
    mem, mask = jagged_batch([9, 2, 0], 10, 8, g)
    q = torch.randn(3, 3, 8, generator=g, dtype=torch.float64)
    tr = attention_module("truncate", D=8, H=2, r=2, truncate_k=4)
    ex = attention_module("sdpa", D=8, H=2, r=2)
    ex.load_state_dict(tr.state_dict())
    out = tr(q, mem, mask)
    m2 = mask.clone()
    m2[0, :5] = False            # user 0: keep rows 5..8 (the last 4 valid ones)
    torch.testing.assert_close(out, ex(q, mem, m2))
    # padding layout does not matter: valid rows scattered, order among valid rows kept
    perm = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9, 3])   # order among valid rows preserved, pad in between
    mem_p, mask_p = mem.clone(), mask.clone()
    mem_p[:, perm], mask_p[:, perm] = mem, mask
    torch.testing.assert_close(tr(q, mem_p, mask_p), out)


def test_linear_attention_matches_direct_formula():
    g = torch.Generator().manual_seed(6)
    mem, mask = jagged_batch([6, 3], 6, 8, g)
    q = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    extra = torch.randn(2, 2, 8, generator=g, dtype=torch.float64)
    m = attention_module("linear", D=8, H=2, r=2)
    out = m(q, mem, mask, extra_kv=extra)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    for b in range(2):
        kv = torch.cat([mem[b][mask[b]], extra[b]])
        Q = phi(m.q_proj(q[b]).view(3, 2, 4).transpose(0, 1))
        K = phi(m.k_proj(kv).view(-1, 2, 4).transpose(0, 1))
        V = m.v_proj(kv).view(-1, 2, 4).transpose(0, 1)
        A = Q @ K.transpose(-1, -2)
        o = (A / A.sum(-1, keepdim=True)) @ V
        torch.testing.assert_close(out[b], m.out_proj(o.transpose(0, 1).reshape(3, 8)))


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_all_kinds_shapes_masks_grads(kind):
    m = attention_module(kind, D=8, H=2, r=3, dtype=torch.float32, truncate_k=3)
    mem = torch.randn(2, 7, 8, requires_grad=True)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :5] = True
    q = torch.randn(2, 4, 8, requires_grad=True)
    qmask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    out = m(q, mem, mask, query_mask=qmask, extra_kv=torch.randn(2, 2, 8), extra_mask=torch.zeros(2, 2, dtype=torch.bool))
    assert out.shape == (2, 4, 8)
    assert torch.all(out[1] == 0) and torch.all(out[0, 2] == 0)
    out.square().sum().backward()
    assert torch.isfinite(mem.grad).all() and torch.isfinite(q.grad).all()
    assert torch.all(mem.grad[0, 5:] == 0)


def test_factory_and_constructor_errors():
    with pytest.raises(ValueError, match="kind"):
        make_attention("flash", 8, 2, 2)
    with pytest.raises(ValueError, match="num_heads"):
        SVDAttention(8, 3, 2)
    with pytest.raises(ValueError, match="rank"):
        SVDAttention(8, 2, 9)
    with pytest.raises(ValueError, match="svd_method"):
        SVDAttention(8, 2, 2, svd_method="qr")
    with pytest.raises(ValueError, match="interest_scale"):
        SVDAttention(8, 2, 2, interest_scale="n")
    with pytest.raises(ValueError, match="basis_grad"):
        SVDAttention(8, 2, 2, basis_grad="none")
    m = SVDAttention(8, 2, 2)
    with pytest.raises(ValueError, match="memory_mask"):
        m(torch.randn(1, 2, 8), torch.randn(1, 3, 8), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="extra_mask"):
        m(torch.randn(1, 2, 8), torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool),
          extra_kv=torch.randn(1, 2, 8), extra_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(1, 2, 6), torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
