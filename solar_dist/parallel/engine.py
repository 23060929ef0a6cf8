"""DeepSpeed for the dense tower only.

`deepspeed.initialize` gets the tower module, never the DMP: DeepSpeed would otherwise cast and broadcast the
sharded tables. The client optimizer is torch's (AdamW/Adam/SGD), which ZeRO partitions at every stage and
which runs on any device; DeepSpeed's fused CUDA optimizers are a drop-in for GPU clusters.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from ..config import SolarConfig


def deepspeed_config(cfg: SolarConfig, world_size: int, total_steps: int = 0) -> Dict[str, Any]:
    """DeepSpeed's config dict. `total_steps` (the run's planned optimizer steps) sets where
    `deepspeed.lr_decay` ends; it must be > 0 when a decay is asked for."""
    ds = cfg.deepspeed
    conf: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "train_batch_size": cfg.data.batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ds.zero_stage, "reduce_bucket_size": ds.bucket_size,
                              "allgather_bucket_size": ds.bucket_size,
                              "stage3_prefetch_bucket_size": ds.bucket_size},
        "gradient_clipping": ds.grad_clip if ds.grad_clip > 0 else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": bool(ds.bf16)},
        # torch.optim.SGD under ZeRO partitions like any torch optimizer; DeepSpeed only lists Adam variants
        "zero_allow_untested_optimizer": True,
    }
    if ds.lr_decay != "none":
        if total_steps < 1:
            raise ValueError(f"deepspeed.lr_decay={ds.lr_decay!r} needs the run's planned steps (got {total_steps})")
        if ds.lr_decay == "linear":
            params = {"warmup_min_lr": 0.0, "warmup_max_lr": ds.lr}
            kind = "WarmupDecayLR"
        else:
            params = {"warmup_min_ratio": 0.0, "cos_min_ratio": ds.min_lr_ratio}
            kind = "WarmupCosineLR"
        params.update({"total_num_steps": int(total_steps), "warmup_num_steps": max(1, ds.warmup_steps),
                       "warmup_type": "linear"})
        conf["scheduler"] = {"type": kind, "params": params}
    elif ds.warmup_steps > 0:
        conf["scheduler"] = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": ds.lr, "warmup_num_steps": ds.warmup_steps,
                       "warmup_type": "linear"},
        }
    return conf


def make_optimizer(cfg: SolarConfig, module: nn.Module) -> torch.optim.Optimizer:
    ds = cfg.deepspeed
    params = [p for p in module.parameters() if p.requires_grad]
    if ds.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=ds.lr, betas=tuple(ds.betas), weight_decay=ds.weight_decay)
    if ds.optimizer == "Adam":
        return torch.optim.Adam(params, lr=ds.lr, betas=tuple(ds.betas), weight_decay=ds.weight_decay)
    return torch.optim.SGD(params, lr=ds.lr, weight_decay=ds.weight_decay)


def planned_steps(cfg: SolarConfig, steps_per_epoch: int) -> int:
    """Optimizer steps the run is configured for: train.epochs x steps per epoch, capped by train.max_steps."""
    total = cfg.train.epochs * steps_per_epoch
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def init_engine(cfg: SolarConfig, tower: nn.Module, world_size: int, total_steps: int = 0):
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=tower, optimizer=make_optimizer(cfg, tower), config=deepspeed_config(cfg, world_size, total_steps)
    )
    return engine
