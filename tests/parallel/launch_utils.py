"""Helpers for multi-process tests: run `launch/local.sh` (the real DeepSpeed launcher, gloo) and read the
final checkpoint of a run back as full tensors, offline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..conftest import REPO, TINY_OVERRIDES

BASE = [o for o in TINY_OVERRIDES if not o.startswith("embedding.sharding_types")]


def launch(nproc: int, run_dir: Path, data: Path, overrides: Sequence[str], timeout: int = 420,
           check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["bash", str(REPO / "launch" / "local.sh"), str(nproc), str(REPO / "configs" / "quickstart.yaml"),
           *BASE, f"data.path={data}", f"train.run_dir={run_dir}", "data.if_missing=error", *overrides]
    env = launch_env()
    shm_before = _deepspeed_shm()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out[-6000:]
        # gloo teardown must be clean on every rank
        assert "terminate called" not in out, out[-6000:]
    # DeepSpeed's per-rank shared-memory workspaces must not outlive the job (parallel/groups.py)
    leaked = _deepspeed_shm() - shm_before
    assert not leaked, f"/dev/shm files left behind by the job: {sorted(leaked)}"
    return proc


def _deepspeed_shm() -> set:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


RENDEZVOUS = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def launch_env() -> dict:
    """This process's environment without rendezvous variables (an in-process Trainer sets them; a launched
    job must pick its own free port)."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    return {**env, "DS_ACCELERATOR": "cpu", "VENV": str(Path(sys.executable).parent.parent)}


def final_state(run_dir: Path) -> tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(tower parameters, full embedding tables) of the newest complete checkpoint of a run."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from solar_dist.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, f"no complete checkpoint in {run_dir}"
    flat = run_dir / "sparse_full.pt"
    dcp_to_torch_save(str(ckpt / "sparse"), str(flat))
    sparse = torch.load(flat, weights_only=False)
    tables = {k: v for k, v in sparse["model"].items() if k.endswith(".weight")}
    module = torch.load(ckpt / "tower" / "tower" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}, tables


def max_abs_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def children(pid: int) -> List[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]
