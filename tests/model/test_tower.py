"""The SOLAR tower on jagged batches: shapes, gradients, and per-request independence."""
import pytest
import torch

from solar_dist.config import ModelConfig
from solar_dist.model.jagged import jagged_to_padded, padded_to_jagged, positions_from_end
from solar_dist.model.tower import SolarTower, recency_bucket

ATTENTIONS = ["svd", "sdpa", "linear", "truncate", "oracle"]


def make_inputs(lengths, cand_lengths, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(int(sum(lengths)), dim, generator=g)
    cand = torch.randn(int(sum(cand_lengths)), dim, generator=g)
    user = torch.randn(len(lengths), dim, generator=g)
    return hist, torch.tensor(lengths), cand, torch.tensor(cand_lengths), user


def test_jagged_padded_round_trip():
    lengths = torch.tensor([3, 0, 5, 1])
    v = torch.arange(9.0)[:, None].repeat(1, 2)
    p, m = jagged_to_padded(v, lengths)
    assert p.shape == (4, 5, 2) and m.sum() == 9
    assert torch.equal(padded_to_jagged(p, m), v)
    assert positions_from_end(torch.tensor([3, 2])).tolist() == [2, 1, 0, 1, 0]
    assert recency_bucket(torch.tensor([0, 1, 2, 3, 4, 7, 8, 10**6]), 8).tolist() == [0, 1, 1, 2, 2, 3, 3, 7]
    with pytest.raises(ValueError, match="lengths sum"):
        jagged_to_padded(v, torch.tensor([1, 1]))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_backward_shapes(attention):
    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, num_heads=2, rank=4, attention=attention, recent_k=3, truncate_k=4,
                      scorer_hidden=[8], set_layer=(attention == "svd"), svd_method="exact")
    dim = 8
    tower = SolarTower(cfg, dim)
    hist, hl, cand, cl, user = make_inputs([7, 1, 12, 3], [4, 2, 5, 1], dim)
    for t in (hist, cand, user):
        t.requires_grad_(True)
    logits = tower(hist, hl, cand, cl, user)
    assert logits.shape == (12,)
    logits.sum().backward()
    for t in (hist, cand, user):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tower.parameters() if p.requires_grad
               and p.grad is not None)
    assert hist.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["svd", "sdpa"])
def test_each_request_equals_itself_alone(attention):
    torch.manual_seed(1)
    cfg = ModelConfig(depth=2, num_heads=2, rank=4, attention=attention, recent_k=3, scorer_hidden=[8],
                      svd_method="exact")
    dim = 8
    tower = SolarTower(cfg, dim).double().eval()
    lengths, cands = [9, 2, 15], [3, 4, 2]
    hist, hl, cand, cl, user = make_inputs(lengths, cands, dim)
    hist, cand, user = hist.double(), cand.double(), user.double()
    batched = tower(hist, hl, cand, cl, user)
    h_off, c_off = 0, 0
    for i, (n, m) in enumerate(zip(lengths, cands)):
        alone = tower(hist[h_off:h_off + n], torch.tensor([n]), cand[c_off:c_off + m], torch.tensor([m]),
                      user[i:i + 1])
        assert torch.allclose(batched[c_off:c_off + m], alone, atol=1e-9), i
        h_off, c_off = h_off + n, c_off + m


def test_old_events_reach_the_logits_beyond_the_recent_window():
    """An event far older than the recent window still changes the scores (through the interests), and
    with truncation it does not."""
    dim = 8
    hist, hl, cand, cl, user = make_inputs([200], [5], dim, seed=3)
    outs = {}
    for attention in ("svd", "truncate"):
        torch.manual_seed(0)
        cfg = ModelConfig(depth=1, num_heads=2, rank=4, attention=attention, recent_k=4, truncate_k=4,
                          scorer_hidden=[8], svd_method="exact")
        tower = SolarTower(cfg, dim).double().eval()
        changed = hist.double().clone()
        changed[:50] += 3.0  # perturb the oldest quarter only
        a = tower(hist.double(), hl, cand.double(), cl, user.double())
        b = tower(changed, hl, cand.double(), cl, user.double())
        outs[attention] = (a - b).abs().max().item()
    assert outs["svd"] > 1e-3
    assert outs["truncate"] < 1e-12


@pytest.mark.parametrize("attention", ["svd", "sdpa", "truncate"])
def test_interest_far_bias_trains_the_far_slot_of_causal_svd_only(attention):
    """model.interest_far_bias: under causal SVD the far slot of each block's rel_bias gets a gradient (it biases
    the interests); without the option it stays unused there. Exact attention uses it either way (its tokens
    older than the window); truncation never sees them."""
    lengths = [20, 5, 12]
    hist, hl, _, _, _ = make_inputs(lengths, [1, 1, 1], 16, seed=3)
    grads = {}
    for far in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(depth=1, num_heads=2, rank=4, attention=attention, causal_window=4, truncate_k=4,
                          svd_method="gram", interest_far_bias=far)
        tower = SolarTower(cfg, 16, head="states")
        tower(hist, hl, mode="states").square().sum().backward()
        g = tower.blocks[0].rel_bias.grad
        grads[far] = float(g[:, -1].abs().sum())
    if attention == "svd":
        assert grads[False] == 0.0 and grads[True] > 0.0
    elif attention == "sdpa":
        assert grads[False] > 0.0 and grads[True] == grads[False]  # the option does not touch exact attention
    else:
        assert grads[False] == grads[True] == 0.0


def test_causal_window_mode_chunks_is_exact_attention_on_short_histories():
    """model.causal_window_mode=chunks: a tower whose histories are at most two windows long computes exactly what
    the exact-attention tower with the same weights computes; a longer history reads its interests and does not.
    The default (sliding) reads interests from the second window on."""
    dim, w = 16, 4
    towers = {}
    for attention, mode in (("sdpa", "sliding"), ("svd", "chunks"), ("svd", "sliding")):
        torch.manual_seed(0)
        cfg = ModelConfig(depth=2, num_heads=2, rank=3, attention=attention, causal_window=w, svd_method="gram",
                          causal_window_mode=mode)
        towers[attention, mode] = SolarTower(cfg, dim, head="states").double().eval()
    state = towers["sdpa", "sliding"].state_dict()
    for key in (("svd", "chunks"), ("svd", "sliding")):
        _, unexpected = towers[key].load_state_dict(state, strict=False)
        assert not unexpected, unexpected
    short, hl, _, _, _ = make_inputs([8, 5, 1], [1, 1, 1], dim, seed=4)
    ref = towers["sdpa", "sliding"](short.double(), hl, mode="states")
    torch.testing.assert_close(towers["svd", "chunks"](short.double(), hl, mode="states"), ref, atol=1e-10, rtol=1e-8)
    assert not torch.allclose(towers["svd", "sliding"](short.double(), hl, mode="states"), ref)
    long, hl2, _, _, _ = make_inputs([9], [1], dim, seed=5)
    assert not torch.allclose(towers["svd", "chunks"](long.double(), hl2, mode="states"),
                              towers["sdpa", "sliding"](long.double(), hl2, mode="states"))
