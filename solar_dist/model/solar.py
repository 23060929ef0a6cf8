"""Glue between the sparse arch's outputs and the tower's inputs, shared by training, evaluation and tests."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torchrec.distributed.types import Awaitable
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from ..data.batch import CAND_ITEM, HIST_ACTION, HIST_ITEM, USER_ID, Batch


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; gradient times `scale` backward."""
    if not isinstance(x, torch.Tensor):
        # autograd.Function treats non-tensors as constants: the gradient would silently stop here
        raise TypeError(f"scale_grad needs a tensor, got {type(x).__name__}")
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def _ready(x):
    """DMP outputs are LazyAwaitables when a collective is in flight (world > 1); indexing them gives lazy
    results too. Wait for the real value before it enters autograd."""
    while isinstance(x, Awaitable):
        x = x.wait()
    return x


def tower_inputs(ec_out: Dict[str, JaggedTensor], ebc_out: KeyedTensor, batch: Batch,
                 grad_scale: float = 1.0, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Jagged embeddings -> tower arguments.

    `grad_scale`: the trainer multiplies the loss by the world size so that DeepSpeed's gradient *mean*
    equals the global gradient of the tower; the embedding path must not see that factor (TorchRec *sums*
    gradients into the owning shards), so it is divided out here, at the boundary."""
    ec_out, ebc_out = _ready(ec_out), _ready(ebc_out)
    hist = _ready(ec_out[HIST_ITEM]).values()
    if HIST_ACTION in batch.features.keys():
        hist = hist + _ready(ec_out[HIST_ACTION]).values()
    cand = _ready(ec_out[CAND_ITEM]).values()
    user = _ready(ebc_out[USER_ID])
    hist, cand, user = (scale_grad(t, grad_scale) for t in (hist, cand, user))
    if dtype is not None:
        hist, cand, user = hist.to(dtype), cand.to(dtype), user.to(dtype)
    return {"hist": hist, "hist_lengths": batch.hist_lengths, "cand": cand, "cand_lengths": batch.cand_lengths,
            "user": user, "hist_pos_from_end": batch.hist_pos_from_end}


def tower_head(cfg) -> str:
    """Which SolarTower head a full config trains: `states` for next-item training at every position
    (next_item.train_mode=all_positions), else the ranking head `rank`."""
    if cfg.data.task == "next_item" and cfg.next_item.train_mode == "all_positions":
        return "states"
    return "rank"
