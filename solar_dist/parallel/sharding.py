"""TorchRec sharding: per-table constraints from config, the planner, and DistributedModelParallel.

The embeddings' optimizer is fused into the backward pass (TorchRec/fbgemm apply it while the gradient is
still sharded), attached with `apply_optimizer_in_backward` before sharding. `init_data_parallel=False`
keeps DMP from wrapping anything in DDP: the sparse arch has no dense parameters, and the dense tower
belongs to DeepSpeed.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import comm_ops
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from ..config import SolarConfig
from ..model.sparse import ITEM_TABLE, USER_TABLE

# Defaults when the config leaves a table to the planner. Data-parallel tables are excluded: TorchRec wraps
# their lookup in DDP and expects a dense optimizer over `.grad`, which the fused in-backward optimizer
# attached here does not provide, so they would never be trained (config.py refuses them by name).
DEFAULT_SHARDING = {ITEM_TABLE: ["row_wise", "table_wise", "column_wise"],
                    USER_TABLE: ["table_wise", "column_wise"]}
ANY_SHARDING = ["table_wise", "row_wise", "column_wise"]


def constraints(cfg: SolarConfig, table_names: List[str], backend: str) -> Dict[str, ParameterConstraints]:
    e = cfg.embedding
    unknown = (set(e.sharding_types) | set(e.compute_kernels)) - set(table_names)
    if unknown:
        raise ValueError(f"embedding.sharding_types/compute_kernels name unknown tables {sorted(unknown)}; "
                         f"tables are {table_names}")
    out = {}
    for t in table_names:
        st = e.sharding_types.get(t, "")
        types = [st] if st else list(DEFAULT_SHARDING.get(t, ANY_SHARDING))
        if t == USER_TABLE and backend == "gloo" and "row_wise" in types:
            if st:
                raise ValueError("embedding.sharding_types.user=row_wise is not supported on gloo "
                                 "(EmbeddingBagCollection row-wise needs reduce_scatter); use table_wise or column_wise")
            types.remove("row_wise")
        ck = e.compute_kernels.get(t, "fused")
        out[t] = ParameterConstraints(sharding_types=types, compute_kernels=[ck] if ck else None)
    return out


def attach_fused_optimizer(cfg: SolarConfig, module: nn.Module) -> None:
    from torchrec.optim import rowwise_adagrad

    e = cfg.embedding
    if e.optimizer == "rowwise_adagrad":
        cls, kw = rowwise_adagrad.RowWiseAdagrad, {"lr": e.lr, "eps": e.eps, "weight_decay": e.weight_decay}
    elif e.optimizer == "adagrad":
        cls, kw = torch.optim.Adagrad, {"lr": e.lr, "eps": e.eps, "weight_decay": e.weight_decay}
    elif e.optimizer == "adam":
        cls, kw = torch.optim.Adam, {"lr": e.lr, "eps": e.eps, "weight_decay": e.weight_decay}
    else:
        cls, kw = torch.optim.SGD, {"lr": e.lr, "weight_decay": e.weight_decay}
    apply_optimizer_in_backward(cls, module.parameters(), kw)


def sharders() -> list:
    return [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]


def make_planner(cfg: SolarConfig, table_names: List[str], world_size: int, device: str, backend: str,
                 hbm_bytes: Optional[int] = None, local_world_size: Optional[int] = None,
                 batch_size: Optional[int] = None) -> EmbeddingShardingPlanner:
    topo = Topology(world_size=world_size, compute_device=device, hbm_cap=hbm_bytes,
                    local_world_size=local_world_size)
    return EmbeddingShardingPlanner(topology=topo, batch_size=batch_size or cfg.data.batch_size,
                                    constraints=constraints(cfg, table_names, backend))


def shard(cfg: SolarConfig, sparse: nn.Module, table_names: List[str], device: torch.device, backend: str,
          pg: Optional[dist.ProcessGroup] = None) -> tuple[DistributedModelParallel, ShardingPlan]:
    # TorchRec by default divides embedding gradients by the world size inside its all-to-all backward (DDP
    # "mean" semantics), but only where a collective runs, i.e. not on one rank. The trainer normalises
    # explicitly instead (loss sums / global counts, and model.solar.scale_grad on the embedding outputs),
    # which is the same on 1 or N ranks and under every sharding type; so TorchRec's division is switched off.
    comm_ops.set_gradient_division(False)
    if device.type == "cpu" and cfg.embedding.optimizer == "adam":
        # fbgemm's CPU table-batched embedding kernel has no Adam; fail here, by name, not deep inside fbgemm
        raise ValueError("embedding.optimizer=adam is not supported by fbgemm's CPU embedding kernel; on CPU "
                         "choose rowwise_adagrad, adagrad or sgd")
    attach_fused_optimizer(cfg, sparse)
    pg = pg or dist.group.WORLD
    planner = make_planner(cfg, table_names, dist.get_world_size(pg), device.type, backend)
    plan = planner.collective_plan(sparse, sharders(), pg)
    dmp = DistributedModelParallel(module=sparse, device=device, plan=plan, sharders=sharders(),
                                   init_data_parallel=False)
    return dmp, plan


def describe_plan(plan: ShardingPlan) -> List[Dict[str, object]]:
    """table -> sharding type, compute kernel, ranks (for logs and `solar plan`)."""
    rows = []
    for module_path, params in plan.plan.items():
        for table, ps in params.items():  # type: ignore[union-attr]
            rows.append({"module": module_path, "table": table, "sharding_type": ps.sharding_type,
                         "compute_kernel": ps.compute_kernel, "ranks": list(ps.ranks or [])})
    return rows
