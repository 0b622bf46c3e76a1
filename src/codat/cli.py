"""`codat <command>`: one function per verb."""

from __future__ import annotations

import argparse
import logging
import sys


def _train(argv: list[str]) -> int:
    from codat.config import load_config
    from codat.train import train

    p = argparse.ArgumentParser(
        prog="codat train", description="Train a model (model.arch: dat, at, nat, ctc, cmlm)."
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir from last/")
    a = p.parse_args(argv)
    train(load_config(a.config, a.overrides), resume=a.resume)
    return 0


def _score(argv: list[str]) -> int:
    from codat.metrics import main

    return main(argv)


def _benchmark(argv: list[str]) -> int:
    from codat import benchmark

    mains = {
        "dag": benchmark.main_dag,
        "decode": benchmark.main_decode,
        "speed": benchmark.main_speed,
    }
    if not argv or argv[0] not in mains:
        print("usage: codat benchmark {dag,decode,speed} [options]", file=sys.stderr)
        return 2
    return mains[argv[0]](argv[1:])


def _analyze(argv: list[str]) -> int:
    from codat.analysis import main_analyze

    return main_analyze(argv)


def _tune_beta(argv: list[str]) -> int:
    from codat.analysis import main_tune_beta

    return main_tune_beta(argv)


def _plot(argv: list[str]) -> int:
    from codat.plot import main

    return main(argv)


def _prepare(argv: list[str]) -> int:
    from codat.prepare import main

    return main(argv)


def _generate(argv: list[str]) -> int:
    from codat.generate import main

    return main(argv)


def _distill(argv: list[str]) -> int:
    from codat.generate import main_distill

    return main_distill(argv)


def _average(argv: list[str]) -> int:
    from codat.checkpoint import main_average

    return main_average(argv)


COMMANDS = {
    "prepare": (_prepare, "raw parallel text -> sentencepiece model + id tensors"),
    "train": (_train, "train a model (DAT, AT, NAT/GLAT, CTC, CMLM) from a YAML config"),
    "generate": (_generate, "translate a file or stdin with a trained run"),
    "distill": (_distill, "decode a training source file with a teacher (sequence-level KD)"),
    "average": (_average, "average the kept best checkpoints of a run into one"),
    "score": (_score, "corpus sacreBLEU of a hypothesis file against a reference file"),
    "tune-beta": (_tune_beta, "pick the sample decoder's rerank weight beta on validation"),
    "analyze": (_analyze, "NCM and Oracle BLEU (best of K samples) on a prepared split"),
    "plot": (_plot, "PNG of validation DP / contrastive loss / BLEU curves of runs"),
    "benchmark": (
        _benchmark,
        "benchmark dag: the DP vs a dense reference; decode: lookahead vs sampling; "
        "speed: batch-1 latency and speed-up of every model's decoders",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: codat <command> [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    func = COMMANDS[argv[0]][0]
    try:
        code = func(argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"codat {argv[0]}: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
