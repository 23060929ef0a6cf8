"""The Ray Data loader: Parquet read by Ray Data, batches collated in Ray workers, streamed ahead of training.

Same batches as the PyArrow loader, by construction:
  * The `BatchPlan` (loader.py) is built from the same history lengths as `ArrowLoader`'s, so for a given
    (seed, epoch) it lists the same global batches of row indices and the same per-dp-rank slices.
  * Ray Data reads the split's Parquet files (`ray.data.read_parquet`, file order, order preserved) into
    Arrow blocks in the object store. At start-up the loader checks that the blocks hold the table's rows in
    the table's order (user ids and history lengths, block by block), so a row index means the same request
    on both paths; a mismatch raises instead of silently training on other rows.
  * Each batch is one Ray task: it receives only the blocks its rows live in (object refs, zero-copy on the
    local node), takes the rows in plan order and runs the same `collate` as the PyArrow loader, so the
    KeyedJaggedTensors are built in the worker; the training process only deserialises a ready `Batch`.

Streaming: `epoch(e)` keeps `prefetch` batch tasks in flight (at least 1) — a bounded queue of object refs
in plan order: when the trainer takes a batch, the next task is submitted. Results are taken in plan order
whatever order the tasks finish in.

Position: `state` = (epoch, step), as in ArrowLoader; `load_state_dict` resumes mid-epoch at `step`.

Ray: started locally from `cfg.ray` (or attached to `ray.address`) by `ensure_ray`, unless the process is
already a Ray worker (Tune trial, Ray Train worker), in which case the running Ray is used. Loader tasks and
Ray Data read tasks reserve `ray.loader_cpus` CPUs each (default 0: they never wait behind a trial that holds
the cluster's CPUs).
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .batch import Batch, collate
from .loader import LoaderState, PlannedLoader
from .schema import split_files


# ------------------------------------------------------------------------------------------ worker side
def _block_keys(block: pa.Table) -> Tuple[np.ndarray, np.ndarray]:
    """(user ids, history lengths) of a block: what the driver checks the row order against."""
    uid = block.column("user_id").to_numpy().astype(np.int64)
    lengths = pc.list_value_length(block.column("hist_item_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    return uid, lengths


def _make_batch(rows: np.ndarray, starts: Sequence[int], columns: Sequence[str], max_hist_len: int,
                *blocks: pa.Table) -> Batch:
    """Runs in a Ray worker: rows (global indices, plan order) from the given blocks -> collated Batch.

    `starts[i]` is the global index of the first row of `blocks[i]`; blocks are in global order."""
    missing = [c for b in blocks for c in columns if c not in b.column_names]
    if missing:
        raise KeyError(f"Ray Data block lacks column {missing[0]!r} (expected {list(columns)})")
    blocks = tuple(b.select(list(columns)) for b in blocks)
    table = pa.concat_tables(blocks) if len(blocks) > 1 else blocks[0]
    starts_arr = np.asarray(starts, dtype=np.int64)
    sizes = np.asarray([b.num_rows for b in blocks], dtype=np.int64)
    concat_off = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts_arr, rows, side="right") - 1
    local = rows - starts_arr[which] + concat_off[which]
    return collate(table.take(pa.array(local)), max_hist_len=max_hist_len)


# ------------------------------------------------------------------------------------------ driver side
class RayLoader(PlannedLoader):
    """Iterates the Batches of a BatchPlan, collated by Ray workers from Ray Data blocks, with prefetch.

    Interface as ArrowLoader: `epoch(e)`, `state`, `state_dict()`, `load_state_dict()`, `plan`, `len()`;
    plus `close()` (shuts Ray down if this loader started it)."""

    def __init__(
        self,
        cfg: Any,
        table: pa.Table,
        batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        bucket_batches: int = 0,
        drop_last: bool = True,
        max_hist_len: int = 0,
        prefetch: int = 2,
        files: Optional[Sequence[str | Path]] = None,
        split: str = "train",
    ) -> None:
        import ray

        from ..tune.ray_runtime import ensure_ray, quiet_ray_data

        super().__init__(table, batch_size, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle, seed=seed,
                         bucket_batches=bucket_batches, drop_last=drop_last)
        self.max_hist_len = max_hist_len
        self.prefetch = max(1, int(prefetch))
        self.columns = list(table.column_names)
        self._started_ray = ensure_ray(cfg)
        quiet_ray_data()
        cpus = float(cfg.ray.loader_cpus)
        self._task = ray.remote(num_cpus=cpus, max_retries=2)(_make_batch)
        files = [str(Path(f).resolve()) for f in (files or split_files(cfg.data.path, split))]
        self.files = files
        self._read(files, cpus)
        self._check_rows(table)

    # ---------------------------------------------------------------------------------------- set-up
    def _read(self, files: List[str], cpus: float) -> None:
        """Ray Data reads the Parquet files (order preserved) into Arrow blocks held in the object store."""
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        # The V1 Parquet datasource resolves the (explicit, local) file list in this process. V2 lists files
        # in a Ray task with a thread pool, which in Ray 2.60 without aiohttp installed intermittently fails
        # with "cannot import name 'HTTPFileSystem' from 'fsspec.implementations.http'" (an import race).
        ctx.use_datasource_v2 = False
        ds = ray.data.read_parquet(files, num_cpus=cpus)
        self._blocks = ds.to_arrow_refs()

    def _check_rows(self, table: pa.Table) -> None:
        """Ray Data's rows must be the table's rows in the same order (the plan indexes rows). The blocks are
        mapped read-only from the object store into this process for the check (no copy), then released."""
        import ray

        blocks = ray.get(self._blocks)
        keep = [i for i, b in enumerate(blocks) if b.num_rows > 0]
        sizes = np.asarray([blocks[i].num_rows for i in keep], dtype=np.int64)
        keys = [_block_keys(blocks[i]) for i in keep]
        del blocks
        self._blocks = [self._blocks[i] for i in keep]
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        n = int(sizes.sum())
        if n != table.num_rows:
            raise ValueError(f"Ray Data read {n} rows from {len(self.files)} files, the loader's table has "
                             f"{table.num_rows}: the files are not the table's source")
        uid = np.concatenate([k[0] for k in keys])
        lengths = np.concatenate([k[1] for k in keys])
        t_uid = table.column("user_id").to_numpy().astype(np.int64)
        bad = np.flatnonzero((uid != t_uid) | (lengths != self.plan.hist_lengths))
        if len(bad):
            raise ValueError(f"Ray Data row {int(bad[0])} (user {int(uid[bad[0]])}) differs from the loader "
                             f"table's row (user {int(t_uid[bad[0]])}): row order is not the table's")
        self.num_rows = n

    # ------------------------------------------------------------------------------------- interface
    def _submit(self, rows: np.ndarray):
        """One Ray task for one batch: only the blocks its rows live in are passed."""
        rows = np.asarray(rows, dtype=np.int64)
        which = np.unique(np.searchsorted(self._starts, rows, side="right") - 1)
        blocks = [self._blocks[i] for i in which]
        starts = [int(self._starts[i]) for i in which]
        return self._task.remote(rows, starts, self.columns, self.max_hist_len, *blocks)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Batches of `epoch`, starting at the saved step when resuming into that epoch."""
        import ray

        start = self.state.step if epoch == self.state.epoch else 0
        self.state = LoaderState(epoch=epoch, step=start)
        rows = [self.plan.rank_slice(b) for b in self.plan.global_batches(epoch)[start:]]
        pending: "collections.deque" = collections.deque()
        nxt = 0
        try:
            while nxt < len(rows) or pending:
                while nxt < len(rows) and len(pending) < self.prefetch:
                    pending.append(self._submit(rows[nxt]))
                    nxt += 1
                ref = pending.popleft()
                batch = ray.get(ref)
                # submit the next before handing this batch over: the queue stays `prefetch` deep while
                # the trainer computes
                if nxt < len(rows):
                    pending.append(self._submit(rows[nxt]))
                    nxt += 1
                self.state.step += 1
                yield batch
        finally:
            # Abandoned iteration (max_steps, an error, a consumer that stops early): the in-flight batch
            # tasks are only dropped, never `ray.cancel`led. Their results are freed when the last ref goes
            # (each task costs milliseconds). Cancelling raced with dependency inlining of small blocks in
            # Ray 2.60's core worker: a RAY_CHECK (`submitted_task_ref_count > 0`) aborted the whole
            # training process with exit code 1 and no Python traceback (ray-project/ray#56123).
            pending.clear()

    def close(self) -> None:
        """Frees the blocks; shuts Ray down if this loader started it."""
        self._blocks = []
        if self._started_ray:
            from ..tune.ray_runtime import shutdown_ray

            shutdown_ray(True)
            self._started_ray = False

    def stats(self) -> Dict[str, Any]:
        return {"files": len(self.files), "blocks": len(self._blocks), "rows": self.num_rows,
                "prefetch": self.prefetch}
