"""Converters from public sequential-recommendation files to the request schema, with the leave-one-out split.

    solar data convert FORMAT INPUT OUT [--ids auto|keep|remap] [--eval-negatives 100] [--seed 0] ...

Formats (any file of the format converts; nothing is hard-coded to one release):
  user_item_lines      one event per line `user item [timestamp]`, chronological per user (SASRec's
                       ml-1m.user_item.txt, Video.txt). Whitespace separated.
  user_sequence_lines  one user per line `user item_1 item_2 ...` in time order (ml-1m.txt). A user on
                       several lines: the lines are concatenated in file order.
  movielens_csv        CSV with a header (ratings.csv). Columns are detected (user: userId/user_id/user/uid,
                       item: movieId/itemId/item_id/item/Id/iid, time: timestamp/ts/time) or given with
                       --user-col/--item-col/--time-col. Events are sorted by timestamp per user; equal
                       timestamps keep their file order (stable sort). --min-rating keeps rows rated >= it.
  taobao_csv           CSV without header `user,item,category,behavior,timestamp`; behavior becomes
                       `hist_action` (pv=1, fav=2, cart=3, buy=4; 0 is padding); sorted by timestamp per user,
                       stable. The category column is not used.

Ids. Item and user ids become dense 1..n with 0 reserved as padding:
  --ids auto (default): raw ids are kept when they are integers that already form exactly 1..max (ml-1m,
  Video.txt); otherwise they are remapped in order of first appearance (users in file order, items in the
  chronological event stream of those users). --ids keep forces raw integer ids (table size = max + 1; must
  be >= 1); --ids remap always remaps. `item_map.tsv` and `user_map.tsv` (raw<TAB>id) are written in every
  case. Table sizes in meta.json are max id + 1.

Leave-one-out split (SASRec/BERT4Rec protocol), per user with n events e_1..e_n:
  n >= 3: test target e_n (history e_1..e_{n-1}), validation target e_{n-1} (history e_1..e_{n-2}),
          training sequence e_1..e_{n-2}.
  n <  3: the user goes to training only (the whole sequence is training data); such users are counted in
          meta.json stats (`users_train_only`). A user with a single event yields no training target (there is
          no history to predict it from): counted as `users_single_event`; the event still counts for item
          popularity and table sizes. Nothing is dropped silently.
Training targets are every next item along the training sequence (cut points 1..len-1); the next-item trainer
(solar_dist/train/next_item.py) builds them from `sequences.parquet`.

Output directory:
  meta.json            DatasetMeta (num_users, num_items = max id + 1, num_actions, stats)
  sequences.parquet    one row per user: user_id, item_ids (full chronological sequence), [ts], [action],
                       num_train (length of the training prefix, = n - 2 for n >= 3 else n)
  train/               request schema, one row per user with >= 2 training events: history = training
                       sequence minus its last event, candidate = that last event (label 1). (The next-item
                       trainer samples all cut points itself; this split keeps the schema complete.)
  valid/, test/        request schema, one row per user with n >= 3: the target (label 1) first, then
                       `--eval-negatives` items the user never interacted with (uniform, without replacement,
                       seeded), label 0: the sampled-100 protocol, fixed on disk. When fewer such items exist
                       all of them are used (counted in stats as `eval_rows_short_negatives`).
  item_map.tsv, user_map.tsv
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .schema import DatasetMeta, write_split

FORMATS = ("user_item_lines", "user_sequence_lines", "movielens_csv", "taobao_csv")
TAOBAO_ACTIONS = {"pv": 1, "fav": 2, "cart": 3, "buy": 4}
USER_COLS = ("userId", "user_id", "user", "uid", "UserID", "userid")
ITEM_COLS = ("movieId", "itemId", "item_id", "item", "Id", "iid", "movie_id", "MovieID", "id")
TIME_COLS = ("timestamp", "ts", "time", "Timestamp", "unix_time")


class ConvertError(ValueError):
    """The input does not match the format; the message names the file and line."""


@dataclass
class Events:
    """Raw events in chronological order per user (rows of one user contiguous, users in first-appearance
    order). Ids are still raw (strings or ints)."""

    users: np.ndarray
    items: np.ndarray
    ts: Optional[np.ndarray] = None
    action: Optional[np.ndarray] = None


# ------------------------------------------------------------------------------------------------ readers
def _group_by_user(users: np.ndarray, *cols: Optional[np.ndarray], sort_key: Optional[np.ndarray] = None):
    """Reorders rows so each user's rows are contiguous (users in order of first appearance), keeping file
    order inside a user, or sorting by `sort_key` (stable: ties keep file order)."""
    _, first, inv = np.unique(users, return_index=True, return_inverse=True)
    user_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")[inv.reshape(-1)]
    if sort_key is None:
        order = np.argsort(user_rank, kind="stable")
    else:
        order = np.lexsort((np.arange(len(users)), sort_key, user_rank))  # last key is primary
    return [users[order]] + [None if c is None else c[order] for c in cols]


def read_user_item_lines(path: Path) -> Events:
    users: List[str] = []
    items: List[str] = []
    ts: List[int] = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ConvertError(f"{path}:{lineno}: expected 'user item [timestamp]', got {line.rstrip()!r}")
            users.append(parts[0])
            items.append(parts[1])
            if len(parts) >= 3:
                try:
                    ts.append(int(float(parts[2])))
                except ValueError:
                    raise ConvertError(f"{path}:{lineno}: third column {parts[2]!r} is not a timestamp") from None
    if ts and len(ts) != len(users):
        raise ConvertError(f"{path}: some lines have a timestamp column and some do not")
    u = np.array(users, dtype=object)
    i = np.array(items, dtype=object)
    t = np.array(ts, dtype=np.int64) if ts else None
    # file order is chronological per user; with timestamps, sort by them (stable) to be safe
    u, i, t = _group_by_user(u, i, t, sort_key=t)
    return Events(u, i, t)


def read_user_sequence_lines(path: Path) -> Events:
    users: List[str] = []
    items: List[str] = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ConvertError(f"{path}:{lineno}: user {parts[0]!r} has no items (expected 'user i1 i2 ...')")
            users.extend([parts[0]] * (len(parts) - 1))
            items.extend(parts[1:])
    u, i = _group_by_user(np.array(users, dtype=object), np.array(items, dtype=object))
    return Events(u, i)


def _pick(names: Sequence[str], given: Optional[str], candidates: Sequence[str], what: str, path: Path) -> str:
    if given:
        if given not in names:
            raise ConvertError(f"{path}: column {given!r} (--{what}-col) not in header {list(names)}")
        return given
    for c in candidates:
        if c in names:
            return c
    lower = {n.lower(): n for n in names}
    for c in candidates:
        if c.lower() in lower:
            return lower[c.lower()]
    raise ConvertError(f"{path}: no {what} column in header {list(names)}; pass --{what}-col")


def read_movielens_csv(path: Path, user_col: Optional[str] = None, item_col: Optional[str] = None,
                       time_col: Optional[str] = None, rating_col: Optional[str] = None,
                       min_rating: Optional[float] = None) -> Events:
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    names = table.column_names
    uc = _pick(names, user_col, USER_COLS, "user", path)
    ic = _pick(names, item_col, ITEM_COLS, "item", path)
    tc = _pick(names, time_col, TIME_COLS, "time", path)
    u = np.array([str(x) for x in table.column(uc).to_pylist()], dtype=object)
    i = np.array([str(x) for x in table.column(ic).to_pylist()], dtype=object)
    t = table.column(tc).cast(pa.int64()).to_numpy()
    if min_rating is not None:
        rc = _pick(names, rating_col, ("rating", "Rating", "score"), "rating", path)
        keep = table.column(rc).cast(pa.float64()).to_numpy() >= min_rating
        u, i, t = u[keep], i[keep], t[keep]
    u, i, t = _group_by_user(u, i, t, sort_key=t)
    return Events(u, i, t)


def read_taobao_csv(path: Path) -> Events:
    opts = pacsv.ReadOptions(column_names=["user", "item", "category", "behavior", "timestamp"])
    conv = pacsv.ConvertOptions(column_types={"user": pa.string(), "item": pa.string(), "category": pa.string(),
                                              "behavior": pa.string(), "timestamp": pa.int64()})
    table = pacsv.read_csv(path, read_options=opts, convert_options=conv)
    beh = table.column("behavior").to_pylist()
    bad = [b for b in set(beh) if b not in TAOBAO_ACTIONS]
    if bad:
        raise ConvertError(f"{path}: unknown behavior values {sorted(bad)[:5]}; allowed {list(TAOBAO_ACTIONS)}")
    a = np.array([TAOBAO_ACTIONS[b] for b in beh], dtype=np.int64)
    u = np.array(table.column("user").to_pylist(), dtype=object)
    i = np.array(table.column("item").to_pylist(), dtype=object)
    t = table.column("timestamp").to_numpy()
    u, i, t, a = _group_by_user(u, i, t, a, sort_key=t)
    return Events(u, i, t, a)


# ------------------------------------------------------------------------------------------------ ids
def _as_int(raw: np.ndarray) -> Optional[np.ndarray]:
    try:
        return np.array([int(x) for x in raw], dtype=np.int64)
    except (ValueError, TypeError):
        return None


def map_ids(raw: np.ndarray, mode: str, what: str) -> tuple[np.ndarray, Dict[str, int], str]:
    """Raw ids (in event order) -> dense ids >= 1. Returns (ids, raw->id map, how)."""
    ints = _as_int(raw)
    if mode in ("auto", "keep") and ints is not None and len(ints):
        uniq = np.unique(ints)
        dense = uniq[0] == 1 and uniq[-1] == len(uniq)
        if mode == "keep" or dense:
            if uniq[0] < 1:
                raise ConvertError(f"--ids keep: {what} id {int(uniq[0])} < 1 (0 is reserved as padding)")
            return ints, {str(int(v)): int(v) for v in uniq}, "kept"
    elif mode == "keep":
        raise ConvertError(f"--ids keep: {what} ids are not integers")
    mapping: Dict[str, int] = {}
    out = np.empty(len(raw), dtype=np.int64)
    for k, r in enumerate(raw):
        key = str(r)
        v = mapping.get(key)
        if v is None:
            v = mapping[key] = len(mapping) + 1
        out[k] = v
    return out, mapping, "remapped by first appearance"


# -------------------------------------------------------------------------------------- split + write
def sample_negatives(exclude: np.ndarray, num_items: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct item ids in [1, num_items) not in `exclude` (uniform, without replacement). Returns fewer
    when fewer exist."""
    excl = np.unique(exclude)
    available = (num_items - 1) - int(np.isin(excl, np.arange(1, num_items)).sum())
    n = min(n, max(available, 0))
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        draw = rng.integers(1, num_items, size=2 * (n - len(out)) + 8)
        draw = draw[~np.isin(draw, excl)]
        draw = draw[~np.isin(draw, out)]
        _, first = np.unique(draw, return_index=True)
        draw = draw[np.sort(first)]
        out = np.concatenate([out, draw[: n - len(out)]])
    return out


def convert(fmt: str, input_path: str | Path, out: str | Path, *, ids: str = "auto", eval_negatives: int = 100,
            seed: int = 0, user_col: Optional[str] = None, item_col: Optional[str] = None,
            time_col: Optional[str] = None, rating_col: Optional[str] = None, min_rating: Optional[float] = None,
            rows_per_file: int = 5000, verbose: bool = True) -> DatasetMeta:
    input_path, out = Path(input_path), Path(out)
    if fmt not in FORMATS:
        raise ConvertError(f"format {fmt!r}; choose one of {list(FORMATS)}")
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {input_path} does not exist")
    if fmt == "user_item_lines":
        ev = read_user_item_lines(input_path)
    elif fmt == "user_sequence_lines":
        ev = read_user_sequence_lines(input_path)
    elif fmt == "movielens_csv":
        ev = read_movielens_csv(input_path, user_col, item_col, time_col, rating_col, min_rating)
    else:
        ev = read_taobao_csv(input_path)
    if len(ev.users) == 0:
        raise ConvertError(f"{input_path}: no events")

    uid, umap, uhow = map_ids(ev.users, ids, "user")
    iid, imap, ihow = map_ids(ev.items, ids, "item")
    num_users, num_items = int(uid.max()) + 1, int(iid.max()) + 1
    num_actions = int(ev.action.max()) + 1 if ev.action is not None else 1

    # contiguous user blocks (readers guarantee contiguity)
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    ends = np.r_[starts[1:], len(uid)]
    if len(np.unique(uid[starts])) != len(starts):
        raise ConvertError("internal: a user's events are not contiguous")
    lens = ends - starts
    rng = np.random.default_rng(seed)

    seq_rows: Dict[str, list] = {"user_id": [], "item_ids": [], "num_train": []}
    if ev.ts is not None:
        seq_rows["ts"] = []
    if ev.action is not None:
        seq_rows["action"] = []
    train: Dict[str, list] = {"user_id": [], "hist_item_ids": [], "cand_item_ids": [], "labels": []}
    valid: Dict[str, list] = {"user_id": [], "hist_item_ids": [], "cand_item_ids": [], "labels": []}
    test: Dict[str, list] = {"user_id": [], "hist_item_ids": [], "cand_item_ids": [], "labels": []}
    for d in (train, valid, test):
        if ev.ts is not None:
            d["hist_ts"] = []
        if ev.action is not None:
            d["hist_action"] = []
    short_neg = 0
    for s, e in zip(starts, ends):
        u = int(uid[s])
        items = iid[s:e]
        ts = ev.ts[s:e] if ev.ts is not None else None
        act = ev.action[s:e] if ev.action is not None else None
        n = len(items)
        n_train = n - 2 if n >= 3 else n
        seq_rows["user_id"].append(u)
        seq_rows["item_ids"].append(items.tolist())
        seq_rows["num_train"].append(n_train)
        if ts is not None:
            seq_rows["ts"].append(ts.tolist())
        if act is not None:
            seq_rows["action"].append(act.tolist())

        def add(d, hist_end: int, cands: List[int], labels: List[float]) -> None:
            d["user_id"].append(u)
            d["hist_item_ids"].append(items[:hist_end].tolist())
            d["cand_item_ids"].append(cands)
            d["labels"].append(labels)
            if ts is not None:
                d["hist_ts"].append(ts[:hist_end].tolist())
            if act is not None:
                d["hist_action"].append(act[:hist_end].tolist())

        if n_train >= 2:
            add(train, n_train - 1, [int(items[n_train - 1])], [1.0])
        if n >= 3:
            for d, pos in ((valid, n - 2), (test, n - 1)):
                neg = sample_negatives(items, num_items, eval_negatives, rng)
                short_neg += int(len(neg) < eval_negatives)
                add(d, pos, [int(items[pos])] + neg.tolist(), [1.0] + [0.0] * len(neg))

    stats = {
        "users": float(len(starts)), "items": float(len(imap)), "events": float(len(uid)),
        "users_train_only": float((lens < 3).sum()), "users_single_event": float((lens == 1).sum()),
        "train_requests": float(len(train["user_id"])), "valid_requests": float(len(valid["user_id"])),
        "test_requests": float(len(test["user_id"])),
        "train_targets": float(np.maximum(np.where(lens >= 3, lens - 2, lens) - 1, 0).sum()),
        "max_seq_len": float(lens.max()), "mean_seq_len": float(lens.mean()),
        "eval_negatives": float(eval_negatives), "eval_rows_short_negatives": float(short_neg),
        "seed": float(seed),
    }
    out.mkdir(parents=True, exist_ok=True)
    meta = DatasetMeta(num_users=num_users, num_items=num_items, num_actions=num_actions,
                       source=f"convert:{fmt}:{input_path.name} (users {uhow}, items {ihow})",
                       has_ts=ev.ts is not None, has_action=ev.action is not None, stats=stats)
    meta.save(out)
    seq_schema = [pa.field("user_id", pa.int64()), pa.field("item_ids", pa.list_(pa.int64())),
                  pa.field("num_train", pa.int64())]
    if ev.ts is not None:
        seq_schema.append(pa.field("ts", pa.list_(pa.int64())))
    if ev.action is not None:
        seq_schema.append(pa.field("action", pa.list_(pa.int64())))
    pq.write_table(pa.table(seq_rows, schema=pa.schema(seq_schema)), out / "sequences.parquet")
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        write_split(rows, out, name, rows_per_file=rows_per_file)
    for name, mapping in (("user_map.tsv", umap), ("item_map.tsv", imap)):
        with open(out / name, "w", encoding="utf-8") as f:
            f.write("raw\tid\n")
            for k, v in mapping.items():
                f.write(f"{k}\t{v}\n")
    if verbose:
        print(f"[convert] {input_path} ({fmt}) -> {out}: users {len(starts):,} (ids {uhow}), items {len(imap):,} "
              f"(ids {ihow}), events {len(uid):,}; tables users={num_users}, items={num_items}; "
              f"train/valid/test requests {len(train['user_id']):,}/{len(valid['user_id']):,}/"
              f"{len(test['user_id']):,}; users with < 3 events (train only): {int(stats['users_train_only'])} "
              f"(single event, no target: {int(stats['users_single_event'])}); training targets "
              f"{int(stats['train_targets']):,}")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="solar data convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=FORMATS)
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--ids", choices=("auto", "keep", "remap"), default="auto")
    p.add_argument("--eval-negatives", type=int, default=100,
                   help="sampled negatives per valid/test row (items the user never interacted with)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--user-col")
    p.add_argument("--item-col")
    p.add_argument("--time-col")
    p.add_argument("--rating-col")
    p.add_argument("--min-rating", type=float)
    p.add_argument("--rows-per-file", type=int, default=5000)
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        convert(a.format, a.input, a.out, ids=a.ids, eval_negatives=a.eval_negatives, seed=a.seed,
                user_col=a.user_col, item_col=a.item_col, time_col=a.time_col, rating_col=a.rating_col,
                min_rating=a.min_rating, rows_per_file=a.rows_per_file)
    except (ConvertError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
