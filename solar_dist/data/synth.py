"""Synthetic lifelong-behaviour data with known ground truth.

The generative model (all randomness from one seed):

1. **Items.** `num_topics` topics with centres c_k ~ N(0, I/d) in a `latent_dim`-dimensional space; item i
   belongs to topic t_i (uniform) and has latent vector e_i = c_{t_i} + 0.3·ε. Popularity follows a power law:
   items get a random popularity rank ρ_i and weight p_i ∝ ρ_i^(−popularity_exponent).
2. **Users.** Each user has `topics_per_user` interests, topics drawn ∝ topic popularity, with weights
   w ~ Dirichlet(2). The behaviour matrix of a user is therefore low-rank (a mixture of a few topic
   directions). The user's strongest interest is *early*: it appears only in the first
   `early_interest_fraction` of the history, the others throughout (a taste shown long ago that still
   decides what the user clicks). History lengths are log-uniform in [min_hist_len, max_hist_len]
   (tens to ≥ 10,000 events).
3. **Behaviours.** Event t of a user picks an active interest (the early one only before the cut, the others
   ∝ w after it) and then an item of that topic ∝ p_i.
4. **Requests.** Candidates: 40% from the user's interest topics (early one included), 30% ∝ popularity,
   30% uniform (interest candidates uniform within the topic, so popularity alone cannot find them). The click probability is
       P(click | u, i) = σ(affinity_weight · Σ_k T·w_k · relu(cos(c_k, e_i))³
                         + popularity_weight · zscore(log p_i) + base_logit),
   and the label is Bernoulli(P). The early interest drives clicks exactly as much as the others, so a model
   that sees only recent events cannot recover it; one that summarises the whole history can.

Every user has one training request; `valid_fraction` and `test_fraction` of the users (disjoint subsets)
also have a later held-out request: the same history, new candidates and labels — the next requests of known
users, as in production ranking (the user-id embedding is then meaningful). The Bayes AUC — the AUC of the
true probabilities against the sampled labels — is the ceiling any model can reach on these labels; it is
stored in meta.json (`stats.bayes_auc_<split>`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

import numpy as np

from ..config import SynthConfig
from .schema import DatasetMeta, write_split


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann–Whitney AUC with tie correction (average ranks). NaN when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class SyntheticWorld:
    """Items, topics and users of the generative model; `request` draws one user's request."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        d, K, I = cfg.latent_dim, cfg.num_topics, cfg.num_items
        self.centres = rng.normal(size=(K, d)) / np.sqrt(d)
        self.item_topic = rng.integers(0, K, size=I)
        self.item_vec = self.centres[self.item_topic] + 0.3 * rng.normal(size=(I, d)) / np.sqrt(d)
        rank = rng.permutation(I) + 1
        pop = rank.astype(np.float64) ** (-cfg.popularity_exponent)
        self.item_pop = pop / pop.sum()
        logp = np.log(self.item_pop)
        self.pop_z = (logp - logp.mean()) / logp.std()
        topic_pop = np.bincount(self.item_topic, weights=self.item_pop, minlength=K)
        self.topic_prob = topic_pop / topic_pop.sum()
        # per-topic item lists with within-topic CDFs for sampling ∝ popularity
        self.topic_items = [np.flatnonzero(self.item_topic == k) for k in range(K)]
        self.topic_cdf = []
        for items in self.topic_items:
            w = self.item_pop[items]
            self.topic_cdf.append(np.cumsum(w) / w.sum() if len(items) else np.zeros(0))
        unit = self.item_vec / np.linalg.norm(self.item_vec, axis=1, keepdims=True)
        cunit = self.centres / np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.item_topic_cos = np.maximum(unit @ cunit.T, 0.0) ** 3  # (I, K) relu(cos(c_k, e_i))^3
        self.pop_cdf = np.cumsum(self.item_pop)

    def _sample_in_topic(self, rng: np.random.Generator, topics: np.ndarray) -> np.ndarray:
        out = np.empty(len(topics), dtype=np.int64)
        for k in np.unique(topics):
            sel = np.flatnonzero(topics == k)
            items = self.topic_items[k]
            if len(items) == 0:  # an empty topic (tiny catalogues): fall back to popularity
                out[sel] = np.searchsorted(self.pop_cdf, rng.random(len(sel)) * self.pop_cdf[-1])
                continue
            idx = np.searchsorted(self.topic_cdf[k], rng.random(len(sel)) * self.topic_cdf[k][-1])
            out[sel] = items[np.minimum(idx, len(items) - 1)]
        return out

    def user(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        cfg = self.cfg
        T = cfg.topics_per_user
        topics = rng.choice(cfg.num_topics, size=T, replace=False, p=self.topic_prob)
        weights = rng.dirichlet(np.full(T, 2.0))
        weights[[0, int(np.argmax(weights))]] = weights[[int(np.argmax(weights)), 0]]  # early one = strongest
        lo, hi = np.log(cfg.min_hist_len), np.log(cfg.max_hist_len + 1)
        n = int(np.clip(np.exp(rng.uniform(lo, hi)), cfg.min_hist_len, cfg.max_hist_len))
        cut = int(round(cfg.early_interest_fraction * n)) if T >= 2 else 0
        late_w = weights[1:] / weights[1:].sum() if T >= 2 else weights
        late_topics = topics[1:] if T >= 2 else topics
        ev_topics = np.empty(n, dtype=np.int64)
        ev_topics[:cut] = topics[0]
        ev_topics[cut:] = rng.choice(late_topics, size=n - cut, p=late_w)
        return {"topics": topics, "weights": weights, "hist": self._sample_in_topic(rng, ev_topics)}

    def click_prob(self, user: Dict[str, np.ndarray], items: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        T = len(user["topics"])
        aff = (self.item_topic_cos[items][:, user["topics"]] * (T * user["weights"])).sum(axis=1)
        logit = cfg.affinity_weight * aff + cfg.popularity_weight * self.pop_z[items] + cfg.base_logit
        return 1.0 / (1.0 + np.exp(-logit))

    def candidates(self, rng: np.random.Generator, user: Dict[str, np.ndarray]) -> np.ndarray:
        M = self.cfg.num_candidates
        n_int = int(round(0.4 * M))
        n_pop = int(round(0.3 * M))
        n_uni = M - n_int - n_pop
        topics = rng.choice(user["topics"], size=n_int)
        c_int = np.array([self.topic_items[k][rng.integers(len(self.topic_items[k]))] if len(self.topic_items[k])
                          else rng.integers(self.cfg.num_items) for k in topics], dtype=np.int64)
        c_pop = np.minimum(np.searchsorted(self.pop_cdf, rng.random(n_pop) * self.pop_cdf[-1]),
                           self.cfg.num_items - 1)
        c_uni = rng.integers(0, self.cfg.num_items, size=n_uni)
        cand = np.concatenate([c_int, c_pop, c_uni])
        return cand[rng.permutation(M)]


def generate(cfg: SynthConfig, out: str | Path, verbose: bool = True) -> DatasetMeta:
    """Writes a synthetic data set (train/valid/test Parquet + meta.json) and returns its metadata."""
    t0 = time.time()
    world = SyntheticWorld(cfg)
    rng = np.random.default_rng([cfg.seed, 1])
    n = cfg.num_users
    split_of = rng.permutation(n)
    n_valid = int(round(cfg.valid_fraction * n))
    n_test = int(round(cfg.test_fraction * n))
    users_by_split = {
        "train": np.arange(n),
        "valid": np.sort(split_of[:n_valid]),
        "test": np.sort(split_of[n_valid: n_valid + n_test]),
    }
    stats: Dict[str, float] = {}
    hist_lengths = []
    pop_counts = np.zeros(cfg.num_items, dtype=np.int64)
    per_split = {}
    for split_index, split in enumerate(("train", "valid", "test")):
        cols: Dict[str, list] = {k: [] for k in ("user_id", "hist_item_ids", "cand_item_ids", "labels", "probs")}
        for uid in users_by_split[split]:
            user = world.user(np.random.default_rng([cfg.seed, 2, int(uid)]))  # same user in every split
            crng = np.random.default_rng([cfg.seed, 3, split_index, int(uid)])  # a new request per split
            cand = world.candidates(crng, user)
            p = world.click_prob(user, cand)
            y = (crng.random(len(p)) < p).astype(np.float32)
            cols["user_id"].append(int(uid))
            cols["hist_item_ids"].append(user["hist"])
            cols["cand_item_ids"].append(cand)
            cols["labels"].append(y)
            cols["probs"].append(p.astype(np.float32))
            if split == "train":
                hist_lengths.append(len(user["hist"]))
                np.add.at(pop_counts, user["hist"], 1)
        write_split(cols, out, split, cfg.rows_per_file)
        per_split[split] = cols
        probs = np.concatenate(cols["probs"]) if cols["probs"] else np.zeros(0)
        labels = np.concatenate(cols["labels"]) if cols["labels"] else np.zeros(0)
        stats[f"bayes_auc_{split}"] = binary_auc(probs, labels)
        stats[f"ctr_{split}"] = float(labels.mean()) if len(labels) else float("nan")
        stats[f"requests_{split}"] = float(len(cols["user_id"]))
    # popularity baseline: score a candidate by how often it appears in training histories
    for split in ("valid", "test"):
        cand = np.concatenate(per_split[split]["cand_item_ids"])
        labels = np.concatenate(per_split[split]["labels"])
        stats[f"popularity_auc_{split}"] = binary_auc(pop_counts[cand].astype(np.float64), labels)
    lengths = np.array(hist_lengths)
    stats.update(
        hist_len_min=float(lengths.min()), hist_len_median=float(np.median(lengths)),
        hist_len_mean=float(lengths.mean()), hist_len_max=float(lengths.max()),
        events=float(lengths.sum()), seconds=time.time() - t0,
    )
    meta = DatasetMeta(num_users=n, num_items=cfg.num_items, num_actions=1, source="synth", stats=stats)
    meta.save(out)
    if verbose:
        print(
            f"[synth] {n} users, {int(lengths.sum()):,} events (history length {int(lengths.min())}.."
            f"{int(lengths.max())}, median {int(np.median(lengths))}), {cfg.num_items} items -> {out}  "
            f"Bayes AUC (test) {stats['bayes_auc_test']:.4f}, popularity AUC {stats['popularity_auc_test']:.4f}"
            f"  [{stats['seconds']:.1f}s]"
        )
    return meta
