"""Mock sharding on one machine: several real processes (gloo) through the DeepSpeed launcher.

Parity: after the same global batches, tower parameters and embedding rows equal the single-process run.
Tolerances (absolute; parameters are O(0.1), training moves them by > 1e-3): tower 2e-6, tables 5e-5.
Why not bitwise: the multi-process runs reduce gradients over ranks (and inside the sp all-reduces) in another
order than one process sums them, and each rank pads its own batch, so float32 results differ in the last bits.
Measured: tower ~6e-8; tables ~3e-6 with `basis_grad=detach` and ~1.5e-5 with the default `full`, whose
eigen-basis backward multiplies round-off by the (bounded) 1/(λi−λj) gap terms. The tower uses SGD here so
that round-off stays round-off (Adam divides by sqrt(v) and turns a 1e-9 difference of a near-zero gradient
into a visible step).
"""
import signal
import subprocess
import time

import pytest
import torch

from .launch_utils import BASE, children, final_state, launch, max_abs_diff

pytestmark = pytest.mark.multiprocess

COMMON = ["train.max_steps=4", "train.epochs=1", "deepspeed.optimizer=SGD", "deepspeed.lr=0.5",
          "deepspeed.zero_stage=2", "loss.listwise_weight=0.5", "model.svd_method=gram", "model.depth=2",
          "model.set_layer=true"]
TOWER_TOL = 2e-6
TABLE_TOL = 5e-5


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    launch(1, run, tiny_data, COMMON + ["data.batch_size=16", "embedding.sharding_types={item: row_wise}"])
    return final_state(run)


@pytest.mark.parametrize("nproc, extra", [
    (2, ["parallel.sp=1", "data.batch_size=8", "embedding.sharding_types={item: row_wise}"]),
    (2, ["parallel.sp=2", "data.batch_size=16", "embedding.sharding_types={item: column_wise}"]),
    (4, ["parallel.sp=2", "data.batch_size=8", "embedding.sharding_types={item: table_wise}"]),
], ids=["dp2-row_wise", "sp2-column_wise", "dp2xsp2-table_wise"])
def test_parity_with_single_process(single, tiny_data, tmp_path, nproc, extra):
    launch(nproc, tmp_path, tiny_data, COMMON + extra)
    tower, tables = final_state(tmp_path)
    ref_tower, ref_tables = single
    assert max_abs_diff(tower, ref_tower) < TOWER_TOL
    assert max_abs_diff(tables, ref_tables) < TABLE_TOL
    # and training did move them (the comparison is not between two untouched initialisations)
    init_tower, init_tables = _initial_state(tiny_data)
    assert max_abs_diff(ref_tables, init_tables) > 1e-3
    assert max_abs_diff(ref_tower, init_tower) > 1e-3


_INIT = {}


def _initial_state(data):
    if "state" not in _INIT:
        from solar_dist.config import load_config
        from solar_dist.train.trainer import Trainer

        cfg = load_config(None, BASE + [f"data.path={data}", "train.run_dir=/tmp/solar-init-unused"])
        t = Trainer(cfg)
        sd = t.dmp.state_dict()
        tables = {f"model.{k}": v.local_shards()[0].tensor.clone() for k, v in sd.items() if k.endswith(".weight")}
        _INIT["state"] = ({k: v.clone() for k, v in t.engine.module.state_dict().items()}, tables)
        t.close()
    return _INIT["state"]


def test_sigkill_one_rank_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    """A 2-rank run is killed with SIGKILL on one rank after a checkpoint; `resume=true` continues from the
    newest complete checkpoint and ends with exactly the parameters of an uninterrupted run."""
    common = ["train.max_steps=30", "train.epochs=5", "train.checkpoint_every=5", "deepspeed.zero_stage=1",
              "data.batch_size=8", "loss.listwise_weight=0.5"]
    launch(2, tmp_path / "ref", tiny_data, common)
    ref = final_state(tmp_path / "ref")

    from .launch_utils import REPO  # noqa: F401  (same launcher as launch())
    import os
    import sys
    from pathlib import Path

    from solar_dist.train.checkpoint import latest_checkpoint

    run = tmp_path / "killed"
    cmd = ["bash", str(Path(REPO) / "launch" / "local.sh"), "2", str(Path(REPO) / "configs" / "quickstart.yaml"),
           *BASE, f"data.path={tiny_data}", f"train.run_dir={run}", "data.if_missing=error", *common]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "VENV": str(Path(sys.executable).parent.parent)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ck = latest_checkpoint(run)
        if ck is not None and int(ck.name.split("-")[1]) >= 10:
            # the launcher's python -> its children are the ranks
            launcher = [p for p in children(proc.pid)] or [proc.pid]
            ranks = [c for p in launcher for c in children(p)]
            if len(ranks) >= 2:
                victim = sorted(ranks)[-1]
                os.kill(victim, signal.SIGKILL)
                killed_at = int(ck.name.split("-")[1])
                break
        time.sleep(0.02)
    proc.wait(timeout=120)
    assert killed_at is not None, "run finished before it could be killed"
    assert proc.returncode != 0
    last = latest_checkpoint(run)
    assert last is not None and int(last.name.split("-")[1]) < 30, "the killed run must not have finished"

    launch(2, run, tiny_data, common + ["train.resume=true"])
    tower, tables = final_state(run)
    assert torch.equal(torch.cat([v.flatten() for v in tower.values()]),
                       torch.cat([v.flatten() for v in ref[0].values()]))
    for k in tables:
        assert torch.equal(tables[k], ref[1][k]), k
