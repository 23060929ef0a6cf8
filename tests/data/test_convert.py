"""Converters (solar_dist/data/convert.py): every format round-trips, ids, and the leave-one-out split."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from solar_dist.data.convert import ConvertError, convert, main, sample_negatives
from solar_dist.data.schema import DatasetMeta, read_split
from tests.conftest import shared_data

# user -> chronological items; lengths 6, 4, 3, 2, 1 (the last two go to training only)
SEQS = {1: [3, 1, 4, 5, 9, 2], 2: [6, 5, 3, 7], 3: [8, 9, 7], 4: [2, 10], 5: [11]}


def _write_user_item(path: Path, seqs=SEQS) -> Path:
    path.write_text("".join(f"{u} {i}\n" for u, items in seqs.items() for i in items))
    return path


def _write_user_sequence(path: Path, seqs=SEQS) -> Path:
    path.write_text("".join(f"{u} " + " ".join(map(str, items)) + "\n" for u, items in seqs.items()))
    return path


def _sequences(out: Path) -> dict:
    t = pq.read_table(out / "sequences.parquet").to_pydict()
    return {u: (items, n) for u, items, n in zip(t["user_id"], t["item_ids"], t["num_train"])}


def _rows(out: Path, split: str) -> list:
    t = read_split(out, split).to_pydict()
    return [dict(zip(t, vals)) for vals in zip(*t.values())]


def _check_leave_one_out(out: Path, seqs: dict, eval_negatives: int) -> None:
    """The protocol: test = last, valid = second to last, train = the rest; no target leaks into its own
    history; negatives are distinct items the user never interacted with."""
    meta = DatasetMeta.load(out)
    got = _sequences(out)
    for split, back in (("valid", 2), ("test", 1)):
        rows = _rows(out, split)
        assert len(rows) == sum(len(s) >= 3 for s in seqs.values())
        for r in rows:
            seq = got[r["user_id"]][0]
            pos = len(seq) - back
            assert r["hist_item_ids"] == seq[:pos], "history must be exactly the events before the target"
            assert r["cand_item_ids"][0] == seq[pos] and r["labels"][0] == 1.0
            assert all(lab == 0.0 for lab in r["labels"][1:])
            negs = r["cand_item_ids"][1:]
            assert len(set(negs)) == len(negs)
            assert not set(negs) & set(seq), "sampled negatives must be items the user never interacted with"
            assert all(1 <= n < meta.num_items for n in negs)
            available = meta.num_items - 1 - len(set(seq))
            assert len(negs) == min(eval_negatives, available)
    for u, (seq, n_train) in got.items():
        assert n_train == (len(seq) - 2 if len(seq) >= 3 else len(seq))
    for r in _rows(out, "train"):
        seq, n_train = got[r["user_id"]]
        # the training split never sees the validation or test target
        assert r["hist_item_ids"] + r["cand_item_ids"] == seq[:n_train]


def test_user_item_lines_round_trip(tmp_path):
    out = tmp_path / "out"
    meta = convert("user_item_lines", _write_user_item(tmp_path / "in.txt"), out, eval_negatives=4, verbose=False)
    assert meta.num_users == 6 and meta.num_items == 12  # ids already dense 1..n: kept; 0 is padding
    assert {u: s for u, (s, _) in _sequences(out).items()} == SEQS
    st = meta.stats
    assert st["users_train_only"] == 2 and st["users_single_event"] == 1 and st["events"] == 16
    assert st["train_targets"] == 3 + 1 + 0 + 1 + 0
    assert len(_rows(out, "train")) == 3  # users 1, 2 (training sequence >= 2) and 4 (2 events)
    _check_leave_one_out(out, SEQS, 4)
    assert (out / "item_map.tsv").read_text().splitlines()[0] == "raw\tid"


def test_user_sequence_lines_equals_user_item_lines(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    convert("user_item_lines", _write_user_item(tmp_path / "ui.txt"), a, verbose=False)
    convert("user_sequence_lines", _write_user_sequence(tmp_path / "us.txt"), b, verbose=False)
    assert _sequences(a) == _sequences(b)
    for split in ("train", "valid", "test"):
        assert _rows(a, split) == _rows(b, split)


def test_movielens_csv_sorts_by_time_stably_and_remaps(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text("userId,Id,rating,timestamp\n"
                 "7,500,4.0,30\n7,20,3.0,10\n7,31,5.0,20\n7,99,1.0,20\n"  # 31 and 99 tie at t=20: file order
                 "3,20,2.0,5\n3,500,4.5,1\n3,64,4.0,7\n")
    out = tmp_path / "out"
    meta = convert("movielens_csv", p, out, eval_negatives=2, verbose=False)
    imap = dict(line.split("\t") for line in (out / "item_map.tsv").read_text().splitlines()[1:])
    umap = dict(line.split("\t") for line in (out / "user_map.tsv").read_text().splitlines()[1:])
    inv = {int(v): k for k, v in imap.items()}
    seqs = {umap_k: [inv[i] for i in s] for umap_k, (s, _) in
            ((k, _sequences(out)[int(v)]) for k, v in umap.items())}
    assert seqs == {"7": ["20", "31", "99", "500"], "3": ["500", "20", "64"]}
    assert sorted(int(v) for v in imap.values()) == [1, 2, 3, 4, 5]  # item ids not dense: remapped 1..n
    assert meta.num_items == 6 and meta.has_ts
    ts = pq.read_table(out / "sequences.parquet").column("ts").to_pylist()
    assert all(t == sorted(t) for t in ts)
    _check_leave_one_out(out, {int(umap[k]): v for k, v in seqs.items()}, 2)
    # explicit columns and a rating threshold
    q = tmp_path / "r2.csv"
    q.write_text("who,what,stars,when\n1,5,5,3\n1,6,1,1\n1,7,4,2\n1,8,5,4\n")
    meta = convert("movielens_csv", q, tmp_path / "o2", user_col="who", item_col="what", time_col="when",
                   rating_col="stars", min_rating=4, verbose=False)
    assert meta.stats["events"] == 3
    with pytest.raises(ConvertError, match="no user column"):
        convert("movielens_csv", q, tmp_path / "o3", verbose=False)


def test_taobao_csv_actions(tmp_path):
    p = tmp_path / "ub.csv"
    p.write_text("100,9,1,pv,50\n100,8,1,buy,60\n100,7,2,cart,40\n1,9,1,fav,5\n1,4,3,pv,6\n1,5,3,pv,7\n")
    out = tmp_path / "out"
    meta = convert("taobao_csv", p, out, eval_negatives=1, verbose=False)
    assert meta.has_action and meta.num_actions == 5
    t = pq.read_table(out / "sequences.parquet").to_pydict()
    # user "100" first (file order), events sorted by time: 7 (cart), 9 (pv), 8 (buy)
    assert t["action"][0] == [3, 1, 4] and t["ts"][0] == [40, 50, 60]
    test_rows = _rows(out, "test")
    assert all(len(r["hist_action"]) == len(r["hist_item_ids"]) for r in test_rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,click,5\n")
    with pytest.raises(ConvertError, match="unknown behavior"):
        convert("taobao_csv", bad, tmp_path / "o2", verbose=False)


def test_ids_modes(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("alice x y z\nbob y w x v\n")
    meta = convert("user_sequence_lines", p, tmp_path / "a", eval_negatives=1, verbose=False)
    assert meta.num_users == 3 and meta.num_items == 6  # strings: remapped 1..n by first appearance
    assert _sequences(tmp_path / "a")[2][0] == [2, 4, 1, 5]
    with pytest.raises(ConvertError, match="not integers"):
        convert("user_sequence_lines", p, tmp_path / "b", ids="keep", verbose=False)
    q = tmp_path / "gaps.txt"
    q.write_text("10 5 50 7\n20 7 5 500\n")
    assert convert("user_sequence_lines", q, tmp_path / "c", ids="keep", verbose=False).num_items == 501
    assert convert("user_sequence_lines", q, tmp_path / "d", verbose=False).num_items == 5  # auto: not dense


def test_sample_negatives_rules():
    rng = np.random.default_rng(0)
    for _ in range(50):
        excl = rng.choice(np.arange(1, 30), size=10, replace=False)
        neg = sample_negatives(excl, 30, 15, rng)
        assert len(neg) == 15 and len(set(neg.tolist())) == 15
        assert not set(neg.tolist()) & set(excl.tolist()) and neg.min() >= 1 and neg.max() < 30
    assert len(sample_negatives(np.arange(1, 25), 30, 100, rng)) == 5  # fewer available than asked


def test_cli_main(tmp_path, capsys):
    src = _write_user_item(tmp_path / "in.txt")
    assert main(["user_item_lines", str(src), str(tmp_path / "o"), "--eval-negatives", "3", "--seed", "1"]) == 0
    assert "users with < 3 events (train only): 2" in capsys.readouterr().out
    assert main(["user_item_lines", str(tmp_path / "missing.txt"), str(tmp_path / "o2")]) == 2
    (tmp_path / "bad.txt").write_text("1\n")
    assert main(["user_item_lines", str(tmp_path / "bad.txt"), str(tmp_path / "o3")]) == 2


# ------------------------------------------------------------------------------------------ real files
def _head(src: Path, dst: Path, n: int) -> Path:
    with open(src) as f:
        dst.write_text("".join(itertools.islice(f, n)))
    return dst


def test_real_ml1m_both_layouts_agree(tmp_path):
    seq_file = shared_data("ml-1m", "ml-1m.txt")
    ui_file = shared_data("ml-1m", "ml-1m.user_item.txt")
    lines = _head(seq_file, tmp_path / "seq.txt", 30)
    assert lines.read_text().startswith("1 1 2 3 4 5 6 ")
    n_events = sum(len(line.split()) - 1 for line in lines.read_text().splitlines())
    _head(ui_file, tmp_path / "ui.txt", n_events)
    a = convert("user_sequence_lines", lines, tmp_path / "a", verbose=False)
    b = convert("user_item_lines", tmp_path / "ui.txt", tmp_path / "b", verbose=False)
    assert a.stats["users"] == 30 and a.stats["events"] == n_events
    assert _sequences(tmp_path / "a") == _sequences(tmp_path / "b")
    for split in ("valid", "test"):
        assert _rows(tmp_path / "a", split) == _rows(tmp_path / "b", split)
    _check_leave_one_out(tmp_path / "a", {u: s for u, (s, _) in _sequences(tmp_path / "a").items()}, 100)


def test_real_games_head(tmp_path):
    src = _head(shared_data("amazon-games", "Video.txt"), tmp_path / "v.txt", 3000)
    meta = convert("user_item_lines", src, tmp_path / "o", eval_negatives=20, verbose=False)
    seqs = {u: s for u, (s, _) in _sequences(tmp_path / "o").items()}
    assert sum(len(s) for s in seqs.values()) == 3000
    assert meta.stats["users_train_only"] == sum(len(s) < 3 for s in seqs.values())
    _check_leave_one_out(tmp_path / "o", seqs, 20)


def test_real_ml_latest_small_head(tmp_path):
    src = _head(shared_data("ml-latest-small", "ratings.csv"), tmp_path / "r.csv", 2001)
    assert src.read_text().startswith("userId,Id,rating,timestamp")
    meta = convert("movielens_csv", src, tmp_path / "o", eval_negatives=100, verbose=False)
    assert meta.stats["events"] == 2000 and meta.has_ts
    assert all(t == sorted(t) for t in pq.read_table(tmp_path / "o" / "sequences.parquet").column("ts").to_pylist())
    _check_leave_one_out(tmp_path / "o", {u: s for u, (s, _) in _sequences(tmp_path / "o").items()}, 100)


def test_real_taobao_sample(tmp_path):
    meta = convert("taobao_csv", shared_data("taobao-sample", "UserBehavior.csv"), tmp_path / "o", verbose=False)
    assert meta.stats["users"] == 51 and meta.stats["events"] == 5000 and meta.has_action
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["num_actions"] == 5
