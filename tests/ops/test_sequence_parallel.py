"""Sequence parallelism (design §4, §5.7): P gloo processes on 127.0.0.1, uneven contiguous chunks per user
(an empty chunk included); outputs and gradients equal the single-process ones; bytes per call independent of N.

Loss for the parity checks: total = Σ_p (local loss of rank p); rank p attends its own slice of the queries.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from solar_dist.ops import COMM_STATS, compact_interests_ex, make_attention, sp_bytes_per_call
from solar_dist.ops.collectives import all_reduce_sum

from ._helpers import jagged_batch

D, H, R = 8, 2, 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuts(lengths, world, seed):
    """Per-user contiguous cut points; user 0 gets an empty chunk on rank world-1 when world > 1."""
    g = torch.Generator().manual_seed(seed)
    cuts = []
    for b, n in enumerate(lengths):
        inner = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
        c = [0] + inner + [n]
        if b == 0 and world > 1:
            c[-2] = n                                   # last rank gets nothing of user 0
        cuts.append(c)
    return cuts


def _local(mem, mask, cuts, p, seed):
    B, _, Dm = mem.shape
    lens = [c[p + 1] - c[p] for c in cuts]
    n_loc = max(lens) + 2
    g = torch.Generator().manual_seed(seed + 100 + p)
    h = (torch.randn(B, n_loc, Dm, generator=g, dtype=torch.float64) * 1e3).to(mem.dtype)   # garbage padding
    m = torch.zeros(B, n_loc, dtype=torch.bool)
    for b, c in enumerate(cuts):
        h[b, :lens[b]] = mem[b, c[p]:c[p + 1]]
        m[b, :lens[b]] = mask[b, c[p]:c[p + 1]]
    return h, m, lens


def _check_case(rank, world, group, method, basis_grad, mass_bias, dtype, seed):
    lengths = [13, 9, 0, 17]
    B, N, Lq = len(lengths), 17, 3
    g = torch.Generator().manual_seed(seed)
    mem, mask = jagged_batch(lengths, N, D, g, dtype=dtype)
    q_all = torch.randn(B, world * Lq, D, generator=g, dtype=torch.float64).to(dtype)
    w_all = torch.randn(B, world * Lq, D, generator=g, dtype=torch.float64).to(dtype)
    extra = torch.randn(B, 2, D, generator=g, dtype=torch.float64).to(dtype)
    kw = dict(svd_method=method, basis_grad=basis_grad, mass_bias=mass_bias, power_iters=2)
    torch.manual_seed(seed)
    m1 = make_attention("svd", D, H, R, **kw).to(dtype)
    m2 = make_attention("svd", D, H, R, **kw).to(dtype)
    m2.load_state_dict(m1.state_dict())
    tol = dict(rtol=1e-8, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)

    # single process, all rows, all queries
    mem1 = mem.clone().requires_grad_()
    q1 = q_all.clone().requires_grad_()
    ex1 = extra.clone().requires_grad_()
    out1 = m1(q1, mem1, mask, extra_kv=ex1)
    it1 = compact_interests_ex(mem1, mask, R, method, basis_grad=basis_grad)
    (w_all * out1).sum().add((it1.z * w_all[:, :R]).sum()).add(it1.mass.sum()).backward()

    # sequence parallel: this rank's chunk of every user and its slice of the queries
    cuts = _cuts(lengths, world, seed)
    h_loc, m_loc, lens = _local(mem, mask, cuts, rank, seed)
    h_loc.requires_grad_()
    sl = slice(rank * Lq, (rank + 1) * Lq)
    q2 = q_all[:, sl].clone().requires_grad_()
    ex2 = extra.clone().requires_grad_()
    out2 = m2(q2, h_loc, m_loc, extra_kv=ex2, sp_group=group)
    it2 = compact_interests_ex(h_loc, m_loc, R, method, basis_grad=basis_grad, sp_group=group)
    # the interests' own loss terms are counted once (by rank 0) in the total
    extra_loss = (it2.z * w_all[:, :R]).sum() + it2.mass.sum() if rank == 0 else 0.0 * it2.z.sum() + 0.0 * it2.mass.sum()
    ((w_all[:, sl] * out2).sum() + extra_loss).backward()

    assert torch.equal(it2.alive, it1.alive)
    torch.testing.assert_close(it2.z, it1.z, **tol)
    torch.testing.assert_close(it2.mass, it1.mass, **tol)
    torch.testing.assert_close(out2, out1[:, sl], **tol)
    torch.testing.assert_close(q2.grad, q1.grad[:, sl], **tol)
    for b, c in enumerate(cuts):
        torch.testing.assert_close(h_loc.grad[b, :lens[b]], mem1.grad[b, c[rank]:c[rank + 1]], **tol)
        assert torch.all(h_loc.grad[b, lens[b]:] == 0)
    # replicated leaves (parameters, extra tokens): the total gradient is the sum over ranks
    dist.all_reduce(ex2.grad, group=group)
    torch.testing.assert_close(ex2.grad, ex1.grad, **tol)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        gsum = p2.grad.clone()
        dist.all_reduce(gsum, group=group)
        torch.testing.assert_close(gsum, p1.grad, **tol, msg=lambda s: f"{name}: {s}")


def _check_bytes(rank, world, group, method):
    """Bytes per call do not depend on N (and match sp_bytes_per_call)."""
    per_n = []
    for n in (6, 60):
        g = torch.Generator().manual_seed(n)
        h, mask = jagged_batch([n, n // 2], n, D, g, dtype=torch.float32)
        h.requires_grad_()
        COMM_STATS.reset()
        it = compact_interests_ex(h, mask, R, method, sp_group=group)
        fwd = COMM_STATS.bytes_all_reduced
        (it.z.sum() + it.mass.sum()).backward()
        per_n.append((fwd, COMM_STATS.bytes_all_reduced, COMM_STATS.calls))
    assert per_n[0] == per_n[1], per_n
    assert per_n[0][0] == sp_bytes_per_call(2, D, R, method)
    assert per_n[0][1] == sp_bytes_per_call(2, D, R, method, backward=True)


def _check_all_reduce_grad(rank, world, group):
    """y = Σ_p x_p; total loss Σ_p L_p(y) with L_p = (p+1)·Σ y³ -> dL/dx_q = Σ_p (p+1)·3y² on every rank."""
    x = torch.arange(4, dtype=torch.float64).add(rank).requires_grad_()
    y = all_reduce_sum(x, group)
    ((rank + 1) * y.pow(3).sum()).backward()
    ys = sum(torch.arange(4, dtype=torch.float64) + p for p in range(world))
    torch.testing.assert_close(y.detach(), ys)
    torch.testing.assert_close(x.grad, sum(p + 1 for p in range(world)) * 3 * ys.square())


def _worker(rank, world, port, plan):
    """plan: list of (P, case); P-rank cases run on the subgroup [0, P) (other ranks skip them), so that one
    spawn of max(P) processes covers several group sizes."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = {P: dist.new_group(list(range(P))) for P in sorted({P for P, _ in plan})}
        for P, case in plan:
            if rank >= P:
                continue
            group = groups[P]
            if case[0] == "allreduce":
                _check_all_reduce_grad(rank, P, group)
            elif case[0] == "bytes":
                _check_bytes(rank, P, group, case[1])
            else:
                _check_case(rank, P, group, *case)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world, plan):
    mp.spawn(_worker, args=(world, _free_port(), plan), nprocs=world, join=True)


F64, F32 = torch.float64, torch.float32


@pytest.mark.multiprocess
def test_sp_two_and_three_ranks():
    """P = 2 and P = 3 (one spawn of 3 processes; the P = 2 cases run on the subgroup {0, 1})."""
    _run(3, [(2, ("allreduce",)), (3, ("allreduce",)),
             (2, ("gram", "full", True, F64, 1)), (2, ("randomized", "detach", True, F64, 3)),
             (3, ("randomized", "full", True, F64, 7)), (3, ("gram", "full", False, F32, 6)),
             (2, ("bytes", "gram")), (3, ("bytes", "randomized"))])


@pytest.mark.slow   # ~15-45 s on 2 shared cores (4 processes)
@pytest.mark.multiprocess
def test_sp_four_ranks_and_more_cases():
    _run(4, [(4, ("allreduce",)), (4, ("randomized", "full", True, F32, 8)), (4, ("gram", "full", False, F64, 9)),
             (4, ("randomized", "detach", True, F64, 10)), (4, ("bytes", "randomized")),
             (2, ("randomized", "full", False, F64, 2)), (2, ("gram", "detach", False, F32, 4)),
             (3, ("randomized", "full", True, F32, 5)), (3, ("gram", "detach", True, F64, 11))])


def test_sp_exact_rejected_and_bytes_formula():
    with pytest.raises(ValueError, match="method"):
        compact_interests_ex(torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), 2, "exact", sp_group=object())
    assert sp_bytes_per_call(2, 8, 3, "gram") == sp_bytes_per_call(2, 8, 3, "gram")
    with pytest.raises(ValueError, match="method"):
        sp_bytes_per_call(2, 8, 3, "exact")
