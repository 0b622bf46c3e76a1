"""Corpus metrics through sacreBLEU: validation BLEU, `codat score HYP REF`, analyze/tune-beta."""

from __future__ import annotations

import pathlib

import sacrebleu

from codat.data import read_lines

TOKENIZERS = tuple(sacrebleu.metrics.BLEU.TOKENIZERS)  # sacreBLEU's --tokenize choices


def read_text(path: str | pathlib.Path) -> list[str]:
    """The lines of a UTF-8 text file (`data.read_lines`: split on newlines only); a missing
    file or invalid UTF-8 raises naming the file."""
    return read_lines(path)


def corpus_bleu(
    hyps: list[str], refs: list[str], *, tokenize: str = "13a"
) -> sacrebleu.metrics.bleu.BLEUScore:
    """Corpus sacreBLEU of detokenised hypotheses against one reference each."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize)


def score_files(
    hyp: str | pathlib.Path, ref: str | pathlib.Path, *, tokenize: str = "13a"
) -> tuple[sacrebleu.metrics.bleu.BLEUScore, str]:
    """Corpus sacreBLEU of the hypothesis file against the reference file, and its signature."""
    if tokenize not in TOKENIZERS:
        raise ValueError(f"--tokenize '{tokenize}': choose one of {', '.join(TOKENIZERS)}")
    hyps, refs = read_text(hyp), read_text(ref)
    for path, lines in ((hyp, hyps), (ref, refs)):
        if not lines:
            raise ValueError(f"{path} is empty: nothing to score")
    if len(hyps) != len(refs):
        raise ValueError(f"{hyp} has {len(hyps)} lines but {ref} has {len(refs)}")
    bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
    return bleu.corpus_score(hyps, [refs]), str(bleu.get_signature())
