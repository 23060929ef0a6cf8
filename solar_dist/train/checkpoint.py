"""Checkpoints: sharded tables via torch.distributed.checkpoint, the tower via DeepSpeed, plus trainer state.

Layout of one checkpoint, `<run_dir>/checkpoints/step-<N>/`:
    sparse/            DCP: DMP state_dict (ShardedTensors) + fused optimizer state, each rank its shards
    tower/             DeepSpeed: module, optimizer and ZeRO partitions, scheduler
    rng-rank<R>.pt     python / numpy / torch RNG states of every rank
    trainer.json       global step, loader position (epoch, step), world layout
    COMPLETE           written last, by rank 0, after every rank finished

Atomicity: everything is written into `tmp-step-<N>/`, then rank 0 writes COMPLETE and renames the folder
(rename is atomic on a POSIX file system). A crash while writing leaves a `tmp-*` folder that is ignored and
removed at the next save, and the previous checkpoint stays the newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _STEP_RE.match(p.name)) and (p / "COMPLETE").is_file()]
    return max(done)[1] if done else None


def evaluation_checkpoint(run_dir: str | Path, select_metric: str = "") -> Optional[Path]:
    """The checkpoint to evaluate: with model selection (train.select_metric) the best validation epoch's
    (run_dir/best), else the newest one."""
    best = latest_checkpoint(Path(run_dir) / "best") if select_metric else None
    return best or latest_checkpoint(run_dir)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sparse_state(dmp: torch.nn.Module) -> Dict[str, Any]:
    return {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}


def save_checkpoint(run_dir: str | Path, step: int, dmp: torch.nn.Module, engine: Any,
                    trainer_state: Dict[str, Any], keep: int = 2) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(run_dir)
    tmp = root / f"tmp-step-{step}"
    final = root / f"step-{step}"
    if rank == 0:
        for stale in root.glob("tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # re-saving the same step (e.g. end of run right after a periodic save)
            shutil.rmtree(final)
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(_sparse_state(dmp), checkpoint_id=str(tmp / "sparse"))
    engine.save_checkpoint(str(tmp / "tower"), tag="tower", save_latest=False)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        with open(tmp / "COMPLETE", "w") as f:
            f.write(str(step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        done = sorted((int(m.group(1)), p) for p in root.iterdir()
                      if (m := _STEP_RE.match(p.name)) and (p / "COMPLETE").is_file())
        for _, old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, dmp: torch.nn.Module, engine: Any, restore_rng: bool = True
                    ) -> Dict[str, Any]:
    """Restores tables, fused optimizer, tower + ZeRO state and (for resuming) this rank's RNG; returns the
    trainer state."""
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = _sparse_state(dmp)
    dcp.load(state, checkpoint_id=str(path / "sparse"))
    dmp.load_state_dict(state["model"])
    dmp.fused_optimizer.load_state_dict(state["optim"])
    load_path, _ = engine.load_checkpoint(str(path / "tower"), tag="tower", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the tower checkpoint under {path / 'tower'}")
    trainer_state = json.loads((path / "trainer.json").read_text())
    if not restore_rng:
        return trainer_state
    rng_file = path / f"rng-rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} missing: checkpoint was written with a different world size "
                                f"({trainer_state.get('world_size')})")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
