"""Deterministic batch order and the PyArrow loader.

`BatchPlan` decides, from (seed, epoch) alone, which request rows form each *global* batch and which slice
of it each data-parallel rank gets. Every loader (PyArrow here, Ray Data in ray_loader.py) follows the same
plan, so the trainer sees identical batches whichever loader is chosen, and a checkpoint needs only
(epoch, step) to resume at the exact position.

Training drops the last partial global batch (it would give ranks unequal work and break dp parity); the
number of rows dropped per epoch is reported by `BatchPlan.dropped_rows`. Evaluation keeps every row.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .batch import Batch, collate


@dataclass
class LoaderState:
    epoch: int = 0
    step: int = 0  # batches already consumed in `epoch`

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}


class BatchPlan:
    """Row indices of every batch of an epoch, identical on every rank and for every loader."""

    def __init__(
        self,
        hist_lengths: np.ndarray,
        batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        bucket_batches: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.hist_lengths = np.asarray(hist_lengths)
        self.num_rows = len(self.hist_lengths)
        self.batch_size = batch_size
        self.global_batch = batch_size * dp_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.seed, self.bucket_batches, self.drop_last = shuffle, seed, bucket_batches, drop_last
        if drop_last and self.num_rows < self.global_batch:
            raise ValueError(
                f"split has {self.num_rows} rows, fewer than one global batch "
                f"(data.batch_size={batch_size} x dp={dp_size}); lower data.batch_size"
            )

    @property
    def dropped_rows(self) -> int:
        return self.num_rows % self.global_batch if self.drop_last else 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_rows // self.global_batch
        return -(-self.num_rows // self.global_batch)

    def global_batches(self, epoch: int) -> List[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_rows) if self.shuffle else np.arange(self.num_rows)
        if self.bucket_batches > 0:
            # Sort by history length inside windows of `bucket_batches` global batches: batches hold
            # similar lengths (less padding), while the window keeps the epoch's order random.
            window = self.bucket_batches * self.global_batch
            for s in range(0, len(order), window):
                w = order[s: s + window]
                order[s: s + window] = w[np.argsort(self.hist_lengths[w], kind="stable")]
        n = len(self)
        batches = [order[i * self.global_batch: (i + 1) * self.global_batch] for i in range(n)]
        if self.bucket_batches > 0 and self.shuffle:
            perm = rng.permutation(n)
            batches = [batches[i] for i in perm]
        return batches

    def rank_slice(self, global_rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of a global batch (eval: as even as possible, may be empty)."""
        if self.drop_last:
            return global_rows[self.dp_rank * self.batch_size: (self.dp_rank + 1) * self.batch_size]
        bounds = np.linspace(0, len(global_rows), self.dp_size + 1).round().astype(int)
        return global_rows[bounds[self.dp_rank]: bounds[self.dp_rank + 1]]


class LoaderPosition:
    """What every loader shares: a BatchPlan (`plan`) and the position (epoch, step) that checkpoints save."""

    plan: BatchPlan
    state: LoaderState

    def __len__(self) -> int:
        return len(self.plan)

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(epoch=int(state["epoch"]), step=int(state["step"]))


class PlannedLoader(LoaderPosition):
    """A loader over one request table: its BatchPlan comes from the table's history lengths."""

    def __init__(self, table: pa.Table, batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True, seed: int = 0, bucket_batches: int = 0, drop_last: bool = True) -> None:
        lengths = pc.list_value_length(table.column("hist_item_ids")).to_numpy(zero_copy_only=False)
        self.plan = BatchPlan(
            lengths, batch_size, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle, seed=seed,
            bucket_batches=bucket_batches, drop_last=drop_last,
        )
        self.state = LoaderState()


class ArrowLoader(PlannedLoader):
    """Iterates Batches of a validated request table following a BatchPlan, with background prefetch."""

    def __init__(
        self,
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
    ) -> None:
        super().__init__(table, batch_size, dp_rank=dp_rank, dp_size=dp_size, shuffle=shuffle, seed=seed,
                         bucket_batches=bucket_batches, drop_last=drop_last)
        self.table = table
        self.max_hist_len = max_hist_len
        self.prefetch = prefetch

    def _make(self, rows: np.ndarray) -> Batch:
        return collate(self.table.take(pa.array(rows, type=pa.int64())), max_hist_len=self.max_hist_len)

    def first_row(self) -> Batch:
        """A one-request batch (row 0): what a rank with an empty evaluation share computes, unreported, so
        that it still joins the collectives of its peers."""
        return self._make(np.zeros(1, dtype=np.int64))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Batches of `epoch`, starting at the saved step when resuming into that epoch."""
        start = self.state.step if epoch == self.state.epoch else 0
        self.state = LoaderState(epoch=epoch, step=start)
        batches = self.plan.global_batches(epoch)[start:]
        rows = [self.plan.rank_slice(b) for b in batches]
        for batch in _prefetch((self._make(r) for r in rows), self.prefetch):
            self.state.step += 1
            yield batch


def _prefetch(it: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Runs `it` in a background thread, `depth` items ahead (0 = inline)."""
    if depth <= 0:
        yield from it
        return
    q: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # surfaced in the consumer, not lost in the thread
            q.put(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while not q.empty():
            q.get_nowait()


def eval_loader(table: pa.Table, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                max_hist_len: int = 0, prefetch: int = 2, bucket_batches: int = 8) -> ArrowLoader:
    """Every row once, in a fixed order (length-bucketed for less padding), split across dp ranks."""
    return ArrowLoader(
        table, batch_size, dp_rank=dp_rank, dp_size=dp_size, shuffle=False, drop_last=False,
        bucket_batches=bucket_batches, max_hist_len=max_hist_len, prefetch=prefetch,
    )

