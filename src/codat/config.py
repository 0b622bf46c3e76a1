"""Typed run configuration: frozen dataclasses from one YAML file plus `key=value` overrides.

Defaults live here and nowhere else. Unknown keys are errors that name the key; the resolved
config is written to every run directory and checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

ARCHS = ("dat", "at", "nat", "glat", "ctc", "cmlm")
OBJECTIVES = ("dp", "codat", "reward")
BATCH_BY = ("longest", "graph")  # train.batch_by
# DAT graph sizes (model.upsample): from the source length, or from the length head's prediction.
UPSAMPLES = ("source", "predict")
# DAT sampler modes (`codat.decode.sampling_distribution`): log = log-joint scores / tau (codat's
# original), paper = Algorithm 2/3 on the probability scale, dat = DAT v2.0's inference_sample.
SAMPLERS = ("log", "paper", "dat")
# Architectures whose training step can add CoDAT's sample term (train.objective codat / reward).
SAMPLE_OBJECTIVE_ARCHS = ("dat", "nat", "glat", "ctc")

# Keys a resumed run may change, each only when named by --allow-change; any other difference
# between the config and the checkpoint's makes --resume an error naming the key.
RESUME_MAY_CHANGE = (
    "train.lr",
    "train.max_steps",
    "train.max_minutes",
    "train.eval_every",
    "train.eval_max_sentences",
    "train.log_every",
    "train.keep_best",
    "train.threads",
    "train.max_skipped_steps",
    "train.valid_decoder",
    *(
        f"decode.{k}"
        for k in (
            "decoder lookahead_token_weight viterbi_length_exponent max_tokens samples "
            "temperature top_p top_tokens rerank_token_weight seed beam length_penalty "
            "max_len_a max_len_b length_beam noise iterations sampler rerank"
        ).split()
    ),
)


def check_range(name: str, value: float, *, low=None, high=None, low_open=False, high_open=False):
    """Raise ValueError naming `name` unless `value` is finite and within the bounds (closed
    unless `low_open` / `high_open`)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{name}={value} must be a finite number{' ' + bounds if bounds else ''}")


def _check_ranges(section: str, obj, rules: dict[str, dict]) -> None:
    for key, bounds in rules.items():
        check_range(f"{section}.{key}", getattr(obj, key), **bounds)


# Keys that were renamed: loading a config that still uses one raises an error naming the new key;
# checkpoints written before the rename are migrated silently (`migrate_config`).
RENAMED = {
    "train.betas": "train.adam_betas",
    "train.cl_samples": "codat.samples",
    "train.cl_keep": "codat.keep",
    "train.cl_temperature": "codat.temperature",
    "train.cl_top_p": "codat.top_p",
    "train.cl_top_tokens": "codat.top_tokens",
    "train.cl_margin": "codat.margin",
    "train.cl_tie": "codat.tie",
    "train.cl_weight": "codat.weight",
    "train.cl_alpha": "codat.alpha",
    "train.cl_noise": "codat.noise",
    "train.reward_samples": "codat.reward_samples",
    "train.eval_cl_sentences": "codat.eval_sentences",
    "decode.beta": "decode.lookahead_token_weight",
    "decode.viterbi_beta": "decode.viterbi_length_exponent",
    "decode.sample_beta": "decode.rerank_token_weight",
}


@dataclass(frozen=True)
class ModelConfig:
    """Model family, size and shape (method.md §2). `vocab_size` 0 = take it from the data.

    arch: dat (DA-Transformer), at (autoregressive Transformer), nat (vanilla NAT, no glancing),
    glat (the same model trained with glancing), ctc (CTC NAT on the upsampled source; CTC+GLAT
    when train.glance_* > 0), cmlm (mask-predict).
    """

    arch: str = "dat"
    vocab_size: int = 0
    dim: int = 512
    heads: int = 8
    ffn_dim: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1
    upsample_scale: float = 8.0  # lambda: graph size L = floor(lambda * m), m counts </s>
    max_source_positions: int = 256
    max_graph_positions: int = 2048  # dat/ctc: graph vertices (decoder positions)
    max_target_positions: int = 1024  # at: decoder positions (<s> + target)
    max_length: int = 256  # nat/glat/cmlm: length classes 0..max_length (target content tokens)
    # dat: what sizes the graph. source: L = floor(upsample_scale * m). predict (DAT's
    # --upsample-base predict; for outputs whose length does not follow the source, e.g.
    # summaries): a length head on the mean-pooled encoder states predicts n, the target length
    # counting <s> and </s> (classes 0..max_length; longer targets count as max_length), and
    # L = floor(upsample_scale * n) clipped to [2, max_graph_positions]: n is the reference's
    # length in training and validation loss (every target up to max_graph_positions fits), the
    # head's argmax at inference.
    upsample: str = "source"
    length_loss_weight: float = 0.1  # dat, upsample predict: loss += weight * length CE

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch='{self.arch}': choose one of {', '.join(ARCHS)}")
        if self.dim <= 0 or self.heads <= 0:
            raise ValueError(f"model.dim={self.dim} and model.heads={self.heads} must be > 0")
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if self.upsample_scale < 1:
            raise ValueError(f"model.upsample_scale={self.upsample_scale} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        _check_ranges("model", self, _MODEL_RANGES)
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"model.upsample='{self.upsample}': choose one of source, predict")
        if self.upsample == "predict" and self.arch != "dat":
            raise ValueError(
                f"model.upsample='predict' sizes a DAT graph: it does not apply to "
                f"model.arch={self.arch} (use source)"
            )


_MODEL_RANGES = {
    "vocab_size": {"low": 0},
    "ffn_dim": {"low": 1},
    "encoder_layers": {"low": 1},
    "decoder_layers": {"low": 1},
    "upsample_scale": {"low": 1},
    "max_source_positions": {"low": 2},
    "max_graph_positions": {"low": 2},
    "max_target_positions": {"low": 3},
    "max_length": {"low": 1},
    "length_loss_weight": {"low": 0},
}


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared (binarised) data lives; see `codat prepare`."""

    dir: str = ""
    train_split: str = "train"
    valid_split: str = "val"
    # Per task: drop training pairs whose tgt/src or src/tgt length ratio is above this (0 = off).
    # 2 suits translation and paraphrase; summarisation (long source, short target) needs 0.
    max_ratio: float = 2.0
    # Validation score that selects the best checkpoints (and tune-beta's weight, analyze's
    # corpus scores): bleu, chrf, or rouge (the average of ROUGE-1/2/L F1, `codat.metrics`).
    valid_metric: str = "bleu"
    tokenize: str = "13a"  # sacreBLEU tokenizer of valid_metric bleu

    def __post_init__(self) -> None:
        from codat.metrics import METRICS, TOKENIZERS

        check_range("data.max_ratio", self.max_ratio, low=0)
        if self.valid_metric not in METRICS:
            raise ValueError(
                f"data.valid_metric='{self.valid_metric}': choose one of {', '.join(METRICS)}"
            )
        if self.tokenize not in TOKENIZERS:
            raise ValueError(
                f"data.tokenize='{self.tokenize}': choose one of {', '.join(TOKENIZERS)}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, glancing and bookkeeping (method.md §4, §6.1)."""

    lr: float = 5e-4
    warmup_steps: int = 10000
    warmup_init_lr: float = 1e-7
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    clip_norm: float = 0.1
    max_tokens: int = 4096  # per micro-batch: batch size * longest size (see batch_by)
    # what an example's size is: longest = max(source, target) length; graph = max(source length,
    # decoder positions in training): the DAG's L = lambda * m (or lambda * n with model.upsample
    # predict) for dat, lambda * m for ctc, the target length otherwise. graph bounds the (B, L, L)
    # transitions and (B, L, V) logits of a micro-batch, whose size lambda multiplies.
    batch_by: str = "longest"
    update_freq: int = 1  # gradient accumulation micro-batches per update
    max_steps: int = 300000
    max_minutes: float = 0.0  # wall-time budget; 0 = none
    glance_start: float = 0.5
    glance_end: float = 0.1
    glance_anneal_steps: int = 200000
    eval_every: int = 1000
    eval_max_sentences: int = 0  # 0 = the whole validation split
    keep_best: int = 3
    log_every: int = 10
    seed: int = 1
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    bf16: bool = False  # autocast the model's matmuls to bfloat16 (the DP stays float32)
    # after the linear warm-up: inverse_sqrt, constant, or linear (down to 0 at max_steps: for a
    # run whose length is known, e.g. the CPU demo)
    lr_schedule: str = "inverse_sqrt"
    # objective dp = the model's own loss (DAT: the DP loss); codat = + ranking constraints on the
    # model's own samples; reward = + the reward term (settings: the `codat` section).
    objective: str = "dp"
    init_from: str = ""  # checkpoint or run directory whose weights start the run (stage 2)
    label_smoothing: float = 0.0  # at / nat / cmlm: epsilon of the label-smoothed NLL
    # Steps whose loss or gradient is not finite are skipped (the optimizer untouched); this
    # many in a row stop the run with an error naming the step.
    max_skipped_steps: int = 10
    # The decoder whose validation score selects checkpoints ('' = decode.decoder, the decoder
    # that is reported); e.g. lookahead for cheap validation of a run reported with sample.
    valid_decoder: str = ""

    def __post_init__(self) -> None:
        _check_ranges("train", self, _TRAIN_RANGES)
        for i, beta in enumerate(self.adam_betas):
            check_range(f"train.adam_betas[{i}]", beta, low=0, high=1, high_open=True)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective='{self.objective}': choose dp, codat or reward")
        if self.lr_schedule not in ("inverse_sqrt", "constant", "linear"):
            raise ValueError(
                f"train.lr_schedule='{self.lr_schedule}': choose inverse_sqrt, constant or linear"
            )
        if self.update_freq < 1:
            raise ValueError(f"train.update_freq={self.update_freq} must be >= 1")
        if not (0 <= self.glance_end <= 1 and 0 <= self.glance_start <= 1):
            raise ValueError("train.glance_start and train.glance_end must be in [0, 1]")
        if self.max_tokens < 16:
            raise ValueError(f"train.max_tokens={self.max_tokens} is too small")
        if self.batch_by not in BATCH_BY:
            raise ValueError(f"train.batch_by='{self.batch_by}': choose {' or '.join(BATCH_BY)}")


_TRAIN_RANGES = {
    "lr": {"low": 0, "low_open": True},
    "warmup_steps": {"low": 0},
    "warmup_init_lr": {"low": 0},
    "weight_decay": {"low": 0},
    "clip_norm": {"low": 0, "low_open": True},
    "max_steps": {"low": 1},
    "max_minutes": {"low": 0},
    "glance_anneal_steps": {"low": 0},
    "eval_every": {"low": 1},
    "eval_max_sentences": {"low": 0},
    "keep_best": {"low": 1},
    "log_every": {"low": 1},
    "threads": {"low": 0},
    "label_smoothing": {"low": 0, "high": 1, "high_open": True},
    "max_skipped_steps": {"low": 1},
}


@dataclass(frozen=True)
class CodatConfig:
    """CoDAT's sample term (paper §3, method.md §9), used when train.objective is codat or reward:
    K samples per sentence from the model, rewarded by sentence BLEU against the reference; codat
    keeps the best `keep` fraction and ranks them (eq. 10), reward uses the first
    `reward_samples`. Sentences whose DP loss exceeds `alpha` get no sample term."""

    samples: int = 128  # K samples per sentence
    keep: float = 0.25  # codat: fraction of the K kept (best by sentence BLEU)
    temperature: float = 0.1  # sampling temperature (DAT: Algorithm 2; CTC: per position)
    top_p: float = 0.5  # DAT: top-p of each sampling step
    top_tokens: int = 1  # DAT: candidate tokens per vertex (1 = the paper's Algorithm 2)
    noise: float = 0.5  # nat/glat (NPD samples): std of the Gaussian noise on decoder inputs
    margin: float = 0.001  # eps_LB per rank gap
    tie: float = 0.001  # rewards (BLEU / 100) closer than this are not ranked
    weight: float = 1.0  # loss = model loss + weight * (contrastive or reward term)
    alpha: float = 0.0  # DP-loss gate; 0 = the init model's mean validation loss (set at start)
    reward_samples: int = 32  # reward: samples per sentence that carry the gradient
    eval_sentences: int = 0  # validation contrastive loss on this many sentences (0 = off)
    # DAT sampler of training samples (log | paper | dat, see SAMPLERS); decode.sampler '' follows.
    sampler: str = "log"
    # codat: which top `keep` fraction is ranked: reward (best sentence BLEU, today) or score
    # (best length-normalised DAG marginal log q(y)/|y|, the likelihood the paper motivates).
    filter: str = "reward"
    # codat: eq. 10's pair losses averaged over all valid pairs of the batch (pooled) or first per
    # sentence, then over the sentences with a pair (sentence, Appendix C).
    pair_average: str = "pooled"
    # reward: 0 = REINFORCE on R - mean(R); > 0 = Appendix A's reverse KL, advantage
    # R / reward_temperature - log q (minus its mean); R in [0, 1].
    reward_temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.samples < 2 or not 0 < self.keep <= 1:
            raise ValueError(
                f"codat.samples={self.samples} must be >= 2 and codat.keep={self.keep} in (0, 1]"
            )
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or self.top_tokens < 1:
            raise ValueError(
                "codat.temperature must be >= 0 (0 = the argmax walk), codat.top_p in (0, 1] "
                "and codat.top_tokens >= 1"
            )
        if self.reward_samples < 1 or self.alpha < 0 or self.noise < 0:
            raise ValueError("codat.reward_samples must be >= 1, codat.alpha and codat.noise >= 0")
        _check_ranges("codat", self, _CODAT_RANGES)
        for key, choices in _CODAT_CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(
                    f"codat.{key}='{getattr(self, key)}': choose one of {', '.join(choices)}"
                )

    @property
    def kept(self) -> int:
        """How many samples per sentence codat ranks: ceil(keep * K), at least 2."""
        return max(2, math.ceil(self.samples * self.keep))

    def per_sentence(self, objective: str) -> int:
        """Samples per sentence that carry gradient: codat ranks `kept`, reward uses the first
        `reward_samples`."""
        return self.kept if objective == "codat" else self.reward_samples

    def gate(self) -> float:
        """The DP-loss threshold alpha (inf when unset, i.e. before the start calibrates it)."""
        return self.alpha if self.alpha > 0 else math.inf


_CODAT_RANGES = {
    "temperature": {"low": 0},
    "noise": {"low": 0},
    "margin": {"low": 0},
    "tie": {"low": 0},
    "weight": {"low": 0},
    "alpha": {"low": 0},
    "eval_sentences": {"low": 0},
    "reward_temperature": {"low": 0},
}
_CODAT_CHOICES = {
    "sampler": SAMPLERS,
    "filter": ("reward", "score"),
    "pair_average": ("pooled", "sentence"),
}


@dataclass(frozen=True)
class DecodeConfig:
    """Decoder choice and its knobs (method.md §5). Decoders per model.arch (the first is the
    default, chosen by decoder ''): dat lookahead|greedy|viterbi|sample; at beam|greedy;
    nat argmax|npd; ctc greedy; cmlm mask-predict."""

    decoder: str = ""
    # fp32, or bf16: the model's matmuls under bfloat16 autocast (the token logits, the DAG
    # decoding and the transitions stay float32), for every decoder
    precision: str = "fp32"
    lookahead_token_weight: float = 1.0  # lookahead: weight of the token log-prob
    viterbi_length_exponent: float = 1.0  # joint Viterbi: score / length ** this exponent
    max_tokens: int = 8192
    # sample: draw `samples` paths per sentence (CoDAT Algorithms 2/3), return the best by
    # rerank_token_weight * token score + (1 - it) * transition score (`codat tune-beta`).
    samples: int = 128
    temperature: float = 0.05
    top_p: float = 0.5
    top_tokens: int = 1  # candidate tokens per vertex (1 = the paper's Algorithm 2)
    rerank_token_weight: float = 0.5
    # sample: the sampler mode (log | paper | dat); '' = codat.sampler, the training sampler.
    sampler: str = ""
    # sample: pick the best sample by score (the rerank_token_weight mix) or by marginal (the
    # DAG's length-normalised log q(y)/|y|, summed over all paths that emit y).
    rerank: str = "score"
    seed: int = 1
    # at: beam search (fairseq's defaults), the length limit floor(max_len_a * m + max_len_b)
    beam: int = 5
    length_penalty: float = 1.0
    max_len_a: float = 1.2
    max_len_b: float = 10.0
    # nat / cmlm: the length_beam most likely lengths; npd: `samples` candidates with noise std
    length_beam: int = 1
    noise: float = 0.5
    iterations: int = 10  # cmlm: mask-predict iterations


# The valid range of each DecodeConfig field (`check_decode`).
DECODE_RANGES = {
    "lookahead_token_weight": {},
    "viterbi_length_exponent": {"low": 0},
    "max_tokens": {"low": 1},
    "samples": {"low": 1},
    "temperature": {"low": 0},
    "top_p": {"low": 0, "high": 1, "low_open": True},
    "top_tokens": {"low": 1},
    "rerank_token_weight": {"low": 0, "high": 1},
    "seed": {},
    "beam": {"low": 1},
    "length_penalty": {},
    "max_len_a": {"low": 0},
    "max_len_b": {"low": 0},
    "length_beam": {"low": 1},
    "noise": {"low": 0},
    "iterations": {"low": 1},
}


# The valid choices of each DecodeConfig string field but `decoder` (`check_decode`).
DECODE_CHOICES = {
    "sampler": ("", *SAMPLERS),
    "rerank": ("score", "marginal"),
    "precision": ("fp32", "bf16"),
}


def check_decode(dc: DecodeConfig, name=lambda field: f"decode.{field}") -> None:
    """Raise ValueError unless every field of `dc` is in range; `name(field)` names the field
    in the message (the config key, or the command-line flag)."""
    for key, bounds in DECODE_RANGES.items():
        check_range(name(key), getattr(dc, key), **bounds)
    for key, choices in DECODE_CHOICES.items():
        if getattr(dc, key) not in choices:
            shown = ", ".join(repr(c) if c == "" else c for c in choices)
            raise ValueError(f"{name(key)}='{getattr(dc, key)}': choose one of {shown}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codat: CodatConfig = field(default_factory=CodatConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    run_dir: str = "runs/dat"

    def __post_init__(self) -> None:
        check_decode(self.decode)
        # One setting drives training and inference: decode.sampler '' takes codat.sampler when
        # the config is built ('' itself samples as log, the default of both).
        if self.decode.sampler == "" and self.codat.sampler != "log":
            resolved = dataclasses.replace(self.decode, sampler=self.codat.sampler)
            object.__setattr__(self, "decode", resolved)
        arch, tc = self.model.arch, self.train
        if arch == "nat" and (tc.glance_start > 0 or tc.glance_end > 0):
            raise ValueError(
                "model.arch=nat is the vanilla NAT, which does not glance: use model.arch=glat "
                "for GLAT, or set train.glance_start=0 and train.glance_end=0"
            )
        if tc.objective != "dp" and arch not in SAMPLE_OBJECTIVE_ARCHS:
            raise ValueError(
                f"train.objective='{tc.objective}' does not apply to model.arch={arch} "
                f"(codat and reward train {', '.join(SAMPLE_OBJECTIVE_ARCHS)})"
            )


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if name in RENAMED:
            raise ValueError(f"config key '{name}' was renamed to '{RENAMED[name]}'")
        if key not in fields:
            raise ValueError(f"unknown config key '{name}' (known: {', '.join(sorted(fields))})")
        sub = (
            fields[key].default_factory
            if fields[key].default_factory is not dataclasses.MISSING
            else None
        )
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, name)
        else:
            kwargs[key] = _coerce(fields[key], value, name)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, name: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        raise ValueError(f"config key '{name}' needs a value")
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                value = float(value)  # YAML reads 1e5 as a string
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if value not in (0, 1):
                raise ValueError
            return bool(value)
        if kind == "str":
            return str(value)
        if kind.startswith("tuple"):
            if isinstance(value, str) or len(value) != kind.count(",") + 1:
                raise ValueError
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"config key '{name}': cannot use {value!r} as {kind}") from None
    return value


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; unknown keys raise ValueError naming the key."""
    return _build(RunConfig, values or {}, "")


def migrate_config(values: dict[str, Any]) -> dict[str, Any]:
    """A config written before the renames in `RENAMED` (and before model.arch=glat), in today's
    keys: how checkpoints saved by earlier versions stay loadable."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (values or {}).items()}
    for old, new in RENAMED.items():
        old_section, old_key = old.split(".")
        section = out.get(old_section)
        if isinstance(section, dict) and old_key in section:
            new_section, new_key = new.split(".")
            out.setdefault(new_section, {})[new_key] = section.pop(old_key)
    model, train = out.get("model", {}), out.get("train", {})
    if model.get("arch") == "nat" and (
        train.get("glance_start", 0.5) or train.get("glance_end", 0.1)
    ):
        model["arch"] = "glat"  # before glat existed, nat glanced unless glancing was zeroed
    if model.get("arch") == "at" and "max_graph_positions" in model:
        model.setdefault("max_target_positions", model["max_graph_positions"])
    return out


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(
    path: str | pathlib.Path, overrides: list[str] | None = None, *, migrate: bool = False
) -> RunConfig:
    """The RunConfig of a YAML file plus `section.key=value` overrides; `migrate` first rewrites
    keys renamed since the file was written (for checkpoints, see `migrate_config`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if migrate and isinstance(values, dict):
        values = migrate_config(values)
    try:
        return config_from_dict(apply_overrides(values, overrides or []))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["train"]["adam_betas"] = list(d["train"]["adam_betas"])
    return d


def save_config(cfg: RunConfig, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
