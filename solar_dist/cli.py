"""`solar` command line: train | eval | data | bench | plan | tune.

Every sub-command that takes a config validates it (and all `key=value` overrides) before doing any work.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def _split_overrides(rest: Sequence[str]) -> List[str]:
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: overrides are key=value (e.g. model.rank=16)")
    return list(rest)


def _print_final(summary: dict) -> None:
    final = summary.get("final", {})
    if "auc" not in final:  # next-item runs report ranking metrics per protocol
        print("\n| metric | value |\n|---|---|")
        for k, v in final.items():
            if isinstance(v, float) and k not in ("epoch_seconds",):
                print(f"| {k} | {v:.4f} |")
        print(f"\nsteps {summary.get('steps')}, wall {summary.get('wall_seconds', 0):.1f}s, "
              f"checkpoint {summary.get('checkpoint')}")
        return
    data = summary.get("data", {})
    rows = [("model (this run)", final.get("auc"), final.get("gauc"), final.get("ne"), final.get("logloss"))]
    split = "valid"
    if f"bayes_auc_{split}" in data:
        rows.append(("Bayes (true probabilities)", data.get(f"bayes_auc_{split}"), None, None, None))
    if f"popularity_auc_{split}" in data:
        rows.append(("popularity baseline", data.get(f"popularity_auc_{split}"), None, None, None))

    def f(x: Optional[float]) -> str:
        return f"{x:.4f}" if isinstance(x, (int, float)) else "   -  "

    print("\n| evaluated on the held-out split | AUC | GAUC | NE | log-loss |")
    print("|---|---|---|---|---|")
    for name, *vals in rows:
        print(f"| {name} | " + " | ".join(f(v) for v in vals) + " |")
    print(f"\nsteps {summary.get('steps')}, {summary.get('train_requests_per_s', 0):.1f} requests/s "
          f"({summary.get('train_events_per_s', 0):,.0f} history events/s), wall {summary.get('wall_seconds', 0):.1f}s, "
          f"checkpoint {summary.get('checkpoint')}")


def cmd_train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    cfg = load_config(args.config, _split_overrides(rest))
    from .parallel.groups import shutdown
    from .train.next_item import make_trainer

    trainer = make_trainer(cfg)  # the ranking Trainer, or the next-item one when data.task=next_item
    try:
        summary = trainer.fit()
        if trainer.layout.is_main:
            _print_final(summary)
    finally:
        trainer.close()
        shutdown()
    return 0


def cmd_eval(args: argparse.Namespace, rest: Sequence[str]) -> int:
    cfg = load_config(args.config, _split_overrides(rest))
    from .parallel.groups import shutdown
    from .train.checkpoint import evaluation_checkpoint
    from .train.next_item import make_trainer

    trainer = make_trainer(cfg)
    try:
        path = Path(args.checkpoint) if args.checkpoint else evaluation_checkpoint(cfg.train.run_dir,
                                                                                   cfg.train.select_metric)
        if path is None or not trainer.restore(path):
            raise FileNotFoundError(f"no complete checkpoint under {cfg.train.run_dir}/checkpoints")
        m = trainer.evaluate()
        if trainer.layout.is_main:
            print(json.dumps({"checkpoint": str(path), "split": cfg.eval.split, **m}, indent=2))
    finally:
        trainer.close()
        shutdown()
    return 0


def cmd_data(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if args.data_cmd == "synth":
        cfg = load_config(args.config, _split_overrides(rest))
        from .data.synth import generate

        generate(cfg.data.synth, args.out or cfg.data.path)
        return 0
    if args.data_cmd == "validate":
        from .data.schema import SPLITS, DatasetMeta, read_split

        meta = DatasetMeta.load(args.path)
        for split in SPLITS:
            t = read_split(args.path, split, meta, allow_empty_history=args.allow_empty_history)
            print(f"{split}: {t.num_rows} requests ok")
        return 0
    mod = importlib.import_module("solar_dist.data.convert")
    return int(mod.main(list(rest)) or 0)


def _tool_main(module: str, argv: Sequence[str]) -> int:
    """Runs tools/<module>.py:main(argv) (the benchmarks live in tools/, the CLI is their front door)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        mod = importlib.import_module(f"tools.{module}")
    except ModuleNotFoundError as exc:
        raise SystemExit(f"benchmark tools/{module}.py is not available: {exc}") from None
    return int(mod.main(list(argv)) or 0)


BENCHES = {"attention": "bench_attention", "causal": "bench_causal", "train": "bench_train", "data": "bench_data",
           "quality": "eval_real", "paired": "paired_eval"}


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    return _tool_main(BENCHES[args.what], rest)


def cmd_plan(args: argparse.Namespace, rest: Sequence[str]) -> int:
    mod = importlib.import_module("solar_dist.parallel.plan")
    return int(mod.main([args.config, *rest]) or 0)


def cmd_tune(args: argparse.Namespace, rest: Sequence[str]) -> int:
    mod = importlib.import_module("solar_dist.tune.sweep")
    return int(mod.main([args.config, *rest]) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="solar", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (and evaluate) a model: solar train CONFIG [key=value ...]")
    t.add_argument("config")
    e = sub.add_parser("eval", help="evaluate the selected (train.select_metric), newest or a given checkpoint")
    e.add_argument("config")
    e.add_argument("--checkpoint", default=None)
    d = sub.add_parser("data", help="synth | validate | convert")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="write the synthetic data set of a config")
    s.add_argument("config", nargs="?", default=None)
    s.add_argument("--out", default=None)
    v = dsub.add_parser("validate", help="read and validate every split of a data set")
    v.add_argument("path")
    v.add_argument("--allow-empty-history", action="store_true")
    dsub.add_parser("convert", help="convert a public data set into the request schema", add_help=False)
    b = sub.add_parser("bench", help="benchmarks: attention | causal | train | data | quality", add_help=False)
    b.add_argument("what", choices=sorted(BENCHES))
    pl = sub.add_parser("plan", help="TorchRec sharding plan and memory for a cluster", add_help=False)
    pl.add_argument("config")
    tu = sub.add_parser("tune", help="Ray Tune sweep over rank and depth", add_help=False)
    tu.add_argument("config")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data, "bench": cmd_bench,
                "plan": cmd_plan, "tune": cmd_tune}
    try:
        return handlers[args.cmd](args, rest)
    except ConfigError as exc:
        print(f"solar: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
