"""tools/dense_next_item.py (the tower alone, dense table, Adam): its batched evaluation against a row-by-row
direct computation, and a short end-to-end run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from solar_dist.config import load_config
from solar_dist.data.schema import DatasetMeta, read_split
import tools.dense_next_item as tool
from tests.train.test_next_item import NEXT_ITEM_TINY, _tiny_next_item_data

STATES = ["next_item.train_mode=all_positions", "next_item.train_negatives=0", "model.causal_window=4",
          "next_item.eval_protocols=[sampled100,full]"]


def _direct(model, table, max_len: int, k: int = 10):
    """Each row alone: its last max_len history events through the tower, the last state scores the stored
    candidates (sampled) and every item but padding and the row's other history items (full)."""
    ranks = {"sampled100": [], "full": []}
    w = model.items.weight
    for row in table.to_pylist():
        hist = row["hist_item_ids"][-max_len:] if max_len else row["hist_item_ids"]
        st = model.states(torch.tensor(hist), torch.tensor([len(hist)]))
        last = st[-1] if len(hist) else torch.zeros(w.shape[1])
        cands, labels = row["cand_item_ids"], row["labels"]
        target = cands[int(np.argmax(labels))]
        s = torch.stack([w[c] @ last for c in cands])
        others = [j for j, c in enumerate(cands) if c != target]
        ranks["sampled100"].append(int((s[others] >= w[target] @ last).sum()))
        full = w @ last
        others = [i for i in range(1, w.shape[0]) if i != target and i not in set(row["hist_item_ids"])]
        ranks["full"].append(int((full[others] >= full[target]).sum()))
    out = {}
    for p, r in ranks.items():
        r = np.asarray(r, dtype=np.float64)
        out[f"{p}_hr@{k}"] = float((r < k).mean())
        out[f"{p}_ndcg@{k}"] = float(((r < k) / np.log2(r + 2)).mean())
        out[f"{p}_mrr"] = float((1 / (r + 1)).mean())
    return out


@pytest.mark.parametrize("max_len", [0, 5])
def test_batched_evaluation_matches_row_by_row(tmp_path, max_len):
    root = _tiny_next_item_data(tmp_path)
    cfg = load_config(None, NEXT_ITEM_TINY + STATES + [f"data.path={root}", f"data.max_hist_len={max_len}"])
    torch.manual_seed(0)
    model = tool.DenseNextItem(cfg, DatasetMeta.load(root).num_items).double()
    with torch.no_grad():
        model.items.weight.normal_()  # spread scores: no accidental ties
    model.eval()
    table = read_split(root, "test")
    got = tool.evaluate(model, table, max_len, torch.device("cpu"), False, batch=7)
    with torch.no_grad():
        want = _direct(model, table, max_len)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key
    assert got["full_count"] == got["sampled100_count"] == table.num_rows > 30


def _run_tool(tmp_path, sets, *flags):
    """tools/dense_next_item.py on the tiny data set with the shared tiny config plus `sets`, on the CPU:
    (the data set's root, the argument list it ran with but --json, its JSON record)."""
    root = _tiny_next_item_data(tmp_path)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("")
    out = tmp_path / "dense.json"
    args = [str(cfg_path), "--device", "cpu", *flags]
    for s in NEXT_ITEM_TINY + STATES + [f"data.path={root}"] + list(sets):
        args += ["--set", s]
    assert tool.main(args + ["--json", str(out)]) == 0
    return root, args, json.loads(out.read_text())


def test_short_run_trains_and_writes_its_record(tmp_path, capsys):
    root, _, rec = _run_tool(tmp_path, ["data.max_hist_len=10", "deepspeed.lr=0.01", "deepspeed.warmup_steps=1",
                                        "data.batch_size=8"], "--epochs", "4", "--eval-every", "2")
    losses = [h["loss"] for h in rec["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    assert [h["epoch"] for h in rec["history"] if "valid_sampled100_ndcg@10" in h] == [1, 3]
    assert rec["selected"]["epoch"] in (1, 3)
    assert rec["test"]["sampled100_count"] == rec["test"]["full_count"] == read_split(root, "test").num_rows
    assert 0.0 <= rec["test"]["full_ndcg@10"] <= rec["test"]["full_hr@10"] <= 1.0
    assert "svd/4" in capsys.readouterr().out


def test_rejects_a_ranking_config(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("")
    with pytest.raises(ValueError, match="data.task"):
        tool.main([str(cfg_path), "--set", f"data.path={tmp_path}", "--device", "cpu"])


def test_bce_negatives_avoid_the_users_training_items_and_the_loss_matches_a_loop(tmp_path):
    from solar_dist.data.sequences import Sequences
    root = _tiny_next_item_data(tmp_path)
    seqs = Sequences.load(root)
    num_items = DatasetMeta.load(root).num_items
    start, length, users = tool._windows(seqs, 0)
    rows = np.arange(min(6, len(users)))
    lengths = torch.from_numpy(length[rows])
    torch.manual_seed(0)
    neg = tool.sampled_negatives(seqs, users[rows], lengths, 3, num_items, torch.device("cpu"))
    assert neg.shape == (int(lengths.sum()), 3)
    assert int(neg.min()) >= 1 and int(neg.max()) < num_items
    seg = np.repeat(np.arange(len(rows)), length[rows])
    for t, u in enumerate(users[rows][seg]):
        own = set(seqs.items[seqs.offsets[u]: seqs.offsets[u] + seqs.num_train[u]].tolist())
        assert not own & set(neg[t].tolist()), (t, u)
    # BCE against a per-position loop; CE against the softmax over every item but padding
    g = torch.Generator().manual_seed(1)
    T, D = neg.shape[0], 5
    states, weight = torch.randn(T, D, generator=g, dtype=torch.float64), torch.randn(num_items, D, generator=g,
                                                                                    dtype=torch.float64)
    tgt = torch.randint(1, num_items, (T,), generator=g)
    want = sum(-torch.log(torch.sigmoid(states[t] @ weight[tgt[t]]))
               - torch.stack([torch.log(1 - torch.sigmoid(states[t] @ weight[n])) for n in neg[t]]).mean()
               for t in range(T)) / T
    assert float(tool.position_loss(states, weight, tgt, "bce", neg)) == pytest.approx(float(want), rel=1e-10)
    ce = sum(torch.logsumexp(states[t] @ weight[1:].T, 0) - states[t] @ weight[tgt[t]] for t in range(T)) / T
    assert float(tool.position_loss(states, weight, tgt, "ce")) == pytest.approx(float(ce), rel=1e-10)


def test_short_bce_run_trains(tmp_path):
    _, args, rec = _run_tool(tmp_path, ["deepspeed.lr=0.05", "deepspeed.warmup_steps=1", "data.batch_size=8"],
                             "--epochs", "8", "--objective", "bce", "--negatives", "2")
    losses = [h["loss"] for h in rec["history"]]
    assert rec["objective"] == "bce" and rec["negatives"] == 2
    assert losses[-1] < losses[0] - 0.05, losses
    with pytest.raises(ValueError, match="--negatives=0"):
        tool.main(args + ["--negatives", "0"])


def test_rowwise_adagrad_matches_torchrecs():
    """The tool's row-wise Adagrad (it runs where TorchRec is not installed) against TorchRec's, rows without
    gradient included."""
    TorchRecRowWise = pytest.importorskip("torchrec.optim.rowwise_adagrad").RowWiseAdagrad
    g = torch.Generator().manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    theirs = torch.nn.Parameter(ours.detach().clone())
    o1, o2 = tool.RowWiseAdagrad([ours], lr=0.05, eps=1e-8), TorchRecRowWise([theirs], lr=0.05, eps=1e-8)
    for k in range(5):
        grad = torch.randn(6, 4, generator=g, dtype=torch.float64)
        grad[k] = 0.0
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, torch.zeros_like(ours))


def test_framework_optimizer_and_batch_plan_train(tmp_path):
    _, _, rec = _run_tool(tmp_path, ["deepspeed.warmup_steps=1", "data.batch_size=8", "embedding.lr=0.1"],
                          "--epochs", "3", "--table-optimizer", "rowwise_adagrad", "--lr", "0.01",
                          "--bucket-batches", "2")
    assert rec["table_optimizer"] == "rowwise_adagrad" and rec["table_lr"] == 0.1 and rec["lr"] == 0.01
    assert rec["bucket_batches"] == 2
    losses = [h["loss"] for h in rec["history"]]
    assert losses[-1] < losses[0] - 0.05, losses


def test_tool_schedules_adam_with_the_frameworks_deepspeed_scheduler():
    """With deepspeed.lr_decay the tool builds the very scheduler the engine's config names, so an ablation and
    the framework decay alike; without, the recorded runs' linear warm-up is kept."""
    cfg = load_config(None, ["deepspeed.lr_decay=cosine", "deepspeed.min_lr_ratio=0.5", "deepspeed.warmup_steps=2",
                             "deepspeed.lr=0.01"])
    p = torch.nn.Parameter(torch.zeros(1))
    adam = torch.optim.Adam([p], lr=0.01)
    sched = tool._schedule(cfg, adam, 10)
    assert type(sched).__name__ == "WarmupCosineLR" and sched.total_num_steps == 10
    for _ in range(10):
        adam.step()
        sched.step()
    assert adam.param_groups[0]["lr"] == pytest.approx(0.005)
    plain = tool._schedule(load_config(None, ["deepspeed.warmup_steps=4"]), torch.optim.Adam([p], lr=0.01), 10)
    assert isinstance(plain, torch.optim.lr_scheduler.LambdaLR)
