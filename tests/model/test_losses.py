"""Losses over jagged candidate sets against direct per-request computations."""
import torch
import torch.nn.functional as F

from solar_dist.model.losses import loss_parts


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
