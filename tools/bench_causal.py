#!/usr/bin/env python
"""Benchmark causal attention for next-item training at every position (solar_dist/ops/causal.py).

Times `causal_attention` forward + backward, side by side in one run, for the kinds over N:
    svd       chunked-causal SVD-Attention: interests of each chunk boundary's prefix (running Gram sums,
              prefix="cumulative") + a sliding window
    svd_recompute  the same, every prefix factorised again with --svd-method (prefix="recompute")
    svd_chunks     svd with window_mode="chunks" (the previous and current chunk exact, no event counted twice)
    exact     exact causal softmax over every earlier event, O(N²)
    truncate  the sliding window alone (last-k truncation)
Median of --repeats timed runs after one warm-up, --batch sequences per call. `--lengths full`: every sequence
has N events; `--lengths skewed`: one has N, the others a geometric number with mean --mean-len (capped at N),
as in a batch of real histories (Amazon Games: mean 9 events, longest 860), where most chunk boundaries lie
past their sequence's end.

    python tools/bench_causal.py --n 200 800 2000 --batch 16 --window 32 --rank 16 --json out/bench_causal.json

Prints a table (seconds, and exact/svd, chunks/svd and svd/truncate ratios) and writes a JSON list of records
{kind, n, batch, dim, heads, rank, window, svd_method, seconds}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solar_dist.ops import SVDAttention  # noqa: E402
from solar_dist.ops.causal import CAUSAL_KINDS, causal_attention  # noqa: E402

BENCH_KINDS = CAUSAL_KINDS + ("svd_recompute", "svd_chunks")
#: bench kind -> (op kind, prefix, window_mode)
OP_ARGS = {"svd_recompute": ("svd", "recompute", "sliding"), "svd_chunks": ("svd", "cumulative", "chunks")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[200, 800, 2000])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--svd-method", default="randomized", choices=["randomized", "gram", "exact"])
    p.add_argument("--kinds", nargs="+", default=list(BENCH_KINDS), choices=list(BENCH_KINDS))
    p.add_argument("--lengths", default="full", choices=["full", "skewed"])
    p.add_argument("--mean-len", type=float, default=10.0, help="--lengths skewed: mean of the short sequences")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: the module and inputs in bf16 (the interests factorise in float32 inside)")
    p.add_argument("--json", type=Path, default=None)
    return p


def lengths_for(args, n: int) -> torch.Tensor:
    """(batch,) sequence lengths: all n, or one n and the rest geometric with mean --mean-len, in [1, n]."""
    if args.lengths == "full":
        return torch.full((args.batch,), n)
    gen = torch.Generator().manual_seed(n)
    p = min(1.0, 1.0 / max(args.mean_len, 1.0))
    short = (torch.rand(args.batch - 1, generator=gen).log() / torch.log1p(torch.tensor(-p))).ceil() if p < 1 \
        else torch.ones(args.batch - 1)
    return torch.cat([torch.tensor([n]), short.clamp(1, n).long()])


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module = SVDAttention(args.dim, args.heads, args.rank, svd_method=args.svd_method, power_iters=1)
    module = module.to(device=device, dtype=dtype)
    rel = torch.zeros(args.heads, args.window + 1, device=device, dtype=dtype, requires_grad=True)
    records = []
    for n in args.n:
        x = torch.randn(args.batch, n, args.dim, device=device, dtype=dtype, requires_grad=True)
        mask = torch.arange(n, device=device)[None, :] < lengths_for(args, n).to(device)[:, None]
        for kind in args.kinds:
            op_kind, prefix, window_mode = OP_ARGS.get(kind, (kind, "cumulative", "sliding"))
            times = []
            for i in range(args.repeats + 1):
                sync()
                t0 = time.perf_counter()
                y = causal_attention(module, x, mask, args.window, rel, op_kind, prefix, window_mode=window_mode)
                y.float().square().mean().backward()
                sync()
                if i:  # the first call warms up
                    times.append(time.perf_counter() - t0)
            records.append({"kind": kind, "n": n, "batch": args.batch, "dim": args.dim, "heads": args.heads,
                            "rank": args.rank, "window": args.window, "svd_method": args.svd_method,
                            "device": str(device), "dtype": args.dtype, "lengths": args.lengths,
                            "events": int(mask.sum()),
                            "seconds": statistics.median(times)})
    return records


def print_table(records) -> None:
    by = {(r["n"], r["kind"]): r["seconds"] for r in records}
    print(f"{'N':>6} | {'svd s':>8} | {'svd recompute s':>15} | {'exact s':>8} | {'truncate s':>10} | "
          f"{'exact/svd':>9} | {'recompute/svd':>13} | {'chunks/svd':>10} | {'svd/truncate':>12}")
    for n in sorted({r["n"] for r in records}):
        s, c, e, t, h = (by.get((n, k)) for k in ("svd", "svd_recompute", "exact", "truncate", "svd_chunks"))
        f = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "-"  # noqa: E731
        print(f"{n:>6} | {f(s):>8} | {f(c):>15} | {f(e):>8} | {f(t):>10} | {ratio(e, s):>9} | "
              f"{ratio(c, s):>13} | {ratio(h, s):>10} | {ratio(s, t):>12}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    records = run(args)
    print_table(records)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
