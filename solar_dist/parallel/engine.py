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


def deepspeed_config(cfg: SolarConfig, world_size: int) -> Dict[str, Any]:
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
    if ds.warmup_steps > 0:
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


def init_engine(cfg: SolarConfig, tower: nn.Module, world_size: int):
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=tower, optimizer=make_optimizer(cfg, tower), config=deepspeed_config(cfg, world_size)
    )
    return engine
