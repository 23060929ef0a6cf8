"""Schema validation: each kind of bad input raises SchemaError naming the file, the row and the column."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from solar_dist.data.schema import DatasetMeta, SchemaError, read_split, validate_table, write_split

META = DatasetMeta(num_users=10, num_items=100)


def good_rows(n=4):
    return {
        "user_id": list(range(n)),
        "hist_item_ids": [list(range(1, 3 + i)) for i in range(n)],
        "hist_ts": [list(range(100, 102 + i)) for i in range(n)],
        "cand_item_ids": [[5, 6, 7] for _ in range(n)],
        "labels": [[1.0, 0.0, 0.0] for _ in range(n)],
    }


def write(tmp_path, rows, split="train"):
    DatasetMeta(**{**META.__dict__}).save(tmp_path)
    write_split(rows, tmp_path, split, rows_per_file=2)
    return tmp_path


def test_good_rows_read_back(tmp_path):
    root = write(tmp_path, good_rows())
    t = read_split(root, "train")
    assert t.num_rows == 4 and t.column("hist_item_ids").to_pylist()[3] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("column, row, value, needle", [
    ("hist_item_ids", 3, [1, -2, 3, 4, 5], "out of range"),          # negative id
    ("cand_item_ids", 2, [5, 100, 7], "out of range"),               # id == table size
    ("user_id", 1, 10, "out of range"),
    ("hist_item_ids", 2, [], "empty history"),
    ("labels", 1, [1.0, 0.0], "length 2 != cand_item_ids length 3"),  # length mismatch
    ("labels", 3, [1.0, float("nan"), 0.0], "NaN"),
    ("labels", 0, [1.0, 2.0, 0.0], "must be finite, in [0, 1]"),
    ("hist_ts", 2, [1], "length 1 != hist_item_ids length 4"),
    ("cand_item_ids", 1, [], "no candidates"),
])
def test_bad_value_named(tmp_path, column, row, value, needle):
    rows = good_rows()
    rows[column][row] = value
    root = write(tmp_path, rows)
    with pytest.raises(SchemaError) as exc:
        read_split(root, "train")
    msg = str(exc.value)
    part = row // 2  # rows_per_file=2
    assert f"part-{part:05d}.parquet" in msg, msg
    assert f"row {row % 2}" in msg and repr(column) in msg and needle in msg, msg


def test_empty_history_allowed_when_asked(tmp_path):
    rows = good_rows()
    rows["hist_item_ids"][1] = []
    rows["hist_ts"][1] = []
    root = write(tmp_path, rows)
    assert read_split(root, "train", allow_empty_history=True).num_rows == 4


def test_missing_and_unknown_columns(tmp_path):
    t = pa.table({"user_id": [0], "hist_item_ids": [[1]], "cand_item_ids": [[1]]})
    with pytest.raises(SchemaError, match="required column 'labels' is missing"):
        validate_table(t, META, "f.parquet")
    t = pa.table({"user_id": [0], "hist_item_ids": [[1]], "cand_item_ids": [[1]], "labels": [[0.0]],
                  "colour": ["red"]})
    with pytest.raises(SchemaError, match="unknown columns"):
        validate_table(t, META, "f.parquet")


def test_wrong_type_and_nulls(tmp_path):
    t = pa.table({"user_id": [0], "hist_item_ids": [["a"]], "cand_item_ids": [[1]], "labels": [[0.0]]})
    with pytest.raises(SchemaError, match="'hist_item_ids' has type"):
        validate_table(t, META, "f.parquet")
    t = pa.table({"user_id": [0, 1], "hist_item_ids": [[1], None], "cand_item_ids": [[1], [2]],
                  "labels": [[0.0], [1.0]]})
    with pytest.raises(SchemaError, match="row 1, column 'hist_item_ids': null"):
        validate_table(t, META, "f.parquet")
    t = pa.table({"user_id": [0], "hist_item_ids": [[1, None]], "cand_item_ids": [[1]], "labels": [[0.0]]})
    with pytest.raises(SchemaError, match="null element"):
        validate_table(t, META, "f.parquet")


def test_row_numbers_are_file_local(tmp_path):
    rows = good_rows(6)
    rows["cand_item_ids"][5] = [5, 6, 700]
    root = write(tmp_path, rows)
    with pytest.raises(SchemaError, match=r"part-00002\.parquet: row 1, column 'cand_item_ids': id 700"):
        read_split(root, "train")


def test_meta_rejects_unknown_keys(tmp_path):
    (tmp_path / "meta.json").write_text('{"num_users": 1, "num_items": 2, "nmu_actions": 3}')
    with pytest.raises(SchemaError, match="nmu_actions"):
        DatasetMeta.load(tmp_path)
    _ = np, pq
