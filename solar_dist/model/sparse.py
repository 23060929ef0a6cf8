"""Sparse arch: the TorchRec embedding tables.

- `EmbeddingCollection` (sequence embeddings, one row per event): table `item` serves both `hist_item` and
  `cand_item` (shared through `feature_names`), optional table `action` serves `hist_action`.
- `EmbeddingBagCollection` (pooled): table `user` for `user_id`.

This module is what `DistributedModelParallel` shards; it has no dense parameters, so the dense tower
(DeepSpeed) and the tables (TorchRec's fused optimizer) never share a parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from ..config import SolarConfig
from ..data.batch import CAND_ITEM, HIST_ACTION, HIST_ITEM, USER_ID

ITEM_TABLE = "item"
ACTION_TABLE = "action"
USER_TABLE = "user"


@dataclass
class TableSizes:
    num_items: int
    num_users: int
    num_actions: int = 1


def table_configs(cfg: SolarConfig, sizes: TableSizes) -> tuple[List[EmbeddingConfig], List[EmbeddingBagConfig]]:
    e = cfg.embedding
    num_items = e.item_table_size or sizes.num_items
    num_users = e.user_table_size or sizes.num_users
    if num_items < sizes.num_items:
        raise ValueError(
            f"embedding.item_table_size={num_items} is smaller than the data's num_items={sizes.num_items}"
        )
    if num_users < sizes.num_users:
        raise ValueError(
            f"embedding.user_table_size={num_users} is smaller than the data's num_users={sizes.num_users}"
        )
    ec = [EmbeddingConfig(name=ITEM_TABLE, embedding_dim=e.dim, num_embeddings=num_items,
                          feature_names=[HIST_ITEM, CAND_ITEM])]
    if e.use_actions:
        ec.append(EmbeddingConfig(name=ACTION_TABLE, embedding_dim=e.dim,
                                  num_embeddings=max(e.action_table_size, sizes.num_actions),
                                  feature_names=[HIST_ACTION]))
    ebc = [EmbeddingBagConfig(name=USER_TABLE, embedding_dim=e.dim, num_embeddings=num_users,
                              feature_names=[USER_ID], pooling=PoolingType.SUM)]
    return ec, ebc


class SparseArch(nn.Module):
    """Looks up every sparse feature. Built on the `meta` device when DMP will materialise shards."""

    def __init__(self, cfg: SolarConfig, sizes: TableSizes, device: torch.device | str = "cpu") -> None:
        super().__init__()
        ec, ebc = table_configs(cfg, sizes)
        self.use_actions = cfg.embedding.use_actions
        self.ec = EmbeddingCollection(tables=ec, device=torch.device(device))
        self.ebc = EmbeddingBagCollection(tables=ebc, device=torch.device(device))

    def forward(self, features: KeyedJaggedTensor, user_features: KeyedJaggedTensor
                ) -> tuple[Dict[str, JaggedTensor], KeyedTensor]:
        if not self.use_actions and HIST_ACTION in features.keys():
            raise ValueError(
                "batch has 'hist_action' but embedding.use_actions=false; set it true or drop the column"
            )
        return self.ec(features), self.ebc(user_features)


def init_tables_(module: nn.Module, std: float, seed: int) -> None:
    """Deterministic N(0, std) init of every unsharded table (so runs with equal seeds are equal)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        if p.device.type == "meta":
            continue
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std)
