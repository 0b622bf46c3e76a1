"""Corpus metrics through sacreBLEU (`codat score HYP REF`)."""

from __future__ import annotations

import argparse
import pathlib

import sacrebleu


def read_text(path: str) -> list[str]:
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 at byte {e.start}") from None


def corpus_bleu(
    hyps: list[str], refs: list[str], *, tokenize: str = "13a"
) -> sacrebleu.metrics.bleu.BLEUScore:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="codat score", description="sacreBLEU of HYP against REF.")
    p.add_argument("hyp")
    p.add_argument("ref")
    p.add_argument("--tokenize", default="13a")
    a = p.parse_args(argv)
    hyps, refs = read_text(a.hyp), read_text(a.ref)
    if len(hyps) != len(refs):
        raise ValueError(f"{a.hyp} has {len(hyps)} lines but {a.ref} has {len(refs)}")
    bleu = sacrebleu.metrics.BLEU(tokenize=a.tokenize)
    score = bleu.corpus_score(hyps, [refs])
    print(score)
    print(f"signature: {bleu.get_signature()}")
    return 0
