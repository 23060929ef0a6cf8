"""Every user's full chronological sequence, as the converter (data/convert.py) stores it for next-item
training: `sequences.parquet` beside the leave-one-out splits."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

SEQUENCES = "sequences.parquet"


@dataclass
class Sequences:
    """Every user's full chronological sequence (from the converter's sequences.parquet)."""

    user_ids: np.ndarray  # (U,)
    offsets: np.ndarray  # (U+1,)
    items: np.ndarray  # flat
    num_train: np.ndarray  # (U,) length of the training prefix
    ts: Optional[np.ndarray] = None
    action: Optional[np.ndarray] = None

    @staticmethod
    def load(root: str | Path) -> "Sequences":
        path = Path(root) / SEQUENCES
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: next-item training needs a data set written by "
                                    f"`solar data convert` (it stores every user's full sequence)")
        t = pq.read_table(path)

        def flat(name: str):
            col = t.column(name).combine_chunks()
            off = col.offsets.to_numpy()
            return col.values.to_numpy(zero_copy_only=False)[off[0]: off[-1]].astype(np.int64), off - off[0]

        items, offsets = flat("item_ids")
        ts = flat("ts")[0] if "ts" in t.column_names else None
        action = flat("action")[0] if "action" in t.column_names else None
        return Sequences(t.column("user_id").to_numpy().astype(np.int64), offsets.astype(np.int64), items,
                         t.column("num_train").to_numpy().astype(np.int64), ts, action)

    def train_item_counts(self, num_items: int) -> np.ndarray:
        """How often each item occurs in the training prefixes (popularity; validation/test targets excluded)."""
        idx = np.concatenate([np.arange(o, o + m) for o, m in zip(self.offsets[:-1], self.num_train)]) \
            if len(self.num_train) else np.zeros(0, np.int64)
        return np.bincount(self.items[idx], minlength=num_items).astype(np.float64)

    def cut_points(self, per_user: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(user index, cut c) pairs: history = sequence[:c], target = sequence[c], 1 <= c < num_train."""
        us, cs = [], []
        for j, m in enumerate(self.num_train):
            n_cuts = int(m) - 1
            if n_cuts <= 0:
                continue
            if per_user and n_cuts > per_user:
                c = np.sort(rng.choice(n_cuts, size=per_user, replace=False)) + 1
            else:
                c = np.arange(1, n_cuts + 1)
            us.append(np.full(len(c), j, dtype=np.int64))
            cs.append(c.astype(np.int64))
        if not us:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(us), np.concatenate(cs)
