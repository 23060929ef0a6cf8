"""Process-group set-up: world = dp x sp.

Rank layout: rank = dp_index * sp + sp_index, so the ranks of one sequence-parallel group are consecutive
(on a GPU cluster they share a node and its fast links; the sp all-reduces are the latency-sensitive ones).
`init_distributed` works under the deepspeed launcher, torchrun, Ray Train, or as a plain single process
(it then creates a world of 1 on a free local port, so the same code path — DMP, DeepSpeed — always runs).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Layout:
    rank: int
    world_size: int
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    local_rank: int
    device: torch.device
    backend: str
    sp_group: dist.ProcessGroup  # the sp ranks of this rank's dp index
    dp_group: dist.ProcessGroup  # ranks with the same sp_rank (sp_rank 0's group evaluates)

    @property
    def tower_sp_group(self) -> Optional[dist.ProcessGroup]:
        """What the tower's collectives use: None when sp == 1 (no communication at all)."""
        return self.sp_group if self.sp > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def default_extension_cache() -> Optional[str]:
    """Points torch's JIT extension cache at this venv (``$VENV/torch_extensions``) unless one is set.

    DeepSpeed JIT-builds its CPU all-reduce op (~45 s) when it initialises. In the shared
    ``~/.cache/torch_extensions`` a second checkout's venv (other sources, other flags) forces a rebuild, and
    the first one's next launch rebuilds it back. Outside a venv, or where the venv is not writable, torch's
    default stays. Returns the directory in use, or None for torch's default.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix \
            and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def init_distributed(sp: int = 1, backend: str = "auto", device: str = "auto") -> Layout:
    """Initialises torch.distributed (if not already) and builds the dp and sp groups."""
    default_extension_cache()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: start through launch/ or a launcher")
        os.environ["MASTER_PORT"] = str(free_port())
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = _resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=10))
        release_deepspeed_shm_name()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % sp != 0:
        raise ValueError(f"parallel.sp={sp} must divide the world size {world}")
    dp = world // sp
    sp_group = dp_group = None
    # every rank must create every group, in the same order
    for d in range(dp):
        ranks = list(range(d * sp, (d + 1) * sp))
        g = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            sp_group = g
    for s in range(sp):
        ranks = list(range(s, world, sp))
        g = dist.new_group(ranks, backend=backend)
        if rank in ranks:
            dp_group = g
    assert sp_group is not None and dp_group is not None
    return Layout(rank=rank, world_size=world, dp=dp, sp=sp, dp_rank=rank // sp, sp_rank=rank % sp,
                  local_rank=local_rank, device=dev, backend=backend, sp_group=sp_group, dp_group=dp_group)


def deepspeed_shm_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce workspace of `rank` lives (ops/csrc/cpu/comm/shm.cpp names it
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>; POSIX shm lives in /dev/shm)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_deepspeed_shm_name() -> None:
    """DeepSpeed's CPU backend creates a 66 MiB shared-memory workspace per rank when every rank is local
    (LOCAL_SIZE == world size, as under its launcher) and never unlinks it: each run would leave one file
    per rank in /dev/shm (RAM) for good, even after a clean exit. Every rank maps every peer's workspace
    inside `deepspeed.init_distributed`; after a barrier the names are no longer needed, so each rank
    unlinks its own. The mappings stay valid until the process exits, and a killed rank leaves nothing."""
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        deepspeed_shm_path(dist.get_rank()).unlink()
    except FileNotFoundError:  # not created (ranks on several hosts, or no LOCAL_SIZE)
        pass


def shutdown() -> None:
    """Barrier, then destroy the default group: every rank leaves the collectives together, so no gloo
    thread is torn down while a peer still talks to it."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
