#!/usr/bin/env python
"""Loader throughput: the Ray Data loader vs the PyArrow loader on lifelong histories (no model).

Both loaders iterate the same BatchPlan over the same training split, side by side in one run
(`solar bench data ...` or `python tools/bench_data.py ...`). The consumer does nothing but touch each Batch
(sum of history lengths), so the numbers are what the loader can feed a training step at most.

Data: a synthetic data set whose histories all have `--hist-len` events (default 10,000), `--requests`
training requests (default 256), written once to `--data` (default data/bench_data_h<hist-len>_r<requests>).

Timing per loader: `setup_s` (construction: for Ray, starting the local Ray, the Ray Data read and the row
check), `first_epoch_s` (epoch 0, includes Ray's worker start-up: importing torch/torchrec in the workers),
then `--epochs` timed epochs: `requests_per_s` = requests / seconds and `events_per_s` = history events /
seconds over those epochs (median epoch). Ray's loader uses `--prefetch` batch tasks in flight; the PyArrow
loader a `--prefetch`-deep background thread.

Example:
    solar bench data --hist-len 10000 --requests 256 --batch-size 32 --epochs 3 --json runs/bench_data.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="solar bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hist-len", type=int, default=10000, help="events per history (min = max)")
    p.add_argument("--requests", type=int, default=256, help="training requests")
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up epoch)")
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--rows-per-file", type=int, default=64)
    p.add_argument("--data", default=None, help="data set directory (synthesised when absent)")
    p.add_argument("--loaders", nargs="+", default=["pyarrow", "ray"], choices=["pyarrow", "ray"])
    p.add_argument("--ray-cpus", type=int, default=0, help="local Ray CPUs (0 = all)")
    p.add_argument("--ray-address", default="", help="attach to this Ray cluster instead of starting one")
    p.add_argument("--object-store-mb", type=int, default=500)
    p.add_argument("--loader-cpus", type=float, default=0.0, help="CPUs each Ray loader task reserves")
    p.add_argument("--json", default=None, help="write the records here")
    return p


def _config(args: argparse.Namespace, data: Path):
    from solar_dist.config import load_config

    n_users = int(round(args.requests / 0.9))
    return load_config(None, [
        f"data.path={data}", f"data.batch_size={args.batch_size}", f"data.prefetch_batches={args.prefetch}",
        f"data.synth.num_users={n_users}", "data.synth.num_items=20000",
        f"data.synth.min_hist_len={args.hist_len}", f"data.synth.max_hist_len={args.hist_len}",
        f"data.synth.num_candidates={args.candidates}", "data.synth.valid_fraction=0.05",
        "data.synth.test_fraction=0.05", f"data.synth.rows_per_file={args.rows_per_file}",
        f"ray.num_cpus={args.ray_cpus}", f"ray.object_store_mb={args.object_store_mb}",
        f"ray.loader_cpus={args.loader_cpus}",
    ] + ([f"ray.address={args.ray_address}"] if args.ray_address else []))


def _run(name: str, make, epochs: int, batch_size: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    loader = make()
    setup = time.perf_counter() - t0

    def one(epoch: int):
        t = time.perf_counter()
        n = ev = 0
        for b in loader.epoch(epoch):
            n += b.batch_size
            ev += int(b.hist_lengths.sum())
        return time.perf_counter() - t, n, ev

    first, _, _ = one(0)
    timed = [one(e) for e in range(1, epochs + 1)]
    secs = [t for t, _, _ in timed]
    med = statistics.median(secs)
    n, ev = timed[0][1], timed[0][2]
    if hasattr(loader, "close"):
        loader.close()
    return {"loader": name, "setup_s": setup, "first_epoch_s": first, "epoch_s": secs, "median_epoch_s": med,
            "requests_per_epoch": n, "batches_per_epoch": len(loader), "batch_size": batch_size,
            "requests_per_s": n / med, "events_per_s": ev / med}


def main(argv: List[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data = Path(args.data or REPO / "data" / f"bench_data_h{args.hist_len}_r{args.requests}")
    cfg = _config(args, data)
    from solar_dist.data.schema import dataset_exists, read_split

    if not dataset_exists(data):
        from solar_dist.data.synth import generate

        t = time.perf_counter()
        generate(cfg.data.synth, data, verbose=False)
        print(f"[bench data] synthesised {data} in {time.perf_counter() - t:.1f}s", flush=True)
    table = read_split(data, "train")  # ~ --requests rows (the synthetic split sizes are rounded)
    from solar_dist.data.loader import ArrowLoader

    kw = dict(dp_rank=0, dp_size=1, shuffle=True, seed=0, bucket_batches=cfg.data.bucket_batches,
              max_hist_len=0, prefetch=args.prefetch)
    records = []
    for name in args.loaders:
        if name == "pyarrow":
            make = lambda: ArrowLoader(table, args.batch_size, **kw)  # noqa: E731
        else:
            from solar_dist.data.ray_loader import RayLoader

            make = lambda: RayLoader(cfg, table, args.batch_size, **kw)  # noqa: E731
        rec = _run(name, make, args.epochs, args.batch_size)
        rec.update(hist_len=args.hist_len, requests=table.num_rows, prefetch=args.prefetch,
                   cpus=os.cpu_count(), host=platform.node())
        records.append(rec)
        print(f"[bench data] {name}: {rec['requests_per_s']:.1f} requests/s", flush=True)

    print(f"\nhistories of {args.hist_len:,} events, {table.num_rows} requests, batch {args.batch_size}, "
          f"prefetch {args.prefetch}, {os.cpu_count()} CPUs\n")
    print("| loader | requests/s | events/s | median epoch s | first epoch s | setup s |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['loader']} | {r['requests_per_s']:.1f} | {r['events_per_s']:,.0f} | {r['median_epoch_s']:.2f} "
              f"| {r['first_epoch_s']:.2f} | {r['setup_s']:.2f} |")
    if len(records) == 2:
        print(f"\nray / pyarrow throughput: {records[1]['requests_per_s'] / records[0]['requests_per_s']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2))
        print(f"records: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
