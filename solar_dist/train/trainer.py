"""The trainer: TorchRec-sharded embeddings (fused optimizer) x DeepSpeed tower, one loop for 1..N processes.

One step:
    ec_out, ebc_out = dmp(features, user_features)     # sharded lookups (all-to-all when world > 1)
    logits = engine(**tower_inputs(...))               # dense tower, DeepSpeed (ZeRO 0-3)
    loss = W * sum(local losses) / global count        # W = world size: DeepSpeed averages tower gradients
    engine.backward(loss); engine.step()               # tables are updated inside backward (fused)

Gradient normalisation: each rank divides its loss *sum* by the global number of candidates (all-reduced),
so the global gradient is the sum over ranks. DeepSpeed averages tower gradients over ranks, hence the factor
W on the loss; TorchRec sums table gradients over ranks, hence 1/W on the embedding outputs (scale_grad).
"""
from __future__ import annotations

import json
import math
import random
import resource
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import SolarConfig, save_config
from ..data.batch import Batch
from ..data.factory import build_train_loader
from ..data.loader import eval_loader
from ..data.schema import DatasetMeta, dataset_exists, read_split
from ..model.losses import loss_parts
from ..model.solar import tower_head, tower_inputs
from ..model.sparse import SparseArch, TableSizes
from ..model.tower import SolarTower
from ..parallel.engine import init_engine, planned_steps
from ..parallel.groups import Layout, init_distributed
from ..parallel.sequence import gather_candidates, split_for_sp
from ..parallel.sharding import describe_plan, shard
from .checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
from .metrics import EvalMetrics


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty() with NaN, which costs more than the step itself
        # when DeepSpeed allocates its gradient buckets; results do not depend on uninitialised memory.
        torch.utils.deterministic.fill_uninitialized_memory = False


def ensure_dataset(cfg: SolarConfig, layout: Optional[Layout] = None) -> DatasetMeta:
    """Synthesises the data set on rank 0 when it is missing and `data.if_missing=synth`."""
    path = Path(cfg.data.path)
    rank0 = layout is None or layout.is_main
    if not dataset_exists(path):
        if cfg.data.if_missing == "error":
            raise FileNotFoundError(f"data.path={str(path)!r} holds no data set (meta.json + train/valid/test)")
        if rank0:
            from ..data.synth import generate

            generate(cfg.data.synth, path)
    if dist.is_initialized():
        dist.barrier()
    return DatasetMeta.load(path)


@torch.no_grad()
def init_sharded_tables_(dmp: torch.nn.Module, std: float, seed: int, block: int = 4096) -> None:
    """Fills every (sharded) table with N(0, std²) values that depend only on (seed, table, row): the same
    model on 1 or N ranks, under any sharding type, starts from identical tables. Rows are generated in
    blocks, so a rank touches only the blocks its shards cover."""
    for key, value in dmp.state_dict().items():
        if not key.endswith(".weight"):
            continue
        table_seed = zlib.crc32(key.encode())
        shards = ([(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in value.local_shards()]
                  if hasattr(value, "local_shards") else [(value, [0, 0], list(value.shape))])
        for tensor, offsets, sizes in shards:
            r0, c0 = offsets
            nr, nc = sizes
            dim = value.size(1) if hasattr(value, "local_shards") else value.shape[1]
            for b in range(r0 // block, (r0 + nr - 1) // block + 1 if nr else 0):
                g = torch.Generator().manual_seed(seed * 1_000_003 + table_seed * 7919 + b)
                full = torch.randn(block, dim, generator=g) * std
                lo, hi = max(r0, b * block), min(r0 + nr, (b + 1) * block)
                tensor[lo - r0: hi - r0].copy_(full[lo - b * block: hi - b * block, c0: c0 + nc])


class Trainer:
    def __init__(self, cfg: SolarConfig, layout: Optional[Layout] = None) -> None:
        self.cfg = cfg
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.layout = layout or init_distributed(cfg.parallel.sp, cfg.parallel.backend, cfg.parallel.device)
        L = self.layout
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self.run_dir = Path(cfg.train.run_dir)
        self.meta = ensure_dataset(cfg, L)
        d = cfg.data
        self.train_table = read_split(d.path, "train", self.meta, allow_empty_history=d.allow_empty_history)
        self.eval_table = read_split(d.path, cfg.eval.split, self.meta, allow_empty_history=d.allow_empty_history)
        self.loader = build_train_loader(cfg, self.train_table, L.dp_rank, L.dp)
        self.sizes = TableSizes(num_items=self.meta.num_items, num_users=self.meta.num_users,
                                num_actions=self.meta.num_actions)
        sparse = SparseArch(cfg, self.sizes, device="meta")
        table_names = [t.name for t in sparse.ec.embedding_configs()] + \
                      [t.name for t in sparse.ebc.embedding_bag_configs()]
        self.dmp, self.plan = shard(cfg, sparse, table_names, L.device, L.backend)
        init_sharded_tables_(self.dmp, cfg.embedding.init_std, cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        tower = SolarTower(cfg.model, cfg.embedding.dim, head=tower_head(cfg)).to(L.device)
        self.engine = init_engine(cfg, tower, L.world_size, planned_steps(cfg, len(self.loader)))
        self.dtype = torch.bfloat16 if cfg.deepspeed.bf16 else None
        self.global_step = 0
        self.history: List[Dict[str, Any]] = []
        self.writer = None
        if L.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    # ---------------------------------------------------------------------------------------- one step
    def forward(self, batch: Batch, grad_scale: float = 1.0) -> torch.Tensor:
        """Logits of this rank's candidates. `batch` is already this rank's sp share (split_for_sp)."""
        ec_out, ebc_out = self.dmp(batch.features, batch.user_features)
        inputs = tower_inputs(ec_out, ebc_out, batch, grad_scale=grad_scale, dtype=self.dtype)
        return self.engine(**inputs, sp_group=self.layout.tower_sp_group).float()

    def _global(self, *values: torch.Tensor | float, op: dist.ReduceOp = dist.ReduceOp.SUM) -> List[float]:
        """Scalars reduced over every rank (sum by default), as floats."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if dist.is_initialized() and self.layout.world_size > 1:
            dist.all_reduce(t, op=op)
        return t.tolist()

    def _over_budget(self, t_start: float) -> bool:
        """Whether any rank has spent `train.max_minutes` since `t_start` (every rank gets the same answer, so
        they all stop after the same step)."""
        (over,) = self._global(time.time() - t_start >= 60.0 * self.cfg.train.max_minutes, op=dist.ReduceOp.MAX)
        return over > 0

    def batch_loss(self, batch: Batch, world: float) -> tuple[torch.Tensor, float]:
        """(loss, number of candidates it averages over, all ranks) of this rank's share of a training batch.
        Its normalisation is global (sums over every rank's count), so `loss * world` through DeepSpeed's
        gradient mean gives the global gradient; the embedding path is scaled by 1/world (tower_inputs)."""
        L, lc = self.layout, self.cfg.loss
        logits = self.forward(batch, grad_scale=1.0 / world)
        parts = loss_parts(logits, batch.labels, batch.cand_lengths, listwise=lc.listwise_weight > 0,
                           sp_group=L.tower_sp_group)
        n_bce, n_lw = self._global(parts.bce_count, parts.listwise_count)
        loss = logits.new_zeros(())
        if lc.bce_weight > 0:
            loss = loss + lc.bce_weight * parts.bce_sum / max(n_bce, 1.0)
        if lc.listwise_weight > 0:
            loss = loss + lc.listwise_weight * parts.listwise_sum / max(n_lw, 1.0)
        return loss, n_bce

    def train_step(self, batch: Batch) -> Dict[str, float]:
        L = self.layout
        batch = split_for_sp(batch, L.sp_rank, L.sp).to(L.device)
        self.engine.train()
        self.dmp.train()
        W = float(L.world_size)
        loss, count = self.batch_loss(batch, W)
        self.engine.backward(loss * W)
        self.engine.step()
        self.global_step += 1
        (total,) = self._global(loss.detach())
        return {"loss": total, "candidates": count}

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, table=None, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Metrics on the held-out split, identical on every rank.

        Each dp group scores its share of the requests; under sp the candidate logits are gathered to the
        group's first rank, so that per-request metrics (GAUC) see whole candidate sets; those ranks reduce
        the metric state over `dp_group` and rank 0 broadcasts the figures."""
        L, cfg = self.layout, self.cfg
        table = self.eval_table if table is None else table
        self.engine.eval()
        self.dmp.eval()
        leader = L.sp_rank == 0
        metrics = EvalMetrics(cfg.eval.metrics, batch_size=cfg.data.eval_batch_size,
                              process_group=L.dp_group) if leader else None
        loader = eval_loader(table, cfg.data.eval_batch_size, L.dp_rank, L.dp, cfg.data.max_hist_len,
                             cfg.data.prefetch_batches)
        limit = max_batches if max_batches is not None else cfg.eval.max_batches
        for i, batch in enumerate(loader.epoch(0)):
            if limit and i >= limit:
                break
            empty = batch.batch_size == 0
            if empty:  # this dp rank's share of the last batch is empty: still join the collectives
                batch = loader.first_row()
            local = split_for_sp(batch, L.sp_rank, L.sp)
            logits = self.forward(local.to(L.device)).cpu()
            logits = gather_candidates(logits, local.cand_lengths, L.sp_group, L.sp)
            if leader and not empty:
                metrics.update(logits, batch.labels, batch.cand_lengths)
        out = metrics.compute() if leader else {}
        if L.world_size > 1:
            box = [out]
            dist.broadcast_object_list(box, src=0)
            out = box[0]
        return out

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits of every candidate of `batch` (the same batch on every rank of an sp group)."""
        L = self.layout
        self.engine.eval()
        self.dmp.eval()
        local = split_for_sp(batch, L.sp_rank, L.sp)
        logits = self.forward(local.to(L.device)).cpu()
        return gather_candidates(logits, local.cand_lengths, L.sp_group, L.sp)

    # ------------------------------------------------------------------------------------- checkpoints
    def trainer_state(self) -> Dict[str, Any]:
        return {"global_step": self.global_step, "loader": self.loader.state_dict(),
                "world_size": self.layout.world_size, "dp": self.layout.dp, "sp": self.layout.sp,
                "history": self.history}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.global_step, self.dmp, self.engine, self.trainer_state(),
                               keep=self.cfg.train.keep_checkpoints)

    def restore(self, path: Optional[Path] = None) -> bool:
        path = path or latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state = load_checkpoint(path, self.dmp, self.engine)
        if state["world_size"] != self.layout.world_size or state["sp"] != self.layout.sp:
            raise ValueError(f"checkpoint {path} was written with world={state['world_size']}, "
                             f"sp={state['sp']}; this run has world={self.layout.world_size}, sp={self.layout.sp}")
        self.global_step = int(state["global_step"])
        self.loader.load_state_dict(state["loader"])
        self.history = list(state.get("history", []))
        return True

    # -------------------------------------------------------------------------------------------- loop
    def fit(self, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Trains `train.epochs` epochs (or `train.max_steps` steps, or until `train.max_minutes`), evaluating
        after each epoch.
        `on_epoch_end(metrics)` is called on every rank after each evaluation (Ray Tune reports there)."""
        cfg, L = self.cfg, self.layout
        if cfg.train.resume and self.restore():
            self._log(f"resumed from step {self.global_step} (epoch {self.loader.state.epoch}, "
                      f"batch {self.loader.state.step})")
        self._log(self._plan_summary())
        if self.loader.plan.dropped_rows:
            self._log(f"each epoch drops the last partial global batch: {self.loader.plan.dropped_rows} of "
                      f"{self.loader.plan.num_rows} rows (global batch {self.loader.plan.global_batch})")
        t_start = time.time()
        samples = events = 0
        train_seconds = 0.0
        done = stopped_by_budget = False
        start_epoch = self.loader.state.epoch
        for epoch in range(start_epoch, cfg.train.epochs):
            bar = self._bar(epoch)
            t_epoch = time.time()
            for batch in self.loader.epoch(epoch):
                t0 = time.time()
                out = self.train_step(batch)
                dt = time.time() - t0
                train_seconds += dt
                n = batch.batch_size * L.dp
                samples += n
                events += int(batch.hist_lengths.sum()) * L.dp
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", req_s=f"{samples / max(train_seconds, 1e-9):.1f}")
                if self.writer is not None and self.global_step % cfg.train.log_every == 0:
                    self.writer.add_scalar("train/loss", out["loss"], self.global_step)
                    self.writer.add_scalar("train/requests_per_s", n / max(dt, 1e-9), self.global_step)
                if not math.isfinite(out["loss"]):
                    raise FloatingPointError(f"loss became {out['loss']} at step {self.global_step}")
                if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                    self.save()
                if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                    done = True
                    break
                if cfg.train.max_minutes and self._over_budget(t_start):
                    self._log(f"time budget reached: train.max_minutes={cfg.train.max_minutes:g} after step "
                              f"{self.global_step} (epoch {epoch})")
                    stopped_by_budget = done = True
                    break
            if bar is not None:
                bar.close()
            if not done:
                # epoch finished: the next position is the start of the next epoch
                self.loader.load_state_dict({"epoch": epoch + 1, "step": 0})
            if cfg.eval.every_epoch or done or epoch == cfg.train.epochs - 1:
                m = self.evaluate()
                m.update(epoch=epoch, step=self.global_step, epoch_seconds=time.time() - t_epoch)
                self.history.append(m)
                self._log(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()
                                                        if isinstance(v, float)))
                if self.writer is not None:
                    for k, v in m.items():
                        if k not in ("epoch", "step"):
                            self.writer.add_scalar(f"eval/{k}", v, self.global_step)
                if on_epoch_end is not None:
                    on_epoch_end(dict(m))
                if cfg.train.select_metric and self._select(m):
                    done = True
            if done:
                break
        ckpt = self.save()
        selected = self._load_selected()
        (peak_rss,) = self._global(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
                                   op=dist.ReduceOp.MAX)
        summary = {
            "final": self.history[-1] if self.history else {},
            "history": self.history,
            "steps": self.global_step,
            "train_requests_per_s": samples / max(train_seconds, 1e-9),
            "train_events_per_s": events / max(train_seconds, 1e-9),
            "wall_seconds": time.time() - t_start,
            "stopped_by_time_budget": stopped_by_budget,
            "checkpoint": str(ckpt),
            "selected": selected,
            "data": {"path": self.cfg.data.path, **{k: v for k, v in self.meta.stats.items()}},
            "world_size": L.world_size, "dp": L.dp, "sp": L.sp,
            "peak_rss_bytes_per_rank": peak_rss,
        }
        if L.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
            if self.writer is not None:
                self.writer.flush()
        return summary

    # ------------------------------------------------------------------------------------ model selection
    def _best_entry(self) -> Optional[Dict[str, Any]]:
        """The history entry with the best `train.select_metric` (the earliest among equals), or None."""
        key, sign = self.cfg.train.select_metric, (1.0 if self.cfg.train.select_mode == "max" else -1.0)
        scored = [h for h in self.history if key in h and math.isfinite(h[key])]
        return max(scored, key=lambda h: (sign * h[key], -h["step"])) if scored else None

    def _select(self, m: Dict[str, Any]) -> bool:
        """After an evaluation: keep the weights if `m` is the best so far; True when early stopping is due."""
        tc = self.cfg.train
        if tc.select_metric not in m:
            raise KeyError(f"train.select_metric={tc.select_metric!r} is not among this evaluation's metrics "
                           f"{sorted(k for k in m if isinstance(m[k], float))}")
        best = self._best_entry()
        if best is m:
            save_checkpoint(self.run_dir / "best", self.global_step, self.dmp, self.engine, self.trainer_state(),
                            keep=1)
            self._log(f"epoch {m['epoch']}: best {tc.select_metric} so far ({m[tc.select_metric]:.4f}); saved")
            return False
        since = sum(1 for h in self.history if h["step"] > best["step"]) if best is not None else 0
        if tc.early_stop_patience and since >= tc.early_stop_patience:
            self._log(f"early stop: no better {tc.select_metric} for {since} evaluations (best "
                      f"{best[tc.select_metric]:.4f} at epoch {best['epoch']})")
            return True
        return False

    def _load_selected(self) -> Optional[Dict[str, Any]]:
        """With train.select_metric: load the best epoch's weights (tables, tower and their optimizer states)
        so that whatever evaluates this trainer next scores the selected model. Step and history stay."""
        tc = self.cfg.train
        if not tc.select_metric:
            return None
        best = self._best_entry()
        if best is None:
            return None
        path = checkpoint_root(self.run_dir / "best") / f"step-{best['step']}"
        if best["step"] != self.global_step:
            load_checkpoint(path, self.dmp, self.engine, restore_rng=False)
        self._log(f"selected epoch {best['epoch']} (step {best['step']}): {tc.select_metric}="
                  f"{best[tc.select_metric]:.4f}")
        return {"epoch": best["epoch"], "step": best["step"], "metric": tc.select_metric,
                "mode": tc.select_mode, "value": best[tc.select_metric], "checkpoint": str(path)}

    # ----------------------------------------------------------------------------------------- helpers
    def _bar(self, epoch: int):
        if not (self.layout.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=len(self.loader), initial=self.loader.state.step if epoch == self.loader.state.epoch else 0,
                    desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)

    def _log(self, msg: str) -> None:
        if self.layout.is_main:
            print(f"[solar] {msg}", flush=True)

    def _plan_summary(self) -> str:
        rows = describe_plan(self.plan)
        tables = "; ".join(f"{r['table']}: {r['sharding_type']}/{r['compute_kernel']} on ranks {r['ranks']}"
                           for r in rows)
        n_tower = sum(p.numel() for p in self.engine.module.parameters())
        return (f"world={self.layout.world_size} (dp={self.layout.dp} x sp={self.layout.sp}), "
                f"device={self.layout.device}, backend={self.layout.backend}; tables: {tables}; "
                f"tower: {n_tower:,} parameters, ZeRO stage {self.cfg.deepspeed.zero_stage}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

