"""Per-user ranks (NextItemTrainer.user_ranks) and the paired comparison tool (tools/paired_eval.py,
`solar bench paired`): the per-user numbers are the ones `evaluate` averages, and the statistics are checked
against direct computations."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from solar_dist.config import load_config
from solar_dist.train.next_item import make_trainer
from solar_dist.train.ranking import metric_sums
from tests.parallel.launch_utils import launch_env
from tests.train.test_next_item import ALL_POS, NEXT_ITEM_TINY, _tiny_next_item_data
from tools.paired_eval import compare, paired_stats, per_user_metrics, resolve_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_paired_stats_hand_checked():
    s = paired_stats(np.array([0.0, 1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0, 0.0]))
    # differences 1, 0, 0, -1: mean 0, sample sd sqrt(2/3), se sqrt(2/3)/2
    assert s["n"] == 4 and s["a"] == 0.5 and s["b"] == 0.5 and s["diff"] == 0.0
    assert math.isclose(s["se"], math.sqrt(2 / 3) / 2, rel_tol=1e-12)
    s = paired_stats(np.array([0.5, 0.25]), np.array([0.75, 0.5]))
    assert s["diff"] == 0.25 and s["se"] == 0.0 and math.isclose(s["rel"], 0.25 / 0.375)
    with pytest.raises(ValueError, match="one length"):
        paired_stats(np.zeros(3), np.zeros(4))


def test_per_user_metrics_average_to_metric_sums():
    ranks = torch.randint(0, 40, (500,))
    sums = metric_sums(ranks, 10)
    m = per_user_metrics(ranks.numpy(), 10)
    n = float(sums[3])
    for i, name in enumerate(("hr@10", "ndcg@10", "mrr")):
        assert math.isclose(m[name].mean(), float(sums[i]) / n, rel_tol=1e-12), name


@pytest.mark.parametrize("mode", ["cut_points", "all_positions"])
def test_user_ranks_are_what_evaluate_averages(tmp_path, mode):
    root = _tiny_next_item_data(tmp_path)
    extra = ALL_POS if mode == "all_positions" else []
    cfg = load_config(None, NEXT_ITEM_TINY + extra + [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}"])
    tr = make_trainer(cfg)
    try:
        for split in ("valid", "test"):
            table = tr.split_table(split)
            for proto in ("sampled100", "full"):
                m = tr.evaluate(table, protocols=[proto])
                uids, ranks = tr.user_ranks(table, proto)
                assert sorted(uids.tolist()) == sorted(table.column("user_id").to_numpy().tolist())
                pu = per_user_metrics(ranks, cfg.next_item.topk)
                for name in ("hr@10", "ndcg@10", "mrr"):
                    assert math.isclose(pu[name].mean(), m[f"{proto}_{name}"], rel_tol=1e-9), (split, proto, name)
        with pytest.raises(ValueError, match="unknown protocol"):
            tr.user_ranks(tr.split_table("valid"), "sampled50")
    finally:
        tr.close()


def test_compare_groups_by_history_length_and_checks_users():
    base = {"topk": 10, "test": {"lengths": {1: 3, 2: 5, 3: 9}, "sampled100": {1: 0, 2: 4, 3: 20}}}
    other = {"topk": 10, "test": {"sampled100": {1: 1, 2: 4, 3: 0}}}
    rows = {(r["history"], r["metric"]): r for r in compare(base, other, ["test"], ["sampled100"], [5])}
    assert set(h for h, _ in rows) == {"all", "1-5", ">5"}
    assert rows[("1-5", "mrr")]["n"] == 2 and math.isclose(rows[("1-5", "mrr")]["diff"], (0.5 - 1.0) / 2)
    assert rows[(">5", "hr@10")]["diff"] == 1.0 and rows[("all", "hr@10")]["b"] == 1.0
    assert {r["history"] for r in compare(base, other, ["test"], ["sampled100"], [])} == {"all"}
    other["test"]["sampled100"].pop(3)
    with pytest.raises(ValueError, match="different users"):
        compare(base, other, ["test"], ["sampled100"], [5])


def test_resolve_checkpoint_names_what_is_missing(tmp_path):
    (tmp_path / "checkpoints" / "step-7").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-7" / "COMPLETE").touch()
    assert resolve_checkpoint(tmp_path, "step-7", "") == tmp_path / "checkpoints" / "step-7"
    with pytest.raises(FileNotFoundError, match="step-8"):
        resolve_checkpoint(tmp_path, "step-8", "")


def test_paired_tool_end_to_end(tmp_path):
    """A run compared with itself (selected checkpoint against the same checkpoint named explicitly) differs by
    exactly zero on every user; against another seed's run it differs, and the JSON holds every row."""
    root = _tiny_next_item_data(tmp_path)
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        cfg = load_config(None, NEXT_ITEM_TINY + ALL_POS + [
            f"data.path={root}", f"train.run_dir={run}", f"train.seed={seed}", "train.epochs=2",
            "train.select_metric=sampled100_ndcg@10"])
        tr = make_trainer(cfg)
        try:
            tr.fit()
        finally:
            tr.close()
        runs.append(run)
    step = sorted((runs[0] / "best" / "checkpoints").iterdir())[-1].name
    out = tmp_path / "paired.json"
    cmd = [sys.executable, "-m", "solar_dist.cli", "bench", "paired", "--run", f"a={runs[0]}",
           "--run", f"same={runs[0]}@{step}", "--run", f"other={runs[1]}", "--edges", "5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env={**launch_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["base"] == "a" and res["edges"] == [5]
    same, other = res["comparisons"]["same"], res["comparisons"]["other"]
    # 2 splits x 2 protocols x (all + 2 length groups) x 3 metrics
    assert len(same) == len(other) == 2 * 2 * 3 * 3
    for r in same:
        assert r["diff"] == 0.0, r
        assert r["se"] == 0.0 or (r["n"] < 2 and math.isnan(r["se"])), r
    alls = [r for r in same if r["history"] == "all"]
    assert all(r["n"] == alls[0]["n"] for r in alls if r["protocol"] == "sampled100")
    groups = {(r["split"], r["protocol"], r["metric"]): 0 for r in same}
    for r in same:
        if r["history"] != "all":
            groups[(r["split"], r["protocol"], r["metric"])] += r["n"]
    assert all(n == alls[0]["n"] for n in groups.values())  # the length groups partition the users
    assert any(r["diff"] != 0.0 for r in other)
    assert "| valid | sampled100 | all |" in proc.stdout
