#!/usr/bin/env python
"""Benchmark SVD-Attention against its baselines (design §2, §6).

Times every method side by side in one run, for each (N, M, rank) and pass (fwd, fwd+bwd):

    svd      SVDAttention, one record per --svd-methods value (randomized, gram, exact)
    sdpa     exact softmax attention over all N rows (torch SDPA)
    linear   linear attention (elu+1)
    truncate exact attention over the last --truncate-k rows
    oracle   U-factored exact form (a test oracle, O(M·N) like sdpa)

M = "self" (or 0) means self-attention: the queries are the N memory rows themselves (L = N).

Timing: median over --repeats runs after --warmup runs of ``out = module(query, memory, mask)`` (fwd) or that
plus ``out.square().mean().backward()`` (fwdbwd), all rows valid, batch --batch users.
Peak memory (``peak_bytes``): on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the start
of the call; on CPU the peak of the tensor bytes live in the CPU allocator during one call above those live at
its start, from the allocation/free events of ``torch.profiler`` (``profile_memory=True``; one extra, untimed
call).  Inputs, parameters and the module are allocated before the call and not counted.

Exact SDPA (and the oracle) is skipped, with a note in the record and the table, where its estimated working
set would not fit --mem-budget (fused-kernel blocks of the score matrix plus projections) or where
N > --sdpa-max-n (use it to bound the benchmark's run time: SDPA is O(M·N·D)).

Output: a table (seconds and speed-up vs sdpa), --json (list of records with keys method, svd_method, n, m,
rank, pass, seconds, peak_bytes, + extras) and --plot (log-log time vs N, one panel per M, matplotlib Agg).

Example (the design's target case)::

    python tools/bench_attention.py --n 10000 20000 --m 2000 self --rank 16 --passes fwdbwd --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solar_dist.ops import make_attention  # noqa: E402

ALL_METHODS = ("svd", "sdpa", "linear", "truncate", "oracle")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="solar bench attention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 5000, 10000, 20000],
                   help="history lengths N")
    p.add_argument("--m", nargs="+", default=["self", "1000", "4000"],
                   help="number of queries M; 'self' or 0 = self-attention (L = N)")
    p.add_argument("--rank", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--dim", type=int, nargs="+", default=[128])
    p.add_argument("--heads", type=int, nargs="+", default=[4])
    p.add_argument("--batch", type=int, nargs="+", default=[2], help="users per call (default 2 = cores here)")
    p.add_argument("--methods", nargs="+", default=["svd", "sdpa", "linear", "truncate"], choices=ALL_METHODS)
    p.add_argument("--svd-methods", nargs="+", default=["randomized", "gram"],
                   choices=["randomized", "gram", "exact"])
    p.add_argument("--power-iters", type=int, nargs="+", default=[1], help="randomized: power iterations q")
    p.add_argument("--oversample", type=int, nargs="+", default=[8])
    p.add_argument("--truncate-k", type=int, nargs="+", default=[64])
    p.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--repeats", type=int, nargs="+", default=[3])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sdpa-max-n", type=int, default=0, help="skip sdpa/oracle above this N (0 = no limit)")
    p.add_argument("--mem-budget", type=float, default=0.0,
                   help="bytes available for sdpa's estimated working set (0 = half the free memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def _parse_m(values):
    out = []
    for v in values:
        v = str(v).lower()
        out.append(0 if v in ("self", "0", "n") else int(v))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free_bytes(device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return float(free)
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return 8e9


def _make_inputs(B, N, M, D, dtype, device, seed, need_grad):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mem = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    if need_grad:
        mem.requires_grad_()
    if M == 0:
        q = mem
    else:
        q = torch.randn(B, M, D, generator=g).to(device=device, dtype=dtype)
        if need_grad:
            q.requires_grad_()
    return q, mem, mask


def _step(module, q, mem, mask, backward):
    out = module(q, mem, mask)
    if backward:
        out.square().mean().backward()
        module.zero_grad(set_to_none=True)
        mem.grad = None
        if q is not mem:
            q.grad = None
    return out


def _time(module, q, mem, mask, backward, repeats, warmup, device):
    for _ in range(warmup):
        _step(module, q, mem, mask, backward)
    ts, cs = [], []
    for _ in range(repeats):
        _sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        _step(module, q, mem, mask, backward)
        _sync(device)
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), ts, statistics.median(cs)


def _peak_bytes(module, q, mem, mask, backward, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(module, q, mem, mask, backward)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(module, q, mem, mask, backward)
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort()
    cur = peak = 0
    for _, nb in events:
        cur += nb
        peak = max(peak, cur)
    return int(peak)


def _global_warmup(device, dtype):
    """One small call of every kind first, so that library/thread-pool initialisation is not timed."""
    q, mem, mask = _make_inputs(2, 256, 64, 32, dtype, device, 0, True)
    for kind in ALL_METHODS:
        for sm in ("randomized", "gram"):
            m = make_attention(kind, 32, 4, 8, svd_method=sm).to(device=device, dtype=dtype)
            _step(m, q, mem, mask, True)


def _sdpa_fits(B, H, L, N, D, elem, backward, budget):
    """Estimated working set of exact attention.  With all rows valid ExactAttention calls SDPA without a mask,
    which uses the fused (flash) kernel on CPU and CUDA: scores are processed in blocks (~512 keys); the math
    kernel (materialised B·h·L·N scores) is assumed only where no fused kernel exists."""
    fused = True
    block = min(N, 512) if fused else N
    scores = B * H * L * block * 4 * (3 if backward else 1)
    proj = B * (L + 2 * N) * D * elem * (4 if backward else 2)
    return scores + proj <= budget, scores + proj


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    budget = args.mem_budget or 0.5 * _free_bytes(device)
    ms = _parse_m(args.m)
    records = []
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    _global_warmup(device, dtype)
    for B in args.batch:
        for D in args.dim:
            for H in args.heads:
                for N in args.n:
                    for M in ms:
                        L = N if M == 0 else M
                        for pas in args.passes:
                            backward = pas == "fwdbwd"
                            q, mem, mask = _make_inputs(B, N, M, D, dtype, device, args.seed, backward)
                            # (method, svd_method, rank-dependent?, kwargs) variants
                            variants = []
                            for meth in args.methods:
                                if meth == "svd":
                                    for sm in args.svd_methods:
                                        for pi in (args.power_iters if sm == "randomized" else [0]):
                                            for ov in (args.oversample if sm == "randomized" else [0]):
                                                variants.append(("svd", sm, True, dict(
                                                    svd_method=sm, power_iters=pi, oversample=ov)))
                                elif meth == "truncate":
                                    for k in args.truncate_k:
                                        variants.append(("truncate", None, False, dict(truncate_k=k)))
                                elif meth == "oracle":
                                    variants.append(("oracle", None, True, dict(svd_method="randomized")))
                                else:
                                    variants.append((meth, None, False, {}))
                            rank_free_cache = {}
                            for r in args.rank:
                                for meth, sm, rank_dep, kw in variants:
                                    key = (meth, tuple(sorted(kw.items())))
                                    rec = dict(method=meth, svd_method=sm, n=N, m=L, rank=r, **{"pass": pas},
                                               seconds=None, peak_bytes=None, self_attention=(M == 0),
                                               batch=B, dim=D, heads=H, dtype=args.dtype, device=str(device),
                                               threads=torch.get_num_threads(), repeats=args.repeats[0], note="")
                                    rec.update({k: v for k, v in kw.items() if k != "svd_method"})
                                    if not rank_dep and key in rank_free_cache:
                                        cached = rank_free_cache[key]
                                        rec.update(seconds=cached["seconds"], peak_bytes=cached["peak_bytes"],
                                                   times=cached.get("times"), cpu_seconds=cached.get("cpu_seconds"),
                                                   note=cached["note"] or
                                                   "rank-independent: measured once")
                                        records.append(rec)
                                        continue
                                    if meth in ("sdpa", "oracle"):
                                        fits, need = _sdpa_fits(B, H, L, N, D, elem, backward, budget)
                                        if not fits or (args.sdpa_max_n and N > args.sdpa_max_n):
                                            rec["note"] = (f"skipped: estimated {need / 2**30:.1f} GiB > budget "
                                                           f"{budget / 2**30:.1f} GiB" if not fits else
                                                           f"skipped: N > --sdpa-max-n {args.sdpa_max_n}")
                                            records.append(rec)
                                            rank_free_cache.setdefault(key, rec)
                                            log(f"  {meth:9s} N={N} M={L} {pas}: {rec['note']}")
                                            continue
                                    torch.manual_seed(args.seed)
                                    module = make_attention(meth, D, H, r, **kw).to(device=device, dtype=dtype)
                                    med, ts, cpu = _time(module, q, mem, mask, backward, args.repeats[0],
                                                         args.warmup, device)
                                    rec["seconds"] = med
                                    rec["times"] = ts
                                    rec["cpu_seconds"] = cpu
                                    if not args.no_memory:
                                        rec["peak_bytes"] = _peak_bytes(module, q, mem, mask, backward, device)
                                    records.append(rec)
                                    if not rank_dep:
                                        rank_free_cache[key] = rec
                                    pk = f"{rec['peak_bytes'] / 2**20:8.1f} MiB" if rec["peak_bytes"] is not None else ""
                                    log(f"  {meth:9s} {sm or '':10s} B={B} N={N} M={L} r={r} {pas:6s} "
                                        f"{med * 1e3:10.2f} ms {pk}")
                                    del module
    return records


def _label(rec):
    if rec["method"] == "svd":
        extra = f",q={rec.get('power_iters')}" if rec["svd_method"] == "randomized" else ""
        return f"svd[{rec['svd_method']}{extra}]"
    if rec["method"] == "truncate":
        return f"truncate[k={rec.get('truncate_k')}]"
    return rec["method"]


def print_table(records, out=None):
    out = out or sys.stdout
    groups = {}
    for rec in records:
        k = (rec["batch"], rec["dim"], rec["heads"], rec["n"], rec["m"], rec["self_attention"], rec["rank"], rec["pass"])
        groups.setdefault(k, []).append(rec)
    print("\nmedian wall seconds per call, speed-up = t(sdpa) / t(method); cpu = median process CPU seconds "
          "(robust to other load on the machine)", file=out)
    hdr = (f"{'B':>2} {'N':>6} {'M':>6} {'r':>3} {'pass':6} {'method':24} {'seconds':>10} {'speed-up':>9} "
           f"{'cpu s':>9} {'cpu sp-up':>9} {'peak MiB':>9}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for k, recs in groups.items():
        B, D, H, N, L, selfa, r, pas = k
        sd = next((x["seconds"] for x in recs if x["method"] == "sdpa" and x["seconds"]), None)
        sdc = next((x.get("cpu_seconds") for x in recs if x["method"] == "sdpa" and x["seconds"]), None)
        for rec in recs:
            m_s = "self" if selfa else str(L)
            if rec["seconds"] is None:
                print(f"{B:>2} {N:>6} {m_s:>6} {r:>3} {pas:6} {_label(rec):24} {'-':>10} {'':>9}  {rec['note']}",
                      file=out)
                continue
            su = f"{sd / rec['seconds']:9.1f}" if sd else f"{'n/a':>9}"
            c = rec.get("cpu_seconds")
            cs = f"{c:9.4f}" if c else f"{'':>9}"
            csu = f"{sdc / c:9.1f}" if (sdc and c) else f"{'n/a':>9}"
            pk = f"{rec['peak_bytes'] / 2**20:9.1f}" if rec["peak_bytes"] is not None else f"{'':>9}"
            print(f"{B:>2} {N:>6} {m_s:>6} {r:>3} {pas:6} {_label(rec):24} {rec['seconds']:10.4f} {su} {cs} {csu} {pk}",
                  file=out)
    # scaling t(2N)/t(N) for svd
    lines = []
    for rec in records:
        if rec["method"] != "svd" or rec["seconds"] is None:
            continue
        twin = [x for x in records if _label(x) == _label(rec) and x["n"] == 2 * rec["n"] and x["rank"] == rec["rank"]
                and x["pass"] == rec["pass"] and x["self_attention"] == rec["self_attention"]
                and (x["self_attention"] or x["m"] == rec["m"]) and x["seconds"]]
        for x in twin:
            lines.append(f"  {_label(rec):24} M={'self' if rec['self_attention'] else rec['m']} r={rec['rank']} "
                         f"{rec['pass']}: t({2 * rec['n']})/t({rec['n']}) = {x['seconds'] / rec['seconds']:.2f}")
    if lines:
        print("\nscaling in N (target <= 2.1):", file=out)
        print("\n".join(lines), file=out)


def plot(records, path: Path, rank=None, pas="fwdbwd"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["seconds"] is not None]
    if not recs:
        return
    ranks = sorted({r["rank"] for r in recs})
    rank = rank if rank in ranks else (16 if 16 in ranks else ranks[0])
    passes = sorted({r["pass"] for r in recs})
    pas = pas if pas in passes else passes[0]
    recs = [r for r in recs if r["rank"] == rank and r["pass"] == pas]
    ms = sorted({("self" if r["self_attention"] else r["m"]) for r in recs}, key=lambda v: (v != "self", v if v != "self" else 0))
    fig, axes = plt.subplots(1, len(ms), figsize=(5 * len(ms), 4), squeeze=False)
    for ax, mv in zip(axes[0], ms):
        sel = [r for r in recs if ("self" if r["self_attention"] else r["m"]) == mv]
        for lab in sorted({_label(r) for r in sel}):
            pts = sorted((r["n"], r["seconds"]) for r in sel if _label(r) == lab)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (history length)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"M={mv}, r={rank}, {pas}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    records = run(args)
    print_table(records)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
