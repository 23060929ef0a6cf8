"""`solar plan`: TorchRec's planner for a cluster that is not there, with memory figures and refusal."""
import pytest

from solar_dist.config import load_config
from solar_dist.parallel.plan import main, plan, tower_bytes_per_rank

from ..conftest import REPO

CONFIG = str(REPO / "configs" / "quickstart.yaml")


def test_plan_for_64_gpus_shards_the_big_table(tmp_path):
    cfg = load_config(CONFIG, ["embedding.item_table_size=100000000", f"data.path={tmp_path / 'none'}"])
    out = plan(cfg, 64, "cuda", 80.0, 8)
    item = next(r for r in out["tables"] if r["table"] == "item")
    assert item["sharding_type"] == "row_wise" and len(item["ranks"]) == 64
    per_rank = out["embedding_bytes_per_rank"]
    # 1e8 rows x 32 dims x 4 bytes + row-wise Adagrad state (4 bytes a row), spread evenly over 64 ranks
    expected = 1e8 * (32 * 4 + 4) / 64
    assert max(per_rank.values()) == pytest.approx(expected, rel=0.01)
    assert out["fits"]


def test_plan_refuses_what_does_not_fit(tmp_path, capsys):
    rc = main([CONFIG, "--world-size", "8", "--hbm-gb", "1", "embedding.item_table_size=100000000",
               f"data.path={tmp_path / 'none'}"])
    assert rc == 3
    out = capsys.readouterr().out
    assert "REFUSED" in out and "GiB" in out


def test_zero_stages_partition_what_they_promise():
    full = tower_bytes_per_rank(1000, 0, 8, False, "AdamW")
    assert full["total"] == 16 * 1000
    s1 = tower_bytes_per_rank(1000, 1, 8, False, "AdamW")
    assert s1["optimizer"] == 8 * 1000 / 8 and s1["grads"] == 4000
    s3 = tower_bytes_per_rank(1000, 3, 8, False, "AdamW")
    assert s3["total"] == pytest.approx(16 * 1000 / 8)
