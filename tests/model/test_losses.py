"""Losses over jagged candidate sets against direct per-request computations."""
import torch
import torch.nn.functional as F

import pytest

from solar_dist.model.losses import catalogue_logsumexp, loss_parts


def test_listwise_matches_per_request_cross_entropy():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 5, 4])
    logits = torch.randn(int(lengths.sum()), dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(int(lengths.sum()), dtype=torch.float64)
    labels[[1, 4, 6, 9]] = 1.0  # request 0: one positive; 1: none; 2: two; 3: one
    labels[3] = 0.0
    parts = loss_parts(logits, labels, lengths)
    expected, count = 0.0, 0
    for seg_logits, seg_labels in zip(logits.split(lengths.tolist()), labels.split(lengths.tolist())):
        if seg_labels.sum() == 0:
            continue
        target = seg_labels / seg_labels.sum()
        expected = expected + -(target * F.log_softmax(seg_logits, 0)).sum()
        count += 1
    assert torch.allclose(parts.listwise_sum, expected)
    assert parts.listwise_count.item() == count
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    assert torch.allclose(parts.bce_sum.double(), bce)
    parts.listwise_sum.backward()
    assert torch.isfinite(logits.grad).all()


def test_listwise_stable_for_huge_logits():
    lengths = torch.tensor([2, 2])
    logits = torch.tensor([1e4, -1e4, 3e4, 3e4], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    parts = loss_parts(logits, labels, lengths)
    assert torch.isfinite(parts.listwise_sum)
    assert abs(parts.listwise_sum.item() - torch.log(torch.tensor(2.0)).item()) < 1e-4


@pytest.mark.parametrize("T, I, max_scores", [(1, 1, 1), (7, 5, 3), (50, 33, 64), (64, 10, 1 << 20), (0, 4, 8)])
def test_catalogue_logsumexp_matches_its_twin(T, I, max_scores):
    """Chunked forward and recomputing backward equal torch.logsumexp(states @ items.T) and its autograd,
    for chunks smaller than one row of scores, uneven last chunks, one chunk and no rows."""
    gen = torch.Generator().manual_seed(T * 31 + I)
    s = torch.randn(T, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    it = (3 * torch.randn(I, 6, generator=gen, dtype=torch.float64)).requires_grad_()
    g = torch.randn(T, generator=gen, dtype=torch.float64)
    got = catalogue_logsumexp(s, it, max_scores=max_scores)
    gs, gi = torch.autograd.grad(got, (s, it), g)
    want = torch.logsumexp(s @ it.T, 1)
    ws, wi = torch.autograd.grad(want, (s, it), g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs, ws, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gi, wi, rtol=1e-10, atol=1e-12)


def test_catalogue_logsumexp_is_stable_and_names_bad_input():
    s = torch.tensor([[1000.0, 0.0]])
    it = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert torch.isfinite(catalogue_logsumexp(s, it)).all()
    with pytest.raises(ValueError, match="share D"):
        catalogue_logsumexp(s, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="empty"):
        catalogue_logsumexp(s, torch.zeros(0, 2))
