"""`codat.config`: YAML + `key=value` overrides -> frozen, validated RunConfig.

Checks that overrides are applied and typed, that unknown keys (in the YAML or in an override) and
values of the wrong type raise ValueError naming the key, that model validation runs, that
save_config/load_config round-trips, and that the configs shipped in configs/ load.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re

import pytest

from codat.config import (
    CodatConfig,
    ModelConfig,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
)

REPO = pathlib.Path(__file__).resolve().parents[1]

BASE_YAML = """\
run_dir: runs/test
data:
  dir: data-bin/x
model:
  dim: 64
  heads: 2
  encoder_layers: 1
train:
  lr: 5.0e-4
  adam_betas: [0.9, 0.98]
  bf16: true
"""


@pytest.fixture
def cfg_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(BASE_YAML)
    return path


def test_yaml_values_and_defaults(cfg_file):
    cfg = load_config(cfg_file)
    assert isinstance(cfg, RunConfig)
    assert cfg.run_dir == "runs/test"
    assert cfg.data.dir == "data-bin/x"
    assert (cfg.model.dim, cfg.model.heads, cfg.model.encoder_layers) == (64, 2, 1)
    assert cfg.model.decoder_layers == ModelConfig().decoder_layers  # default kept
    assert cfg.train.lr == 5e-4
    assert cfg.train.adam_betas == (0.9, 0.98)
    assert cfg.train.bf16 is True


def test_overrides_replace_values_with_the_right_types(cfg_file):
    cfg = load_config(cfg_file, ["train.lr=1e-3", "model.dim=128", "model.heads=4"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert isinstance(cfg.train.lr, float)
    assert cfg.model.dim == 128 and isinstance(cfg.model.dim, int)
    assert cfg.model.heads == 4
    assert cfg.model.encoder_layers == 1  # untouched keys survive


def test_overrides_can_add_sections_and_top_level_keys(cfg_file):
    cfg = load_config(
        cfg_file, ["decode.decoder=viterbi", "run_dir=runs/other", "train.bf16=false"]
    )
    assert cfg.decode.decoder == "viterbi"
    assert cfg.run_dir == "runs/other"
    assert cfg.train.bf16 is False


def test_apply_overrides_does_not_mutate_its_input():
    values = {"model": {"dim": 64}, "run_dir": "a"}
    out = apply_overrides(values, ["model.dim=32", "train.lr=0.1"])
    assert values == {"model": {"dim": 64}, "run_dir": "a"}
    assert out == {"model": {"dim": 32}, "run_dir": "a", "train": {"lr": 0.1}}


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dimm: 64\n")
    with pytest.raises(ValueError, match=r"model\.dimm") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unknown_section_in_yaml_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle:\n  dim: 64\n")
    with pytest.raises(ValueError, match="modle"):
        load_config(path)


def test_unknown_override_key_names_it(cfg_file):
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        load_config(cfg_file, ["train.learning_rate=1e-3"])


def test_override_without_equals_sign_raises(cfg_file):
    with pytest.raises(ValueError, match="key=value"):
        load_config(cfg_file, ["train.lr"])


def test_override_into_a_scalar_raises(cfg_file):
    with pytest.raises(ValueError, match="run_dir"):
        load_config(cfg_file, ["run_dir.x=1"])


def test_section_given_a_scalar_raises(cfg_file):
    with pytest.raises(ValueError, match="'model' must be a mapping"):
        load_config(cfg_file, ["model=3"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=2.5", "train.max_steps"),
        ("train.lr=fast", "train.lr"),
        ("train.bf16=maybe", "train.bf16"),
        ("train.adam_betas=0.9", "train.adam_betas"),
        ("model.dim=[1, 2]", "model.dim"),
    ],
)
def test_bad_type_names_the_key(cfg_file, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(cfg_file, [override])


def test_integral_float_is_accepted_for_an_int(cfg_file):
    assert load_config(cfg_file, ["train.max_steps=2000.0"]).train.max_steps == 2000


def test_dim_not_divisible_by_heads_raises(cfg_file):
    with pytest.raises(ValueError, match="not divisible"):
        load_config(cfg_file, ["model.dim=100", "model.heads=3"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.upsample_scale=0.5", "upsample_scale"),
        ("model.dropout=1.0", "dropout"),
        ("train.update_freq=0", "update_freq"),
        ("train.glance_start=1.5", "glance"),
        ("train.max_tokens=8", "max_tokens"),
    ],
)
def test_validation_errors_name_the_field(cfg_file, override, match):
    with pytest.raises(ValueError, match=match):
        load_config(cfg_file, [override])


def test_zero_heads_raises_value_error(cfg_file):
    with pytest.raises(ValueError, match="heads"):
        load_config(cfg_file, ["model.heads=0"])


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_raises_value_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [dim: 1\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_config(path)


def test_empty_yaml_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RunConfig()


def test_config_is_frozen(cfg_file):
    cfg = load_config(cfg_file)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.dim = 1  # type: ignore[misc]


def test_save_load_round_trip_equals_the_original(tmp_path, cfg_file):
    cfg = load_config(cfg_file, ["train.lr=1e-3", "model.dim=128", "model.heads=4"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_save_load_round_trip_of_the_defaults(tmp_path):
    save_config(RunConfig(), tmp_path / "d.yaml")
    back = load_config(tmp_path / "d.yaml")
    assert back == RunConfig()
    assert isinstance(back.train.adam_betas, tuple)


def test_config_from_dict_of_none_gives_the_defaults():
    assert config_from_dict(None) == RunConfig()  # type: ignore[arg-type]


def test_shipped_small_multi30k_config_loads():
    cfg = load_config(REPO / "configs" / "multi30k_deen_dat_small.yaml")
    assert cfg.model.dim % cfg.model.heads == 0
    assert cfg.model.dim == 256 and cfg.model.upsample_scale == 4.0
    assert cfg.train.bf16 is True
    assert cfg.run_dir == "runs/m30k_deen_dat_small"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), RunConfig)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.dir=", "data.dir"),
        ("train.adam_betas=[0.9]", "train.adam_betas"),
        ("train.max_steps=true", "train.max_steps"),
        ("train.bf16=2", "train.bf16"),
    ],
)
def test_loose_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        config_from_dict(apply_overrides({}, [override]))


def test_integer_in_exponent_notation_is_accepted():
    assert config_from_dict(apply_overrides({}, ["train.max_steps=1e5"])).train.max_steps == 100000


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("train.cl_samples=8", "codat.samples"),
        ("train.eval_cl_sentences=5", "codat.eval_sentences"),
        ("train.betas=[0.9,0.98]", "train.adam_betas"),
        ("decode.beta=0.5", "decode.lookahead_token_weight"),
        ("decode.sample_beta=0.5", "decode.rerank_token_weight"),
        ("decode.viterbi_beta=0.5", "decode.viterbi_length_exponent"),
    ],
)
def test_renamed_key_error_names_the_new_key(tmp_path, old, new):
    path = tmp_path / "cfg.yaml"
    path.write_text("run_dir: r\n")
    with pytest.raises(ValueError, match=f"'{old.split('=')[0]}' was renamed to '{new}'"):
        load_config(path, [old])


def test_checkpoint_config_with_old_keys_is_migrated(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "model: {arch: nat}\n"
        "train: {betas: [0.8, 0.9], cl_samples: 16, cl_alpha: 2.5, glance_start: 0.5}\n"
        "decode: {beta: 0.7, sample_beta: 0.3}\n"
    )
    with pytest.raises(ValueError, match="renamed"):
        load_config(path)
    cfg = load_config(path, migrate=True)
    assert cfg.model.arch == "glat"  # nat glanced before glat existed
    assert cfg.train.adam_betas == (0.8, 0.9)
    assert (cfg.codat.samples, cfg.codat.alpha) == (16, 2.5)
    assert (cfg.decode.lookahead_token_weight, cfg.decode.rerank_token_weight) == (0.7, 0.3)


def test_nat_with_glancing_is_an_error_naming_glat(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {arch: nat}\ntrain: {glance_start: 0.5, glance_end: 0.1}\n")
    with pytest.raises(ValueError, match="model.arch=glat"):
        load_config(path)
    cfg = load_config(path, ["train.glance_start=0", "train.glance_end=0"])
    assert cfg.model.arch == "nat"


@pytest.mark.parametrize("arch", ["at", "cmlm"])
def test_sample_objective_on_an_arch_without_samples_is_an_error(tmp_path, arch):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model: {{arch: {arch}}}\ntrain: {{objective: codat}}\n")
    with pytest.raises(
        ValueError, match=f"train.objective='codat' does not apply to model.arch={arch}"
    ):
        load_config(path)


def test_codat_section_validates_and_resolves_gate():
    assert CodatConfig(samples=8, keep=0.25).kept == 2
    assert CodatConfig(samples=128, keep=0.25).kept == 32
    assert CodatConfig().gate() == math.inf
    assert CodatConfig(alpha=1.5).gate() == 1.5
    for bad in ({"samples": 1}, {"keep": 0.0}, {"temperature": -1.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="codat"):
            CodatConfig(**bad)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=0", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.keep_best=0", "train.keep_best"),
        ("train.log_every=0", "train.log_every"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.clip_norm=0", "train.clip_norm"),
        ("train.max_minutes=-1", "train.max_minutes"),
        ("train.max_skipped_steps=0", "train.max_skipped_steps"),
        ("train.adam_betas=[0.9, 1.0]", "train.adam_betas[1]"),
        ("model.encoder_layers=0", "model.encoder_layers"),
        ("data.max_ratio=-1", "data.max_ratio"),
        ("codat.margin=-0.1", "codat.margin"),
        ("decode.top_p=1.5", "decode.top_p"),
        ("decode.beam=0", "decode.beam"),
        ("decode.temperature=.nan", "decode.temperature"),
        ("decode.samples=0", "decode.samples"),
    ],
)
def test_every_value_is_range_checked_at_load_naming_the_key(cfg_file, override, key):
    with pytest.raises(ValueError, match=re.escape(f"{key}=")):
        load_config(cfg_file, [override])


# --- sampler modes, filter, pair averaging, reward temperature, rerank, validation decoder ------


def test_decode_sampler_follows_codat_sampler_unless_set():
    from codat.config import config_from_dict

    assert config_from_dict({}).decode.sampler == ""  # samples as log, the default of both
    follows = config_from_dict({"codat": {"sampler": "paper"}})
    assert follows.decode.sampler == "paper"
    own = config_from_dict({"codat": {"sampler": "paper"}, "decode": {"sampler": "dat"}})
    assert own.decode.sampler == "dat" and own.codat.sampler == "paper"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"codat": {"sampler": "exp"}}, "codat.sampler"),
        ({"codat": {"filter": "bleu"}}, "codat.filter"),
        ({"codat": {"pair_average": "mean"}}, "codat.pair_average"),
        ({"codat": {"reward_temperature": -1.0}}, "codat.reward_temperature"),
        ({"decode": {"sampler": "exp"}}, "decode.sampler"),
        ({"decode": {"rerank": "bleu"}}, "decode.rerank"),
    ],
)
def test_new_codat_and_decode_fields_are_checked(values, key):
    from codat.config import config_from_dict

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_dict(values)
