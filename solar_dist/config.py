"""Typed configuration: one dataclass per concern, merged by OmegaConf, validated before any work starts.

Why structured configs: OmegaConf rejects unknown keys and wrong types against the dataclass schema, so a
typo in a YAML file or a `key=value` override fails at load time with the key named, not an hour into a run.
Cross-field rules (rank <= dim, heads divide dim, ...) live in `validate()`, which raises `ConfigError`
naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible. The message names the key."""


# ----------------------------------------------------------------------------------------------- schema
@dataclass
class SynthConfig:
    """Parameters of the synthetic lifelong-behaviour generator (see solar_dist/data/synth.py)."""

    num_users: int = 3000
    num_items: int = 20000
    num_topics: int = 48
    topics_per_user: int = 3
    latent_dim: int = 16
    min_hist_len: int = 20
    max_hist_len: int = 10000
    num_candidates: int = 50
    popularity_exponent: float = 1.1
    early_interest_fraction: float = 0.15
    affinity_weight: float = 3.0
    popularity_weight: float = 0.3
    base_logit: float = -3.0
    valid_fraction: float = 0.15
    test_fraction: float = 0.15
    rows_per_file: int = 1000
    seed: int = 0


@dataclass
class DataConfig:
    """Where the Parquet request files live and how they are read."""

    path: str = "data/quickstart"
    # ranking: requests carry candidates + labels (CTR-style). next_item: leave-one-out sequential
    # recommendation (targets along the history, sampled negatives; see `next_item`).
    task: str = "ranking"
    # When `path` has no data yet: "synth" generates it with `synth`; "error" refuses.
    if_missing: str = "synth"
    synth: SynthConfig = field(default_factory=SynthConfig)
    loader: str = "pyarrow"  # pyarrow | ray
    batch_size: int = 32
    eval_batch_size: int = 64
    shuffle: bool = True
    # Sort requests by history length inside windows of this many batches, to cut padding (0 = off).
    bucket_batches: int = 8
    max_hist_len: int = 0  # 0 = keep every event; > 0 keeps the most recent events (explicit, logged)
    allow_empty_history: bool = False
    prefetch_batches: int = 2
    num_workers: int = 0


@dataclass
class EmbeddingConfig:
    """TorchRec tables. The item table is shared by history and candidates (`feature_names`)."""

    dim: int = 64
    user_table_size: int = 0  # 0 = from the data's metadata
    item_table_size: int = 0  # 0 = from the data's metadata
    use_actions: bool = False
    action_table_size: int = 8
    optimizer: str = "rowwise_adagrad"  # rowwise_adagrad | adagrad | adam | sgd
    lr: float = 0.05
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Per-table constraints for the planner: sharding type (table_wise | row_wise | column_wise |
    # table_row_wise, or "" = planner's choice) and compute kernel (fused, or "" = planner's choice).
    # data_parallel / dense are refused: nothing would update such a table (see _DATA_PARALLEL_REFUSAL).
    sharding_types: Dict[str, str] = field(default_factory=dict)
    compute_kernels: Dict[str, str] = field(default_factory=dict)
    init_std: float = 0.02


@dataclass
class ModelConfig:
    """The SOLAR tower."""

    depth: int = 2
    num_heads: int = 2
    rank: int = 8
    attention: str = "svd"  # svd | sdpa | linear | truncate | oracle
    svd_method: str = "randomized"  # exact | gram | randomized
    interest_scale: str = "sqrt_n"  # sqrt_n | none
    basis_grad: str = "full"  # full | detach
    mass_bias: bool = False
    oversample: int = 8
    power_iters: int = 1  # randomized range finder: q=1 is ~1.3x cheaper than q=2 and accurate with p=8
    truncate_k: int = 50
    recent_k: int = 16  # last-k events joined to the interests in candidate attention (0 = pure SOLAR)
    ffn_mult: int = 2
    dropout: float = 0.0
    set_layer: bool = False
    scorer_hidden: List[int] = field(default_factory=lambda: [64])
    position_buckets: int = 32  # log-spaced recency buckets
    # Next-item training at every position (next_item.train_mode=all_positions): chunk and sliding-window
    # length of causal SVD-Attention (ops/causal.py); `truncate` uses truncate_k instead.
    causal_window: int = 32
    # how causal SVD-Attention gets the interests of each chunk-boundary prefix: cumulative (running Gram
    # sums, O(N·D²), needs basis_grad=full) | recompute (svd_method on every prefix, O(N²/C·D·r))
    causal_prefix: str = "cumulative"
    # causal SVD-Attention: the interests (the events older than the window) get the learned per-head bias that
    # exact attention gives its tokens older than the window (the block's rel_bias[:, causal_window]), so the two
    # kinds have the same parameters. Off: the interests' scores carry no bias (the behaviour before 2026-11-28).
    interest_far_bias: bool = False
    # causal SVD-Attention: what the loss's gradient reaches through the interests (ops/causal.INTEREST_GRADS):
    # full | eigenvalues (the Gram eigenvectors held constant; needs causal_prefix=cumulative) | none (the
    # interests are constants to the loss; the k/v projections still learn from them). The forward is the same.
    interest_grad: str = "full"
    # causal SVD-Attention: the exact tokens beside the interests (ops/causal.WINDOW_MODES). sliding: the last
    # causal_window events [t-C+1, t], with the interests of the prefix before t's chunk, which the window overlaps
    # (events of the previous chunk count twice); chunks: every event of the previous and the current chunk up to
    # t (C..2C-1 of them; offsets >= C get exact's far bias), with the interests of the events before the previous
    # chunk: each event counted once, the same cost, and equal to exact attention on histories of <= 2C events.
    causal_window_mode: str = "sliding"


@dataclass
class LossConfig:
    bce_weight: float = 1.0
    listwise_weight: float = 0.0


@dataclass
class ParallelConfig:
    """world = dp x sp. Sequence parallelism splits each user's history over `sp` ranks."""

    sp: int = 1
    backend: str = "auto"  # auto (nccl on cuda, else gloo) | gloo | nccl
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DeepSpeedConfig:
    """The dense tower's engine. Written into DeepSpeed's own config dict by parallel/engine.py."""

    zero_stage: int = 0
    optimizer: str = "AdamW"
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    bf16: bool = False
    warmup_steps: int = 20
    # Decay after the warm-up, over the run's planned steps (train.epochs x steps per epoch, or train.max_steps
    # if smaller): none (constant) | linear (to 0, DeepSpeed's WarmupDecayLR) | cosine (to min_lr_ratio x lr,
    # WarmupCosineLR). A train.max_minutes stop or early stopping ends the run before the schedule does.
    # The tables' lr (embedding.lr) is not scheduled: row-wise Adagrad already shrinks its steps.
    lr_decay: str = "none"
    min_lr_ratio: float = 0.0
    # ZeRO communication buckets (elements). DeepSpeed's default (5e8) allocates GBs for a small tower.
    bucket_size: int = 50_000_000


@dataclass
class TrainConfig:
    epochs: int = 2
    max_steps: int = 0  # 0 = no limit
    # Wall-clock budget of one fit() call in minutes, evaluations included (0 = none): the step that crosses it
    # is the last; the usual end-of-training evaluation and model selection follow. The ranks agree on the
    # step (max over ranks). The epochs trained then depend on the machine's speed: records say how many.
    max_minutes: float = 0.0
    seed: int = 0
    log_every: int = 10
    run_dir: str = "runs/quickstart"
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    # Model selection on the per-epoch evaluation (the validation split): after every evaluation that improves
    # `select_metric` (a key of the evaluation's metrics, e.g. "sampled100_ndcg@10" or "auc") the weights are
    # saved under run_dir/best, and fit() ends with those weights loaded, so a later test evaluation scores
    # the selected epoch, not the last one. "" = keep the last epoch's weights.
    select_metric: str = ""
    select_mode: str = "max"  # max | min: whether a larger select_metric is better
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    resume: bool = False
    progress: bool = True
    deterministic: bool = True
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default


@dataclass
class EvalConfig:
    every_epoch: bool = True
    split: str = "valid"  # valid | test
    metrics: List[str] = field(default_factory=lambda: ["auc", "gauc", "ne", "logloss"])
    max_batches: int = 0


@dataclass
class RayConfig:
    address: str = ""  # "" = start a local Ray; otherwise attach (e.g. "auto" or "ray://host:10001")
    num_cpus: int = 0  # 0 = Ray's default
    dashboard: bool = False
    object_store_mb: int = 0  # local Ray only: object store size in MiB (0 = Ray's default, 30% of RAM)
    # CPUs each Ray loader task / Ray Data read task reserves. 0 = none: loading never waits for a free CPU,
    # so it cannot deadlock inside a Tune trial or Ray Train worker that already holds the CPUs.
    loader_cpus: float = 0.0


@dataclass
class NextItemConfig:
    """Next-item (sequential recommendation) training and evaluation, used when `data.task=next_item`.

    Owned by the real-data work (converters, leave-one-out protocol, retrieval metrics)."""

    # prefix_samples: one sample per (user, cut point), the target-aware ranking tower scores candidates.
    # all_positions: one causal pass per user, every position predicts the next event (SASRec-style), the
    # tower's per-position states score items by dot product with their embeddings (ops/causal.py).
    train_mode: str = "prefix_samples"
    train_negatives: int = 128  # sampled negatives per training target (0 = full catalogue softmax)
    # all_positions: every position's softmax holds the negatives of every user in the batch (B x
    # train_negatives) instead of its own user's train_negatives (train_negatives=0: the catalogue, looked up
    # once per batch)
    share_negatives: bool = False
    # all_positions: only each user's last k positions carry a loss (0 = every position); the older events
    # still reach the states through the causal tower (interests), at linear cost with data.max_hist_len=0
    loss_last_positions: int = 0
    # all_positions: how the positions of a batch are weighed against each other. position: every position
    # alike (SASRec's objective): a step's loss sum over the epoch's mean loss positions per global batch, a
    # constant, so a position weighs the same whichever batch it lands in. user: every user alike (the test
    # metrics' weighting): a position weighs 1 / its user's loss positions. batch_mean: the step's own mean
    # over its positions (solar-dist before 2026-11-27); with length-bucketed batches (data.bucket_batches) that
    # weighs a position of a batch of short users far above one of a batch of long users.
    loss_weighting: str = "position"  # position | user | batch_mean
    negative_sampler: str = "uniform"  # uniform | popularity
    cut_points_per_user: int = 0  # training samples per user per epoch (0 = every position)
    eval_protocols: List[str] = field(default_factory=lambda: ["sampled100", "full"])
    eval_negatives: int = 100
    topk: int = 10
    # Per-epoch validation on a fixed random subset of this many users (0 = all); the final test uses all.
    eval_max_users: int = 0
    # Full-catalogue ranking on a fixed random subset of this many users (0 = all; large catalogues on CPU).
    full_max_users: int = 0
    # Full-catalogue scoring: at most this many (user, item) scores per forward call (bounds memory).
    eval_chunk_pairs: int = 65536


@dataclass
class TuneConfig:
    """Ray Tune sweep over SVD-Attention rank, tower depth and learning rate (ASHA early stopping).

    Owned by the Ray work."""

    ranks: List[int] = field(default_factory=lambda: [4, 8, 16])
    depths: List[int] = field(default_factory=lambda: [1, 2])
    lr_min: float = 5e-4
    lr_max: float = 5e-3
    num_samples: int = 1  # repeats of the grid (lr sampled log-uniform each time)
    metric: str = "auc"
    mode: str = "max"
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0 = as many as the CPUs allow
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1  # > 1: Ray Train TorchTrainer with DeepSpeed inside each trial
    storage_path: str = "runs/tune"
    name: str = "solar_tune"
    # Extra grid axes over any config key, e.g. {"data.batch_size": [16, 32]}; values are checked per trial
    # (a trial whose value is invalid fails with the error and the sweep goes on).
    grid: Dict[str, Any] = field(default_factory=dict)
    # true: continue the sweep at storage_path/name (unfinished trials run again, finished/failed ones are kept)
    resume: bool = False


@dataclass
class SolarConfig:
    data: DataConfig = field(default_factory=DataConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    next_item: NextItemConfig = field(default_factory=NextItemConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# ------------------------------------------------------------------------------------------ allowed values
CHOICES: Dict[str, Sequence[str]] = {
    "data.if_missing": ("synth", "error"),
    "data.task": ("ranking", "next_item"),
    "next_item.negative_sampler": ("uniform", "popularity"),
    "next_item.train_mode": ("prefix_samples", "all_positions"),
    "next_item.loss_weighting": ("position", "user", "batch_mean"),
    "model.causal_prefix": ("cumulative", "recompute"),
    "model.interest_grad": ("full", "eigenvalues", "none"),
    "model.causal_window_mode": ("sliding", "chunks"),
    "tune.mode": ("max", "min"),
    "data.loader": ("pyarrow", "ray"),
    "embedding.optimizer": ("rowwise_adagrad", "adagrad", "adam", "sgd"),
    "model.attention": ("svd", "sdpa", "linear", "truncate", "oracle"),
    "model.svd_method": ("exact", "gram", "randomized"),
    "model.interest_scale": ("sqrt_n", "none"),
    "model.basis_grad": ("full", "detach"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "parallel.device": ("auto", "cpu", "cuda"),
    "deepspeed.optimizer": ("AdamW", "Adam", "SGD"),
    "deepspeed.lr_decay": ("none", "linear", "cosine"),
    "train.select_mode": ("max", "min"),
    "eval.split": ("valid", "test"),
}
SHARDING_TYPES = ("", "table_wise", "row_wise", "column_wise", "table_row_wise")
COMPUTE_KERNELS = ("", "fused")
# TorchRec's data_parallel sharding (the only one with the `dense` kernel) replicates a table and leaves its
# update to a dense optimizer over `.grad`; solar-dist trains tables only through the fused in-backward
# optimizer, so such a table would never change (measured: weights identical after training). Refused by name
# until a data-parallel table optimizer exists.
_DATA_PARALLEL_REFUSAL = ("data-parallel tables (sharding data_parallel, kernel dense) are not trained by "
                          "solar-dist: their weights would never update; use table_wise, row_wise or column_wise")
EVAL_METRICS = ("auc", "gauc", "ne", "logloss")

# (key, lower bound, inclusive?) for numbers that must be positive / non-negative.
_POSITIVE = [
    "synth.num_users", "synth.num_items", "synth.num_topics", "synth.topics_per_user", "synth.latent_dim",
    "synth.min_hist_len", "synth.max_hist_len", "synth.num_candidates", "synth.rows_per_file",
    "data.batch_size", "data.eval_batch_size", "embedding.dim", "deepspeed.bucket_size", "embedding.action_table_size",
    "model.depth", "model.num_heads", "model.rank", "model.truncate_k", "model.ffn_mult",
    "model.position_buckets", "model.causal_window", "parallel.sp", "next_item.eval_negatives", "next_item.topk", "next_item.eval_chunk_pairs",
    "tune.num_samples", "tune.grace_period", "tune.reduction_factor", "tune.workers_per_trial", "train.epochs", "train.log_every", "train.keep_checkpoints",
]
_NON_NEGATIVE = [
    "data.bucket_batches", "data.max_hist_len", "data.prefetch_batches", "data.num_workers",
    "embedding.user_table_size", "embedding.item_table_size", "embedding.lr", "embedding.eps",
    "embedding.weight_decay", "embedding.init_std", "model.oversample", "model.power_iters", "model.recent_k",
    "model.dropout", "loss.bce_weight", "loss.listwise_weight", "deepspeed.lr", "deepspeed.weight_decay",
    "deepspeed.grad_clip", "deepspeed.warmup_steps",
    "train.max_steps", "train.max_minutes", "train.checkpoint_every", "train.early_stop_patience",
    "train.num_threads", "eval.max_batches", "ray.num_cpus", "next_item.train_negatives", "next_item.loss_last_positions",
    "next_item.cut_points_per_user", "next_item.eval_max_users", "next_item.full_max_users", "tune.max_concurrent", "tune.lr_min", "synth.popularity_exponent",
    "synth.early_interest_fraction", "synth.valid_fraction", "synth.test_fraction",
]


def _get(cfg: Any, dotted: str) -> Any:
    root = cfg.data.synth if dotted.startswith("synth.") else cfg
    key = dotted[len("synth."):] if dotted.startswith("synth.") else dotted
    for part in key.split("."):
        root = getattr(root, part)
    return root


def _full_key(dotted: str) -> str:
    return "data." + dotted if dotted.startswith("synth.") else dotted


def validate(cfg: Any) -> None:
    """Cross-field checks. Raises ConfigError naming the key, its value and what is allowed."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    for key in _POSITIVE:
        value = _get(cfg, key)
        if value < 1:
            raise ConfigError(f"{_full_key(key)}={value} must be >= 1")
    for key in _NON_NEGATIVE:
        value = _get(cfg, key)
        if value < 0:
            raise ConfigError(f"{_full_key(key)}={value} must be >= 0")
    e, m, s = cfg.embedding, cfg.model, cfg.data.synth
    if e.dim % m.num_heads != 0:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must divide embedding.dim={e.dim}; allowed heads: "
            f"{[h for h in range(1, e.dim + 1) if e.dim % h == 0]}"
        )
    if m.rank > e.dim:
        raise ConfigError(f"model.rank={m.rank} must be <= embedding.dim={e.dim} (allowed 1..{e.dim})")
    if m.dropout >= 1:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    ds = cfg.deepspeed
    if not 0 <= ds.min_lr_ratio <= 1:
        raise ConfigError(f"deepspeed.min_lr_ratio={ds.min_lr_ratio} must be in [0, 1]")
    if ds.min_lr_ratio > 0 and ds.lr_decay != "cosine":
        raise ConfigError(f"deepspeed.min_lr_ratio={ds.min_lr_ratio} applies only to deepspeed.lr_decay=cosine "
                          f"(got lr_decay={ds.lr_decay!r}; linear decays to 0, none does not decay)")
    if cfg.loss.bce_weight == 0 and cfg.loss.listwise_weight == 0:
        raise ConfigError("loss.bce_weight and loss.listwise_weight are both 0; at least one must be > 0")
    if s.min_hist_len > s.max_hist_len:
        raise ConfigError(
            f"data.synth.min_hist_len={s.min_hist_len} must be <= data.synth.max_hist_len={s.max_hist_len}"
        )
    if s.topics_per_user > s.num_topics:
        raise ConfigError(
            f"data.synth.topics_per_user={s.topics_per_user} must be <= data.synth.num_topics={s.num_topics}"
        )
    if s.num_candidates > s.num_items:
        raise ConfigError(f"data.synth.num_candidates={s.num_candidates} must be <= data.synth.num_items")
    if not 0 <= s.early_interest_fraction < 1:
        raise ConfigError(f"data.synth.early_interest_fraction={s.early_interest_fraction} must be in [0, 1)")
    if s.valid_fraction + s.test_fraction >= 1:
        raise ConfigError("data.synth.valid_fraction + data.synth.test_fraction must be < 1")
    for table, st in e.sharding_types.items():
        if st == "data_parallel":
            raise ConfigError(f"embedding.sharding_types.{table}=data_parallel: {_DATA_PARALLEL_REFUSAL}")
        if st not in SHARDING_TYPES:
            raise ConfigError(f"embedding.sharding_types.{table}={st!r}; choose one of {list(SHARDING_TYPES)}")
    for table, ck in e.compute_kernels.items():
        if ck == "dense":
            raise ConfigError(f"embedding.compute_kernels.{table}=dense: {_DATA_PARALLEL_REFUSAL}")
        if ck not in COMPUTE_KERNELS:
            raise ConfigError(f"embedding.compute_kernels.{table}={ck!r}; choose one of {list(COMPUTE_KERNELS)}")
    for name in cfg.eval.metrics:
        if name not in EVAL_METRICS:
            raise ConfigError(f"eval.metrics contains {name!r}; allowed: {list(EVAL_METRICS)}")
    if cfg.next_item.train_mode == "all_positions":
        if cfg.model.attention not in ("svd", "sdpa", "truncate"):
            raise ConfigError(f"model.attention={cfg.model.attention!r} has no causal form; next_item.train_mode="
                              f"all_positions needs one of ['svd', 'sdpa', 'truncate']")
        if cfg.parallel.sp != 1:
            raise ConfigError(f"parallel.sp={cfg.parallel.sp}: next_item.train_mode=all_positions runs the causal "
                              f"tower on whole sequences (use data parallelism, parallel.sp=1)")
        if cfg.model.attention == "svd" and cfg.model.causal_prefix == "cumulative" and cfg.model.basis_grad != "full":
            raise ConfigError(f"model.causal_prefix=cumulative differentiates through the basis; model.basis_grad="
                              f"{cfg.model.basis_grad!r} needs model.causal_prefix=recompute")
        if cfg.model.interest_grad == "eigenvalues" and cfg.model.causal_prefix != "cumulative":
            raise ConfigError("model.interest_grad=eigenvalues holds the Gram eigenvectors of the cumulative prefix "
                              f"constant; model.causal_prefix={cfg.model.causal_prefix!r} needs interest_grad full "
                              "or none")
        if cfg.next_item.train_negatives == 0 and cfg.next_item.share_negatives:
            raise ConfigError("next_item.share_negatives=true pools sampled negatives, but train_negatives=0 "
                              "already scores every position against the full catalogue; drop one of them")
        if cfg.next_item.train_negatives == 0 and cfg.loss.bce_weight > 0:
            raise ConfigError(f"loss.bce_weight={cfg.loss.bce_weight}: next_item.train_mode=all_positions with "
                              f"next_item.train_negatives=0 trains a full-catalogue softmax (listwise only); "
                              f"set loss.bce_weight=0 or next_item.train_negatives > 0")
    tr = cfg.train
    if tr.early_stop_patience and not tr.select_metric:
        raise ConfigError(f"train.early_stop_patience={tr.early_stop_patience} needs train.select_metric (the "
                          f"metric whose lack of improvement stops training)")
    if tr.select_metric and not cfg.eval.every_epoch:
        raise ConfigError(f"train.select_metric={tr.select_metric!r} selects among per-epoch evaluations; it "
                          f"needs eval.every_epoch=true")
    for name in cfg.next_item.eval_protocols:
        if name not in ("sampled100", "full"):
            raise ConfigError(f"next_item.eval_protocols contains {name!r}; allowed: ['sampled100', 'full']")
    t = cfg.tune
    if not t.ranks or any(r < 1 or r > e.dim for r in t.ranks):
        raise ConfigError(f"tune.ranks={list(t.ranks)}: each must be in 1..embedding.dim={e.dim}")
    if not t.depths or any(d < 1 for d in t.depths):
        raise ConfigError(f"tune.depths={list(t.depths)}: each must be >= 1")
    if not 0 < t.lr_min <= t.lr_max:
        raise ConfigError(f"tune.lr_min={t.lr_min} and tune.lr_max={t.lr_max} must satisfy 0 < min <= max")
    if t.cpus_per_trial <= 0:
        raise ConfigError(f"tune.cpus_per_trial={t.cpus_per_trial} must be > 0")
    for key, values in t.grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"tune.grid.{key}={values!r} must be a non-empty list of values")
    if cfg.ray.object_store_mb < 0 or cfg.ray.loader_cpus < 0:
        raise ConfigError("ray.object_store_mb and ray.loader_cpus must be >= 0")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; allowed: [0, 1, 2, 3]")
    if len(cfg.deepspeed.betas) != 2 or not all(0 <= b < 1 for b in cfg.deepspeed.betas):
        raise ConfigError(f"deepspeed.betas={list(cfg.deepspeed.betas)} must be two numbers in [0, 1)")
    if any(h < 1 for h in m.scorer_hidden):
        raise ConfigError(f"model.scorer_hidden={list(m.scorer_hidden)}: every width must be >= 1")


# ---------------------------------------------------------------------------------------------- loading
def _merge_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    return ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> SolarConfig:
    """Schema defaults <- YAML file <- `key=value` overrides; then validate().

    Returns a typed object (OmegaConf.to_object), so code downstream uses plain attribute access.
    """
    schema = OmegaConf.structured(SolarConfig)
    try:
        merged = schema
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: SolarConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _merge_error(exc) from None
    validate(cfg)
    return cfg


def to_dict(cfg: SolarConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: SolarConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: SolarConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))
