"""End-to-end training throughput: the SVD tower vs the same model with exact attention.

For each history length N (fixed per data set), candidate count M, attention kind and process layout
(1 process; 2 processes dp=2; 2 processes sp=2) it trains a few steps through `launch/local.sh` (the real
DeepSpeed launcher, TorchRec DMP, gloo) and reads the run's metrics.json: requests/s over the timed steps and
peak RSS per rank. Writes JSON (+ a plot) and prints a table with the SVD/exact ratio.

    solar bench train --n 1000 5000 10000 --m 1000 --json out/bench_train.json --plot out/bench_train.png
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
SETUPS = {"single": (1, 1), "dp2": (2, 1), "sp2": (2, 2)}


def _dataset(root: Path, n: int, m: int, users: int, dim_items: int) -> Path:
    from solar_dist.config import SynthConfig
    from solar_dist.data.schema import dataset_exists
    from solar_dist.data.synth import generate

    path = root / f"n{n}_m{m}_u{users}"
    if not dataset_exists(path):
        generate(SynthConfig(num_users=users, num_items=dim_items, min_hist_len=n, max_hist_len=n,
                             num_candidates=m, valid_fraction=0.1, test_fraction=0.1, seed=1), path, verbose=False)
    return path


def run_one(data: Path, run_dir: Path, nproc: int, sp: int, attention: str, batch: int, steps: int,
            extra: Sequence[str]) -> dict:
    per_rank_batch = batch // (nproc // sp)
    cmd = ["bash", str(REPO / "launch" / "local.sh"), str(nproc), str(REPO / "configs" / "quickstart.yaml"),
           f"data.path={data}", f"train.run_dir={run_dir}", "data.if_missing=error",
           f"data.batch_size={per_rank_batch}", "data.eval_batch_size=2", f"parallel.sp={sp}",
           f"model.attention={attention}", f"train.max_steps={steps}", "train.epochs=1", "eval.max_batches=1",
           "train.progress=false", "data.bucket_batches=0", *extra]
    rendezvous = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "DS_ACCELERATOR": "cpu",
           "VENV": str(Path(sys.executable).parent.parent)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"requests_per_s": m["train_requests_per_s"], "events_per_s": m["train_events_per_s"],
            "peak_rss_bytes": m["peak_rss_bytes_per_rank"], "steps": m["steps"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="solar bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 5000, 10000])
    p.add_argument("--m", type=int, nargs="+", default=[1000])
    p.add_argument("--attention", nargs="+", default=["svd", "sdpa"], choices=["svd", "sdpa", "linear", "truncate"])
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--batch", type=int, default=4, help="global requests per step")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--work", default="out/bench_train_work")
    p.add_argument("--json", default="out/bench_train.json")
    p.add_argument("--plot", default=None)
    p.add_argument("extra", nargs="*", help="config overrides for every run, key=value")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records: List[dict] = []
    for n in args.n:
        for m in args.m:
            data = _dataset(work / "data", n, m, users=max(8 * args.batch, 40), dim_items=5000)
            for setup in args.setups:
                nproc, sp = SETUPS[setup]
                for att in args.attention:
                    rec = {"n": n, "m": m, "setup": setup, "attention": att, "nproc": nproc, "sp": sp,
                           "batch": args.batch}
                    if sp > 1 and att != "svd":
                        rec["skipped"] = "only SVD-Attention has a sequence-parallel path (N-independent sums)"
                        records.append(rec)
                        continue
                    rec.update(run_one(data, work / f"run_{setup}_{att}_{n}_{m}", nproc, sp, att, args.batch,
                                       args.steps, args.extra))
                    records.append(rec)
                    print(json.dumps(rec)[:300], flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(records, indent=2))
    print("\n| N | M | setup | svd req/s | exact req/s | svd/exact | svd peak RSS | exact peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for m in args.m:
            for setup in args.setups:
                row = {r["attention"]: r for r in records if (r["n"], r["m"], r["setup"]) == (n, m, setup)}
                s, e = row.get("svd", {}), row.get("sdpa", {})

                def f(r, k, scale=1.0, fmt="{:.2f}"):
                    if k in r:
                        return fmt.format(r[k] / scale)
                    return "error" if "error" in r else ("n/a" if "skipped" in r else "-")

                ratio = (f"{s['requests_per_s'] / e['requests_per_s']:.1f}x"
                         if "requests_per_s" in s and "requests_per_s" in e else "-")
                print(f"| {n} | {m} | {setup} | {f(s, 'requests_per_s')} | {f(e, 'requests_per_s')} | {ratio} | "
                      f"{f(s, 'peak_rss_bytes', 2**20, '{:.0f} MiB')} | {f(e, 'peak_rss_bytes', 2**20, '{:.0f} MiB')} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for setup in args.setups:
            for att in args.attention:
                pts = [(r["n"], r["requests_per_s"]) for r in records
                       if r["setup"] == setup and r["attention"] == att and "requests_per_s" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{att} {setup}")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("history length N"), ax.set_ylabel("requests / s")
        ax.legend(), ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
