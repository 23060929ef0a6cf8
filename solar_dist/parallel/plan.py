"""`solar plan CONFIG --world-size 64 --device cuda --hbm-gb 80`: plan a cluster that is not there.

Runs TorchRec's planner for the requested topology (no process group needed: `planner.plan`), then prints
  - the sharding plan: table -> sharding type -> ranks,
  - per-rank embedding + fused-optimizer memory (from the plan's shard sizes),
  - the tower's per-rank memory under the configured ZeRO stage,
  - the activation memory of the longest sequence under the configured sp,
and refuses (exit code 3), with the numbers, a plan whose busiest rank does not fit in `--hbm-gb`.

The tower and activation figures are estimates from counts (documented beside each formula); the embedding
figures are exact shard sizes.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence


from torchrec.distributed.planner.types import PlannerError

from ..config import SolarConfig, load_config

GiB = 1024 ** 3


def table_sizes(cfg: SolarConfig):
    from ..data.schema import DatasetMeta, dataset_exists
    from ..model.sparse import TableSizes

    if dataset_exists(cfg.data.path):
        meta = DatasetMeta.load(cfg.data.path)
        max_len = int(meta.stats.get("hist_len_max", 0)) or cfg.data.synth.max_hist_len
        return TableSizes(meta.num_items, meta.num_users, meta.num_actions), max_len
    s = cfg.data.synth
    return TableSizes(cfg.embedding.item_table_size or s.num_items, cfg.embedding.user_table_size or s.num_users,
                      cfg.embedding.action_table_size), s.max_hist_len


def optimizer_state_bytes_per_row(optimizer: str, cols: int) -> int:
    """Fused-optimizer state per embedding row (fp32)."""
    return {"rowwise_adagrad": 4, "adagrad": 4 * cols, "adam": 8 * cols, "sgd": 0}[optimizer]


def tower_bytes_per_rank(num_params: int, stage: int, world: int, bf16: bool, optimizer: str) -> Dict[str, float]:
    """ZeRO memory per rank (Rajbhandari et al.): fp32 master weights 4P, gradients 4P (2P in bf16),
    optimizer state 8P for Adam(W) (0 for SGD), plus 2P bf16 weights when bf16. Stage 1 partitions the
    optimizer state, stage 2 also the gradients, stage 3 also the weights."""
    P = float(num_params)
    opt = 8 * P if optimizer in ("AdamW", "Adam") else 0.0
    weights, grads = 4 * P + (2 * P if bf16 else 0.0), (2 * P if bf16 else 4 * P)
    if stage >= 1:
        opt /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    return {"weights": weights, "grads": grads, "optimizer": opt, "total": weights + grads + opt}


def activation_bytes(cfg: SolarConfig, max_len: int, sp: int, bf16: bool) -> float:
    """Activations kept for backward for ONE request of the longest history, on one sp rank: per token and
    layer ~ (8 + 3·ffn_mult)·D values (norms, q, attention output, residuals, FFN hidden before/after GELU)
    plus the factorisation's sketch (r + p values); times depth; plus the candidate side (ignored: M·D)."""
    D, m = cfg.embedding.dim, cfg.model
    n_local = math.ceil(max_len / sp)
    per_token = (8 + 3 * m.ffn_mult) * D + (m.rank + m.oversample)
    return float(n_local * per_token * m.depth * (2 if bf16 else 4))


def plan(cfg: SolarConfig, world_size: int, device: str, hbm_gb: float, local_world_size: int) -> Dict:
    from ..model.sparse import SparseArch
    from ..model.solar import tower_head
    from ..model.tower import SolarTower
    from .sharding import make_planner, sharders

    if world_size % cfg.parallel.sp:
        raise ValueError(f"parallel.sp={cfg.parallel.sp} must divide --world-size {world_size}")
    sizes, max_len = table_sizes(cfg)
    sparse = SparseArch(cfg, sizes, device="meta")
    names = [t.name for t in sparse.ec.embedding_configs()] + [t.name for t in sparse.ebc.embedding_bag_configs()]
    backend = "nccl" if device == "cuda" else "gloo"
    planner = make_planner(cfg, names, world_size, device, backend, hbm_bytes=int(hbm_gb * GiB),
                           local_world_size=local_world_size)
    per_rank: Dict[int, float] = defaultdict(float)
    rows: List[Dict] = []
    planner_error = None
    try:
        sharding_plan = planner.plan(sparse, sharders())
        items = sharding_plan.plan.items()
    except PlannerError as exc:
        # TorchRec found no placement within the memory: report what an even split would need
        planner_error = str(exc).strip().splitlines()[0]
        items = []
        for cfg_t in list(sparse.ec.embedding_configs()) + list(sparse.ebc.embedding_bag_configs()):
            b = cfg_t.num_embeddings * (cfg_t.embedding_dim * 4 + optimizer_state_bytes_per_row(
                cfg.embedding.optimizer, cfg_t.embedding_dim))
            for r in range(world_size):
                per_rank[r] += b / world_size
    for module_path, params in items:
        for table, ps in params.items():  # type: ignore[union-attr]
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            ranks = []
            for sh in shards:
                r = sh.placement.rank()
                n_rows, n_cols = sh.shard_sizes
                b = n_rows * n_cols * 4 + n_rows * optimizer_state_bytes_per_row(cfg.embedding.optimizer, n_cols)
                per_rank[r] += b
                ranks.append(r)
            rows.append({"table": table, "module": module_path, "sharding_type": ps.sharding_type,
                         "compute_kernel": ps.compute_kernel, "ranks": sorted(set(ranks))})
    tower = SolarTower(cfg.model, cfg.embedding.dim, head=tower_head(cfg))
    n_params = sum(p.numel() for p in tower.parameters())
    tb = tower_bytes_per_rank(n_params, cfg.deepspeed.zero_stage, world_size, cfg.deepspeed.bf16,
                              cfg.deepspeed.optimizer)
    act = activation_bytes(cfg, max_len, cfg.parallel.sp, cfg.deepspeed.bf16) * cfg.data.batch_size
    busiest = max(per_rank.values()) if per_rank else 0.0
    total = busiest + tb["total"] + act
    return {"world_size": world_size, "device": device, "sp": cfg.parallel.sp, "dp": world_size // cfg.parallel.sp,
            "hbm_bytes": hbm_gb * GiB, "tables": rows, "embedding_bytes_per_rank": dict(per_rank),
            "tower_params": n_params, "tower_bytes_per_rank": tb, "longest_history": max_len,
            "activation_bytes_per_rank": act, "busiest_rank_total_bytes": total,
            "planner_error": planner_error, "fits": planner_error is None and total <= hbm_gb * GiB}


def _gb(x: float) -> str:
    return f"{x / GiB:.3f} GiB"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="solar plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="memory per rank (HBM on cuda, RAM share on cpu)")
    p.add_argument("--local-world-size", type=int, default=8, help="ranks per host")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    out = plan(cfg, args.world_size, args.device, args.hbm_gb, min(args.local_world_size, args.world_size))
    print(f"plan for world={out['world_size']} (dp={out['dp']} x sp={out['sp']}) on {args.device}, "
          f"{args.hbm_gb:g} GB per rank\n")
    print("| table | sharding type | compute kernel | ranks |\n|---|---|---|---|")
    for r in out["tables"]:
        ranks = r["ranks"]
        shown = f"{ranks[0]}..{ranks[-1]} ({len(ranks)})" if len(ranks) > 6 else str(ranks)
        print(f"| {r['table']} | {r['sharding_type']} | {r['compute_kernel']} | {shown} |")
    emb = out["embedding_bytes_per_rank"]
    print(f"\nembeddings + fused optimizer per rank: max {_gb(max(emb.values(), default=0))}, "
          f"min {_gb(min(emb.values(), default=0))} over {len(emb)} ranks holding shards")
    tb = out["tower_bytes_per_rank"]
    print(f"tower: {out['tower_params']:,} parameters; ZeRO-{cfg.deepspeed.zero_stage} per rank: weights "
          f"{_gb(tb['weights'])}, grads {_gb(tb['grads'])}, optimizer {_gb(tb['optimizer'])}")
    print(f"activations: longest history {out['longest_history']:,} events / sp={out['sp']} x batch "
          f"{cfg.data.batch_size}: {_gb(out['activation_bytes_per_rank'])} per rank (estimate)")
    print(f"busiest rank total: {_gb(out['busiest_rank_total_bytes'])} of {_gb(out['hbm_bytes'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    if out["planner_error"]:
        print(f"TorchRec's planner found no placement: {out['planner_error']}\n(embedding figures above assume "
              f"an even split of every table over the {out['world_size']} ranks)")
    if not out["fits"]:
        print(f"\nREFUSED: the busiest rank needs {_gb(out['busiest_rank_total_bytes'])} but has "
              f"{_gb(out['hbm_bytes'])}; add ranks, raise parallel.sp, shard differently or lower data.batch_size")
        return 3
    print("\nfits.")
    return 0


