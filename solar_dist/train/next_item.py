"""Next-item (sequential recommendation) training and evaluation on leave-one-out data (data/convert.py).

Training (`data.task=next_item`): one sample per (user, cut point c) with the prefix e_1..e_c as history and
e_{c+1} as the target, c in 1..num_train-1 (the training sequence excludes the validation and test targets).
`next_item.cut_points_per_user` > 0 draws that many distinct cut points per user per epoch (all prefixes
together are O(N^2) events). The candidates are the target plus `train_negatives` sampled items (uniform
over the catalogue or proportional to training popularity; the target itself is excluded, other history
items are not), or the whole catalogue when `train_negatives=0`. The loss is the trainer's: configure
`loss.listwise_weight` (softmax cross-entropy over the candidate set, the next-item loss) and/or BCE.

`next_item.train_mode=all_positions` (SASRec-style, svd_attention.md §7): one sample per user per epoch, its
training sequence (the last `data.max_hist_len`+1 events of it when set); the causal tower (model/tower.py,
ops/causal.py) gives a state at every position t, which scores the next event e_{t+1} against
`train_negatives` items sampled per user (shared by the user's positions; a negative equal to a position's
target is masked out for that position) by dot products with the item embeddings, or against the whole
catalogue (`train_negatives=0`); the loss, averaged over every position of the batch, is `loss.listwise_weight`
x softmax cross-entropy (SASRec+) + `loss.bce_weight` x binary cross-entropy (SASRec's objective; sampled
negatives only). Evaluation scores candidates with the state of the last history position. One pass per user
trains every position, instead of one prefix per sample.

Causality (svd_attention.md §7): a sample's history is exactly the prefix before its target, so the interests
and the recent window are computed from events strictly before the target; tests/train/test_next_item.py
checks that no target ever reaches its own history.

Evaluation, both published protocols, on the split's rows (validation: history e_1..e_{n-2}, target
e_{n-1}; test: history e_1..e_{n-1}, target e_n):
  sampled100  the candidates stored by the converter: the target + 100 items the user never interacted with
              (uniform, seeded) -> HR@10, NDCG@10 (and MRR over the 101).
  full        the target ranked among every item 1..num_items-1, excluding the items of the row's history
              (other than the target itself), as is standard -> HR@10, NDCG@10, MRR. Items are scored in
              chunks of at most `next_item.eval_chunk_pairs` (user, item) pairs per forward call.
Ties count against the target (rank = number of other candidates scoring >= the target), so a constant
model scores zero rather than being lucky.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from ..config import SolarConfig
from ..data.batch import CAND_ITEM, Batch, collate
from ..data.loader import BatchPlan, LoaderPosition, LoaderState, _prefetch, eval_loader
from ..data.schema import DatasetMeta, dataset_exists, read_split
from ..data.sequences import SEQUENCES, Sequences
from ..model.jagged import jagged_to_padded, segment_ids
from ..model.losses import catalogue_logsumexp
from ..model.solar import tower_head, tower_inputs
from .ranking import dense_target_ranks, jagged_target_ranks, metric_sums, rank_metrics, sums_to_metrics
from .trainer import Trainer

__all__ = ["NegativeSampler", "NextItemLoader", "NextItemTrainer", "Sequences", "all_position_loss", "make_trainer",
           "popularity_metrics", "rank_metrics", "jagged_target_ranks", "dense_target_ranks"]


class NegativeSampler:
    """Items in [1, num_items) drawn uniformly or by training popularity; never the row's own target."""

    def __init__(self, num_items: int, kind: str = "uniform", counts: Optional[np.ndarray] = None) -> None:
        if num_items < 3:
            raise ValueError(f"num_items={num_items}: need at least two real items to sample negatives")
        self.num_items, self.kind = num_items, kind
        if kind == "popularity":
            if counts is None:
                raise ValueError("popularity sampling needs item counts")
            p = np.asarray(counts, dtype=np.float64).copy()
            p[0] = 0.0
            if p.sum() <= 0:
                raise ValueError("popularity sampling: every item count is zero")
            self.cdf = np.cumsum(p) / p.sum()
        elif kind != "uniform":
            raise ValueError(f"negative_sampler={kind!r}; choose uniform or popularity")

    def draw(self, shape, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "uniform":
            return rng.integers(1, self.num_items, size=shape)
        return np.minimum(np.searchsorted(self.cdf, rng.random(size=shape), side="right"), self.num_items - 1)

    def sample(self, targets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """(B, n) negatives; entries equal to the row's target are redrawn until none is left."""
        out = self.draw((len(targets), n), rng)
        bad = out == targets[:, None]
        for _ in range(1000):
            if not bad.any():
                return out
            out[bad] = self.draw(int(bad.sum()), rng)
            bad = out == targets[:, None]
        raise RuntimeError("could not draw negatives different from the targets (catalogue too small?)")


def _list_array(values: np.ndarray, lengths: np.ndarray, dtype=np.int64) -> pa.Array:
    """Flat `values` cut into lists of `lengths` (int64 ids by default; np.float32 for labels)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values).astype(dtype)))


def _with_candidates(base: pa.Table, cands: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> pa.Table:
    """`base` (requests without candidates) with the given candidate lists and their labels appended."""
    return base.append_column("cand_item_ids", _list_array(cands, lengths)).append_column(
        "labels", _list_array(labels, lengths, np.float32))


class NextItemLoader(LoaderPosition):
    """Training batches of (prefix history, target + negatives) samples, deterministic in (seed, epoch, step):
    the same interface as ArrowLoader (epoch(), len(), state_dict(), plan), so Trainer.fit drives it."""

    def __init__(self, seqs: Sequences, meta: DatasetMeta, cfg: SolarConfig, dp_rank: int = 0, dp_size: int = 1
                 ) -> None:
        self.seqs, self.meta, self.cfg = seqs, meta, cfg
        self.ni, self.d = cfg.next_item, cfg.data
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = cfg.train.seed
        self.max_hist_len = self.d.max_hist_len
        self.use_actions = cfg.embedding.use_actions and seqs.action is not None
        self.all_positions = self.ni.train_mode == "all_positions"
        counts = seqs.train_item_counts(meta.num_items)
        self.sampler = NegativeSampler(meta.num_items, self.ni.negative_sampler, counts)
        self.state = LoaderState()
        self._epoch_cache: Optional[tuple[int, np.ndarray, np.ndarray, BatchPlan]] = None
        self.plan = self._epoch_samples(0)[2]

    def _epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray, BatchPlan]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1:]  # type: ignore[return-value]
        rng = np.random.default_rng([self.seed, epoch, 1])
        if self.all_positions:  # every user with at least one (history, next event) pair; cut = whole prefix
            users = np.flatnonzero(self.seqs.num_train >= 2).astype(np.int64)
            cuts = self.seqs.num_train[users] - 1  # positions 0..cut-1 predict events 1..cut
        else:
            users, cuts = self.seqs.cut_points(self.ni.cut_points_per_user, rng)
        lengths = np.minimum(cuts, self.max_hist_len) if self.max_hist_len else cuts
        plan = BatchPlan(lengths, self.d.batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
                         shuffle=self.d.shuffle, seed=self.seed, bucket_batches=self.d.bucket_batches)
        self._epoch_cache = (epoch, users, cuts, plan)
        return users, cuts, plan

    def loss_positions_per_batch(self) -> float:
        """All-position training: the mean number of positions that carry a loss in one global batch
        (batch_size x dp users), over every sample of the epoch. `next_item.loss_weighting=position` divides
        each step's loss sum by it. The same every epoch: all_positions uses every user's whole prefix."""
        lengths = self.plan.hist_lengths
        last = self.ni.loss_last_positions
        per_user = np.minimum(lengths, last) if last else lengths
        return float(per_user.mean()) * self.d.batch_size * self.dp_size if len(per_user) else 0.0

    def make_batch(self, users: np.ndarray, cuts: np.ndarray, rng: np.random.Generator) -> Batch:
        s = self.seqs
        start = s.offsets[users]
        lo = start + (np.maximum(cuts - self.max_hist_len, 0) if self.max_hist_len else 0)
        hi = start + cuts
        idx = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
        hist_len = hi - lo
        targets = s.items[hi]
        n = self.ni.train_negatives
        if self.all_positions:
            # candidates of a user: the next event of each history position, then n negatives for all of them
            tgt = s.items[idx + 1]
            if n == 0:  # full catalogue: every user's targets; the catalogue once, after the first user's
                cat = np.arange(1, self.meta.num_items)
                cands = np.concatenate([tgt[: hist_len[0]], cat, tgt[hist_len[0]:]])
                labels = np.r_[np.ones(hist_len[0], np.float32), np.zeros(len(cat), np.float32),
                               np.ones(len(tgt) - hist_len[0], np.float32)]
                cl = hist_len.copy()
                cl[0] += len(cat)
            else:
                negs = self.sampler.draw((len(users), n), rng)
                offs = np.r_[0, np.cumsum(hist_len)]
                cands = np.concatenate([np.concatenate([tgt[a:b], g])
                                        for a, b, g in zip(offs[:-1], offs[1:], negs)])
                labels = np.concatenate([np.r_[np.ones(m, np.float32), np.zeros(n, np.float32)] for m in hist_len])
                cl = hist_len + n
        else:
            if n > 0:
                cands = np.concatenate([targets[:, None], self.sampler.sample(targets, n, rng)], axis=1)
                labels = np.zeros(cands.shape, dtype=np.float32)
                labels[:, 0] = 1.0
            else:  # the whole catalogue (ids 1..num_items-1)
                cat = np.arange(1, self.meta.num_items)
                cands = np.broadcast_to(cat, (len(users), len(cat)))
                labels = (cands == targets[:, None]).astype(np.float32)
            cl = np.full(len(users), cands.shape[1])
        cols = {"user_id": pa.array(s.user_ids[users]), "hist_item_ids": _list_array(s.items[idx], hist_len),
                "cand_item_ids": _list_array(cands.reshape(-1), cl),
                "labels": _list_array(labels.reshape(-1), cl, np.float32)}
        if s.ts is not None:
            cols["hist_ts"] = _list_array(s.ts[idx], hist_len)
        if self.use_actions:
            cols["hist_action"] = _list_array(s.action[idx], hist_len)
        return collate(pa.table(cols))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        users, cuts, plan = self._epoch_samples(epoch)
        self.plan = plan
        start = self.state.step if epoch == self.state.epoch else 0
        self.state = LoaderState(epoch=epoch, step=start)
        batches = plan.global_batches(epoch)

        def gen():
            for step in range(start, len(batches)):
                rows = plan.rank_slice(batches[step])
                rng = np.random.default_rng([self.seed, epoch, step, self.dp_rank, 2])
                yield self.make_batch(users[rows], cuts[rows], rng)

        for batch in _prefetch(gen(), self.d.prefetch_batches):
            self.state.step += 1
            yield batch


# ------------------------------------------------------------------------------------ all-position loss
def all_position_loss(states: torch.Tensor, cand: torch.Tensor, cand_ids: torch.Tensor,
                      hist_lengths: torch.Tensor, num_negatives: int, share: bool = False, catalogue: int = 0,
                      last: int = 0, listwise_weight: float = 1.0, bce_weight: float = 0.0,
                      per_user: bool = False) -> tuple[torch.Tensor, int]:
    """Loss of every position's next event against sampled negatives or the whole catalogue.

    Per position: `listwise_weight` x softmax cross-entropy of the target among the negatives (SASRec+) plus
    `bce_weight` x binary cross-entropy, -log sigmoid(target) - mean over the negatives of log(1 - sigmoid(neg))
    (SASRec's objective, which draws one negative per position; here the mean over the position's negatives
    keeps the target and the negatives equally weighted whatever their count). BCE needs sampled negatives.

    states (T, D): causal states, jagged by hist_lengths (B,). cand (Tc, D) / cand_ids (Tc,): per user its
    hist_length targets (target of position t = the event after t) followed by `num_negatives` negatives.
    `share=False`: a position's softmax holds its user's negatives; `share=True`: the negatives of every user
    of the batch (B·num_negatives per position, closer to a full-catalogue softmax at the same lookups).
    A negative equal to a position's target is left out of that position's softmax.
    `catalogue` > 0 (num_negatives = 0): the first user's targets are followed by the `catalogue` item
    embeddings (ids 1..catalogue, as NextItemLoader writes them), and every position's softmax runs over all
    of them (SASRec+'s full cross-entropy; the target is one of them). `last` > 0: only each user's last
    `last` positions contribute (older ones still shape the states through the causal tower). Returns (sum
    of the per-position losses, number of positions that contribute), or with `per_user` (sum over users of
    the mean loss of their contributing positions, number of users with such a position)."""
    B = hist_lengths.numel()
    S = num_negatives
    T = states.shape[0]
    hl = hist_lengths.long()
    if int(hl.sum()) != T:
        raise ValueError(f"states has {T} rows but hist_lengths sum to {int(hl.sum())}")
    if catalogue and (S or share):
        raise ValueError(f"catalogue={catalogue} (full softmax) excludes sampled negatives; got num_negatives={S}"
                         f", share={share}")
    if listwise_weight < 0 or bce_weight < 0 or listwise_weight + bce_weight == 0:
        raise ValueError(f"listwise_weight={listwise_weight} and bce_weight={bce_weight} must be >= 0, not both 0")
    if bce_weight and not S:  # catalogue > 0 implies S = 0 (checked above)
        raise ValueError(f"bce_weight={bce_weight} needs sampled negatives; num_negatives=0" +
                         (f" (catalogue={catalogue} is the full softmax, listwise only)" if catalogue else ""))
    cl = hl + S
    if catalogue and B:
        cl[0] += catalogue
    if int(cl.sum()) != cand.shape[0]:
        raise ValueError(f"cand has {cand.shape[0]} rows; expected sum(hist_lengths + num_negatives) "
                         f"+ catalogue = {int(cl.sum())}")
    seg = segment_ids(hl)
    h_off = torch.cumsum(hl, 0) - hl
    c_off = torch.cumsum(cl, 0) - cl
    within = torch.arange(T, device=hl.device) - h_off[seg]                             # position in its user
    tgt_idx = c_off[seg] + within
    keep = within >= (hl[seg] - last) if last else None                                  # positions with a loss
    if catalogue:
        lo = int(hl[0]) if B else 0
        if B and not bool((cand_ids[lo: lo + catalogue] == torch.arange(1, catalogue + 1, device=hl.device)).all()):
            raise ValueError(f"cand_ids after the first user's {lo} targets are not the catalogue 1..{catalogue}")
        if keep is not None:
            states, tgt_idx = states[keep], tgt_idx[keep]
        pos = (states * cand[tgt_idx]).sum(-1)
        loss = listwise_weight * (catalogue_logsumexp(states, cand[lo: lo + catalogue]) - pos)
        return _reduce(loss, seg if keep is None else seg[keep], B, per_user)
    pos = (states * cand[tgt_idx]).sum(-1)                                               # (T,)
    neg_idx = (c_off + hl)[:, None] + torch.arange(S, device=hl.device)[None, :]        # (B, S)
    if share:
        pool = neg_idx.reshape(-1)
        neg = states @ cand[pool].T                                                      # (T, B*S)
        clash = cand_ids[pool][None, :] == cand_ids[tgt_idx][:, None]
    else:
        padded, mask = jagged_to_padded(states, hl)                                      # (B, N, D)
        neg = torch.bmm(padded, cand[neg_idx].transpose(1, 2))[mask]                     # (T, S)
        clash = cand_ids[neg_idx][seg] == cand_ids[tgt_idx][:, None]
    loss = pos.new_zeros(pos.shape)
    if listwise_weight:
        loss = loss + listwise_weight * (
            torch.logsumexp(torch.cat([pos[:, None], neg.masked_fill(clash, float("-inf"))], 1), 1) - pos)
    if bce_weight:
        valid = (~clash).to(neg.dtype)
        neg_term = (F.softplus(neg) * valid).sum(1) / valid.sum(1).clamp(min=1.0)
        loss = loss + bce_weight * (F.softplus(-pos) + neg_term)
    if keep is not None:
        return _reduce(loss[keep], seg[keep], B, per_user)
    return _reduce(loss, seg, B, per_user)


def _reduce(loss: torch.Tensor, seg: torch.Tensor, B: int, per_user: bool) -> tuple[torch.Tensor, int]:
    """(sum of the position losses, their count), or per user: (sum of each user's mean, users counted)."""
    if not per_user:
        return loss.sum(), int(loss.numel())
    n = torch.bincount(seg, minlength=B).to(loss.dtype)
    return (loss / n[seg]).sum(), int((n > 0).sum())


# ---------------------------------------------------------------------------------------------- trainer
def _subset(table: pa.Table, max_users: int, seed: int = 0) -> pa.Table:
    if not max_users or table.num_rows <= max_users:
        return table
    rows = np.sort(np.random.default_rng([seed, 99]).choice(table.num_rows, size=max_users, replace=False))
    return table.take(pa.array(rows))


class NextItemTrainer(Trainer):
    """Trainer with next-item samples and retrieval evaluation; reuses the DMP, the DeepSpeed engine,
    train_step, forward, checkpoints and fit() of Trainer unchanged."""

    def __init__(self, cfg: SolarConfig, layout=None) -> None:
        if cfg.data.task != "next_item":
            raise ValueError(f"NextItemTrainer needs data.task=next_item (got {cfg.data.task!r})")
        path = Path(cfg.data.path)
        if not dataset_exists(path) or not (path / SEQUENCES).is_file():
            raise FileNotFoundError(
                f"data.path={str(path)!r} holds no converted next-item data set (meta.json, {SEQUENCES}, "
                f"train/valid/test); create it with `solar data convert FORMAT INPUT {path}`")
        super().__init__(cfg, layout)
        self.seqs = Sequences.load(path)
        self.loader = NextItemLoader(self.seqs, self.meta, cfg, self.layout.dp_rank, self.layout.dp)
        if cfg.model.set_layer and "full" in cfg.next_item.eval_protocols:
            raise ValueError("next_item.eval_protocols has 'full' but model.set_layer=true makes a candidate's "
                             "score depend on the other candidates; full-catalogue ranking needs set_layer=false")
        self._tables: Dict[str, pa.Table] = {}
        self.head = tower_head(cfg)

    # ------------------------------------------------------------------------ all-position training
    def batch_loss(self, batch: Batch, world: float) -> tuple[torch.Tensor, float]:
        """The states head: `all_position_loss` of every rank's batch, weighed by `next_item.loss_weighting`:
        position (the sum over positions / the epoch's mean positions per global batch), user (the sum of each
        user's mean / the users of the global batch) or batch_mean (the sum / this global batch's positions).
        The ranking head keeps Trainer's loss."""
        if self.head != "states":
            return super().batch_loss(batch, world)
        states, inp = self._states(batch, grad_scale=1.0 / world)
        ni, lc = self.cfg.next_item, self.cfg.loss
        loss_sum, count = all_position_loss(states, inp["cand"].float(), batch.features[CAND_ITEM].values(),
                                            batch.hist_lengths, ni.train_negatives, share=ni.share_negatives,
                                            catalogue=0 if ni.train_negatives else self.meta.num_items - 1,
                                            last=ni.loss_last_positions, listwise_weight=lc.listwise_weight,
                                            bce_weight=lc.bce_weight, per_user=ni.loss_weighting == "user")
        (n,) = self._global(count)
        denom = self.loader.loss_positions_per_batch() if ni.loss_weighting == "position" else n
        return loss_sum / max(denom, 1.0), n

    def _states(self, batch: Batch, grad_scale: float = 1.0) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Causal states (T, D) of every history position (float32), and the tower inputs (the candidates'
        embeddings among them)."""
        ec_out, ebc_out = self.dmp(batch.features, batch.user_features)
        inp = tower_inputs(ec_out, ebc_out, batch, grad_scale=grad_scale, dtype=self.dtype)
        return self.engine(hist=inp["hist"], hist_lengths=batch.hist_lengths, mode="states").float(), inp

    def _last_states(self, batch: Batch) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(B, D) state of each request's last history position (zero for an empty history), and the tower
        inputs (for the candidates' embeddings)."""
        states, inp = self._states(batch)
        hl = batch.hist_lengths.long()
        last = torch.zeros(hl.numel(), states.shape[1], dtype=states.dtype, device=states.device)
        has = hl > 0
        last[has] = states[(torch.cumsum(hl, 0) - 1)[has]]
        return last, inp

    def score(self, batch: Batch) -> torch.Tensor:
        """Logits of the batch's candidates (jagged by cand_lengths), whichever head the tower has."""
        if self.head != "states":
            return self.forward(batch)
        last, inp = self._last_states(batch)
        seg = segment_ids(batch.cand_lengths.long())
        return (inp["cand"].float() * last[seg]).sum(-1)

    def _item_embeddings(self) -> torch.Tensor:
        """(num_items, D) embeddings of every item id (row 0 = padding), looked up through the sharded table
        (one request whose candidates are the whole catalogue)."""
        I = self.meta.num_items
        base = pa.table({"user_id": pa.array([int(self.seqs.user_ids[0])]),
                         "hist_item_ids": _list_array(np.array([1]), np.array([1]))})
        batch = collate(_with_candidates(base, np.arange(I), np.array([I]), np.zeros(I))).to(self.layout.device)
        ec_out, ebc_out = self.dmp(batch.features, batch.user_features)
        return tower_inputs(ec_out, ebc_out, batch, dtype=self.dtype)["cand"].float()

    def split_table(self, split: str) -> pa.Table:
        if split == self.cfg.eval.split:
            return self.eval_table
        if split not in self._tables:
            self._tables[split] = read_split(self.cfg.data.path, split, self.meta)
        return self._tables[split]

    # ------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, table: Optional[pa.Table] = None, max_batches: Optional[int] = None, *,
                 split: Optional[str] = None, protocols: Optional[Sequence[str]] = None,
                 max_users: Optional[int] = None) -> Dict[str, float]:
        """Metrics `<protocol>_hr@k`, `<protocol>_ndcg@k`, `<protocol>_mrr` for each protocol. Default: the
        configured eval split, limited to `next_item.eval_max_users` users (the per-epoch validation)."""
        ni = self.cfg.next_item
        if table is None:
            table = self.split_table(split) if split else self.eval_table
            table = _subset(table, ni.eval_max_users if max_users is None else max_users)
        elif max_users:
            table = _subset(table, max_users)
        self.engine.eval()
        self.dmp.eval()
        out: Dict[str, float] = {}
        for proto in (protocols or ni.eval_protocols):
            t0 = time.time()
            sums = torch.zeros(4, dtype=torch.float64)
            for _, ranks in self._ranks(table, proto, max_batches):
                sums += metric_sums(ranks, ni.topk)
            m = sums_to_metrics(self._global(*sums), ni.topk)
            out.update({f"{proto}_{k}": v for k, v in m.items()})
            out[f"{proto}_seconds"] = time.time() - t0
        return out

    @torch.no_grad()
    def user_ranks(self, table: pa.Table, protocol: str) -> tuple[np.ndarray, np.ndarray]:
        """(user ids, target ranks) of this rank's rows of `table` under `protocol`: the per-user numbers that
        `evaluate` sums, for paired comparisons of two models on the same users (tools/paired_eval.py). A rank
        is the number of other candidates scoring >= the target."""
        self.engine.eval()
        self.dmp.eval()
        uids, ranks = [], []
        for u, r in self._ranks(table, protocol, None):
            uids.append(np.asarray(u, dtype=np.int64))
            ranks.append(r.numpy())
        if not uids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(uids), np.concatenate(ranks)

    def _ranks(self, table: pa.Table, protocol: str, max_batches: Optional[int]):
        """Yields (user ids, target ranks) per batch of this rank's rows."""
        if protocol == "sampled100":
            return self._ranks_sampled(table, max_batches)
        if protocol == "full":
            return self._ranks_full(_subset(table, self.cfg.next_item.full_max_users), max_batches)
        raise ValueError(f"unknown protocol {protocol!r}")

    def _ranks_sampled(self, table: pa.Table, max_batches: Optional[int]):
        cfg, L, ni = self.cfg, self.layout, self.cfg.next_item
        ncand = pc.list_value_length(table.column("cand_item_ids")).to_numpy(zero_copy_only=False)
        if len(ncand) and int(ncand.max()) != ni.eval_negatives + 1:
            raise ValueError(f"the split's rows hold up to {int(ncand.max())} candidates but next_item.eval_negatives="
                             f"{ni.eval_negatives}; re-run `solar data convert ... --eval-negatives "
                             f"{ni.eval_negatives}` or set next_item.eval_negatives={int(ncand.max()) - 1}")
        loader = eval_loader(table, cfg.data.eval_batch_size, L.dp_rank, L.dp, cfg.data.max_hist_len, 0)
        for i, batch in enumerate(loader.epoch(0)):
            if max_batches and i >= max_batches:
                break
            logits = self.score(batch.to(L.device)).cpu()
            yield batch.user_ids.cpu(), jagged_target_ranks(logits, batch.labels, batch.cand_lengths)

    def _ranks_full(self, table: pa.Table, max_batches: Optional[int]):
        cfg, L, ni = self.cfg, self.layout, self.cfg.next_item
        I = self.meta.num_items
        bu = max(1, min(cfg.data.eval_batch_size, ni.eval_chunk_pairs))
        chunk = max(1, ni.eval_chunk_pairs // bu)
        items = self._item_embeddings() if self.head == "states" else None
        # this rank's rows (same split as eval_loader), in length-sorted order to cut padding
        plan = BatchPlan(pc.list_value_length(table.column("hist_item_ids")).to_numpy(zero_copy_only=False), bu,
                         dp_rank=L.dp_rank, dp_size=L.dp, shuffle=False, drop_last=False, bucket_batches=8)
        for i, rows in enumerate(plan.rank_slice(b) for b in plan.global_batches(0)):
            if max_batches and i >= max_batches:
                break
            if len(rows) == 0:
                continue
            sub = table.take(pa.array(rows))
            B = sub.num_rows
            cands = sub.column("cand_item_ids").to_pylist()
            labels = sub.column("labels").to_pylist()
            target = torch.tensor([c[int(np.argmax(lab))] for c, lab in zip(cands, labels)])
            base = sub.drop_columns(["cand_item_ids", "labels"])
            if items is not None:  # dot-product head: one state per user against every item embedding
                one = _with_candidates(base, target.numpy(), np.ones(B), np.ones(B))
                last, _ = self._last_states(collate(one, max_hist_len=cfg.data.max_hist_len).to(L.device))
                scores = (last @ items.T).cpu()
                scores[:, 0] = float("-inf")
            else:  # target-aware head: every item is a candidate, scored in chunks
                scores = torch.full((B, I), float("-inf"))
                for lo in range(1, I, chunk):
                    hi = min(I, lo + chunk)
                    n = hi - lo
                    t = _with_candidates(base, np.tile(np.arange(lo, hi), B), np.full(B, n), np.zeros(B * n))
                    batch = collate(t, max_hist_len=cfg.data.max_hist_len)
                    scores[:, lo:hi] = self.forward(batch.to(L.device)).float().cpu().view(B, n)
            exclude = torch.zeros(B, I, dtype=torch.bool)
            exclude[:, 0] = True  # padding id
            hist = sub.column("hist_item_ids").combine_chunks()
            hl = np.diff(hist.offsets.to_numpy())
            hv = hist.values.to_numpy(zero_copy_only=False)[hist.offsets.to_numpy()[0]: hist.offsets.to_numpy()[-1]]
            exclude[torch.from_numpy(np.repeat(np.arange(B), hl)), torch.from_numpy(hv.astype(np.int64))] = True
            yield sub.column("user_id").to_numpy(), dense_target_ranks(scores, target, exclude)


def popularity_metrics(root: str | Path, split: str = "test", protocols: Sequence[str] = ("sampled100", "full"),
                       k: int = 10) -> Dict[str, float]:
    """The most-popular baseline (training-prefix counts) under the same protocols and tie rule."""
    meta = DatasetMeta.load(root)
    seqs = Sequences.load(root)
    pop = torch.from_numpy(seqs.train_item_counts(meta.num_items))
    # break ties between equally popular items by a fixed tiny jitter, not in the target's favour or against it
    pop = pop + torch.from_numpy(np.random.default_rng(0).random(meta.num_items)) * 1e-3
    table = read_split(root, split, meta)
    out: Dict[str, float] = {}
    cands = table.column("cand_item_ids").combine_chunks()
    cl = torch.from_numpy(np.diff(cands.offsets.to_numpy()).astype(np.int64))
    cv = torch.from_numpy(cands.values.to_numpy(zero_copy_only=False).astype(np.int64))
    labels = torch.from_numpy(table.column("labels").combine_chunks().values.to_numpy(zero_copy_only=False).copy())
    if "sampled100" in protocols:
        m = rank_metrics(jagged_target_ranks(pop[cv], labels, cl), k)
        out.update({f"sampled100_{n}": v for n, v in m.items()})
    if "full" in protocols:
        seg = segment_ids(cl)
        target = torch.zeros(len(cl), dtype=torch.long).index_add(0, seg, torch.where(labels > 0.5, cv, 0))
        hist = table.column("hist_item_ids").combine_chunks()
        hl = np.diff(hist.offsets.to_numpy())
        hv = hist.values.to_numpy(zero_copy_only=False).astype(np.int64)
        ranks = []
        for s in range(0, len(cl), 512):
            e = min(len(cl), s + 512)
            B = e - s
            exclude = torch.zeros(B, meta.num_items, dtype=torch.bool)
            exclude[:, 0] = True
            o = hist.offsets.to_numpy()
            exclude[torch.from_numpy(np.repeat(np.arange(B), hl[s:e])), torch.from_numpy(hv[o[s]: o[e]])] = True
            ranks.append(dense_target_ranks(pop[None, :].expand(B, -1), target[s:e], exclude))
        m = rank_metrics(torch.cat(ranks), k)
        out.update({f"full_{n}": v for n, v in m.items()})
    return out


def make_trainer(cfg: SolarConfig, layout=None) -> Trainer:
    """The trainer for `cfg`: NextItemTrainer when data.task=next_item, else the ranking Trainer."""
    if cfg.data.task == "next_item":
        return NextItemTrainer(cfg, layout)
    return Trainer(cfg, layout)
