"""Causal attention (ops/causal.py) against its position-by-position reference twin, and the property that
makes next-item training at every position honest: nothing after position t reaches position t."""
import pytest
import torch

from solar_dist.ops import SVDAttention
from solar_dist.ops.causal import causal_attention
from solar_dist.ops.reference import ref_causal_attention


def _batch(lengths, N, D, gen, dtype=torch.float64):
    x = torch.randn(len(lengths), N, D, generator=gen, dtype=dtype)
    mask = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    x = torch.where(mask[..., None], x, torch.full_like(x, 1e3))  # garbage padding must not matter
    return x, mask


def _module(D, h, r, method, mass_bias=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return SVDAttention(D, h, r, svd_method=method, mass_bias=mass_bias, power_iters=2).to(dtype)


CASES = [  # (lengths, N, D, heads, rank, window)
    ([7, 3, 0, 1], 7, 8, 2, 3, 3),
    ([11, 11], 11, 6, 1, 4, 4),
    ([5, 9, 2], 9, 8, 4, 2, 1),
    ([6], 6, 4, 2, 4, 8),        # window longer than the sequence: no interests at all
    ([13, 10, 4], 13, 12, 3, 5, 5),
]


KINDS = [("svd", "cumulative"), ("svd", "recompute"), ("exact", "cumulative"), ("truncate", "cumulative")]


@pytest.mark.parametrize("kind, prefix", KINDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(kind, prefix, case):
    lengths, N, D, h, r, w = CASES[case]
    gen = torch.Generator().manual_seed(100 + case)
    x, mask = _batch(lengths, N, D, gen)
    m = _module(D, h, r, "exact", mass_bias=(case % 2 == 1))
    rel = torch.randn(h, w + 1, generator=gen, dtype=torch.float64)
    got = causal_attention(m, x, mask, w, rel, kind, prefix)
    ref = ref_causal_attention(m, x, mask, w, rel, kind)
    assert got.shape == (len(lengths), N, D)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-7)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))


@pytest.mark.parametrize("prefix", ["cumulative", "recompute"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_far_bias_on_the_interests_matches_reference(prefix, case):
    """far_bias: the interests get rel_bias[:, window]; the reference adds it per head to each interest."""
    lengths, N, D, h, r, w = CASES[case]
    gen = torch.Generator().manual_seed(200 + case)
    x, mask = _batch(lengths, N, D, gen)
    m = _module(D, h, r, "exact", mass_bias=(case % 2 == 0))
    rel = torch.randn(h, w + 1, generator=gen, dtype=torch.float64)
    rel[:, w] += 3.0  # a far bias large enough to move the softmax
    got = causal_attention(m, x, mask, w, rel, "svd", prefix, far_bias=True)
    torch.testing.assert_close(got, ref_causal_attention(m, x, mask, w, rel, "svd", far_bias=True),
                               atol=1e-9, rtol=1e-7)
    without = causal_attention(m, x, mask, w, rel, "svd", prefix)
    past_window = mask & (torch.arange(N)[None, :] >= w)  # positions that see interests
    if bool(past_window.any()):
        assert not torch.allclose(got[past_window], without[past_window])
    # positions in the first chunk have no interests: the bias changes nothing there
    torch.testing.assert_close(got[:, :w], without[:, :w], atol=0, rtol=0)
    with pytest.raises(ValueError, match="far_bias"):
        causal_attention(m, x, mask, w, None, "svd", prefix, far_bias=True)


@pytest.mark.parametrize("method", ["gram", "randomized"])
def test_fast_interest_methods_match_reference_on_low_rank_sequences(method):
    """With prefixes of rank <= r every method is lossless, so the chunked op equals the exact reference."""
    gen = torch.Generator().manual_seed(7)
    B, N, D, r, w = 3, 12, 8, 3, 4
    basis = torch.randn(B, r, D, generator=gen, dtype=torch.float64)
    x = torch.einsum("bnr,brd->bnd", torch.randn(B, N, r, generator=gen, dtype=torch.float64), basis)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate([12, 9, 5]):
        mask[b, :n] = True
    m = _module(D, 2, r, method)
    got = causal_attention(m, x, mask, w, None, "svd", "recompute")
    torch.testing.assert_close(got, ref_causal_attention(m, x, mask, w, None, "svd"), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("prefix", ["cumulative", "recompute"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_chunks_window_matches_reference(prefix, case):
    """window_mode="chunks": interests of [0, (j-1)C) and the tokens of chunks j-1, j up to t, each counted once;
    with and without the mass and far biases."""
    lengths, N, D, h, r, w = CASES[case]
    gen = torch.Generator().manual_seed(300 + case)
    x, mask = _batch(lengths, N, D, gen)
    m = _module(D, h, r, "exact", mass_bias=(case % 2 == 1))
    rel = torch.randn(h, w + 1, generator=gen, dtype=torch.float64)
    far = case % 2 == 0
    got = causal_attention(m, x, mask, w, rel, "svd", prefix, far_bias=far, window_mode="chunks")
    ref = ref_causal_attention(m, x, mask, w, rel, "svd", far_bias=far, window_mode="chunks")
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-7)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    sliding = causal_attention(m, x, mask, w, rel, "svd", prefix, far_bias=far)
    # the two modes agree on the first chunk (no past) only; from chunk 1 on, "chunks" sees chunk j-1 whole
    torch.testing.assert_close(got[:, :w], sliding[:, :w], atol=1e-12, rtol=0)
    late = mask & (torch.arange(N)[None, :] >= w)
    if bool(late.any()):
        assert not torch.allclose(got[late], sliding[late])


@pytest.mark.parametrize("prefix", ["cumulative", "recompute"])
def test_chunks_window_is_exact_up_to_two_chunks(prefix):
    """Sequences of at most 2C events have no interests under window_mode="chunks": every position sees all of
    its past exactly, with exact's biases (offsets >= C share the far slot), so the output is exact's."""
    gen = torch.Generator().manual_seed(11)
    w = 5
    x, mask = _batch([10, 7, 3, 1], 10, 8, gen)
    m = _module(8, 2, 3, "randomized")
    rel = torch.randn(2, w + 1, generator=gen, dtype=torch.float64)
    got = causal_attention(m, x, mask, w, rel, "svd", prefix, window_mode="chunks")
    torch.testing.assert_close(got, causal_attention(m, x, mask, w, rel, "exact"), atol=1e-12, rtol=1e-10)
    # one event more and the last position reads the interests of the first chunk
    x2, mask2 = _batch([11], 11, 8, gen)
    a = causal_attention(m, x2, mask2, w, rel, "svd", prefix, window_mode="chunks")
    b = causal_attention(m, x2, mask2, w, rel, "exact")
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-12, rtol=1e-10)
    assert not torch.allclose(a[:, 10], b[:, 10])


CAUSAL_SETTINGS = [k + ("sliding",) for k in KINDS] + [("svd", "cumulative", "chunks"), ("svd", "recompute", "chunks")]


@pytest.mark.parametrize("kind, prefix, window_mode", CAUSAL_SETTINGS)
def test_nothing_after_t_reaches_t(kind, prefix, window_mode):
    """Gradients of position t's output w.r.t. every later event are exactly zero, and changing the later
    events leaves positions <= t bit-identical (randomized interests, float32: the training configuration)."""
    gen = torch.Generator().manual_seed(3)
    B, N, D, w = 2, 23, 16, 4
    x, mask = _batch([23, 17], N, D, gen, dtype=torch.float32)
    m = _module(D, 2, 4, "randomized", dtype=torch.float32)
    rel = torch.randn(2, w + 1, generator=gen)
    for t in (0, 3, 4, 9, 16):
        xx = x.clone().requires_grad_(True)
        y = causal_attention(m, xx, mask, w, rel, kind, prefix, window_mode=window_mode)
        y[:, t].pow(2).sum().backward()
        assert torch.equal(xx.grad[:, t + 1:], torch.zeros_like(xx.grad[:, t + 1:])), t
        assert bool(xx.grad[:, : t + 1].abs().sum() > 0)
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(B, N - t - 1, D, generator=gen) * 5
        y2 = causal_attention(m, x2, mask, w, rel, kind, prefix, window_mode=window_mode)
        assert torch.equal(y.detach()[:, : t + 1], y2[:, : t + 1]), t


@pytest.mark.parametrize("prefix", ["cumulative", "recompute"])
def test_degenerate_inputs_are_finite(prefix):
    """Zero sequences, repeated rows, empty rows: finite outputs and gradients."""
    D, w = 8, 3
    m = _module(D, 2, 4, "randomized", dtype=torch.float32)
    x = torch.zeros(3, 10, D)
    x[1] = torch.randn(1, D)          # one repeated row: rank 1
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :7] = True
    x.requires_grad_(True)
    y = causal_attention(m, x, mask, w, torch.zeros(2, w + 1), "svd", prefix)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.equal(y[2], torch.zeros_like(y[2]))


def test_bad_inputs_are_named():
    m = _module(8, 2, 4, "exact")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="kind"):
        causal_attention(m, x, mask, 2, None, "linear")
    with pytest.raises(ValueError, match="window"):
        causal_attention(m, x, mask, 0)
    with pytest.raises(ValueError, match="rel_bias"):
        causal_attention(m, x, mask, 2, torch.zeros(2, 2))
    holes = mask.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match="left-aligned"):
        causal_attention(m, x, holes, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        causal_attention(m, x[..., :4], mask, 2)
    with pytest.raises(ValueError, match="prefix"):
        causal_attention(m, x, mask, 2, prefix="gram")
    with pytest.raises(ValueError, match="window_mode"):
        causal_attention(m, x, mask, 2, window_mode="blocks")
    with pytest.raises(ValueError, match="kind='truncate' has no interests"):
        causal_attention(m, x, mask, 2, kind="truncate", window_mode="chunks")
    m.basis_grad = "detach"
    with pytest.raises(ValueError, match="basis_grad"):
        causal_attention(m, x, mask, 2)


def test_cumulative_prefix_factorises_once_and_recompute_once_per_boundary(monkeypatch):
    """The cumulative path computes all chunk-boundary interests in one prefix_interests call and never
    factorises a prefix; recompute factorises each of the ceil(N/C) - 1 prefixes. (Costs are measured by
    `solar bench causal`, not asserted here: wall-clock ratios on a shared machine are flaky.)"""
    import solar_dist.ops.causal as causal

    m = _module(8, 2, 3, "randomized", dtype=torch.float32)
    x, mask = _batch([37, 20], 37, 8, torch.Generator().manual_seed(2), dtype=torch.float32)
    calls = {"interests": 0, "prefix": 0}
    real_interests, real_prefix = m.interests, causal.prefix_interests

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(m, "interests", count("interests", real_interests))
    monkeypatch.setattr(causal, "prefix_interests", count("prefix", real_prefix))
    causal_attention(m, x, mask, 5, None, "svd", "cumulative")
    assert calls == {"interests": 0, "prefix": 1}
    causal_attention(m, x, mask, 5, None, "svd", "recompute")
    assert calls == {"interests": 7, "prefix": 1}  # ceil(37 / 5) - 1 boundaries
    causal_attention(m, x, mask, 5, None, "svd", "recompute", window_mode="chunks")
    assert calls == {"interests": 13, "prefix": 1}  # the last boundary is read by no chunk

def test_bench_causal_smoke(tmp_path, capsys):
    """tools/bench_causal.py (`solar bench causal`): records for every kind and N, a table, the JSON file."""
    import json

    from solar_dist.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "causal", "--n", "16", "40", "--batch", "2", "--dim", "8", "--rank", "2", "--window", "4",
                 "--repeats", "1", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    kinds = ("svd", "svd_recompute", "svd_chunks", "exact", "truncate")
    assert {(r["kind"], r["n"]) for r in recs} == {(k, n) for k in kinds for n in (16, 40)}
    assert all(r["seconds"] > 0 for r in recs)
    out = capsys.readouterr().out
    assert "exact/svd" in out and "chunks/svd" in out



def test_bench_causal_skewed_lengths(tmp_path):
    """--lengths skewed: one sequence of N events, the others shorter (geometric, in [1, N], the same on every
    call); the records count the valid events."""
    import argparse
    import json

    from solar_dist.cli import main
    from tools.bench_causal import lengths_for

    a = argparse.Namespace(lengths="skewed", batch=64, mean_len=5.0)
    L = lengths_for(a, 300)
    assert L[0] == 300 and bool((L[1:] >= 1).all()) and bool((L[1:] <= 300).all())
    assert 2 < float(L[1:].float().mean()) < 12
    assert torch.equal(L, lengths_for(a, 300))
    out = tmp_path / "s.json"
    assert main(["bench", "causal", "--n", "24", "--batch", "3", "--dim", "8", "--rank", "2", "--window", "4",
                 "--repeats", "1", "--lengths", "skewed", "--mean-len", "3", "--kinds", "svd", "exact",
                 "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert {r["lengths"] for r in recs} == {"skewed"} and 24 < recs[0]["events"] < 3 * 24

def test_exact_in_query_blocks_equals_one_block(monkeypatch):
    """Long sequences run the exact kind block by block with checkpointing: outputs and gradients (inputs and
    rel_bias) equal the single-block computation."""
    import solar_dist.ops.causal as causal

    gen = torch.Generator().manual_seed(11)
    x, mask = _batch([37, 20, 1], 37, 8, gen)
    m = _module(8, 2, 3, "exact")
    rel = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 37, 8, generator=gen, dtype=torch.float64)

    def run():
        xx = x.clone().requires_grad_(True)
        y = causal_attention(m, xx, mask, 4, rel, "exact")
        gx, gr = torch.autograd.grad((y * g).sum(), (xx, rel))
        return y, gx, gr

    whole = run()
    monkeypatch.setattr(causal, "EXACT_BLOCK_SCORES", 3 * 2 * 37 * 5)  # blocks of 16 queries (the minimum)
    blocked = run()
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("prefix", ["cumulative", "recompute"])
def test_interest_grad_changes_the_backward_only(prefix):
    """interest_grad: the same output whatever it is; under "none" an event older than the window no longer
    reaches a later position's gradient (it enters that position only through the interests), under "full" and
    "eigenvalues" it does; the k/v projections still learn from the interests under "none"."""
    lengths, N, D, h, r, w = [13, 10, 4], 13, 12, 3, 5, 5
    gen = torch.Generator().manual_seed(7)
    x, mask = _batch(lengths, N, D, gen)
    m = _module(D, h, r, "exact", mass_bias=True)
    rel = torch.randn(h, w + 1, generator=gen, dtype=torch.float64)
    modes = ["full", "none"] + (["eigenvalues"] if prefix == "cumulative" else [])
    outs, far_grads, kv_grads = {}, {}, {}
    for mode in modes:
        xx = x.clone().requires_grad_(True)
        m.zero_grad()
        y = causal_attention(m, xx, mask, w, rel, "svd", prefix, interest_grad=mode)
        outs[mode] = y.detach()
        y[0, 12].square().sum().backward()   # position 12 sees events 8..12 exactly, 0..4 through interests
        far_grads[mode] = float(xx.grad[0, :5].abs().max())
        kv_grads[mode] = float(m.k_proj.weight.grad.abs().sum())
    for mode in modes[1:]:
        torch.testing.assert_close(outs[mode], outs["full"], atol=0, rtol=0)
    assert far_grads["none"] == 0.0 and far_grads["full"] > 1e-6
    if "eigenvalues" in far_grads:
        assert far_grads["eigenvalues"] > 1e-6
    assert kv_grads["none"] > 0.0
    with pytest.raises(ValueError, match="interest_grad"):
        causal_attention(m, x, mask, w, rel, "svd", prefix, interest_grad="detach")
    if prefix == "recompute":
        with pytest.raises(ValueError, match="eigenvalues"):
            causal_attention(m, x, mask, w, rel, "svd", prefix, interest_grad="eigenvalues")
