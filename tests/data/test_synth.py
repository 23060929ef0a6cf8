"""The synthetic generator: the statistics it promises (power-law popularity, low-rank users, long histories,
early interests that drive clicks) and a Bayes AUC that really is the ceiling."""
import numpy as np
import pytest

from solar_dist.config import SynthConfig
from solar_dist.data.schema import DatasetMeta, read_split
from solar_dist.data.synth import SyntheticWorld, binary_auc, generate


def test_binary_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert binary_auc(s, y) == pytest.approx(pairwise, abs=1e-12)
    assert np.isnan(binary_auc(s, np.zeros(200)))


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(SynthConfig(num_items=5000, num_topics=20, latent_dim=16, seed=3))


def test_popularity_is_power_law(world):
    p = np.sort(world.item_pop)[::-1]
    ranks = np.arange(1, len(p) + 1)
    slope = np.polyfit(np.log(ranks[:2000]), np.log(p[:2000]), 1)[0]
    assert slope == pytest.approx(-world.cfg.popularity_exponent, abs=0.05)


def test_histories_are_low_rank_and_long(world):
    rng = np.random.default_rng(1)
    lengths, ranks = [], []
    for _ in range(300):
        u = world.user(rng)
        lengths.append(len(u["hist"]))
        H = world.item_vec[u["hist"]]
        s = np.linalg.svd(H, compute_uv=False)
        energy = np.cumsum(s**2) / np.sum(s**2)
        ranks.append(int(np.searchsorted(energy, 0.9) + 1))
    assert min(lengths) >= 20 and max(lengths) >= 5000 and np.median(lengths) < 2000
    # a user mixes `topics_per_user` topic directions: 90% of the energy in a handful of components
    assert np.median(ranks) <= world.cfg.topics_per_user + 2


def test_early_interest_only_early_and_still_drives_clicks(world):
    rng = np.random.default_rng(2)
    for _ in range(50):
        u = world.user(rng)
        n = len(u["hist"])
        cut = int(round(world.cfg.early_interest_fraction * n))
        topics = world.item_topic[u["hist"]]
        early = u["topics"][0]
        assert (topics[:cut] == early).all()
        assert not (topics[cut:] == early).any()
        items_early = world.topic_items[early][:20]
        other = np.setdiff1d(np.arange(world.cfg.num_items), np.concatenate([world.topic_items[t] for t in u["topics"]]))[:200]
        assert world.click_prob(u, items_early).mean() > 2 * world.click_prob(u, other).mean()


def test_generate_writes_valid_splits_and_reports_auc(tmp_path):
    cfg = SynthConfig(num_users=200, num_items=800, num_topics=10, min_hist_len=10, max_hist_len=300,
                      num_candidates=20, rows_per_file=64, seed=5)
    meta = generate(cfg, tmp_path, verbose=False)
    assert DatasetMeta.load(tmp_path) == meta
    users = {}
    for split in ("train", "valid", "test"):
        t = read_split(tmp_path, split)
        users[split] = set(t.column("user_id").to_pylist())
        probs = np.concatenate(t.column("probs").to_pylist())
        labels = np.concatenate(t.column("labels").to_pylist())
        assert meta.stats[f"bayes_auc_{split}"] == pytest.approx(binary_auc(probs, labels))
    # every user trains; held-out requests are new requests of disjoint subsets of those users
    assert users["train"] == set(range(200))
    assert users["valid"] <= users["train"] and users["test"] <= users["train"]
    assert not (users["valid"] & users["test"]) and len(users["valid"]) == len(users["test"]) == 30
    tr, te = read_split(tmp_path, "train"), read_split(tmp_path, "test")
    u = sorted(users["test"])[0]
    row_tr = tr.column("user_id").to_pylist().index(u)
    row_te = te.column("user_id").to_pylist().index(u)
    assert tr.column("hist_item_ids")[row_tr] == te.column("hist_item_ids")[row_te]
    assert tr.column("cand_item_ids")[row_tr] != te.column("cand_item_ids")[row_te]
    # the ground truth beats popularity, and both beat chance
    assert meta.stats["bayes_auc_test"] > meta.stats["popularity_auc_test"] + 0.1
    assert 0.5 < meta.stats["popularity_auc_test"]


def test_generate_is_deterministic(tmp_path):
    cfg = SynthConfig(num_users=40, num_items=300, num_topics=6, min_hist_len=5, max_hist_len=50,
                      num_candidates=8, seed=9)
    generate(cfg, tmp_path / "a", verbose=False)
    generate(cfg, tmp_path / "b", verbose=False)
    assert read_split(tmp_path / "a", "train").equals(read_split(tmp_path / "b", "train"))
