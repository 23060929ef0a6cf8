"""A training batch as the model sees it: KeyedJaggedTensors for TorchRec plus dense per-request tensors.

Sequences stay jagged: `features` holds `hist_item` (and `hist_action`) with one length per request and
`cand_item` with one length per request; the EmbeddingCollection looks all of them up in one call.
`collate` turns a slice of the Parquet request table into a Batch; the PyArrow loader calls it in the
training process, the Ray loader in its workers.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

HIST_ITEM = "hist_item"
HIST_ACTION = "hist_action"
CAND_ITEM = "cand_item"
USER_ID = "user_id"


@dataclass
class Batch:
    user_ids: torch.Tensor  # (B,) int64
    features: KeyedJaggedTensor  # EmbeddingCollection input: hist_item[, hist_action], cand_item
    user_features: KeyedJaggedTensor  # EmbeddingBagCollection input: user_id (one id per request)
    hist_lengths: torch.Tensor  # (B,) int64
    cand_lengths: torch.Tensor  # (B,) int64
    labels: torch.Tensor  # (sum cand_lengths,) float32
    probs: Optional[torch.Tensor] = None  # ground-truth click probabilities (synthetic data only)
    hist_ts: Optional[torch.Tensor] = None  # (sum hist_lengths,) int64
    # Global distance of each local event from its request's newest event. Set by the sequence-parallel
    # split (parallel/sequence.py); None = computed from hist_lengths (the whole history is local).
    hist_pos_from_end: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.user_ids.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device=device, non_blocking=non_blocking) if v is not None else None
        return Batch(**out)

    def pin_memory(self) -> "Batch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.pin_memory() if v is not None else None
        return Batch(**out)

    def num_candidates(self) -> int:
        return int(self.labels.numel())


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of a list column as numpy arrays, without Python loops."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
    return values, np.diff(offsets)


def collate(table: pa.Table, *, max_hist_len: int = 0) -> Batch:
    """Builds a Batch from a (validated) slice of the request table.

    max_hist_len > 0 keeps the most recent `max_hist_len` events of each history (the caller asked for it
    in the config; nothing is clipped otherwise)."""
    hist, hist_len = _list_column(table, "hist_item_ids")
    cand, cand_len = _list_column(table, "cand_item_ids")
    labels, _ = _list_column(table, "labels")
    extra: Dict[str, np.ndarray] = {}
    for col in ("hist_ts", "hist_action"):
        if col in table.column_names:
            extra[col] = _list_column(table, col)[0]
    if max_hist_len and (hist_len > max_hist_len).any():
        starts = np.concatenate([[0], np.cumsum(hist_len)[:-1]])
        keep_len = np.minimum(hist_len, max_hist_len)
        idx = np.concatenate([np.arange(s + n - k, s + n) for s, n, k in zip(starts, hist_len, keep_len)])
        hist = hist[idx]
        extra = {k: v[idx] for k, v in extra.items()}
        hist_len = keep_len

    keys: List[str] = [HIST_ITEM]
    values = [hist]
    lengths = [hist_len]
    if "hist_action" in extra:
        keys.append(HIST_ACTION)
        values.append(extra["hist_action"])
        lengths.append(hist_len)
    keys.append(CAND_ITEM)
    values.append(cand)
    lengths.append(cand_len)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
    )
    uid = torch.from_numpy(table.column("user_id").to_numpy().astype(np.int64))
    user_features = KeyedJaggedTensor.from_lengths_sync(
        keys=[USER_ID], values=uid.clone(), lengths=torch.ones(len(uid), dtype=torch.int32)
    )
    probs = None
    if "probs" in table.column_names:
        probs = torch.from_numpy(_list_column(table, "probs")[0].astype(np.float32))
    hist_ts = torch.from_numpy(extra["hist_ts"].astype(np.int64)) if "hist_ts" in extra else None
    return Batch(
        user_ids=uid,
        features=features,
        user_features=user_features,
        hist_lengths=torch.from_numpy(hist_len.astype(np.int64)),
        cand_lengths=torch.from_numpy(cand_len.astype(np.int64)),
        labels=torch.from_numpy(labels.astype(np.float32)),
        probs=probs,
        hist_ts=hist_ts,
    )
