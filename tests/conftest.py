"""Shared fixtures: a tiny synthetic data set and a tiny config, so that tests exercise the real stack fast."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_OVERRIDES = [
    "data.synth.num_users=240", "data.synth.num_items=600", "data.synth.num_topics=12",
    "data.synth.min_hist_len=5", "data.synth.max_hist_len=400", "data.synth.num_candidates=12",
    "data.synth.rows_per_file=50", "data.batch_size=16", "data.eval_batch_size=32",
    "embedding.dim=16", "model.rank=4", "model.num_heads=2", "model.depth=1", "model.recent_k=4",
    "model.scorer_hidden=[16]", "train.epochs=1", "train.progress=false", "deepspeed.warmup_steps=0",
    "embedding.sharding_types={item: row_wise, user: table_wise}",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from solar_dist.config import load_config
    from solar_dist.data.synth import generate

    out = tmp_path_factory.mktemp("tiny_data")
    cfg = load_config(None, TINY_OVERRIDES)
    generate(cfg.data.synth, out, verbose=False)
    return out


@pytest.fixture()
def tiny_cfg(tiny_data, tmp_path):
    from solar_dist.config import load_config

    return load_config(None, TINY_OVERRIDES + [f"data.path={tiny_data}", f"train.run_dir={tmp_path / 'run'}",
                                               "data.if_missing=error"])


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (../shared/data is only present in the project's checkouts/CI)")
    return path
