"""`solar tune`: a small Ray Tune sweep on the tiny synthetic data.

One sweep (module fixture): model.rank in [2, 4] x model.depth in [1, 2] (4 real training trials, 2 epochs,
ASHA) crossed with an extra grid axis model.num_heads in [2, 3]: the 4 trials with num_heads=3 raise a
ConfigError inside the trial (3 does not divide embedding.dim=16) and must be reported as failed while the
sweep goes on."""
import csv
import math
from pathlib import Path

import pytest

from solar_dist.config import load_config

from ..conftest import REPO, TINY_OVERRIDES

pytest.importorskip("ray.tune")

RAY = ["ray.num_cpus=2", "ray.object_store_mb=300"]


def _sweep_overrides(tiny_data, storage, name="tiny"):
    return TINY_OVERRIDES + RAY + [
        f"data.path={tiny_data}", "data.if_missing=error", "train.epochs=2",
        "tune.ranks=[2,4]", "tune.depths=[1,2]", "tune.grid={model.num_heads: [2, 3]}",
        "tune.grace_period=1", "tune.reduction_factor=2", "tune.cpus_per_trial=0.5",
        f"tune.storage_path={storage}", f"tune.name={name}",
    ]


@pytest.fixture(scope="module")
def sweep(tiny_data, tmp_path_factory):
    from solar_dist.tune.sweep import run_sweep

    storage = tmp_path_factory.mktemp("tune")
    overrides = _sweep_overrides(tiny_data, storage)
    res = run_sweep(load_config(None, overrides), verbose=0)
    return res, overrides, storage


def test_sweep_table_and_failed_trials(sweep):
    import ray

    res, _, _ = sweep
    assert not ray.is_initialized()  # the sweep shut down the Ray it started
    rows = res.rows
    assert len(rows) == 8
    ok = [r for r in rows if r["model.num_heads"] == 2]
    bad = [r for r in rows if r["model.num_heads"] == 3]
    assert {(r["rank"], r["depth"]) for r in ok} == {(2, 1), (2, 2), (4, 1), (4, 2)}
    for r in ok:
        assert r["status"] in ("TERMINATED", "STOPPED_EARLY"), r
        assert 1 <= r["epochs"] <= 2 and math.isfinite(r["best_auc"]) and r["error"] == ""
        assert 5e-4 <= r["lr"] <= 5e-3
    assert any(r["status"] == "TERMINATED" and r["epochs"] == 2 for r in ok)
    for r in bad:
        assert r["status"] == "ERROR" and "ConfigError" in r["error"] and "num_heads=3" in r["error"], r
    with open(res.csv) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {t["status"] for t in table} >= {"ERROR"}
    assert "| rank | depth |" in res.markdown and (res.sweep_dir / "results.md").is_file()
    assert res.plot is not None and res.plot.stat().st_size > 1000
    assert (res.sweep_dir / "sweep.json").is_file()


def test_tune_result_metrics_arrive(sweep):
    """Tune's Result.metrics holds the last epoch's validation metrics of every trial that reported
    (function trainable + ray.tune.report, no checkpoint); failed trials before a report have none."""
    res, _, _ = sweep
    got = res.extra["result_metrics"]
    reported = [m for m in got.values() if m and "auc" in m]
    assert len(reported) == 4
    for m in reported:
        assert {"auc", "gauc", "ne", "logloss", "epoch", "training_iteration"} <= set(m)
        assert m["epoch"] == m["training_iteration"]


def test_best_config_reloads_and_trains(sweep):
    from solar_dist.parallel.groups import shutdown
    from solar_dist.train.trainer import Trainer

    res, _, _ = sweep
    assert res.best is not None and res.best["status"] != "ERROR"
    best = max((r for r in res.rows if r["status"] != "ERROR"), key=lambda r: r["best_auc"])
    assert res.best["trial"] == best["trial"]
    cfg = load_config(res.best_config)  # exactly what `solar train best_config.yaml` loads
    assert (cfg.model.rank, cfg.model.depth, cfg.model.num_heads) == (best["rank"], best["depth"], 2)
    assert cfg.deepspeed.lr == pytest.approx(best["lr"], rel=1e-12)
    assert Path(cfg.data.path).is_absolute() and not Path(cfg.train.run_dir).exists()
    assert not cfg.train.resume
    t = Trainer(cfg)
    try:
        summary = t.fit()
    finally:
        t.close()
        shutdown()
    assert summary["steps"] > 0 and math.isfinite(summary["final"]["logloss"])
    assert (Path(cfg.train.run_dir) / "metrics.json").is_file()


def test_resume_and_refuse_overwrite(sweep, capsys):
    """Without tune.resume an existing sweep is not overwritten; with it, `Tuner.restore` picks the
    experiment up (all trials are done or failed: nothing reruns) and the tables are rewritten."""
    from solar_dist.tune.sweep import main, run_sweep

    res, overrides, _ = sweep
    with pytest.raises(FileExistsError, match="tune.resume=true"):
        run_sweep(load_config(None, overrides))
    rc = main([str(REPO / "configs" / "quickstart.yaml"), *overrides, "tune.resume=true"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| rank | depth |" in out and "best config:" in out
    with open(res.csv) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and sum(t["status"] == "ERROR" for t in table) == 4


@pytest.mark.slow
def test_multi_worker_trial_through_ray_train(tiny_data, tmp_path):
    """workers_per_trial=2: each trial is a Ray Train TorchTrainer (gloo, DeepSpeed in the workers); Tune gets
    every epoch's metrics through TuneReportCallback (the trial's Result.metrics holds the last epoch)."""
    from solar_dist.tune.sweep import run_sweep

    overrides = TINY_OVERRIDES + RAY + [
        f"data.path={tiny_data}", "data.if_missing=error", "train.epochs=2", "tune.ranks=[4]", "tune.depths=[1]",
        "tune.workers_per_trial=2", "tune.cpus_per_trial=1", f"tune.storage_path={tmp_path}", "tune.name=w2"]
    res = run_sweep(load_config(None, overrides), verbose=0)
    (row,) = res.rows
    assert row["status"] == "TERMINATED" and row["epochs"] == 2, row
    (metrics,) = res.extra["result_metrics"].values()
    assert metrics["training_iteration"] == 2 and "auc" in metrics
