"""Chooses the training loader from `data.loader`. Every loader follows the same BatchPlan (loader.py), so
results do not depend on the choice."""
from __future__ import annotations

import pyarrow as pa

from ..config import SolarConfig
from .loader import ArrowLoader


def build_train_loader(cfg: SolarConfig, table: pa.Table, dp_rank: int, dp_size: int):
    d = cfg.data
    kwargs = dict(dp_rank=dp_rank, dp_size=dp_size, shuffle=d.shuffle, seed=cfg.train.seed,
                  bucket_batches=d.bucket_batches, max_hist_len=d.max_hist_len, prefetch=d.prefetch_batches)
    if d.loader == "pyarrow":
        return ArrowLoader(table, d.batch_size, **kwargs)
    if d.loader == "ray":
        from .ray_loader import RayLoader  # imported lazily: Ray is heavy and optional for the default path

        return RayLoader(cfg, table, d.batch_size, **kwargs)
    raise ValueError(f"data.loader={d.loader!r}; choose one of ['pyarrow', 'ray']")
