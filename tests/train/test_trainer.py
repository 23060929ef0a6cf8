"""The real stack on one process: TorchRec DMP (fused row-wise Adagrad) + DeepSpeed tower.

A short run must lower the held-out log-loss, and a checkpoint must reload into a fresh trainer with exactly
the same predictions."""
import json

import pytest
import torch

from solar_dist.config import load_config
from solar_dist.data.loader import eval_loader

from ..conftest import TINY_OVERRIDES


def _trainer(cfg):
    from solar_dist.train.trainer import Trainer

    return Trainer(cfg)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, TINY_OVERRIDES + [f"data.path={tiny_data}", f"train.run_dir={run}", "train.epochs=3",
                                              "data.if_missing=error", "deepspeed.zero_stage=2"])
    t = _trainer(cfg)
    before = t.evaluate()
    summary = t.fit()
    yield cfg, t, before, summary
    t.close()


def test_loss_falls_and_metrics_written(trained):
    cfg, t, before, summary = trained
    after = summary["final"]
    assert after["logloss"] < before["logloss"] - 0.01, (before, after)
    assert after["auc"] > before["auc"]
    m = json.loads((t.run_dir / "metrics.json").read_text())
    assert m["steps"] == summary["steps"] > 0 and len(m["history"]) == cfg.train.epochs
    assert set(["auc", "gauc", "ne", "logloss"]) <= set(m["final"])
    assert any((t.run_dir / "tb").iterdir())


def test_tables_and_tower_were_updated(trained):
    cfg, t, _, _ = trained
    from solar_dist.train.trainer import Trainer

    fresh = Trainer(cfg)
    sd_a, sd_b = t.dmp.state_dict(), fresh.dmp.state_dict()
    key = next(k for k in sd_a if k.endswith("item.weight"))
    a = sd_a[key].local_shards()[0].tensor
    b = sd_b[key].local_shards()[0].tensor
    assert not torch.equal(a, b)  # fused optimizer moved the embedding rows
    pa = torch.cat([p.detach().flatten() for p in t.engine.module.parameters()])
    pb = torch.cat([p.detach().flatten() for p in fresh.engine.module.parameters()])
    assert not torch.equal(pa, pb)
    fresh.close()


def test_checkpoint_reloads_to_same_predictions(trained, tmp_path):
    cfg, t, _, summary = trained
    batch = next(iter(eval_loader(t.eval_table, 16, prefetch=0).epoch(0)))
    expected = t.predict(batch)
    # a fresh trainer with another seed: different weights until the checkpoint is loaded
    other = load_config(None, TINY_OVERRIDES + [f"data.path={cfg.data.path}", f"train.run_dir={cfg.train.run_dir}",
                                                "train.seed=123", "data.if_missing=error", "deepspeed.zero_stage=2"])
    fresh = _trainer(other)
    assert not torch.allclose(fresh.predict(batch), expected)
    assert fresh.restore()
    assert torch.equal(fresh.predict(batch), expected)
    assert fresh.global_step == summary["steps"]
    fresh.close()


def test_deterministic_table_init_is_sharding_independent(tiny_data, tmp_path):
    """Row-wise and column-wise sharded tables start from the same values (seeded per table and row)."""
    outs = []
    for st in ("row_wise", "column_wise", "table_wise"):
        cfg = load_config(None, TINY_OVERRIDES + [f"data.path={tiny_data}", f"train.run_dir={tmp_path / st}",
                                                  f"embedding.sharding_types={{item: {st}, user: table_wise}}"])
        t = _trainer(cfg)
        batch = next(iter(eval_loader(t.eval_table, 8, prefetch=0).epoch(0)))
        ec, _ = t.dmp(batch.features, batch.user_features)
        outs.append(ec["cand_item"].values().detach().clone())
        t.close()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def _selection_trainer(tiny_data, run, *extra):
    cfg = load_config(None, TINY_OVERRIDES + [f"data.path={tiny_data}", f"train.run_dir={run}",
                                              "data.if_missing=error", *extra])
    return _trainer(cfg)


def test_select_metric_restores_the_selected_epoch(tiny_data, tmp_path):
    """train.select_metric: fit() ends with the weights of the epoch that was best on validation. Selecting the
    *lowest* AUC picks an early epoch, not the last one, so the restore is visible in the evaluation."""
    t = _selection_trainer(tiny_data, tmp_path, "train.epochs=3", "train.select_metric=auc",
                           "train.select_mode=min")
    summary = t.fit()
    aucs = [h["auc"] for h in summary["history"]]
    best = min(range(len(aucs)), key=lambda i: (aucs[i], i))
    sel = summary["selected"]
    assert (sel["epoch"], sel["value"], sel["metric"]) == (best, aucs[best], "auc")
    assert best != len(aucs) - 1, f"the test needs an earlier epoch to select; AUCs {aucs}"
    again = t.evaluate()
    assert again["auc"] == pytest.approx(aucs[best], abs=1e-9)  # the selected weights, not the last epoch's
    assert again["auc"] != pytest.approx(aucs[-1], abs=1e-6)
    assert summary["steps"] == t.global_step  # the step count (and the resume checkpoint) stay the last
    assert (t.run_dir / "checkpoints" / f"step-{summary['steps']}" / "COMPLETE").is_file()
    assert [p.name for p in (t.run_dir / "best" / "checkpoints").iterdir()] == [f"step-{sel['step']}"]
    from solar_dist.train.checkpoint import evaluation_checkpoint  # what `solar eval` scores

    assert evaluation_checkpoint(t.run_dir, "auc").name == f"step-{sel['step']}"
    assert evaluation_checkpoint(t.run_dir).name == f"step-{summary['steps']}"
    t.close()


def test_early_stop_after_patience_evaluations_without_improvement(tiny_data, tmp_path):
    """Stops at the first evaluation that is `patience` evaluations past the best one, never earlier."""
    patience, epochs = 1, 6
    t = _selection_trainer(tiny_data, tmp_path, f"train.epochs={epochs}", "train.select_metric=auc",
                           "train.select_mode=min", f"train.early_stop_patience={patience}")
    hist = t.fit()["history"]
    t.close()
    aucs = [h["auc"] for h in hist]
    best_so_far = [min(range(i + 1), key=lambda j: (aucs[j], j)) for i in range(len(aucs))]
    for i in range(len(aucs) - 1):  # no earlier evaluation met the stopping rule
        assert i - best_so_far[i] < patience, aucs
    last = len(aucs) - 1
    assert last - best_so_far[last] >= patience or len(aucs) == epochs, aucs
    assert len(aucs) < epochs, f"AUC fell at every epoch, so the rule never fired: {aucs}"


def test_select_metric_must_be_an_evaluated_metric(tiny_data, tmp_path):
    t = _selection_trainer(tiny_data, tmp_path, "train.select_metric=sampled100_ndcg@10")
    with pytest.raises(KeyError, match="train.select_metric='sampled100_ndcg@10'.*auc"):
        t.fit()
    t.close()


def test_adam_tables_on_cpu_fail_by_name(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="embedding.optimizer=adam"):
        _selection_trainer(tiny_data, tmp_path, "embedding.optimizer=adam")


def test_time_budget_ends_training_after_the_step_that_crosses_it(tiny_data, tmp_path):
    """train.max_minutes: the step during which the budget runs out is the last; an evaluation follows, the
    summary says why training stopped, and the loader stays mid-epoch (a resume continues from there)."""
    t = _selection_trainer(tiny_data, tmp_path, "train.epochs=5", "train.max_minutes=1e-9")
    summary = t.fit()
    t.close()
    assert summary["steps"] == 1 and summary["stopped_by_time_budget"] is True
    assert len(summary["history"]) == 1 and summary["history"][0]["epoch"] == 0
    assert t.loader.state.epoch == 0 and t.loader.state.step == 1
    t = _selection_trainer(tiny_data, tmp_path / "b", "train.epochs=1", "train.max_minutes=60")
    summary = t.fit()
    t.close()
    assert summary["stopped_by_time_budget"] is False and summary["steps"] == len(t.loader)


@pytest.mark.parametrize("decay,floor", [("linear", 0.0), ("cosine", 0.25)])
def test_lr_decay_reaches_its_floor_at_the_planned_last_step(tiny_data, tmp_path, decay, floor):
    """deepspeed.lr_decay: DeepSpeed's scheduler spans train.epochs x steps per epoch; after the warm-up the tower's
    lr never rises, and the last planned step leaves it at min_lr_ratio x lr (cosine), or one linear decrement
    above 0 (DeepSpeed's WarmupDecayLR reaches 0 one step after total_num_steps)."""
    extra = [f"deepspeed.lr_decay={decay}", "deepspeed.warmup_steps=3", "train.epochs=2", "deepspeed.lr=0.01"]
    if decay == "cosine":
        extra.append(f"deepspeed.min_lr_ratio={floor}")
    t = _selection_trainer(tiny_data, tmp_path, *extra)
    lrs, step = [], t.train_step

    def spy(batch):
        out = step(batch)
        lrs.append(t.engine.get_lr()[0])
        return out

    t.train_step = spy
    t.fit()
    t.close()
    total = 2 * len(t.loader)
    assert t.engine.lr_scheduler.total_num_steps == total and len(lrs) == total
    peak = int(torch.tensor(lrs).argmax())
    assert lrs[peak] == pytest.approx(0.01, rel=0.05) and peak <= 4
    assert all(b <= a + 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    one_step = 0.01 / (total - 3) if decay == "linear" else 0.0
    assert lrs[-1] == pytest.approx(floor * 0.01 + one_step, abs=1e-9)


def test_lr_decay_spans_max_steps_when_that_is_shorter(tiny_data, tmp_path):
    t = _selection_trainer(tiny_data, tmp_path, "deepspeed.lr_decay=cosine", "train.epochs=3", "train.max_steps=5")
    assert t.engine.lr_scheduler.total_num_steps == 5
    t.close()
