"""tools/eval_real.py (`solar bench quality`) end to end on a real data set, with a tiny budget: the records
have the documented fields, the report is generated, and each run starts from an empty run directory."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from solar_dist.config import load_config
from tests.conftest import shared_data
from tests.parallel.launch_utils import launch_env

REPO = Path(__file__).resolve().parents[2]


def test_bench_quality_smoke(tmp_path):
    """Runs the CLI in its own process, as users do: it owns (and shuts down) its process group."""
    shared_data("ml-latest-small", "ratings.csv")
    out, runs = tmp_path / "results.json", tmp_path / "runs"
    stale = runs / "ml_latest_small" / "svd_r4_s0" / "checkpoints" / "step-99999"  # an earlier run's leftover
    stale.mkdir(parents=True)
    (stale / "COMPLETE").touch()
    cmd = [sys.executable, "-m", "solar_dist.cli", "bench", "quality", "--datasets", "ml_latest_small",
           "--models", "svd,truncate", "--ranks", "4", "--max-steps", "2", "--protocols", "sampled100,full",
           "--full-max-users", "60",
           "--set", f"data.path={tmp_path / 'mls'}", "--set", "next_item.eval_max_users=16",
           "--set", "data.batch_size=8", "--set", "train.select_metric=sampled100_ndcg@10",
           "--runs", str(runs), "--out", str(out)]
    env = {**launch_env(), "OMP_NUM_THREADS": "1"}  # no rendezvous variables of this process's own group
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads(out.read_text())
    weighting = load_config(REPO / "configs" / "ml_latest_small.yaml").next_item.loss_weighting  # the config's
    assert {(r["dataset"], r["model"], r["rank"], r["protocol"]) for r in recs} == {
        ("ml_latest_small", m, k, p) for m, k in (("svd", 4), ("truncate", None)) for p in ("sampled100", "full")}
    for r in recs:
        assert {"hr@10", "ndcg@10", "mrr", "seeds", "wall_seconds"} <= set(r)
        assert 0.0 <= r["ndcg@10"] <= r["hr@10"] <= 1.0 and r["seeds"] == [0] and r["steps"] == 2
        # every test user of ml-latest-small; full ranking on the fixed subset of --full-max-users
        assert r["users"] == (610 if r["protocol"] == "sampled100" else 60)
        assert r["selected_epochs"] == [0]  # the one (stopped) epoch's evaluation was the validation best
        assert r["loss_weighting"] == weighting  # recorded, so that reports compare like with like
        # the departures from the config, sorted; where data and runs live is none
        assert r["recipe"] == ("data.batch_size=8 next_item.eval_max_users=16 train.max_steps=2 "
                               "train.select_metric=sampled100_ndcg@10"), r["recipe"]
        # the per-length groups partition the ranked users (for full ranking, the same subset): their user-weighted
        # mean is the split's metric
        window = load_config(REPO / "configs" / "ml_latest_small.yaml").model.causal_window
        groups = r["by_length"]
        assert [g["hi"] for g in groups] == [window, 2 * window, None]
        assert sum(g["users"] for g in groups) == r["users"]
        live = [g for g in groups if g["users"]]
        assert len(live) >= 2  # ml-latest-small's histories run from 18 to 2,697 events
        for m in ("hr@10", "ndcg@10", "mrr"):
            whole = sum(g["users"] * g[m] for g in live) / r["users"]
            assert abs(whole - r[m]) < 1e-6, (m, whole, r[m])
    md = out.with_suffix(".md").read_text()
    assert "By history length" in md and f"| {window + 1}-{2 * window} |" in md, md
    assert "ml_latest_small" in md and re.search(r"\| 1 of \d+ \(best 0\) \| 2 \|", md), md
    assert f"| svd | 4 | {weighting} | {recs[0]['recipe']} | sampled100 |" in md, md
    assert f"sampled100, {weighting} weighting, {recs[0]['recipe']}: SVD (r=4)" in md, md
    assert not stale.exists(), "a fresh run must not keep an earlier run's checkpoints"
    assert "[eval_real] ml_latest_small svd_r4_s0" in proc.stdout


def test_merge_keeps_the_other_weightings_records():
    sys.path.insert(0, str(REPO))
    from tools.eval_real import merge_records, render_md

    def rec(norm, ndcg, model="svd", rank=16):
        r = {"dataset": "games", "model": model, "rank": rank, "protocol": "sampled100", "hr@10": 0.7,
             "ndcg@10": ndcg, "mrr": 0.4, "seeds": [0], "wall_seconds": 1.0}
        if norm:
            r["loss_weighting"] = norm
        return r

    old = [rec(None, 0.48), rec(None, 0.47, "exact", None), rec("position", 0.50)]
    merged = merge_records(old, [rec("position", 0.52)])
    assert [(r.get("loss_weighting"), r["ndcg@10"]) for r in merged] == [(None, 0.48), (None, 0.47),
                                                                         ("position", 0.52)]
    md = render_md(merged)
    assert "| svd | 16 | batch_mean | config | sampled100 |" in md and "| svd | 16 | position | config | sampled100 |" in md
    # SVD is checked against exact only within one weighting: there is no exact run under `position`
    assert "sampled100, batch_mean weighting: SVD (r=16) vs exact" in md
    assert "position weighting: SVD (r=16) vs exact" not in md
    # each rank is checked on its own, not the rank that did best on the test split
    md = render_md(merged + [rec(None, 0.49, rank=8)])
    assert "batch_mean weighting: SVD (r=8) vs exact NDCG@10: +4.26%" in md
    assert "batch_mean weighting: SVD (r=16) vs exact NDCG@10: +2.13%" in md


def test_add_seeds_joins_a_record_with_its_other_seeds():
    sys.path.insert(0, str(REPO))
    from tools.eval_real import merge_records

    def rec(seeds, ndcgs, recipe="config", groups=(0.5, 0.6)):
        return {"dataset": "games", "model": "svd", "rank": 16, "protocol": "sampled100", "recipe": recipe,
                "loss_weighting": "position", "hr@10": 0.7, "ndcg@10": sum(ndcgs) / len(ndcgs), "mrr": 0.4,
                "seeds": seeds, "wall_seconds": 10.0 * len(seeds),
                "per_seed": {"hr@10": [0.7] * len(seeds), "ndcg@10": list(ndcgs), "mrr": [0.4] * len(seeds)},
                "selected_epochs": [4] * len(seeds), "command": f"seeds {seeds}",
                "by_length": [{"history": "1-16", "lo": 0, "hi": 16, "users": 3, "hr@10": 0.7, "ndcg@10": groups[0],
                               "mrr": 0.4},
                              {"history": ">16", "lo": 16, "hi": None, "users": 1, "hr@10": 0.7,
                               "ndcg@10": groups[1], "mrr": 0.4}]}

    other = rec([0], [0.9], recipe="model.causal_window=32")
    old = [rec([0], [0.50], groups=(0.4, 0.8)), other]
    merged = merge_records(old, [rec([1, 2], [0.53, 0.56])], add_seeds=True)
    assert merged[0] is other  # another recipe's record is untouched
    j = merged[1]
    assert j["seeds"] == [0, 1, 2] and j["per_seed"]["ndcg@10"] == [0.50, 0.53, 0.56]
    assert abs(j["ndcg@10"] - 0.53) < 1e-12 and j["wall_seconds"] == 30.0 and j["selected_epochs"] == [4, 4, 4]
    assert [round(g["ndcg@10"], 12) for g in j["by_length"]] == [round((0.4 + 2 * 0.5) / 3, 12),
                                                                  round((0.8 + 2 * 0.6) / 3, 12)]
    assert merge_records(old, [rec([1, 2], [0.53, 0.56])])[1]["seeds"] == [1, 2]  # without: it replaces
    with pytest.raises(ValueError, match=r"seeds \[0\] are in both"):
        merge_records(old, [rec([0, 1], [0.5, 0.5])], add_seeds=True)
    no_groups = dict(rec([3], [0.5]), by_length=None)
    assert merge_records(old, [no_groups], add_seeds=True)[1]["by_length"] is None


def test_a_recipe_variant_sits_beside_the_config_runs():
    """A run with other training settings (here a cosine lr decay) neither replaces the config's records nor
    is compared with them: SVD meets exact only within one recipe."""
    sys.path.insert(0, str(REPO))
    from tools.eval_real import merge_records, render_md

    def rec(model, ndcg, recipe=None):
        r = {"dataset": "ml1m", "model": model, "rank": 16 if model == "svd" else None, "protocol": "full",
             "hr@10": 0.3, "ndcg@10": ndcg, "mrr": 0.15, "seeds": [0], "wall_seconds": 1.0,
             "loss_weighting": "position"}
        if recipe:
            r["recipe"] = recipe
        return r

    cos = "deepspeed.lr_decay=cosine train.epochs=30"
    merged = merge_records([rec("svd", 0.178), rec("exact", 0.170)], [rec("svd", 0.181, cos)])
    assert sorted(r["ndcg@10"] for r in merged) == [0.170, 0.178, 0.181]
    merged = merge_records(merged, [rec("svd", 0.182, cos)])  # the same recipe: replaced
    assert sorted(r["ndcg@10"] for r in merged) == [0.170, 0.178, 0.182]
    md = render_md(merged)
    assert f"| svd | 16 | position | {cos} | full | 0.3000 | 0.1820 |" in md, md
    assert "full, position weighting: SVD (r=16) vs exact NDCG@10: +4.71% relative" in md, md  # 0.178 vs 0.170
    assert f"full, position weighting, {cos}: SVD (r=16) vs exact" not in md  # no exact under that recipe
    assert f"best ours 0.1820 (svd r=16, {cos}) — NOT met" in md, md


def test_recipe_names_only_the_overrides_that_change_training():
    sys.path.insert(0, str(REPO))
    import pytest

    from solar_dist.config import ConfigError
    from tools.eval_real import recipe_of

    cfg = REPO / "configs" / "ml1m.yaml"
    own = load_config(cfg)
    assert recipe_of(cfg, []) == "config"
    # the config's own value, where data and runs live, and the safety stop are no departure
    assert recipe_of(cfg, [f"data.batch_size={own.data.batch_size}", "data.path=/elsewhere",
                           "train.run_dir=/tmp/r", "train.max_minutes=5"]) == "config"
    # departures from the config's own values (whatever they are), sorted by key
    decay = "linear" if own.deepspeed.lr_decay != "linear" else "cosine"
    epochs = own.train.epochs + 5
    assert recipe_of(cfg, [f"train.epochs={epochs}", f"deepspeed.lr_decay={decay}"]) == \
        f"deepspeed.lr_decay={decay} train.epochs={epochs}"
    with pytest.raises(ConfigError, match="lr_decay"):
        recipe_of(cfg, ["deepspeed.lr_decay=step"])
    # overrides that need each other are applied together, as the run applies them; a key given twice counts
    # once, with its last value; keys inside a dict-valued field are looked up too
    g = REPO / "configs" / "games.yaml"
    assert load_config(g).deepspeed.lr_decay == "none"  # min_lr_ratio alone would be refused here
    assert recipe_of(g, ["deepspeed.min_lr_ratio=0.1", "deepspeed.lr_decay=cosine"]) == \
        "deepspeed.lr_decay=cosine deepspeed.min_lr_ratio=0.1"
    assert recipe_of(g, ["train.epochs=3", "train.epochs=4"]) == "train.epochs=4"
    item = load_config(g).embedding.sharding_types["item"]
    other = "table_wise" if item != "table_wise" else "column_wise"
    assert recipe_of(g, [f"embedding.sharding_types.item={other}"]) == f"embedding.sharding_types.item={other}"
    assert recipe_of(g, [f"embedding.sharding_types.item={item}"]) == "config"


def test_epochs_column_says_when_the_time_limit_ended_a_run():
    sys.path.insert(0, str(REPO))
    from tools.eval_real import _epochs

    r = {"epochs": 30, "epochs_trained": [29], "selected_epochs": [None], "stopped_by_time_budget": [True]}
    assert _epochs(r) == "29 of 30, time limit"
    assert _epochs({**r, "epochs_trained": [30], "stopped_by_time_budget": [False]}) == "30"
    assert _epochs({"epochs": 10, "epochs_trained": [7, 8], "selected_epochs": [4, 5]}) == "7,8 of 10 (best 4,5)"


def test_seed_note_counts_the_seeds_each_side_wins():
    sys.path.insert(0, str(REPO))
    from tools.eval_real import _seeds_note

    a = {"seeds": [0, 1, 2], "per_seed": {"ndcg@10": [0.46, 0.44, 0.45]}}
    b = {"seeds": [0, 1, 2], "per_seed": {"ndcg@10": [0.45, 0.45, 0.46]}}
    assert _seeds_note(a, b) == " (higher on 1 of 3 seeds)"
    assert _seeds_note(a, {"seeds": [0], "per_seed": {"ndcg@10": [0.4]}}) == " (seeds 0,1,2 vs 0)"
    one = {"seeds": [0], "per_seed": {"ndcg@10": [0.5]}}
    assert _seeds_note(one, {"seeds": [0], "per_seed": {"ndcg@10": [0.4]}}) == ""
