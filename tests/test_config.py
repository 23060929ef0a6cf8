"""Config: schema defaults, YAML + overrides, and every kind of bad value failing early with the key named."""
import pytest

from solar_dist.config import ConfigError, load_config, to_yaml

from .conftest import REPO


def test_quickstart_loads_and_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.model.attention == "svd" and cfg.embedding.dim % cfg.model.num_heads == 0
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_overrides_apply_with_types():
    cfg = load_config(None, ["model.rank=4", "deepspeed.lr=0.1", "embedding.sharding_types={item: column_wise}"])
    assert cfg.model.rank == 4 and cfg.deepspeed.lr == 0.1
    assert cfg.embedding.sharding_types == {"item": "column_wise"}


@pytest.mark.parametrize("override, needle", [
    ("model.rnak=4", "model.rnak"),                      # unknown key
    ("data.batch_size=abc", "data.batch_size"),         # wrong type
    ("model.rank=65", "model.rank"),                     # rank > dim (default dim 64)
    ("model.num_heads=3", "model.num_heads"),            # heads do not divide dim
    ("data.batch_size=-1", "data.batch_size"),           # negative size
    ("embedding.dim=0", "embedding.dim"),
    ("model.attention=flash", "model.attention"),        # not an allowed value
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("data.synth.min_hist_len=500", "data.synth.min_hist_len"),  # min > max (max set to 100 below)
    ("embedding.sharding_types={item: diagonal}", "embedding.sharding_types.item"),
    ("embedding.sharding_types={user: data_parallel}", "embedding.sharding_types.user=data_parallel"),
    ("embedding.compute_kernels={item: dense}", "embedding.compute_kernels.item=dense"),
    ("eval.metrics=[auc,precision]", "eval.metrics"),
    ("model.dropout=1.5", "model.dropout"),
    ("train.select_mode=largest", "train.select_mode"),
    ("train.early_stop_patience=-1", "train.early_stop_patience"),
    ("train.early_stop_patience=2", "train.select_metric"),     # patience without a metric to watch
    ("train.select_metric=auc", "eval.every_epoch"),            # selection with no per-epoch evaluation
])
def test_bad_values_name_the_key(override, needle):
    extra = ["data.synth.max_hist_len=100"] if "min_hist_len" in override else []
    if override == "train.select_metric=auc":
        extra.append("eval.every_epoch=false")
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override, *extra])
    assert needle in str(exc.value)


def test_allowed_values_listed():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.svd_method=qr"])
    assert "randomized" in str(exc.value) and "gram" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.num_heads=5", "embedding.dim=12", "model.rank=4"])
    assert "[1, 2, 3, 4, 6, 12]" in str(exc.value)


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.rank"])


def test_cli_rejects_bad_config_before_work(capsys, tmp_path):
    from solar_dist.cli import main

    rc = main(["train", str(REPO / "configs" / "quickstart.yaml"), "model.rank=999",
               f"data.path={tmp_path / 'never'}"])
    assert rc == 2
    assert "model.rank" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("path", sorted(str(p) for p in (REPO / "configs").glob("*.yaml")
                                        if not p.name.startswith("tune_")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.path


@pytest.mark.parametrize("override, needle", [
    (["model.attention=linear"], "no causal form"),
    (["parallel.sp=2"], "parallel.sp=2"),
    (["next_item.train_negatives=0", "next_item.share_negatives=true"], "share_negatives=true"),
    (["next_item.train_negatives=0", "loss.bce_weight=1"], "loss.bce_weight=1.0"),
    (["model.basis_grad=detach"], "causal_prefix=recompute"),
    (["model.causal_prefix=gram"], "causal_prefix"),
    (["model.causal_prefix=recompute", "model.interest_grad=eigenvalues"], "interest_grad=eigenvalues"),
    (["model.interest_grad=detach"], "model.interest_grad"),
    (["model.causal_window_mode=overlap"], "model.causal_window_mode"),
])
def test_all_positions_rejects_what_it_cannot_run(override, needle):
    base = ["data.task=next_item", "next_item.train_mode=all_positions"]
    with pytest.raises(ConfigError, match=needle):
        load_config(None, base + override)


def test_lr_decay_options_are_checked_by_name():
    with pytest.raises(ConfigError, match="deepspeed.lr_decay='step'"):
        load_config(None, ["deepspeed.lr_decay=step"])
    with pytest.raises(ConfigError, match="deepspeed.min_lr_ratio=0.1 applies only to deepspeed.lr_decay=cosine"):
        load_config(None, ["deepspeed.lr_decay=linear", "deepspeed.min_lr_ratio=0.1"])
    with pytest.raises(ConfigError, match=r"deepspeed.min_lr_ratio=1.5 must be in \[0, 1\]"):
        load_config(None, ["deepspeed.lr_decay=cosine", "deepspeed.min_lr_ratio=1.5"])
    from solar_dist.parallel.engine import deepspeed_config

    with pytest.raises(ValueError, match="needs the run's planned steps"):
        deepspeed_config(load_config(None, ["deepspeed.lr_decay=cosine"]), 1, 0)
