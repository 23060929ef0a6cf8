"""Next-item training and evaluation (solar_dist/train/next_item.py): metrics, negatives, causality, smoke run."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from solar_dist.config import load_config
from solar_dist.data.batch import CAND_ITEM
from solar_dist.data.convert import convert
from solar_dist.train.next_item import (NegativeSampler, NextItemLoader, NextItemTrainer, Sequences,
                                        all_position_loss, dense_target_ranks, jagged_target_ranks,
                                        make_trainer, popularity_metrics, rank_metrics)
from tests.conftest import shared_data

NEXT_ITEM_TINY = [
    "data.task=next_item", "data.if_missing=error", "data.batch_size=16", "data.eval_batch_size=16",
    "data.bucket_batches=0", "embedding.dim=16", "model.rank=4", "model.num_heads=2", "model.depth=1",
    "model.recent_k=4", "model.scorer_hidden=[16]", "train.epochs=1", "train.progress=false",
    "deepspeed.warmup_steps=0", "loss.bce_weight=0", "loss.listwise_weight=1", "next_item.train_negatives=8",
    "next_item.eval_negatives=20", "next_item.eval_chunk_pairs=256",
]


# ---------------------------------------------------------------------------------------------- metrics
def test_rank_metrics_hand_checked():
    m = rank_metrics(np.array([0, 1, 9, 10, 50]), k=10)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 51) / 5)


def test_jagged_ranks_hand_checked_and_ties_count_against_target():
    # request 0: target 0.5 beaten by 0.9 -> rank 1; request 1: target best -> 0; request 2: all tied -> 2
    logits = torch.tensor([0.9, 0.5, 0.1, 2.0, 1.0, 0.3, 0.3, 0.3])
    labels = torch.tensor([0, 1, 0, 1, 0, 0, 1, 0], dtype=torch.float32)
    ranks = jagged_target_ranks(logits, labels, torch.tensor([3, 2, 3]))
    assert ranks.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="exactly one"):
        jagged_target_ranks(logits, torch.zeros(8), torch.tensor([3, 2, 3]))


def test_metrics_match_torchmetrics():
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG

    g = torch.Generator().manual_seed(0)
    Q, C = 200, 101
    logits = torch.randn(Q * C, generator=g)  # continuous: no ties, so the sort order is unique
    labels = torch.zeros(Q, C)
    labels[torch.arange(Q), torch.randint(0, C, (Q,), generator=g)] = 1
    labels = labels.reshape(-1)
    idx = torch.arange(Q).repeat_interleave(C)
    ours = rank_metrics(jagged_target_ranks(logits, labels, torch.full((Q,), C)), k=10)
    assert ours["hr@10"] == pytest.approx(float(RetrievalHitRate(top_k=10)(logits, labels.long(), indexes=idx)))
    assert ours["ndcg@10"] == pytest.approx(float(RetrievalNormalizedDCG(top_k=10)(logits, labels.long(), indexes=idx)))
    assert ours["mrr"] == pytest.approx(float(RetrievalMRR()(logits, labels.long(), indexes=idx)))
    # the dense (full-catalogue) path gives the same ranks as the jagged path
    scores = logits.view(Q, C)
    target = labels.view(Q, C).argmax(1)
    dense = dense_target_ranks(scores, target, torch.zeros(Q, C, dtype=torch.bool))
    assert dense.tolist() == jagged_target_ranks(logits, labels, torch.full((Q,), C)).tolist()


def test_dense_ranks_exclude_history_but_never_the_target():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0]])
    ex = torch.tensor([[True, True, False, True, False]])  # padding 0 and history items 1, 3
    assert dense_target_ranks(scores, torch.tensor([4]), ex).tolist() == [1]  # only item 2 beats it
    ex_t = torch.tensor([[True, False, False, False, True]])  # target itself in the history: still ranked
    assert dense_target_ranks(scores, torch.tensor([4]), ex_t).tolist() == [3]


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_negative_sampler_excludes_target(kind):
    counts = np.array([0, 100, 1, 1, 50], dtype=float)  # item 1 very popular
    s = NegativeSampler(5, kind, counts)
    rng = np.random.default_rng(0)
    targets = np.array([1, 2, 3, 4] * 50)
    neg = s.sample(targets, 16, rng)
    assert neg.shape == (200, 16)
    assert not (neg == targets[:, None]).any()
    assert neg.min() >= 1 and neg.max() <= 4  # never the padding id 0
    if kind == "popularity":
        assert (neg[targets != 1] == 1).mean() > 0.5


# ---------------------------------------------------------------------------------------------- causality
def _tiny_next_item_data(tmp_path: Path, users: int = 40, items: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, users + 1):
        n = int(rng.integers(2, 30))
        seq = rng.choice(np.arange(1, items + 1), size=min(n, items), replace=False)  # no repeats: checkable
        lines.append(f"{u} " + " ".join(map(str, seq)))
    src = tmp_path / "seqs.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    convert("user_sequence_lines", src, out, eval_negatives=20, verbose=False)
    return out


def test_training_samples_never_see_their_target(tmp_path):
    root = _tiny_next_item_data(tmp_path)
    from solar_dist.data.schema import DatasetMeta

    meta = DatasetMeta.load(root)
    seqs = Sequences.load(root)
    full = {int(u): seqs.items[a:b].tolist() for u, a, b in zip(seqs.user_ids, seqs.offsets[:-1], seqs.offsets[1:])}
    n_train = dict(zip(seqs.user_ids.tolist(), seqs.num_train.tolist()))
    for max_len, cuts in ((0, 0), (5, 3)):
        cfg = load_config(None, NEXT_ITEM_TINY + [f"data.path={root}", f"data.max_hist_len={max_len}",
                                                  f"next_item.cut_points_per_user={cuts}"])
        loader = NextItemLoader(seqs, meta, cfg)
        seen = 0
        for batch in loader.epoch(0):
            hist = batch.features["hist_item"].to_dense()
            cand = batch.features["cand_item"].to_dense()
            for u, h, c in zip(batch.user_ids.tolist(), hist, cand):
                h, target = h.tolist(), int(c[0])
                seq = full[u]
                pos = seq.index(target)  # the position of this target in the user's sequence
                assert pos < n_train[u], "a validation/test target was used for training"
                assert target not in h, "the target reached its own history"
                expect = seq[max(0, pos - max_len) if max_len else 0: pos]
                assert h == expect, "history must be exactly the events just before the target"
                assert target not in c[1:].tolist()
                seen += 1
        assert seen == len(loader) * cfg.data.batch_size


def test_model_output_does_not_depend_on_the_future(tmp_path):
    """Changing everything at and after a sample's target leaves its logits unchanged: the interests and the
    recent window are computed from the prefix only (svd_attention.md §7)."""
    root = _tiny_next_item_data(tmp_path)
    cfg = load_config(None, NEXT_ITEM_TINY + [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}"])
    tr = make_trainer(cfg)
    try:
        assert isinstance(tr, NextItemTrainer)
        seqs = tr.seqs
        users = np.array([j for j, m in enumerate(seqs.num_train) if m >= 4][:6])
        cuts = np.full(len(users), 3)
        a = tr.loader.make_batch(users, cuts, np.random.default_rng(1))
        changed = Sequences(seqs.user_ids, seqs.offsets, seqs.items.copy(), seqs.num_train)
        for j in users:  # rewrite the target and everything after it
            s, e = seqs.offsets[j] + 3, seqs.offsets[j + 1]
            changed.items[s + 1: e] = (changed.items[s + 1: e] % 50) + 1
        tr.loader.seqs = changed
        b = tr.loader.make_batch(users, cuts, np.random.default_rng(1))
        tr.loader.seqs = seqs
        assert torch.equal(a.features["hist_item"].values(), b.features["hist_item"].values())
        la, lb = tr.predict(a), tr.predict(b)
        assert torch.equal(la, lb)
        # one training step and both protocols run end to end
        out = tr.train_step(next(iter(tr.loader.epoch(0))))
        assert math.isfinite(out["loss"])
        m = tr.evaluate()
        for p in ("sampled100", "full"):
            assert 0 <= m[f"{p}_hr@10"] <= 1 and m[f"{p}_count"] == tr.eval_table.num_rows
    finally:
        tr.close()


# ---------------------------------------------------------------------------------- all-position training
ALL_POS = ["next_item.train_mode=all_positions", "model.causal_window=3"]


@pytest.mark.parametrize("max_len", [0, 6])
def test_all_position_samples_are_the_training_sequence(tmp_path, max_len):
    """One sample per user: history = the training events (the last max_len+1 of them when set) minus the
    last, targets = the same shifted by one; no validation/test event, negatives after the targets."""
    root = _tiny_next_item_data(tmp_path)
    from solar_dist.data.schema import DatasetMeta

    meta = DatasetMeta.load(root)
    seqs = Sequences.load(root)
    full = {int(u): seqs.items[a:b].tolist() for u, a, b in zip(seqs.user_ids, seqs.offsets[:-1], seqs.offsets[1:])}
    n_train = dict(zip(seqs.user_ids.tolist(), seqs.num_train.tolist()))
    cfg = load_config(None, NEXT_ITEM_TINY + ALL_POS + [f"data.path={root}", f"data.max_hist_len={max_len}",
                                                        "data.batch_size=4"])
    loader = NextItemLoader(seqs, meta, cfg)
    users = []
    for batch in loader.epoch(0):
        hl = batch.hist_lengths.tolist()
        hist = batch.features["hist_item"].to_dense()
        cand = batch.features["cand_item"].to_dense()
        labels = batch.labels.split(batch.cand_lengths.tolist())
        for u, h, c, lab, n in zip(batch.user_ids.tolist(), hist, cand, labels, hl):
            train = full[u][: n_train[u]]
            expect = train[:-1][-max_len:] if max_len else train[:-1]
            assert h.tolist() == expect
            assert c[:n].tolist() == train[len(train) - n:], "targets = the history shifted by one"
            assert len(c) == n + cfg.next_item.train_negatives
            assert lab[:n].eq(1).all() and lab[n:].eq(0).all()
            users.append(u)
    eligible = {u for u, m in n_train.items() if m >= 2}
    assert len(set(users)) == len(users) == len(loader) * 4 > len(eligible) - 4  # each once (drop_last)
    assert set(users) <= eligible


@pytest.mark.parametrize("share", [False, True])
def test_all_position_loss_matches_direct_computation(share):
    gen = torch.Generator().manual_seed(0)
    hl = torch.tensor([3, 1, 4])
    S, D = 5, 6
    states = torch.randn(int(hl.sum()), D, generator=gen, dtype=torch.float64)
    ids, rows = [], []
    for n in hl.tolist():
        ids += list(range(1, n + 1)) + [2, 9, 1, 7, 3]  # negatives 2, 1 and 3 clash with some targets
    cand_ids = torch.tensor(ids)
    cand = torch.randn(len(ids), D, generator=gen, dtype=torch.float64)
    got, count = all_position_loss(states, cand, cand_ids, hl, S, share=share)
    starts = (torch.cumsum(hl + S, 0) - (hl + S)).tolist()
    pool = [(st + n + j) for st, n in zip(starts, hl.tolist()) for j in range(S)]  # every user's negatives
    want, t, c0 = 0.0, 0, 0
    per_pos, where = [], []
    for n in hl.tolist():
        for p in range(n):
            s = states[t]
            negs = pool if share else [c0 + n + j for j in range(S)]
            logits = [float(s @ cand[c0 + p])]
            logits += [float(s @ cand[k]) for k in negs if ids[k] != ids[c0 + p]]
            per_pos.append(float(torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0)) - logits[0])
            where.append((p, n))
            want += per_pos[-1]
            t += 1
        c0 += n + S
    assert count == 8
    assert abs(float(got) - want) < 1e-9
    for last in (1, 2):  # only each user's last `last` positions
        got_l, count_l = all_position_loss(states, cand, cand_ids, hl, S, share=share, last=last)
        kept = [v for (p, n), v in zip(where, per_pos) if p >= n - last]
        assert count_l == len(kept) and abs(float(got_l) - sum(kept)) < 1e-9
    for last in (0, 2):  # per_user: the sum over users of each user's mean over its contributing positions
        got_u, users = all_position_loss(states, cand, cand_ids, hl, S, share=share, last=last, per_user=True)
        by_user = {}
        for u, ((p, n), v) in zip(np.repeat(np.arange(len(hl)), hl.numpy()), zip(where, per_pos)):
            if not last or p >= n - last:
                by_user.setdefault(u, []).append(v)
        assert users == len(by_user) == 3
        assert abs(float(got_u) - sum(np.mean(v) for v in by_user.values())) < 1e-9
    with pytest.raises(ValueError, match="hist_lengths"):
        all_position_loss(states[:-1], cand, cand_ids, hl, S)


@pytest.mark.parametrize("share", [False, True])
def test_all_position_bce_matches_direct_computation(share):
    """bce_weight: per position -log sigmoid(target) - mean over its non-clashing negatives of
    log(1 - sigmoid(neg)) (SASRec's objective), added to listwise_weight x the softmax loss."""
    gen = torch.Generator().manual_seed(2)
    hl = torch.tensor([2, 4, 1])
    S, D = 3, 5
    states = torch.randn(int(hl.sum()), D, generator=gen, dtype=torch.float64)
    ids = []
    for n in hl.tolist():
        ids += list(range(1, n + 1)) + [1, 8, 3]  # negatives 1 and 3 clash with some targets
    ids[-3:] = [1, 1, 1]  # the last user (one position, target 1): every own negative clashes
    cand_ids = torch.tensor(ids)
    cand = torch.randn(len(ids), D, generator=gen, dtype=torch.float64)
    starts = (torch.cumsum(hl + S, 0) - (hl + S)).tolist()
    pool = [(st + n + j) for st, n in zip(starts, hl.tolist()) for j in range(S)]
    bce, ce, t, c0 = 0.0, 0.0, 0, 0
    for n in hl.tolist():
        for p in range(n):
            s = states[t]
            negs = [k for k in (pool if share else [c0 + n + j for j in range(S)]) if ids[k] != ids[c0 + p]]
            pos = float(s @ cand[c0 + p])
            nl = [float(s @ cand[k]) for k in negs]
            bce += -math.log(1 / (1 + math.exp(-pos)))
            if nl:
                bce += sum(-math.log(1 - 1 / (1 + math.exp(-v))) for v in nl) / len(nl)
            ce += math.log(sum(math.exp(v) for v in [pos] + nl)) - pos
            t += 1
        c0 += n + S
    got, count = all_position_loss(states, cand, cand_ids, hl, S, share=share, listwise_weight=0.0, bce_weight=1.0)
    assert count == 7 and abs(float(got) - bce) < 1e-9
    got, _ = all_position_loss(states, cand, cand_ids, hl, S, share=share, listwise_weight=0.5, bce_weight=2.0)
    assert abs(float(got) - (0.5 * ce + 2.0 * bce)) < 1e-9
    with pytest.raises(ValueError, match="needs sampled negatives"):
        all_position_loss(states, cand, cand_ids, hl, 0, catalogue=3, bce_weight=1.0)
    with pytest.raises(ValueError, match="not both 0"):
        all_position_loss(states, cand, cand_ids, hl, S, listwise_weight=0.0, bce_weight=0.0)


def test_full_catalogue_loss_matches_direct_computation():
    """catalogue > 0: the first user's targets, then items 1..I-1, then the other users' targets; every
    position's loss is the CE of its target over the whole catalogue."""
    gen = torch.Generator().manual_seed(1)
    hl = torch.tensor([2, 3, 1])
    I, D = 9, 4
    table = torch.randn(I, D, generator=gen, dtype=torch.float64)
    states = torch.randn(int(hl.sum()), D, generator=gen, dtype=torch.float64)
    targets = [3, 8, 1, 1, 5, 2]
    ids = targets[:2] + list(range(1, I)) + targets[2:]
    cand_ids = torch.tensor(ids)
    got, count = all_position_loss(states, table[cand_ids], cand_ids, hl, 0, catalogue=I - 1)
    logits = states @ table[1:].T
    want = F.cross_entropy(logits, torch.tensor(targets) - 1, reduction="sum")
    assert count == 6 and abs(float(got) - float(want)) < 1e-10
    # last=2: only each user's last two positions (rows 0-1, 3-4 and 5) carry a loss
    got2, count2 = all_position_loss(states, table[cand_ids], cand_ids, hl, 0, catalogue=I - 1, last=2)
    keep = torch.tensor([0, 1, 3, 4, 5])
    want2 = F.cross_entropy(logits[keep], torch.tensor(targets)[keep] - 1, reduction="sum")
    assert count2 == 5 and abs(float(got2) - float(want2)) < 1e-10
    # per_user with last=2: each user's mean over its kept rows, summed over the users
    got3, users = all_position_loss(states, table[cand_ids], cand_ids, hl, 0, catalogue=I - 1, last=2,
                                    per_user=True)
    rows = F.cross_entropy(logits[keep], torch.tensor(targets)[keep] - 1, reduction="none")
    want3 = rows[:2].mean() + rows[2:4].mean() + rows[4:].mean()
    assert users == 3 and abs(float(got3) - float(want3)) < 1e-10
    with pytest.raises(ValueError, match="not the catalogue"):
        all_position_loss(states, table[cand_ids], cand_ids.flip(0), hl, 0, catalogue=I - 1)
    with pytest.raises(ValueError, match="excludes sampled negatives"):
        all_position_loss(states, table[cand_ids], cand_ids, hl, 2, catalogue=I - 1)


def test_full_catalogue_batches_carry_the_catalogue_once_and_train(tmp_path):
    """train_negatives=0: each user's candidates are its targets; the catalogue follows the first user's
    once per batch; a trainer step on it runs and lowers the loss on a repeated batch."""
    root = _tiny_next_item_data(tmp_path)
    cfg = load_config(None, NEXT_ITEM_TINY + ALL_POS + [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}",
                                                        "next_item.train_negatives=0", "data.batch_size=4"])
    tr = make_trainer(cfg)
    try:
        I = tr.meta.num_items
        batch = next(iter(tr.loader.epoch(0)))
        hl, cl = batch.hist_lengths, batch.cand_lengths
        assert int(cl[0]) == int(hl[0]) + I - 1 and torch.equal(cl[1:], hl[1:])
        c0 = batch.features["cand_item"].values()[: int(cl[0])]
        assert c0[int(hl[0]):].tolist() == list(range(1, I))
        assert int(batch.labels.sum()) == int(hl.sum())
        losses = [float(tr.train_step(batch)["loss"]) for _ in range(4)]
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    finally:
        tr.close()


@pytest.mark.parametrize("max_len,last", [(0, 0), (6, 0), (0, 2)])
def test_loss_positions_per_batch_is_the_epoch_mean(tmp_path, max_len, last):
    root = _tiny_next_item_data(tmp_path)
    from solar_dist.data.schema import DatasetMeta

    seqs = Sequences.load(root)
    cfg = load_config(None, NEXT_ITEM_TINY + ALL_POS + [f"data.path={root}", "data.batch_size=4",
                                                        f"data.max_hist_len={max_len}",
                                                        f"next_item.loss_last_positions={last}"])
    n_train = seqs.num_train[seqs.num_train >= 2]
    lengths = np.minimum(n_train - 1, max_len) if max_len else n_train - 1
    want = float((np.minimum(lengths, last) if last else lengths).mean()) * 4
    for dp in (1, 2):  # the global batch: batch_size x dp users
        loader = NextItemLoader(seqs, DatasetMeta.load(root), cfg, dp_rank=0, dp_size=dp)
        assert loader.loss_positions_per_batch() == pytest.approx(want * dp)


def test_loss_weighting_position_user_and_batch_mean(tmp_path):
    """position divides a step's position-loss sum by the epoch's mean loss positions per batch, a constant (a
    position weighs the same in a batch of short users as in one of long users, whatever data.bucket_batches
    does); batch_mean by the step's own count; user sums each user's mean and divides by the users."""
    root = _tiny_next_item_data(tmp_path)
    sets = NEXT_ITEM_TINY + ALL_POS + [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}", "data.batch_size=4",
                                       "data.bucket_batches=2"]
    trainers = {w: make_trainer(load_config(None, sets + [f"next_item.loss_weighting={w}"]))
                for w in ("position", "batch_mean", "user")}
    try:
        ps, bm, us = trainers["position"], trainers["batch_mean"], trainers["user"]
        want = ps.loader.loss_positions_per_batch()
        for other in (bm, us):
            other.engine.module.load_state_dict(ps.engine.module.state_dict())
            other.dmp.load_state_dict(ps.dmp.state_dict())
        counts = []
        for batch in list(ps.loader.epoch(0))[:3]:
            losses = {}
            for w, tr in trainers.items():
                torch.manual_seed(0)  # the same dropout masks
                losses[w] = tr.batch_loss(batch, 1.0)
            (lp, n), (lb, nb), (lu, nu) = losses["position"], losses["batch_mean"], losses["user"]
            assert n == nb > 0 and nu == batch.batch_size
            assert float(lp.detach()) == pytest.approx(float(lb.detach()) * n / want, rel=1e-6)
            counts.append(n)
            # user: the per-user sum of the op (its per-user mean is checked against a direct computation in
            # test_all_position_loss_matches_direct_computation) over the batch's users
            torch.manual_seed(0)
            states, inp = us._states(batch)
            ni = us.cfg.next_item
            want_u, users = all_position_loss(states, inp["cand"].float(), batch.features[CAND_ITEM].values(),
                                              batch.hist_lengths, ni.train_negatives, per_user=True)
            assert users == batch.batch_size
            assert float(lu.detach()) == pytest.approx(float(want_u) / users, rel=1e-6)
        assert len(set(counts)) > 1, "the batches should differ in loss positions for this test to mean much"
    finally:
        for tr in trainers.values():
            tr.close()


def test_all_position_states_do_not_depend_on_the_future(tmp_path):
    """Through the trainer's DMP and DeepSpeed tower: rewriting a user's events after position t leaves the
    states of positions <= t unchanged; one training step and both protocols run end to end."""
    root = _tiny_next_item_data(tmp_path)
    cfg = load_config(None, NEXT_ITEM_TINY + ALL_POS + [f"data.path={root}", f"train.run_dir={tmp_path / 'run'}"])
    tr = make_trainer(cfg)
    try:
        assert tr.head == "states" and not hasattr(tr.engine.module, "scorer")
        seqs = tr.seqs
        users = np.array([j for j, m in enumerate(seqs.num_train) if m >= 12][:4])
        cuts = seqs.num_train[users] - 1
        tr.engine.eval()
        tr.dmp.eval()

        def states(sq):
            tr.loader.seqs = sq
            b = tr.loader.make_batch(users, cuts, np.random.default_rng(1))
            tr.loader.seqs = seqs
            with torch.no_grad():
                ec, ebc = tr.dmp(b.features, b.user_features)
                from solar_dist.model.solar import tower_inputs

                inp = tower_inputs(ec, ebc, b)
                return tr.engine(hist=inp["hist"], hist_lengths=b.hist_lengths, mode="states"), b.hist_lengths

        a, hl = states(seqs)
        t = 7
        changed = Sequences(seqs.user_ids, seqs.offsets, seqs.items.copy(), seqs.num_train)
        for j in users:
            s, e = seqs.offsets[j] + t + 1, seqs.offsets[j + 1]
            changed.items[s:e] = (changed.items[s:e] % 50) + 1
        b, _ = states(changed)
        keep = torch.cat([torch.arange(n) <= t for n in hl.tolist()])
        assert torch.equal(a[keep], b[keep])
        assert not torch.equal(a[~keep], b[~keep])
        out = tr.train_step(next(iter(tr.loader.epoch(0))))
        assert math.isfinite(out["loss"]) and out["candidates"] > 0
        m = tr.evaluate()
        for p in ("sampled100", "full"):
            assert 0 <= m[f"{p}_hr@10"] <= 1 and m[f"{p}_count"] == tr.eval_table.num_rows
    finally:
        tr.close()


def test_make_trainer_needs_converted_data(tmp_path):
    cfg = load_config(None, NEXT_ITEM_TINY + [f"data.path={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="solar data convert"):
        make_trainer(cfg)


# ---------------------------------------------------------------------------------------------- smoke
def _ml1m_subset(tmp_path: Path, users: int) -> Path:
    src = shared_data("ml-1m", "ml-1m.txt")
    sub = tmp_path / f"ml1m_{users}.txt"
    with open(src) as f:
        sub.write_text("".join(itertools.islice(f, users)))
    root = tmp_path / f"ml1m_{users}"
    convert("user_sequence_lines", sub, root, verbose=False)
    return root


def _smoke_cfg(root: Path, tmp_path: Path, extra=()):
    return load_config(None, [
        f"data.path={root}", f"train.run_dir={tmp_path / 'run'}", "data.task=next_item", "data.if_missing=error",
        "data.batch_size=64", "data.eval_batch_size=150", "data.max_hist_len=20", "embedding.dim=32",
        "embedding.lr=0.2", "model.rank=8", "model.depth=1", "model.recent_k=8", "model.scorer_hidden=[32]",
        "deepspeed.lr=0.01", "deepspeed.warmup_steps=0", "loss.bce_weight=0", "loss.listwise_weight=1",
        "next_item.train_negatives=32", "next_item.cut_points_per_user=8", "next_item.eval_protocols=[sampled100]",
        "train.epochs=2", "train.progress=false", *extra])


def test_ml1m_subset_smoke_learns(tmp_path):
    """Two short epochs (~37 steps each) on 300 ML-1M users: the loss falls and validation NDCG@10
    (sampled-100) rises well above the untrained model's. Beating most-popular needs more steps than a fast
    test allows on 2 CPU cores: see the slow test below."""
    root = _ml1m_subset(tmp_path, 300)
    tr = make_trainer(_smoke_cfg(root, tmp_path))
    try:
        before = tr.evaluate()["sampled100_ndcg@10"]
        summary = tr.fit()
    finally:
        tr.close()
    after = summary["final"]["sampled100_ndcg@10"]
    assert after > before + 0.05, (before, after)


def test_ml1m_subset_all_positions_learns(tmp_path):
    """Next-item training at every position (causal SVD tower): 5 epochs on 1,000 ML-1M users (75 steps)
    lift validation NDCG@10 (sampled-100) well above the untrained model's and above most-popular."""
    root = _ml1m_subset(tmp_path, 1000)
    tr = make_trainer(_smoke_cfg(root, tmp_path, [
        "next_item.train_mode=all_positions", "model.causal_window=8", "data.max_hist_len=50", "train.epochs=5",
        "embedding.lr=0.05", "deepspeed.lr=0.003", "next_item.eval_max_users=500"]))
    try:
        before = tr.evaluate()["sampled100_ndcg@10"]
        summary = tr.fit()
        after = tr.evaluate(max_users=0)["sampled100_ndcg@10"]  # every validation user, like the baseline
    finally:
        tr.close()
    pop = popularity_metrics(root, "valid", protocols=("sampled100",))["sampled100_ndcg@10"]
    assert summary["history"][-1]["sampled100_ndcg@10"] > before + 0.05
    assert after > pop + 0.02, (before, after, pop)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="known gap (2026-11-27): 6 epochs x 16 cut points (450 steps) reach "
                   "NDCG@10 0.219 vs most-popular 0.233; the next-item recipe (lr, negatives, cut-point "
                   "sampling) still needs tuning")
def test_ml1m_subset_beats_popularity(tmp_path):
    """Longer run (6 epochs x 16 cut points, 300 users): validation NDCG@10 (sampled-100) above most-popular."""
    root = _ml1m_subset(tmp_path, 300)
    pop = popularity_metrics(root, "valid", protocols=("sampled100",))
    tr = make_trainer(_smoke_cfg(root, tmp_path, ["train.epochs=6", "next_item.cut_points_per_user=16"]))
    try:
        summary = tr.fit()
    finally:
        tr.close()
    ndcg = summary["final"]["sampled100_ndcg@10"]
    assert ndcg > pop["sampled100_ndcg@10"], (ndcg, pop)
