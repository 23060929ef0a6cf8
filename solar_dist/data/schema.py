"""The Parquet request schema: one row per request (one user, N behaviours, M candidates).

A data set is a directory:

    <path>/meta.json              DatasetMeta: table sizes and what produced the data
    <path>/train/part-00000.parquet ...
    <path>/valid/part-*.parquet
    <path>/test/part-*.parquet

Columns (REQUEST_SCHEMA): `user_id` int64, `hist_item_ids` list<int64> (chronological, oldest first),
optional `hist_ts` list<int64> (unix seconds) and `hist_action` list<int64>, `cand_item_ids` list<int64>,
`labels` list<float32> (one per candidate), optional `probs` list<float32> (ground-truth click probability,
synthetic data only). Reading validates every row: a bad value raises SchemaError naming file, row and column;
nothing is dropped or clipped silently.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SPLITS = ("train", "valid", "test")
REQUIRED_COLUMNS = ("user_id", "hist_item_ids", "cand_item_ids", "labels")
OPTIONAL_COLUMNS = ("hist_ts", "hist_action", "probs")

REQUEST_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("hist_item_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("hist_ts", pa.list_(pa.int64())),
        pa.field("hist_action", pa.list_(pa.int64())),
        pa.field("cand_item_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("labels", pa.list_(pa.float32()), nullable=False),
        pa.field("probs", pa.list_(pa.float32())),
    ]
)


class SchemaError(ValueError):
    """A request file breaks the schema. The message names the file, the row and the column."""


@dataclass
class DatasetMeta:
    """Sizes the model needs (ids must be < these) and provenance. Stored as meta.json."""

    num_users: int
    num_items: int  # item ids are in [0, num_items); 0 may be used as padding by converters
    num_actions: int = 1
    source: str = ""
    has_ts: bool = False
    has_action: bool = False
    stats: Dict[str, float] = field(default_factory=dict)

    def save(self, root: str | Path) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "meta.json").write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))

    @staticmethod
    def load(root: str | Path) -> "DatasetMeta":
        path = Path(root) / "meta.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {root} is not a solar-dist data set")
        raw = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(DatasetMeta)}
        unknown = set(raw) - known
        if unknown:
            raise SchemaError(f"{path}: unknown keys {sorted(unknown)}; allowed {sorted(known)}")
        return DatasetMeta(**raw)


def split_files(root: str | Path, split: str) -> List[Path]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {list(SPLITS)}")
    files = sorted((Path(root) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {Path(root) / split}")
    return files


def dataset_exists(root: str | Path) -> bool:
    root = Path(root)
    return (root / "meta.json").is_file() and all(any((root / s).glob("*.parquet")) for s in SPLITS)


# ------------------------------------------------------------------------------------------ validation
def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _row_of_value(offsets: np.ndarray, value_index: int) -> int:
    return int(np.searchsorted(offsets, value_index, side="right") - 1)


def _check_ids(table: pa.Table, column: str, upper: int, file: str, row_base: int) -> None:
    col = table.column(column).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False)
    offsets = col.offsets.to_numpy()
    bad = (values < 0) | (values >= upper)
    if bad.any():
        i = _first_bad(bad)
        row = _row_of_value(offsets, i)
        raise SchemaError(
            f"{file}: row {row_base + row}, column {column!r}: id {int(values[i])} is out of range "
            f"[0, {upper}) (table size {upper})"
        )


def validate_table(
    table: pa.Table,
    meta: DatasetMeta,
    file: str = "<table>",
    *,
    allow_empty_history: bool = False,
    row_base: int = 0,
) -> pa.Table:
    """Checks one table against the schema and the data set's table sizes; returns it cast to REQUEST_SCHEMA
    column types (missing optional columns are absent, not invented)."""
    names = set(table.column_names)
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise SchemaError(f"{file}: required column {col!r} is missing (has {sorted(names)})")
    unknown = names - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS)
    if unknown:
        raise SchemaError(f"{file}: unknown columns {sorted(unknown)}; allowed {list(REQUEST_SCHEMA.names)}")
    for col in table.column_names:
        target = REQUEST_SCHEMA.field(col).type
        if table.column(col).null_count:
            row = _first_bad(table.column(col).is_null().to_numpy(zero_copy_only=False))
            raise SchemaError(f"{file}: row {row_base + row}, column {col!r}: null value")
        if table.schema.field(col).type != target:
            try:
                table = table.set_column(table.column_names.index(col), col, table.column(col).cast(target))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"{file}: column {col!r} has type {table.schema.field(col).type}, expected {target}: {exc}"
                ) from None
        if col != "user_id":
            inner = table.column(col).combine_chunks()
            if inner.flatten().null_count:
                vals = inner.flatten().is_null().to_numpy(zero_copy_only=False)
                row = _row_of_value(inner.offsets.to_numpy(), _first_bad(vals))
                raise SchemaError(f"{file}: row {row_base + row}, column {col!r}: null element in list")

    uid = table.column("user_id").to_numpy()
    bad = (uid < 0) | (uid >= meta.num_users)
    if bad.any():
        row = _first_bad(bad)
        raise SchemaError(
            f"{file}: row {row_base + row}, column 'user_id': id {int(uid[row])} is out of range [0, {meta.num_users})"
        )
    _check_ids(table, "hist_item_ids", meta.num_items, file, row_base)
    _check_ids(table, "cand_item_ids", meta.num_items, file, row_base)
    if "hist_action" in names:
        _check_ids(table, "hist_action", meta.num_actions, file, row_base)

    hist_len = pc.list_value_length(table.column("hist_item_ids")).to_numpy(zero_copy_only=False)
    if not allow_empty_history and (hist_len == 0).any():
        row = _first_bad(hist_len == 0)
        raise SchemaError(
            f"{file}: row {row_base + row}, column 'hist_item_ids': empty history (set "
            f"data.allow_empty_history=true if the model should score users without history)"
        )
    for col in ("hist_ts", "hist_action"):
        if col in names:
            other = pc.list_value_length(table.column(col)).to_numpy(zero_copy_only=False)
            if (other != hist_len).any():
                row = _first_bad(other != hist_len)
                raise SchemaError(
                    f"{file}: row {row_base + row}, column {col!r}: length {int(other[row])} != "
                    f"hist_item_ids length {int(hist_len[row])}"
                )
    cand_len = pc.list_value_length(table.column("cand_item_ids")).to_numpy(zero_copy_only=False)
    if (cand_len == 0).any():
        row = _first_bad(cand_len == 0)
        raise SchemaError(f"{file}: row {row_base + row}, column 'cand_item_ids': no candidates")
    for col in ("labels", "probs"):
        if col not in names:
            continue
        n = pc.list_value_length(table.column(col)).to_numpy(zero_copy_only=False)
        if (n != cand_len).any():
            row = _first_bad(n != cand_len)
            raise SchemaError(
                f"{file}: row {row_base + row}, column {col!r}: length {int(n[row])} != "
                f"cand_item_ids length {int(cand_len[row])}"
            )
        arr = table.column(col).combine_chunks()
        vals = arr.flatten().to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(vals) | (vals < 0) | (vals > 1)
        if bad.any():
            i = _first_bad(bad)
            row = _row_of_value(arr.offsets.to_numpy(), i)
            what = "NaN" if np.isnan(vals[i]) else f"{vals[i]!r} (must be finite, in [0, 1])"
            raise SchemaError(f"{file}: row {row_base + row}, column {col!r}: {what}")
    return table


def read_split(
    root: str | Path, split: str, meta: Optional[DatasetMeta] = None, *, allow_empty_history: bool = False
) -> pa.Table:
    """Reads and validates every file of a split into one table (rows in file order)."""
    meta = meta or DatasetMeta.load(root)
    tables = []
    for f in split_files(root, split):
        t = pq.read_table(f)
        tables.append(validate_table(t, meta, str(f), allow_empty_history=allow_empty_history))
    cols = [c for c in REQUEST_SCHEMA.names if all(c in t.column_names for t in tables)]
    return pa.concat_tables([t.select(cols) for t in tables])


def write_split(
    rows: Dict[str, Sequence], root: str | Path, split: str, rows_per_file: int = 1000
) -> List[Path]:
    """Writes columns (name -> list of values) as Parquet parts of at most `rows_per_file` rows."""
    out = Path(root) / split
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    cols = [c for c in REQUEST_SCHEMA.names if c in rows]
    schema = pa.schema([REQUEST_SCHEMA.field(c) for c in cols])
    table = pa.table({c: rows[c] for c in cols}, schema=schema)
    paths = []
    for i, start in enumerate(range(0, max(len(table), 1), rows_per_file)):
        p = out / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(start, rows_per_file), p)
        paths.append(p)
    return paths
