"""`codat <verb>`: every command-line flag of the package, and one plain function call per verb.

The decoding flags (`--decoder`, `--lookahead-token-weight`, `--samples`, ...) are generated once
from the fields of `DecodeConfig`; `commands.decode_config` applies the given ones to the run's
own decoding settings. `run(argv)` raises the verbs' errors; `main(argv)` (the console script)
turns them into one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from codat import __version__, commands
from codat.config import ARCHS, RESUME_MAY_CHANGE, DecodeConfig
from codat.runs import Interrupted, TrainingStopped

# Help text of each DecodeConfig field, shown by every verb that decodes.
DECODE_HELP = {
    "decoder": "decoder of the model's arch (first = default): dat lookahead|greedy|viterbi|"
    "sample; at beam|greedy; nat/glat argmax|npd; ctc greedy; cmlm mask-predict",
    "precision": "fp32, or bf16: the model's matmuls under bfloat16 autocast, token logits in "
    "float32 (every decoder)",
    "lookahead_token_weight": "lookahead: weight of the token log-prob in the next-vertex score",
    "viterbi_length_exponent": "viterbi: the joint score is divided by length ** this",
    "max_tokens": "decoding batch size, in decoder positions",
    "samples": "sample: hypotheses per sentence; npd: noisy candidates",
    "temperature": "sample: sampling temperature",
    "top_p": "sample: top-p of each sampling step",
    "top_tokens": "sample: candidate tokens per vertex",
    "rerank_token_weight": "sample: rerank score w * token score + (1 - w) * transition score",
    "sampler": "sample: sampler mode log|paper|dat ('' = the run's codat.sampler)",
    "rerank": "sample: pick the best sample by score (the --rerank-token-weight mix) or by "
    "marginal (the DAG marginal log q(y)/|y|)",
    "seed": "sample / npd: random seed",
    "beam": "at: beam size",
    "length_penalty": "at: beam search length penalty",
    "max_len_a": "at: output length limit a * source length + b",
    "max_len_b": "at: output length limit a * source length + b",
    "length_beam": "nat / glat / cmlm: number of predicted lengths tried",
    "noise": "npd: std of the Gaussian noise on the decoder inputs",
    "iterations": "cmlm: mask-predict iterations",
}
_TYPES = {"int": int, "float": float, "str": str}
_BETA_RENAMED = (
    "was renamed: use --lookahead-token-weight (lookahead decoder) or --rerank-token-weight "
    "(sample decoder's rerank weight)"
)


class _RenamedFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {_BETA_RENAMED}")


def flag_name(field_name: str) -> str:
    """The command-line flag of a DecodeConfig field: top_p -> --top-p."""
    return "--" + field_name.replace("_", "-")


def add_decode_flags(p: argparse.ArgumentParser, *, title: str) -> None:
    """One flag per `DecodeConfig` field (default None: keep the run's setting), plus the
    renamed `--beta`, which exits with an error naming its replacements."""
    group = p.add_argument_group(title)
    for f in dataclasses.fields(DecodeConfig):
        kind, help_ = _TYPES[f.type], DECODE_HELP[f.name]
        group.add_argument(flag_name(f.name), dest=f.name, type=kind, default=None, help=help_)
    p.add_argument("--beta", nargs="?", action=_RenamedFlag, help=argparse.SUPPRESS)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")


# --- the parser -----------------------------------------------------------------------------------


def _verb(sub, name: str, func, help_: str, description: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=description or help_, allow_abbrev=False)
    p.set_defaults(func=func)
    return p


def _add_prepare(sub) -> None:
    p = _verb(
        sub,
        "prepare",
        commands.prepare,
        "raw parallel text -> sentencepiece model + id tensors",
        "Read PREFIX.LANG[.gz] of each split, train a joint sentencepiece BPE model, write id "
        "tensors; the output directory appears only when complete.",
    )
    p.add_argument("--src", required=True, help="source language suffix, e.g. de")
    p.add_argument("--tgt", required=True, help="target language suffix, e.g. en")
    p.add_argument(
        "--train", required=True, help="training prefix: reads PREFIX.SRC[.gz], PREFIX.TGT[.gz]"
    )
    p.add_argument("--valid", help="validation prefix")
    p.add_argument("--test", action="append", default=[], help="test prefix (repeatable)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument(
        "--upsample-scale", type=float, default=8.0, help="lambda used to drop pairs with L < n"
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        default=2.0,
        help="drop training pairs whose length ratio (either way) is above this; a per-task "
        "choice: 2 (default) for translation and paraphrase, 0 = off for summarisation",
    )
    p.add_argument(
        "--max-positions",
        type=int,
        default=256,
        help="the model's max_source_positions: longer sources (+</s>) are truncated (see "
        "--long-sources), training pairs with a longer target (+<s></s>) dropped (0 = no limit)",
    )
    p.add_argument(
        "--long-sources",
        choices=("truncate", "drop"),
        default="truncate",
        help="sources longer than --max-positions: truncate (default, counted and reported) or "
        "drop the training pair (evaluation splits are always truncated)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory written by an earlier codat prepare "
        "(never any other directory)",
    )


def _add_data(sub) -> None:
    p = _verb(
        sub,
        "data",
        commands.data,
        "download a corpus (multi30k, qqp, scitldr) from its pinned upstream into DIR/NAME",
        "Download a corpus from its public upstream (a pinned GitHub commit), verify every file's "
        "sha256, build the split files and write DIR/NAME (appears only when complete).",
    )
    p.add_argument("name", help="multi30k, qqp or scitldr")
    p.add_argument("--to", required=True, metavar="DIR", help="parent directory, e.g. data")
    p.add_argument(
        "--base-url",
        default="https://raw.githubusercontent.com",
        help="where OWNER/REPO/COMMIT/PATH are served (a mirror; default GitHub's raw files)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train(sub) -> None:
    p = _verb(
        sub,
        "train",
        commands.train,
        "train a model (DAT, AT, NAT, GLAT, CTC, CMLM) from a YAML config",
        f"Train a model (model.arch: {', '.join(ARCHS)}).",
    )
    p.add_argument(
        "config", help="YAML config file, or the name of a shipped recipe (multi30k_deen_dat_small)"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    p.add_argument(
        "--resume",
        nargs="?",
        const="yes",
        default=None,
        type=_resume_mode,
        help="continue the run in run_dir from last/; --resume auto: resume if it has a "
        "checkpoint, else start it (put overrides before --resume)",
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY[,KEY]",
        help="--resume: let these config keys differ from the run's "
        f"({', '.join(RESUME_MAY_CHANGE)})",
    )


def _resume_mode(value: str) -> str:
    if value not in ("yes", "auto"):
        raise argparse.ArgumentTypeError(
            f"expected nothing or 'auto', got '{value}' (put config overrides before --resume)"
        )
    return value


def _add_generate(sub) -> None:
    p = _verb(sub, "generate", commands.generate, "translate a file or stdin with a trained run")
    p.add_argument(
        "run_dir", help="run directory (uses its best/ checkpoint) or checkpoint directory"
    )
    p.add_argument(
        "--input", "-i", default="-", help="source text file, one sentence per line (- = stdin)"
    )
    p.add_argument("--output", "-o", default="-", help="output file (- = stdout)")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="translate line by line, writing each output line as soon as it is decoded (the "
        "default when reading a terminal; otherwise the input is batched by --max-tokens)",
    )
    p.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        help="refuse inputs longer than the model's source positions (default: truncate them "
        "and say how many)",
    )
    add_decode_flags(p, title="decoding (default: the run's decode settings)")
    _add_device(p)


def _add_export(sub) -> None:
    p = _verb(
        sub,
        "export",
        commands.export,
        "write a self-contained model directory with a model card, ready to publish",
        "Write OUT: the run's best checkpoint (model.safetensors, config.yaml, spm.model) and a "
        "model card README.md (data, config, validation scores from metrics.jsonl). "
        "codat.load(OUT) and codat generate OUT read it.",
    )
    p.add_argument("run_dir", help="run directory")
    p.add_argument("out", help="output directory (created; appears only when complete)")
    p.add_argument("--checkpoint", help="export this checkpoint directory instead of RUN_DIR/best")
    p.add_argument("--force", action="store_true", help="replace an earlier export in OUT")


def _add_distill(sub) -> None:
    p = _verb(
        sub,
        "distill",
        commands.distill,
        "decode a training source file with a teacher (sequence-level KD)",
        "Decode every line of SRC with a trained model and write OUT atomically, to pair with "
        "SRC in codat prepare. An AT teacher decodes with beam search unless --decoder says "
        "otherwise (even if its run validated with greedy); other archs use the run's decoder.",
    )
    p.add_argument("run_dir", help="run or checkpoint directory of the teacher (usually an AT)")
    p.add_argument("src", help="source sentences, one per line (.gz allowed)")
    p.add_argument("out", help="distilled target file to write")
    p.add_argument(
        "--no-truncate",
        dest="truncate",
        action="store_false",
        help="refuse sources longer than the model's source positions",
    )
    add_decode_flags(p, title="decoding (default: the run's decode settings; AT: --decoder beam)")
    _add_device(p)


def _add_small_verbs(sub) -> None:
    p = _verb(
        sub, "average", commands.average, "average the kept best checkpoints of a run into one"
    )
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output checkpoint dir (default RUN_DIR/averaged)")
    p = _verb(
        sub,
        "score",
        commands.score,
        "corpus BLEU, chrF or ROUGE of a hypothesis file against references",
        "Corpus BLEU / chrF (sacreBLEU) or ROUGE-1/2/L/Lsum (rouge-score, stemmed) of HYP "
        "against REF (one reference per line) or --refs-jsonl (several per line: a JSON list).",
    )
    p.add_argument("hyp")
    p.add_argument("ref", nargs="?", help="reference file, one per line (or use --refs-jsonl)")
    p.add_argument(
        "--refs-jsonl",
        help="references as JSON lists, one line per hypothesis (e.g. SciTLDR's dev.refs.jsonl); "
        "ROUGE takes the best reference per sentence, BLEU/chrF use all",
    )
    p.add_argument("--metric", default="bleu", help="bleu (default), chrf or rouge")
    p.add_argument("--tokenize", default="13a", help="sacreBLEU tokenizer for bleu (default 13a)")
    p = _verb(
        sub,
        "plot",
        commands.plot,
        "PNG of validation DP / contrastive loss / BLEU curves of runs",
        "Validation DP loss, contrastive loss and BLEU against step (paper Figure 2).",
    )
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", help="output PNG (default: RUN_DIR/curves.png of the first run)")
    p.add_argument("--labels", help="comma-separated legend labels, one per run dir")


def _add_sampling_verbs(sub) -> None:
    analyze = _verb(
        sub,
        "analyze",
        commands.analyze,
        "NCM and Oracle BLEU (best of K samples) on a prepared split",
        "NCM and Oracle BLEU (best of K samples) of a trained DAT on a prepared split.",
    )
    analyze.add_argument(
        "--ncm-scorer",
        metavar="AT_RUN",
        default=None,
        help="AT run (or checkpoint) that scores the sample decoder's outputs: reports the "
        "paper's NCM, its NLL per token (without it, only dp_loss_per_token, the reference's "
        "DAG loss per token)",
    )
    tune = _verb(
        sub,
        "tune-beta",
        commands.tune_beta,
        "pick the sample decoder's rerank token weight on validation",
        "Pick the sample decoder's rerank token weight by the corpus score (--metric, default "
        "the run's data.valid_metric) on validation.",
    )
    tune.add_argument(
        "--betas",
        "--rerank-token-weights",
        dest="betas",
        default="0.3,0.5,0.7",
        help="comma-separated rerank token weights to compare",
    )
    for p in (analyze, tune):
        p.add_argument("run_dir", help="run directory (its best/) or checkpoint directory")
        p.add_argument("--data-dir", required=True, help="prepared data directory (codat prepare)")
        p.add_argument("--split", default="val", help="split name (default val)")
        p.add_argument("--max-sentences", type=int, default=0, help="only the first N (0 = all)")
        p.add_argument("--output", "-o", default=None, help="also write the result as JSON here")
        p.add_argument(
            "--metric",
            default=None,
            help="bleu, chrf or rouge (default: the run's data.valid_metric)",
        )
        p.add_argument(
            "--tokenize",
            default=None,
            help="sacreBLEU tokenizer (default: the run's data.tokenize)",
        )
        add_decode_flags(p, title="sampling (default: the run's decode settings)")
        _add_device(p)


def _add_benchmark(sub) -> None:
    bench = sub.add_parser(
        "benchmark",
        help="dag: the DP vs a dense reference; decode: lookahead vs sampling; speed: batch-1 "
        "latency and speed-up of every model's decoders",
        allow_abbrev=False,
    )
    kinds = bench.add_subparsers(dest="kind", metavar="{dag,decode,speed,train}", required=True)
    p = _verb(
        kinds, "dag", commands.benchmark_dag, "time the DAG forward algorithm vs a dense reference"
    )
    p.add_argument("--batch-size", type=int, default=32, help="B (default 32)")
    p.add_argument("--target-len", type=int, default=30, help="N, longest target (default 30)")
    p.add_argument("--graph-len", type=int, default=240, help="L, longest graph (default 240)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the random logits by this: > 1 gives the peaky distributions of a trained "
        "model (default 1)",
    )
    p.add_argument(
        "--thread-counts",
        default="",
        help="comma list of CPU thread counts, one report each, e.g. 1,2 (default: --threads)",
    )
    decode = _verb(
        kinds,
        "decode",
        commands.benchmark_decode,
        "batch-1 latency of lookahead vs sampling + rerank",
    )
    decode.add_argument("run_dir", help="run directory (its best/) or checkpoint directory")
    add_decode_flags(
        decode,
        title="the sample decoder (default: samples 128, temperature 0.05, top-p 0.5, "
        "top-tokens 1, rerank-token-weight 0.5, else the run's settings)",
    )
    speed = _verb(
        kinds,
        "speed",
        commands.benchmark_speed,
        "batch-1 latency of every decoder of many runs and the speed-up over the first "
        "(put the AT first: its beam search is the baseline)",
    )
    speed.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR", help="e.g. at=runs/at")
    speed.add_argument("--samples", type=int, default=128, help="dat sample / npd candidates")
    speed.add_argument("--iterations", default="1,4,10", help="cmlm mask-predict iterations")
    for q in (decode, speed):
        q.add_argument(
            "--batch-size",
            type=int,
            default=1,
            help="sentences per decoding call (1 = the paper's latency protocol)",
        )
        q.add_argument(
            "--bf16", action="store_true", help="also time every row under bf16 autocast"
        )
        q.add_argument("--input", "-i", required=True, help="source text, one sentence per line")
        q.add_argument("--max-sentences", type=int, default=200, help="first N lines (0 = all)")
        q.add_argument("--repeats", type=int, default=3, help="passes over the sentences")
    for q in (p, decode, speed):
        _add_device(q)
        q.add_argument("--json", metavar="PATH", help="also write the result dict as JSON")
    train = _verb(
        kinds,
        "train",
        commands.benchmark_train,
        "the DAT training step with its speed settings off vs on: same batches, one process",
    )
    train.add_argument("config", help="DAT config YAML or shipped recipe name")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.dir=data-bin")
    train.add_argument("--batches", type=int, default=4, help="batches per timed pass (default 4)")
    train.add_argument(
        "--repeats", type=int, default=5, help="alternating timed passes (default 5)"
    )
    train.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps before each timed pass: each variant's steady state (default 1)",
    )
    train.add_argument("--ratio", type=float, default=None, help="glancing ratio (default: start)")
    train.add_argument("--seed", type=int, default=0, help="batch order and model seed (default 0)")
    train.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0 = torch default; 1 is steadiest)"
    )
    train.add_argument("--json", metavar="PATH", help="also write the result dict as JSON")


def build_parser() -> argparse.ArgumentParser:
    """The `codat` parser: one sub-command per verb."""
    parser = argparse.ArgumentParser(
        prog="codat",
        description="DA-Transformer and CoDAT (and AT, NAT, GLAT, CTC, CMLM baselines).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"codat {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<command>", required=True)
    _add_data(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_distill(sub)
    _add_export(sub)
    _add_sampling_verbs(sub)
    _add_small_verbs(sub)
    _add_benchmark(sub)
    return parser


def run(argv: list[str]) -> int:
    """Parse `argv` and run its verb; the verb's errors propagate (argparse's exit with 2)."""
    a = build_parser().parse_args(argv)
    return a.func(a)


def main(argv: list[str] | None = None) -> None:
    """The console script: exit 0 on success, 1 with one error line on a bad input, 2 on bad
    usage."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    verb = " ".join(argv[:2] if argv[:1] == ["benchmark"] else argv[:1])
    try:
        code = run(argv)
    except BrokenPipeError:  # `codat score ... | head -1`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # what a shell reports for SIGPIPE
    except (ValueError, FileNotFoundError, FileExistsError, TrainingStopped) as e:
        print(f"codat {verb}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except ImportError as e:
        if e.name is not None:  # a real missing module: keep the traceback
            raise
        print(f"codat {verb}: error: {e}", file=sys.stderr)  # e.g. codat plot without matplotlib
        sys.exit(1)
    except Interrupted as e:
        print(f"codat {verb}: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print(f"codat {verb}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
