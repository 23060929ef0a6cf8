#!/usr/bin/env python
"""Train the SOLAR tower alone on one device, with a plain embedding table and Adam on every parameter.

An ablation, not the framework's training path. `solar train` shards the tables with TorchRec (fbgemm's fused
row-wise Adagrad) and trains the tower under DeepSpeed across ranks. This script keeps everything that
decides quality and swaps only the distributed parts for single-device PyTorch:
  - the same tower (model/tower.py: causal SVD-Attention of ops/causal.py, or the exact / truncate baselines);
  - the same data (the converter's sequences.parquet and leave-one-out splits, `data.max_hist_len`);
  - the same full-catalogue cross-entropy at every position;
  - the same ranking metrics (train/ranking.py), with ties counted against the target.
It needs no TorchRec, fbgemm or DeepSpeed, so it runs on a bare GPU machine, and it answers what the CPU
budget cannot: how far SASRec's recipe (Adam on the tables as well, many epochs) takes the tower, and how
fast the tower trains on a GPU.

    python tools/dense_next_item.py configs/ml1m.yaml --epochs 200 --minutes 8 --device cuda \
        --json out/dense_ml1m.json

Validation (sampled-100 NDCG@10 on `next_item.eval_max_users` users) runs every `--eval-every` epochs; the
best epoch's weights are kept (on the device) and the test split is scored with them on every user, under
both protocols (sampled100, full). Prints a short table; writes a JSON record with the history.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solar_dist.config import load_config  # noqa: E402
from solar_dist.data.loader import BatchPlan  # noqa: E402
from solar_dist.data.schema import DatasetMeta, read_split  # noqa: E402
from solar_dist.data.sequences import Sequences  # noqa: E402
from solar_dist.model.tower import SolarTower  # noqa: E402
from solar_dist.parallel.engine import deepspeed_config  # noqa: E402
from solar_dist.train.ranking import dense_target_ranks, metric_sums, sums_to_metrics  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a next-item config (configs/ml1m.yaml, ...)")
    p.add_argument("--set", action="append", default=[], help="key=value config override (repeatable)")
    p.add_argument("--epochs", type=int, default=0, help="0 = the config's train.epochs")
    p.add_argument("--minutes", type=float, default=0.0, help="start no epoch after this many minutes (0 = none)")
    p.add_argument("--lr", type=float, default=0.0, help="Adam lr for every parameter (0 = deepspeed.lr)")
    p.add_argument("--bucket-batches", type=int, default=0,
                   help="0: batches of random users; K > 0: the framework's plan (data.bucket_batches), users "
                        "sorted by length inside windows of K batches")
    p.add_argument("--table-optimizer", default="adam", choices=["adam", "rowwise_adagrad"],
                   help="the item table's optimizer: adam (with the tower, --lr) or the framework's row-wise "
                        "Adagrad (fbgemm's EXACT_ROWWISE_ADAGRAD, lr embedding.lr)")
    p.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--patience", type=int, default=0, help="stop after N validations without improvement (0 = off)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast of the forward pass")
    p.add_argument("--objective", default="ce", choices=["ce", "bce"],
                   help="ce: softmax over the whole catalogue at every position (SASRec+); bce: SASRec's binary "
                        "cross-entropy, the target against --negatives items drawn per position")
    p.add_argument("--negatives", type=int, default=1,
                   help="bce: uniform negatives per position, none of them in the user's training sequence "
                        "(SASRec draws 1)")
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    return p


class RowWiseAdagrad(torch.optim.Optimizer):
    """fbgemm's exact row-wise Adagrad on a dense table: one accumulator per row, the mean of the row's squared
    gradient; w -= lr * g / (sqrt(acc) + eps). Rows without gradient stay as they are, as in the sparse kernel."""

    def __init__(self, params, lr: float, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                st = self.state[w]
                if not st:
                    st["acc"] = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
                st["acc"] += w.grad.pow(2).mean(1, keepdim=True)
                w.addcdiv_(w.grad, st["acc"].sqrt() + group["eps"], value=-group["lr"])


class DenseNextItem(nn.Module):
    """Item table (row 0 = padding) + the causal tower; an item's score is ⟨state, item embedding⟩."""

    def __init__(self, cfg, num_items: int) -> None:
        super().__init__()
        self.items = nn.Embedding(num_items, cfg.embedding.dim)
        nn.init.normal_(self.items.weight, std=cfg.embedding.init_std)
        self.tower = SolarTower(cfg.model, cfg.embedding.dim, head="states")

    def states(self, hist: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.tower(self.items(hist), lengths, mode="states")


class _Both:
    """Optimizers stepped together (the tower's, the table's)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def _windows(seqs: Sequences, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, length, user) per training user: the flat item array's range of its history positions, the
    last max_len events of the training prefix but its final one, which has no next event to predict."""
    users = np.flatnonzero(seqs.num_train >= 2)
    cut = seqs.num_train[users] - 1
    start = seqs.offsets[users] + (np.maximum(cut - max_len, 0) if max_len else 0)
    return start, seqs.offsets[users] + cut - start, users


def sampled_negatives(seqs: Sequences, users: np.ndarray, lengths: torch.Tensor, k: int, num_items: int,
                      device: torch.device) -> torch.Tensor:
    """(T, k) item ids in [1, num_items), drawn uniformly per position and redrawn while they fall in the
    position's user's training sequence (SASRec's random_neq). T = lengths.sum()."""
    B = len(users)
    excl = torch.zeros(B, num_items, dtype=torch.bool, device=device)
    n_train = seqs.num_train[users]
    own = _batch_index(seqs.offsets[users], n_train)
    excl[torch.from_numpy(np.repeat(np.arange(B), n_train)).to(device),
         torch.from_numpy(seqs.items[own]).to(device)] = True
    seg = torch.repeat_interleave(torch.arange(B, device=device), lengths)[:, None].expand(-1, k)
    neg = torch.randint(1, num_items, seg.shape, device=device)
    for _ in range(1000):
        bad = excl[seg, neg]
        if not bool(bad.any()):
            return neg
        neg[bad] = torch.randint(1, num_items, (int(bad.sum()),), device=device)
    raise RuntimeError("could not draw negatives outside the users' sequences (catalogue too small?)")


def position_loss(states: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, objective: str,
                  neg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean loss over positions. ce: softmax over every item but the padding row. bce: -log sigmoid(target)
    - mean over the position's negatives of log(1 - sigmoid(neg))."""
    if objective == "ce":
        return F.cross_entropy(states @ weight[1:].T, tgt - 1)
    pos = (states * weight[tgt]).sum(-1)
    negl = torch.einsum("td,tkd->tk", states, weight[neg])
    return (F.softplus(-pos) + F.softplus(negl).mean(-1)).mean()


def _batch_index(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    return np.concatenate([np.arange(s, s + n) for s, n in zip(start, length)])


def _schedule(cfg, adam: torch.optim.Optimizer, total_steps: int):
    """The framework's lr schedule on the tool's Adam: with deepspeed.lr_decay, the very DeepSpeed scheduler
    class the engine builds (parallel/engine.py); without, the linear warm-up the recorded runs used."""
    if cfg.deepspeed.lr_decay == "none":
        warm = max(cfg.deepspeed.warmup_steps, 1)
        return torch.optim.lr_scheduler.LambdaLR(adam, lambda s: min(1.0, (s + 1) / warm))
    from deepspeed.runtime import lr_schedules

    spec = deepspeed_config(cfg, 1, total_steps)["scheduler"]
    return getattr(lr_schedules, spec["type"])(adam, **spec["params"])


def train_epoch(model, opt, sched, seqs, start, length, users, batch_size, rng, device, amp,
                objective: str = "ce", negatives: int = 1, bucket_batches: int = 0, epoch: int = 0,
                seed: int = 0) -> float:
    model.train()
    if bucket_batches:  # the framework's batch plan: lengths sorted inside windows of `bucket_batches` batches
        plan = BatchPlan(length, batch_size, shuffle=True, seed=seed, bucket_batches=bucket_batches)
        batches = plan.global_batches(epoch)
    else:
        order = rng.permutation(len(start))
        batches = [order[lo: lo + batch_size] for lo in range(0, len(order), batch_size)]
        if len(batches) > 1 and len(batches[-1]) < batch_size:
            batches.pop()  # drop the last partial batch, as the framework's loader does
    items = torch.from_numpy(seqs.items)
    total, count = 0.0, 0
    for rows in batches:
        idx = torch.from_numpy(_batch_index(start[rows], length[rows]))
        hist, tgt = items[idx].to(device), items[idx + 1].to(device)
        lengths = torch.from_numpy(length[rows]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            states = model.states(hist, lengths)
        neg = (sampled_negatives(seqs, users[rows], lengths, negatives, model.items.num_embeddings, device)
               if objective == "bce" else None)
        loss = position_loss(states.float(), model.items.weight, tgt, objective, neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(tgt)
        count += len(tgt)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model, table, max_len, device, amp, batch: int, protocols=("sampled100", "full"), k: int = 10):
    """Scores each row's candidates (sampled100) and every item (full, the row's history excluded) with the
    state of its last history position."""
    model.eval()
    hist_col = table.column("hist_item_ids").combine_chunks()
    off = hist_col.offsets.to_numpy()
    vals = hist_col.values.to_numpy(zero_copy_only=False)[off[0]: off[-1]].astype(np.int64)
    off = off - off[0]
    cand = table.column("cand_item_ids").to_pylist()
    labels = table.column("labels").to_pylist()
    weight = model.items.weight
    I = weight.shape[0]
    sums = {p: torch.zeros(4, dtype=torch.float64) for p in protocols}
    for lo in range(0, table.num_rows, batch):
        hi = min(table.num_rows, lo + batch)
        n_full = off[lo + 1: hi + 1] - off[lo: hi]
        keep = np.minimum(n_full, max_len) if max_len else n_full
        idx = np.concatenate([np.arange(e - m, e) for e, m in zip(off[lo + 1: hi + 1], keep)])
        lengths = torch.from_numpy(keep).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            states = model.states(torch.from_numpy(vals[idx]).to(device), lengths).to(weight.dtype)
        last = torch.zeros(hi - lo, weight.shape[1], device=device, dtype=weight.dtype)
        has = lengths > 0
        last[has] = states[(torch.cumsum(lengths, 0) - 1)[has]]
        c = torch.tensor(cand[lo:hi], device=device)                       # (B, C) the stored candidates
        t_col = torch.tensor([int(np.argmax(lab)) for lab in labels[lo:hi]])
        target = c[torch.arange(hi - lo), t_col.to(device)]
        if "sampled100" in sums:
            s = (weight[c] * last[:, None]).sum(-1).cpu()
            sums["sampled100"] += metric_sums(dense_target_ranks(s, t_col, torch.zeros_like(s, dtype=torch.bool)), k)
        if "full" in sums:
            s = (last @ weight.T).cpu()
            ex = torch.zeros(hi - lo, I, dtype=torch.bool)
            ex[:, 0] = True
            rows = np.repeat(np.arange(hi - lo), n_full)
            ex[torch.from_numpy(rows), torch.from_numpy(vals[off[lo]: off[hi]])] = True
            sums["full"] += metric_sums(dense_target_ranks(s, target.cpu(), ex), k)
    out = {}
    for p, s in sums.items():
        out.update({f"{p}_{key}": v for key, v in sums_to_metrics(s.tolist(), k).items()})
    return out


def run(args) -> dict:
    cfg = load_config(args.config, args.set)
    if cfg.data.task != "next_item":
        raise ValueError(f"{args.config}: data.task={cfg.data.task!r}; this tool trains next-item configs only")
    device = torch.device(args.device)
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    root = Path(cfg.data.path)
    meta, seqs = DatasetMeta.load(root), Sequences.load(root)
    valid, test = read_split(root, "valid", meta), read_split(root, "test", meta)
    if cfg.next_item.eval_max_users and valid.num_rows > cfg.next_item.eval_max_users:
        pick = np.sort(np.random.default_rng(0).choice(valid.num_rows, cfg.next_item.eval_max_users, replace=False))
        valid = valid.take(pick)
    L = cfg.data.max_hist_len
    if args.objective == "bce" and args.negatives < 1:
        raise ValueError(f"--negatives={args.negatives}: the bce objective needs at least one negative per position")
    start, length, users = _windows(seqs, L)
    model = DenseNextItem(cfg, meta.num_items).to(device)
    lr = args.lr or cfg.deepspeed.lr
    adam_all = args.table_optimizer == "adam"
    adam = torch.optim.Adam(model.parameters() if adam_all else model.tower.parameters(), lr=lr, betas=(0.9, 0.98))
    opt = adam if adam_all else _Both(adam, RowWiseAdagrad(model.items.parameters(), lr=cfg.embedding.lr,
                                                           eps=cfg.embedding.eps))
    epochs = args.epochs or cfg.train.epochs
    # the schedule is Adam's (DeepSpeed's scheduler in the framework); fbgemm's table lr is constant
    # batches per epoch as train_epoch cuts them: the last partial batch dropped unless it is the only one
    sched = _schedule(cfg, adam, epochs * max(1, len(users) // cfg.data.batch_size))
    amp = args.amp == "bf16"
    t0 = time.time()
    history, best, best_state, stale = [], None, None, 0
    for epoch in range(epochs):
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            break
        te = time.time()
        loss = train_epoch(model, opt, sched, seqs, start, length, users, cfg.data.batch_size, rng, device, amp,
                           args.objective, args.negatives, args.bucket_batches, epoch, cfg.train.seed)
        rec = {"epoch": epoch, "loss": loss, "train_seconds": time.time() - te}
        if (epoch + 1) % args.eval_every == 0 or epoch == epochs - 1:
            m = evaluate(model, valid, L, device, amp, args.eval_batch, ("sampled100",))
            rec.update({f"valid_{key}": v for key, v in m.items()})
            score = m["sampled100_ndcg@10"]
            if best is None or score > best["value"]:
                best = {"epoch": epoch, "value": score}
                best_state, stale = copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        rec["elapsed"] = time.time() - t0
        history.append(rec)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
        if args.patience and stale >= args.patience:
            break
    train_seconds = time.time() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    te = time.time()
    test_m = evaluate(model, test, L, device, amp, args.eval_batch)
    result = {
        "config": args.config, "overrides": args.set, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "amp": args.amp, "lr": lr,
        "table_optimizer": args.table_optimizer, "bucket_batches": args.bucket_batches,
        "table_lr": lr if args.table_optimizer == "adam" else cfg.embedding.lr, "objective": args.objective,
        "negatives": args.negatives if args.objective == "bce" else None,
        "epochs_trained": len(history), "selected": best,
        "train_seconds": train_seconds, "test_eval_seconds": time.time() - te,
        "seconds_per_epoch": float(np.median([h["train_seconds"] for h in history])) if history else math.nan,
        "test": test_m, "history": history,
        "attention": cfg.model.attention, "rank": cfg.model.rank, "max_hist_len": L,
    }
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    res = run(args)
    t = res["test"]
    print(f"{'model':10s} {'epochs':>8s} {'best':>5s} {'s/epoch':>8s} {'HR@10':>7s} {'NDCG@10':>8s} "
          f"{'full HR@10':>10s} {'full NDCG':>9s}")
    sel = res["selected"]["epoch"] if res["selected"] else -1
    print(f"{res['attention'] + '/' + str(res['rank']):10s} {res['epochs_trained']:8d} {sel:5d} "
          f"{res['seconds_per_epoch']:8.2f} {t['sampled100_hr@10']:7.4f} {t['sampled100_ndcg@10']:8.4f} "
          f"{t['full_hr@10']:10.4f} {t['full_ndcg@10']:9.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
