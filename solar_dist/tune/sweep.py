"""`solar tune CONFIG [key=value ...]`: a Ray Tune sweep over SVD-Attention rank x tower depth x learning rate.

Search space: `model.rank` over `tune.ranks` x `model.depth` over `tune.depths` (grid), `deepspeed.lr`
log-uniform in [tune.lr_min, tune.lr_max] (sampled once per trial, seeded by `train.seed`), repeated
`tune.num_samples` times; optional extra grid axes `tune.grid` ({config key: [values]}). ASHA
(time_attr=`epoch` = epochs completed, grace_period / reduction_factor / metric / mode from `tune.*`) stops
weak trials early.

Each trial is a real training run (`Trainer`) with its own `train.run_dir` = <trial dir>/run, torch threads
= cpus_per_trial, reporting the validation metrics after every epoch through `ray.tune.report`. With
`tune.workers_per_trial > 1` a trial drives a Ray Train `TorchTrainer` (gloo, DeepSpeed inside each worker);
the workers report with `ray.train.report` and `TuneReportCallback` forwards rank 0's metrics to Tune
(Ray Train V2's own `Result.metrics` only holds reports that came with a checkpoint).

Output in <tune.storage_path>/<tune.name>/ (next to Tune's own experiment files):
    base_config.yaml     the sweep's config (data.path absolute); every trial = this + its overrides
    results.csv / .md    one row per trial: rank, depth, lr, extra axes, final and best metric, epochs run,
                         status (TERMINATED | STOPPED_EARLY | ERROR | INTERRUPTED / NOT_STARTED after Ctrl-C), error
    metric_vs_rank_depth.png
    best_config.yaml     the best trial's full config, runnable with `solar train` unchanged (fresh run_dir)
    sweep.json           summary (best trial, paths, interrupted or not)

Faults: a trial that raises (an invalid value, a crash) is recorded as ERROR with its error message; the other
trials go on (FailureConfig(max_failures=0, fail_fast=False)). Ctrl-C: Tune stops the running trials and
saves its state; the tables are written from what has been reported so far. Resume: run the same command with
`tune.resume=true`: `Tuner.restore` continues the experiment at storage_path/name (unfinished trials run
again — from their last Trainer checkpoint when `train.checkpoint_every` wrote one —, finished and failed
trials are kept as they are). Without `tune.resume`, an existing experiment at that path is not overwritten:
the sweep refuses to start.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import ConfigError, SolarConfig, load_config, save_config

METRIC_KEYS = ("auc", "gauc", "ne", "logloss")
DRIVER_CPU = 0.01  # CPU share of a trial that only drives a Ray Train run (workers_per_trial > 1)


# ------------------------------------------------------------------------------------------- overrides
def _fmt(value: Any) -> str:
    """A value as an OmegaConf dotlist override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int,)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value)  # lists / dicts: JSON is valid OmegaConf grammar


def trial_overrides(params: Dict[str, Any]) -> List[str]:
    """The config overrides that make a trial: rank, depth, lr and the extra grid axes."""
    out = [f"model.rank={_fmt(params['rank'])}", f"model.depth={_fmt(params['depth'])}",
           f"deepspeed.lr={_fmt(float(params['lr']))}"]
    out += [f"{k}={_fmt(v)}" for k, v in sorted((params.get("grid") or {}).items())]
    return out


def _threads(cpus: float) -> int:
    return max(1, int(math.floor(cpus + 1e-9)))


def _tune_metrics(m: Dict[str, Any]) -> Dict[str, Any]:
    """Trainer's epoch metrics -> what Tune gets: `epoch` = epochs completed (ASHA's time_attr)."""
    out = {k: float(v) for k, v in m.items() if k in METRIC_KEYS}
    out["epoch"] = int(m["epoch"]) + 1
    out["step"] = int(m.get("step", 0))
    out["epoch_seconds"] = float(m.get("epoch_seconds", 0.0))
    return out


# ---------------------------------------------------------------------------------------------- trials
def _trial(params: Dict[str, Any]) -> None:
    """One Tune trial (runs in a Ray actor)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ray import tune

    trial_dir = Path(tune.get_context().get_trial_dir())
    workers = int(params.get("workers", 1))
    threads = _threads(float(params.get("cpus", 1.0)) / max(workers, 1))
    overrides = trial_overrides(params) + [
        f"train.run_dir={_fmt(str(trial_dir / 'run'))}", "train.progress=false", f"train.num_threads={threads}",
        "train.resume=true",  # a trial restarted by `tune.resume` continues from its own checkpoint, if any
    ]
    cfg = load_config(params["base_config"], overrides)  # an invalid value raises here: the trial fails
    if workers <= 1:
        _run_local(cfg)
    else:
        _run_ray_train(params["base_config"], overrides, workers, float(params.get("cpus", 1.0)), trial_dir)


def _run_local(cfg: SolarConfig) -> None:
    from ray import tune

    from ..parallel.groups import shutdown
    from ..train.trainer import Trainer

    # A trial is its own world of 1. Rendezvous variables inherited from the process that started Ray (e.g. a
    # driver that ran a Trainer itself) would make concurrent trials share one MASTER_PORT: drop them, so
    # init_distributed picks a free port per trial.
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    trainer = Trainer(cfg)
    try:
        trainer.fit(on_epoch_end=lambda m: tune.report(_tune_metrics(m)))
    finally:
        trainer.close()
        shutdown()


def _train_worker(config: Dict[str, Any]) -> None:
    """Ray Train worker: the process group comes from Ray Train (gloo); init_distributed reuses it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    from ..train.trainer import Trainer

    cfg = load_config(config["base_config"], config["overrides"])
    trainer = Trainer(cfg)
    try:
        trainer.fit(on_epoch_end=lambda m: ray.train.report(_tune_metrics(m)))
    finally:
        trainer.close()


def _run_ray_train(base_config: str, overrides: List[str], workers: int, cpus: float, trial_dir: Path) -> None:
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"base_config": base_config, "overrides": overrides},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                     resources_per_worker={"CPU": cpus / workers}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=TrainRunConfig(name="ray_train", storage_path=str(trial_dir),
                                  callbacks=[TuneReportCallback()]),
    )
    # Raises on a worker error: the Tune trial fails with it. Tune gets every epoch through TuneReportCallback
    # (Ray Train V2's own Result.metrics only follows reports that carry a checkpoint, and Tune usually ends the
    # trial at its last report, before fit() returns here).
    trainer.fit()


# ------------------------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    sweep_dir: Path
    rows: List[Dict[str, Any]]
    best: Optional[Dict[str, Any]]
    best_config: Optional[Path]
    csv: Path
    markdown: str
    plot: Optional[Path]
    interrupted: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


def _prepare_base(cfg: SolarConfig, sweep_dir: Path) -> Path:
    """Absolute data path, data synthesised once (not by N trials at once), base config saved."""
    cfg.data.path = str(Path(cfg.data.path).resolve())
    from ..data.schema import dataset_exists

    if not dataset_exists(cfg.data.path):
        if cfg.data.if_missing == "error":
            raise FileNotFoundError(f"data.path={cfg.data.path!r} holds no data set")
        from ..data.synth import generate

        generate(cfg.data.synth, cfg.data.path)
    base = sweep_dir / "base_config.yaml"
    save_config(cfg, base)
    return base


def _check_metric(cfg: SolarConfig) -> None:
    t = cfg.tune
    if t.metric not in cfg.eval.metrics:
        raise ConfigError(f"tune.metric={t.metric!r} is not evaluated; eval.metrics={list(cfg.eval.metrics)}")


def run_sweep(cfg: SolarConfig, *, verbose: int = 1) -> SweepResult:
    """Runs (or resumes) the sweep described by `cfg.tune`, then writes the tables, plot and best config."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from .ray_runtime import ensure_ray, shutdown_ray

    _check_metric(cfg)
    t = cfg.tune
    storage = Path(t.storage_path).resolve()
    sweep_dir = storage / t.name
    restoring = t.resume and sweep_dir.exists() and tune.Tuner.can_restore(str(sweep_dir))
    if not restoring and sweep_dir.exists() and tune.Tuner.can_restore(str(sweep_dir)):
        raise FileExistsError(f"{sweep_dir} already holds a sweep: set tune.resume=true to continue it, or choose "
                              f"another tune.name / tune.storage_path")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if restoring and (sweep_dir / "base_config.yaml").is_file():
        base = sweep_dir / "base_config.yaml"  # the sweep's own config: trials keep their meaning on resume
        base_cfg = load_config(base)
    else:
        base = _prepare_base(cfg, sweep_dir)
        base_cfg = load_config(base)

    started = ensure_ray(cfg)
    try:
        workers = int(t.workers_per_trial)
        if workers > 1:
            # the trial itself only drives the TorchTrainer (a token CPU share: Tune refuses an empty request);
            # its workers hold the CPUs, so Tune cannot count them: concurrency = what the workers fit
            trainable = tune.with_resources(_trial, {"CPU": DRIVER_CPU})
            total = float(ray.cluster_resources().get("CPU", 1))
            max_conc = t.max_concurrent or max(1, int(total // (t.cpus_per_trial + DRIVER_CPU)))
        else:
            trainable = tune.with_resources(_trial, {"CPU": float(t.cpus_per_trial)})
            max_conc = t.max_concurrent or None
        if restoring:
            print(f"[tune] resuming the sweep at {sweep_dir}", flush=True)
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            param_space = {
                "rank": tune.grid_search(list(t.ranks)),
                "depth": tune.grid_search(list(t.depths)),
                "lr": tune.loguniform(t.lr_min, t.lr_max),
                "base_config": str(base),
                "workers": workers,
                "cpus": float(t.cpus_per_trial),
            }
            if t.grid:
                param_space["grid"] = {k: tune.grid_search(list(v)) for k, v in t.grid.items()}
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=t.metric, mode=t.mode, num_samples=t.num_samples, max_concurrent_trials=max_conc,
                    scheduler=ASHAScheduler(time_attr="epoch", max_t=base_cfg.train.epochs,
                                            grace_period=t.grace_period, reduction_factor=t.reduction_factor),
                    search_alg=BasicVariantGenerator(random_state=base_cfg.train.seed),
                ),
                run_config=tune.RunConfig(
                    name=t.name, storage_path=str(storage), verbose=verbose,
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                ),
            )
        try:
            tuner.fit()  # Ctrl-C: Tune stops the trials, saves its state and returns
        except KeyboardInterrupt:  # a second Ctrl-C
            print("[tune] interrupted: writing the results reported so far", flush=True)
        return summarize(base_cfg, base, sweep_dir, load_results(sweep_dir))
    finally:
        shutdown_ray(started)


# ------------------------------------------------------------------------------------------- reporting
def _short_error(err: Any) -> str:
    """The exception line of a (possibly wrapped, multi-line) trial error."""
    if err is None:
        return ""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ":" in ln and (head.endswith("Error") or head.endswith("Exception") or head.endswith("Interrupt")):
            msg = ln
            break
    else:
        msg = f"{type(err).__name__}: {lines[-1] if lines else ''}"
    return msg[:300]


def load_results(sweep_dir: Path) -> Any:
    """The sweep's trials as saved on disk (statuses, configs, errors, every report): the same view after a
    finished, an interrupted or a resumed sweep. Trials left PENDING/RUNNING mean the sweep was interrupted."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    return ResultGrid(ExperimentAnalysis(str(sweep_dir)))


FINAL = ("TERMINATED", "ERROR")


def _trial_rows(grid: Any, metric: str, mode: str, max_epochs: int) -> List[Dict[str, Any]]:
    trials = list(grid._experiment_analysis.trials)
    rows = []
    for trial, result in zip(trials, grid):
        cfg = dict(trial.config or {})
        df = result.metrics_dataframe
        cols = list(getattr(df, "columns", []))
        history = [float(x) for x in df[metric].tolist() if x == x] if df is not None and metric in cols else []
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in cols and len(df) else 0
        best = (max(history) if mode == "max" else min(history)) if history else float("nan")
        final = history[-1] if history else float("nan")
        status = str(trial.status)
        if result.error is not None or status == "ERROR":
            status = "ERROR"
        elif status == "TERMINATED":
            status = "TERMINATED" if epochs >= max_epochs else "STOPPED_EARLY"  # ASHA
        else:  # left PENDING / RUNNING / PAUSED by an interrupted sweep
            status = "INTERRUPTED" if epochs > 0 else "NOT_STARTED"
        row = {"trial": trial.trial_id, "rank": cfg.get("rank"), "depth": cfg.get("depth"), "lr": cfg.get("lr")}
        for k, v in sorted((cfg.get("grid") or {}).items()):
            row[k] = v
        row.update({f"final_{metric}": final, f"best_{metric}": best, "epochs": epochs, "status": status,
                    "error": _short_error(result.error), "path": trial.path or ""})
        rows.append(row)
    rows.sort(key=lambda r: (str(r["rank"]), str(r["depth"]), str(r["trial"])))
    return rows


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    cols = [c for c in rows[0] if c != "path"]
    for r in rows[1:]:
        cols += [c for c in r if c not in cols and c != "path"]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else (f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4f}")
        return str(v if v is not None else "").replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    cols: List[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols or ["trial"])
        w.writeheader()
        for r in rows:
            w.writerow(r)


def plot_sweep(rows: List[Dict[str, Any]], metric: str, mode: str, path: Path) -> Optional[Path]:
    """Best metric per (rank, depth) over learning rates: one line per depth against rank, plus every trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"best_{metric}"
    ok = [r for r in rows if r["status"] != "ERROR" and isinstance(r[key], float) and r[key] == r[key]]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for depth in sorted({r["depth"] for r in ok}):
        pts = {}
        for r in ok:
            if r["depth"] != depth:
                continue
            pts.setdefault(r["rank"], []).append(r[key])
        ranks = sorted(pts)
        agg = [max(pts[k]) if mode == "max" else min(pts[k]) for k in ranks]
        line, = ax.plot(ranks, agg, marker="o", label=f"depth {depth} (best over lr)")
        for k in ranks:
            ax.scatter([k] * len(pts[k]), pts[k], color=line.get_color(), alpha=0.35, s=14)
    failed = [r for r in rows if r["status"] == "ERROR"]
    title = f"{metric} ({mode}) vs SVD rank and depth"
    if failed:
        title += f" — {len(failed)} failed trial(s) not shown"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("model.rank")
    ax.set_ylabel(f"validation {metric}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fresh_dir(path: Path) -> Path:
    if not path.exists():
        return path
    i = 1
    while Path(f"{path}_{i}").exists():
        i += 1
    return Path(f"{path}_{i}")


def summarize(base_cfg: SolarConfig, base: Path, sweep_dir: Path, grid: Any) -> SweepResult:
    t = base_cfg.tune
    rows = _trial_rows(grid, t.metric, t.mode, base_cfg.train.epochs)
    interrupted = any(r["status"] in ("INTERRUPTED", "NOT_STARTED") for r in rows)
    # what Tune's Result.metrics holds per trial (the last report), kept for inspection and tests
    result_metrics = {}
    for trial, result in zip(grid._experiment_analysis.trials, grid):
        result_metrics[trial.trial_id] = dict(result.metrics) if result.metrics is not None else None
    csv_path = sweep_dir / "results.csv"
    _write_csv(rows, csv_path)
    md = markdown_table(rows)
    (sweep_dir / "results.md").write_text(md + "\n")
    plot = plot_sweep(rows, t.metric, t.mode, sweep_dir / "metric_vs_rank_depth.png")
    key = f"best_{t.metric}"
    ok = [r for r in rows if r["status"] != "ERROR" and isinstance(r[key], float) and r[key] == r[key]]
    best = (max if t.mode == "max" else min)(ok, key=lambda r: r[key]) if ok else None
    best_path = None
    if best is not None:
        params = {"rank": best["rank"], "depth": best["depth"], "lr": best["lr"],
                  "grid": {k: best[k] for k in (t.grid or {})}}
        run_dir = _fresh_dir(sweep_dir / "best_run")
        best_cfg = load_config(base, trial_overrides(params) + [f"train.run_dir={_fmt(str(run_dir))}",
                                                                 "train.resume=false"])
        best_path = sweep_dir / "best_config.yaml"
        save_config(best_cfg, best_path)
    summary = {"sweep_dir": str(sweep_dir), "metric": t.metric, "mode": t.mode, "interrupted": interrupted,
               "trials": len(rows), "errors": sum(r["status"] == "ERROR" for r in rows), "best": best,
               "best_config": str(best_path) if best_path else None, "results_csv": str(csv_path),
               "plot": str(plot) if plot else None}
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    return SweepResult(sweep_dir=sweep_dir, rows=rows, best=best, best_config=best_path, csv=csv_path,
                       markdown=md, plot=plot, interrupted=interrupted, extra={"result_metrics": result_metrics})


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: solar tune CONFIG [key=value ...]\n\n" + (__doc__ or ""))
        return 0 if argv else 2
    config, overrides = argv[0], argv[1:]
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: overrides are key=value (e.g. tune.ranks=[4,8])")
    cfg = load_config(config, overrides)
    t0 = time.time()
    res = run_sweep(cfg)
    print(f"\n## sweep {res.sweep_dir.name}: {len(res.rows)} trials, {time.time() - t0:.0f}s"
          + (" (interrupted: partial results)" if res.interrupted else "") + "\n")
    print(res.markdown)
    print(f"\ntable: {res.csv}\nplot: {res.plot}")
    if res.best is not None:
        print(f"best: rank={res.best['rank']} depth={res.best['depth']} lr={res.best['lr']:.3g} "
              f"{cfg.tune.metric}={res.best[f'best_{cfg.tune.metric}']:.4f}\n"
              f"best config: {res.best_config}  (run it: solar train {res.best_config})")
    else:
        print("no trial finished successfully")
    if not res.sweep_dir.joinpath("base_config.yaml").is_file():
        print("warning: base config missing", file=sys.stderr)
    return 0 if res.best is not None else 1
