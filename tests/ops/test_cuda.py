"""The ops on a CUDA device against their reference twin (run on the CPU in float64).

Skipped where no CUDA device is present (CI, the CPU machines); a GPU machine runs them with
`pytest tests/ops/test_cuda.py`. float64 on CUDA must match the twin as tightly as the CPU path does (same
algorithm, other kernels: cuSOLVER's eigh/QR, cuBLAS); float32 and bfloat16 are checked against it with
tolerances set by the format's precision, and the gradients must match the CPU's.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solar_dist.ops import make_attention
from solar_dist.ops.causal import causal_attention
from solar_dist.ops.interests import prefix_interests
from solar_dist.ops.reference import ref_causal_attention, ref_svd_attention

from ._helpers import attention_inputs, attention_module, attn_cases, jagged_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU machines only)")

CUDA = torch.device("cuda")
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CASES = attn_cases(max_width=6, max_batch=4, max_n=40, max_queries=9)  # wider and longer than the CPU tests'


def _module(c, method, dtype=torch.float64, mass_bias=False):
    return attention_module(D=c["D"], H=c["H"], r=c["r"], dtype=dtype, seed=c["seed"], svd_method=method,
                            mass_bias=mass_bias, power_iters=2)


def _to(xs, device, dtype=None):
    return [None if x is None else x.to(device=device, dtype=dtype if x.is_floating_point() and dtype else x.dtype)
            for x in xs]


@SETTINGS
@given(CASES, st.sampled_from(["exact", "gram", "randomized"]), st.booleans())
def test_svd_attention_cuda_float64_matches_reference(c, method, mass_bias):
    m = _module(c, method, mass_bias=mass_bias)
    q, mem, mask, qmask, extra, emask = attention_inputs(c)
    ref = ref_svd_attention(m, q, mem, mask, query_mask=qmask, extra_kv=extra, extra_mask=emask)
    mc = copy.deepcopy(m).to(CUDA)
    out = mc(*_to([q, mem, mask], CUDA), query_mask=qmask.to(CUDA), extra_kv=_to([extra], CUDA)[0],
             extra_mask=_to([emask], CUDA)[0])
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-7, atol=1e-8)


@settings(max_examples=15, deadline=None)
@given(CASES, st.sampled_from([(torch.float32, 1e-3), (torch.bfloat16, 6e-2)]))
def test_svd_attention_cuda_low_precision_near_reference(c, dtype_tol):
    """float32 / bfloat16 modules on CUDA (bf16 factorises in float32 inside) vs the float64 twin of the same
    weights, both fed the same rounded inputs; the tolerance is the format's, scaled by the output size."""
    dtype, tol = dtype_tol
    m = _module(c, "randomized", dtype=dtype)
    q, mem, mask, qmask, extra, emask = _to(attention_inputs(c), "cpu", dtype)
    mc = copy.deepcopy(m).to(CUDA)
    out = mc(*_to([q, mem, mask], CUDA), query_mask=qmask.to(CUDA), extra_kv=_to([extra], CUDA)[0],
             extra_mask=_to([emask], CUDA)[0])
    assert out.dtype == dtype
    m64 = copy.deepcopy(m).double()
    ref = ref_svd_attention(m64, *_to([q, mem, mask], "cpu", torch.float64), query_mask=qmask,
                            extra_kv=_to([extra], "cpu", torch.float64)[0], extra_mask=emask)
    scale = 1.0 + ref.abs().max().item()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("kind, prefix", [("svd", "cumulative"), ("svd", "recompute"), ("exact", "cumulative"),
                                          ("truncate", "cumulative")])
@pytest.mark.parametrize("seed", range(4))
def test_causal_cuda_matches_reference_and_cpu_gradients(kind, prefix, seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, D, h, r, w = 3, 29 + seed, 12, 2 + seed % 2, 4, 5
    D = D - D % h
    lengths = [N, int(torch.randint(0, N, (1,), generator=gen)), 1]
    x = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    torch.manual_seed(seed)
    m = make_attention("svd", D, h, r, svd_method="exact", mass_bias=seed % 2 == 1).double()
    rel = torch.randn(h, w + 1, generator=gen, dtype=torch.float64)
    ref = ref_causal_attention(m, x, mask, w, rel, kind)

    def run(device):
        mm = copy.deepcopy(m).to(device)
        xx = x.to(device).requires_grad_(True)
        rr = rel.to(device).requires_grad_(True)
        y = causal_attention(mm, xx, mask.to(device), w, rr, kind, prefix)
        (y * torch.linspace(-1, 1, y.numel(), device=device, dtype=y.dtype).view_as(y)).sum().backward()
        return y.detach().cpu(), xx.grad.cpu(), rr.grad.cpu(), [p.grad.cpu() for p in mm.parameters()]

    y, gx, gr, gp = run(CUDA)
    torch.testing.assert_close(y, ref, atol=1e-9, rtol=1e-7)
    y_cpu, gx_cpu, gr_cpu, gp_cpu = run("cpu")
    torch.testing.assert_close(y, y_cpu, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(gx, gx_cpu, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(gr, gr_cpu, atol=1e-7, rtol=1e-6)
    for a, b in zip(gp, gp_cpu):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_prefix_interests_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    lengths, N, D, r, chunk = [40, 17, 0, 1, 33], 40, 16, 6, 8
    x, mask = jagged_batch(lengths, N, D, gen)
    cpu = prefix_interests(x, mask, r, chunk)
    gpu = prefix_interests(x.to(CUDA), mask.to(CUDA), r, chunk)
    assert torch.equal(gpu.alive.cpu(), cpu.alive)
    torch.testing.assert_close(gpu.z.cpu(), cpu.z, atol=1e-8, rtol=1e-7)
