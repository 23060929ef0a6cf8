"""Starting or attaching to Ray, once per process, from `cfg.ray`.

`ensure_ray(cfg)`:
  * inside a Ray worker (a Tune trial, a Ray Train worker, a loader task) Ray is already initialised: it does
    nothing and returns False;
  * `ray.address == ""`: starts a local Ray with `ray.num_cpus` CPUs (0 = every core), an object store of
    `ray.object_store_mb` MiB (0 = Ray's default) and the dashboard only when `ray.dashboard` (bound to
    127.0.0.1); returns True (the caller started Ray and should `ray.shutdown()` when done);
  * `ray.address` set ("auto", "10.0.0.1:6379", "ray://head:10001"): attaches to that cluster; the cluster's
    resources are its own, so num_cpus / object store / dashboard settings are not passed. The solar_dist
    package is shipped to the cluster's workers (runtime_env py_modules).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

# Environment every Ray process of ours needs: DeepSpeed must not probe for CUDA on CPU machines and Ray must
# not phone home. Set before ray is imported anywhere so the raylet and workers inherit it.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_log = logging.getLogger(__name__)


def ray_init_kwargs(cfg: Any) -> Dict[str, Any]:
    """The keyword arguments `ensure_ray` passes to `ray.init` (exposed for tests and logging)."""
    r = cfg.ray
    env_vars = {k: os.environ[k] for k in ("DS_ACCELERATOR", "RAY_USAGE_STATS_ENABLED", "OMP_NUM_THREADS")
                if k in os.environ}
    kwargs: Dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": True}
    if r.address:
        kwargs["address"] = r.address
        runtime_env: Dict[str, Any] = {"env_vars": env_vars}
        import solar_dist

        runtime_env["py_modules"] = [str(Path(solar_dist.__file__).parent)]
        kwargs["runtime_env"] = runtime_env
        return kwargs
    kwargs.update(
        num_cpus=r.num_cpus or None,
        include_dashboard=bool(r.dashboard),
        dashboard_host="127.0.0.1",
        object_store_memory=(r.object_store_mb * 1024 * 1024) if r.object_store_mb else None,
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )
    return {k: v for k, v in kwargs.items() if v is not None}


def ensure_ray(cfg: Any) -> bool:
    """Initialises Ray from `cfg.ray` unless it already is. Returns True when this call started/attached."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = ray_init_kwargs(cfg)
    where = f"attaching to {kwargs['address']!r}" if "address" in kwargs else (
        f"starting a local Ray (num_cpus={kwargs.get('num_cpus', 'all')}, object store "
        f"{kwargs.get('object_store_memory', 0) // 2**20 or 'default'} MiB, dashboard "
        f"{'on 127.0.0.1' if kwargs.get('include_dashboard') else 'off'})")
    _log.info("ray: %s", where)
    ray.init(**kwargs)
    quiet_ray_data()
    return True


def quiet_ray_data() -> None:
    """Ray Data prints an execution plan and progress for every dataset; keep the training log readable."""
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.verbose_stats_logs = False
    except Exception:  # pragma: no cover - cosmetic only
        pass
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def shutdown_ray(started: Optional[bool] = True) -> None:
    """`ray.shutdown()` when this process started Ray (started=True)."""
    if not started:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
