"""Paired comparison of next-item checkpoints on the same users: is model B better or worse than A, and by more
than chance?

    solar bench paired --run exact=runs/games/exact_s0 --run svd=runs/games/svd_r16_s0@step-1673
                       [--splits valid,test] [--protocols sampled100,full] [--edges 16,32] [--out out/paired.json]

Each `--run NAME=RUN_DIR[@CHECKPOINT]` is restored with the config saved in RUN_DIR/config.yaml, at the
checkpoint named (a directory, or a `step-N` under RUN_DIR/checkpoints or RUN_DIR/best/checkpoints), else the
one `solar eval` would take (the selected epoch's, or the newest). Every user of each split is scored
(NextItemTrainer.user_ranks, the numbers `evaluate` sums), and each later run is compared with the first on the
same users: mean of each, mean of the per-user differences and its standard error (paired: the two models'
per-user scores correlate strongly, so this error is a fraction of the unpaired one), overall and per group of
history length (`--edges`, default the first run's `model.causal_window` and twice it, as `solar bench
quality`'s `by_length`).

Why: an aggregate difference of 0.005 NDCG@10 on ~30k users may or may not be noise; across splits (validation
vs test) or checkpoints (epoch 4 vs epoch 6 of one run) the paired error says which. Single process only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METRICS = ("hr@10", "ndcg@10", "mrr")


def per_user_metrics(ranks: np.ndarray, k: int = 10) -> Dict[str, np.ndarray]:
    """HR@k, NDCG@k and reciprocal rank of each user from its target's rank: the values evaluate sums."""
    from solar_dist.train.ranking import per_request_metrics

    return {name: v.numpy() for name, v in per_request_metrics(torch.as_tensor(np.asarray(ranks)), k).items()}


def paired_stats(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Means of a and b (per-user values of the same users, in the same order), the mean difference b - a, its
    standard error, and the difference relative to a's mean."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-d arrays of one length, got {a.shape} and {b.shape}")
    n = len(a)
    d = b - a
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    ma = float(a.mean()) if n else float("nan")
    return {"n": n, "a": ma, "b": float(b.mean()) if n else float("nan"), "diff": float(d.mean()) if n else float("nan"),
            "se": se, "rel": float(d.mean() / ma) if n and ma else float("nan")}


def parse_run(spec: str) -> Tuple[str, Path, Optional[str]]:
    if "=" not in spec:
        raise SystemExit(f"--run wants NAME=RUN_DIR[@CHECKPOINT], got {spec!r}")
    name, rest = spec.split("=", 1)
    run_dir, _, ckpt = rest.partition("@")
    return name, Path(run_dir), ckpt or None


def resolve_checkpoint(run_dir: Path, ckpt: Optional[str], select_metric: str) -> Path:
    from solar_dist.train.checkpoint import evaluation_checkpoint

    if ckpt is None:
        path = evaluation_checkpoint(str(run_dir), select_metric)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {run_dir}")
        return Path(path)
    for cand in (Path(ckpt), run_dir / "checkpoints" / ckpt, run_dir / "best" / "checkpoints" / ckpt):
        if (cand / "COMPLETE").exists():
            return cand
    raise FileNotFoundError(f"checkpoint {ckpt!r} of {run_dir}: no complete checkpoint at {ckpt}, "
                            f"{run_dir}/checkpoints/{ckpt} or {run_dir}/best/checkpoints/{ckpt}")


def score_run(run_dir: Path, ckpt: Optional[str], splits: Sequence[str], protocols: Sequence[str],
              overrides: Sequence[str] = ()) -> Dict:
    """{checkpoint, causal_window, topk, <split>: {lengths: {uid: n}, <protocol>: {uid: rank}}} of one run."""
    from solar_dist.config import load_config
    from solar_dist.train.next_item import make_trainer

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: --run wants a run directory that training wrote")
    cfg = load_config(cfg_path, [f"train.run_dir={run_dir}", *overrides])
    if cfg.data.task != "next_item":
        raise ValueError(f"{run_dir} trained data.task={cfg.data.task!r}; paired evaluation is for next_item runs")
    path = resolve_checkpoint(run_dir, ckpt, cfg.train.select_metric)
    tr = make_trainer(cfg)
    try:
        if tr.layout.world_size != 1:
            raise RuntimeError("paired evaluation runs in one process (world size 1)")
        if not tr.restore(path):
            raise FileNotFoundError(f"could not restore {path}")
        out: Dict = {"checkpoint": str(path), "causal_window": int(cfg.model.causal_window),
                     "topk": int(cfg.next_item.topk)}
        for split in splits:
            table = tr.split_table(split)
            lengths = table.column("hist_item_ids").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
            res = {"lengths": dict(zip(table.column("user_id").to_numpy().tolist(), lengths.tolist()))}
            for proto in protocols:
                uids, ranks = tr.user_ranks(table, proto)
                res[proto] = dict(zip(uids.tolist(), ranks.tolist()))
            out[split] = res
    finally:
        tr.close()
    return out


def compare(base: Dict, other: Dict, splits: Sequence[str], protocols: Sequence[str],
            edges: Sequence[int]) -> List[Dict]:
    """One row per (split, protocol, length group, metric): paired_stats of other against base."""
    k = int(base["topk"])
    rows = []
    for split in splits:
        lengths = base[split]["lengths"]
        for proto in protocols:
            ra, rb = base[split][proto], other[split][proto]
            if set(ra) != set(rb):
                raise ValueError(f"{split}/{proto}: the two runs ranked different users ({len(ra)} and {len(rb)}); "
                                 f"compare runs of one data set and the same next_item.full_max_users")
            uids = np.array(sorted(ra))
            n = np.array([lengths[u] for u in uids])
            ma = per_user_metrics(np.array([ra[u] for u in uids]), k)
            mb = per_user_metrics(np.array([rb[u] for u in uids]), k)
            groups = [("all", np.ones(len(uids), dtype=bool))]
            for lo, hi in (zip([0] + list(edges), list(edges) + [None]) if edges else ()):
                label = f"{lo + 1}-{hi}" if hi is not None else f">{lo}"
                groups.append((label, (n > lo) & (n <= hi) if hi is not None else n > lo))
            for label, m in groups:
                for metric in (f"hr@{k}", f"ndcg@{k}", "mrr"):
                    rows.append({"split": split, "protocol": proto, "history": label, "metric": metric,
                                 **paired_stats(ma[metric][m], mb[metric][m])})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="solar bench paired", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR[@CHECKPOINT]; the first is the base")
    ap.add_argument("--splits", default="valid,test")
    ap.add_argument("--protocols", default="sampled100,full")
    ap.add_argument("--edges", default="", help="history-length group edges, e.g. 16,32 (default: the first "
                                                "run's causal_window and twice it; 'none' for no groups)")
    ap.add_argument("--metric", default="ndcg@10", help="metric of the printed table (the JSON has all)")
    ap.add_argument("--set", action="append", default=[], help="key=value override for every run (e.g. "
                                                                "next_item.eval_chunk_pairs=65536)")
    ap.add_argument("--out", default="", help="JSON file for every row")
    args = ap.parse_args(list(argv) if argv is not None else None)
    runs = [parse_run(s) for s in args.run]
    if len(runs) < 2:
        raise SystemExit("give at least two --run: the first is the base the others are compared with")
    if len({name for name, _, _ in runs}) != len(runs):
        raise SystemExit("--run names must differ")
    splits = [s for s in args.splits.split(",") if s]
    protocols = [p for p in args.protocols.split(",") if p]
    scored = {}
    for name, run_dir, ckpt in runs:
        scored[name] = score_run(run_dir, ckpt, splits, protocols, args.set)
        print(f"[paired] {name}: {scored[name]['checkpoint']}", flush=True)
    base_name = runs[0][0]
    base = scored[base_name]
    if args.edges == "none":
        edges: List[int] = []
    elif args.edges:
        edges = [int(x) for x in args.edges.split(",")]
    else:
        edges = [base["causal_window"], 2 * base["causal_window"]]
    result = {"base": base_name, "runs": {n: scored[n]["checkpoint"] for n in scored}, "edges": edges,
              "comparisons": {}}
    for name, _, _ in runs[1:]:
        rows = compare(base, scored[name], splits, protocols, edges)
        result["comparisons"][name] = rows
        print(f"\n{name} against {base_name} ({args.metric}; diff = {name} - {base_name}, paired standard error)")
        print(f"| split | protocol | history | users | {base_name} | {name} | diff | se | rel |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["metric"] == args.metric:
                print(f"| {r['split']} | {r['protocol']} | {r['history']} | {r['n']} | {r['a']:.4f} | {r['b']:.4f} | "
                      f"{r['diff']:+.4f} | {r['se']:.4f} | {r['rel']:+.2%} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    from solar_dist.parallel.groups import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
