"""Corpus metrics through the libraries: BLEU and chrF from sacreBLEU, ROUGE from `rouge-score`.

Used by validation (checkpoint selection: `data.valid_metric`), `codat score`, analyze and
tune-beta. Every scorer takes one or several references per hypothesis (`Refs`: a list of
strings, or a list of lists of strings); with several, BLEU and chrF use sacreBLEU's
multi-reference statistics and ROUGE takes, per sentence and per ROUGE type, the best F1 over the
references (`RougeScorer.score_multi`), as the SciTLDR paper does.

ROUGE: F1 x 100, averaged over sentences; Porter stemming (NLTK's stemmer: code only, no NLTK
data download); rouge-score's tokenizer lowercases and keeps only [a-z0-9], so it suits English
targets only. The `rouge` selection score is the average of ROUGE-1, ROUGE-2 and ROUGE-L, as in
the CoDAT paper's Table 4 ("Avg"). Hypotheses are one line each, so ROUGE-Lsum equals ROUGE-L.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass, field

import sacrebleu

from codat.data import read_lines

TOKENIZERS = tuple(sacrebleu.metrics.BLEU.TOKENIZERS)  # sacreBLEU's --tokenize choices
METRICS = ("bleu", "chrf", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

Refs = list[str] | list[list[str]]


@dataclass(frozen=True)
class Score:
    """One corpus score: `metric`, its number `score` (BLEU, chrF, or the ROUGE-1/2/L average),
    `parts` (ROUGE: each type), `signature` (what was computed) and `text` (one printable line)."""

    metric: str
    score: float
    signature: str
    text: str
    parts: dict[str, float] = field(default_factory=dict)


def read_refs_jsonl(path: str | pathlib.Path) -> list[list[str]]:
    """Several references per line: each line a JSON list of strings (SciTLDR's *.refs.jsonl;
    a bare JSON string counts as a list of one).

    Raises:
        ValueError: naming the file and line of a line that is not such a list, or is empty.
    """
    refs = []
    for i, line in enumerate(read_lines(path), 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not JSON ({e.msg})") from None
        item = [item] if isinstance(item, str) else item
        if not isinstance(item, list) or not item or not all(isinstance(r, str) for r in item):
            raise ValueError(f"{path}, line {i}: expected a non-empty JSON list of strings")
        refs.append(item)
    return refs


def as_multi(refs: Refs) -> list[list[str]]:
    """Each hypothesis's references as a list (one reference per line becomes a list of one)."""
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def _streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's reference streams: stream j holds every sentence's j-th reference (None where
    a sentence has fewer)."""
    width = max((len(r) for r in refs), default=1)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


def _check(hyps: list[str], refs: list[list[str]]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")
    if any(not r for r in refs):
        raise ValueError("a hypothesis has no reference")


def corpus_bleu(
    hyps: list[str], refs: Refs, *, tokenize: str = "13a"
) -> sacrebleu.metrics.bleu.BLEUScore:
    """Corpus sacreBLEU of detokenised hypotheses against one or more references each."""
    multi = as_multi(refs)
    _check(hyps, multi)
    return sacrebleu.corpus_bleu(hyps, _streams(multi), tokenize=tokenize)


def bleu_score(hyps: list[str], refs: Refs, *, tokenize: str = "13a") -> Score:
    """Corpus BLEU as a `Score` (with sacreBLEU's signature)."""
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize '{tokenize}': choose one of {', '.join(TOKENIZERS)}")
    multi = as_multi(refs)
    _check(hyps, multi)
    bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
    result = bleu.corpus_score(hyps, _streams(multi))
    return Score("bleu", result.score, str(bleu.get_signature()), str(result))


def chrf_score(hyps: list[str], refs: Refs) -> Score:
    """Corpus chrF (sacreBLEU's defaults: character 6-grams, beta 2)."""
    multi = as_multi(refs)
    _check(hyps, multi)
    chrf = sacrebleu.metrics.CHRF()
    result = chrf.corpus_score(hyps, _streams(multi))
    return Score("chrf", result.score, str(chrf.get_signature()), str(result))


def rouge_score(hyps: list[str], refs: Refs) -> Score:
    """ROUGE-1/2/L/Lsum F1 x 100 (stemmed), the mean over sentences of the best reference's F1;
    `score` is the average of ROUGE-1, ROUGE-2 and ROUGE-L."""
    from rouge_score import rouge_scorer  # imported here: only ROUGE users pay for nltk

    logging.getLogger("absl").setLevel(logging.WARNING)  # its "Using default tokenizer." line
    multi = as_multi(refs)
    _check(hyps, multi)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, sent_refs in zip(hyps, multi, strict=True):
        for key, value in scorer.score_multi(sent_refs, hyp).items():
            sums[key] += value.fmeasure
    parts = {k: 100 * v / max(len(hyps), 1) for k, v in sums.items()}
    avg = (parts["rouge1"] + parts["rouge2"] + parts["rougeL"]) / 3
    width = max((len(r) for r in multi), default=0)
    signature = f"rouge-score|F1|stem:porter|refs:max-of-{width}|avg:R1,R2,RL"
    text = f"ROUGE avg {avg:.2f} = " + " ".join(f"{k} {v:.2f}" for k, v in parts.items())
    return Score("rouge", avg, signature, text, parts)


def corpus_score(metric: str, hyps: list[str], refs: Refs, *, tokenize: str = "13a") -> Score:
    """The corpus score of `metric` (bleu, chrf or rouge; `tokenize` is BLEU's tokenizer).

    Raises:
        ValueError: an unknown metric or tokenizer, or hypotheses and references that differ in
            number.
    """
    if metric == "bleu":
        return bleu_score(hyps, refs, tokenize=tokenize)
    if metric == "chrf":
        return chrf_score(hyps, refs)
    if metric == "rouge":
        return rouge_score(hyps, refs)
    raise ValueError(f"metric '{metric}': choose one of {', '.join(METRICS)}")


def score_files(
    hyp: str | pathlib.Path,
    ref: str | pathlib.Path | None = None,
    *,
    metric: str = "bleu",
    tokenize: str = "13a",
    refs_jsonl: str | pathlib.Path | None = None,
) -> Score:
    """Corpus `metric` of the hypothesis file against the reference file (one reference per
    line) or against `refs_jsonl` (several per line; see `read_refs_jsonl`), not both.

    Raises:
        ValueError: naming the flag or file at fault (no reference, both, empty or misaligned
            files, an unknown metric or tokenizer).
    """
    if metric not in METRICS:
        raise ValueError(f"--metric '{metric}': choose one of {', '.join(METRICS)}")
    if tokenize not in TOKENIZERS:
        raise ValueError(f"--tokenize '{tokenize}': choose one of {', '.join(TOKENIZERS)}")
    if (ref is None) == (refs_jsonl is None):
        raise ValueError("give either a reference file REF or --refs-jsonl FILE (exactly one)")
    ref_path = ref if ref is not None else refs_jsonl
    hyps = read_lines(hyp)
    refs = read_lines(ref) if ref is not None else read_refs_jsonl(refs_jsonl)
    for path, lines in ((hyp, hyps), (ref_path, refs)):
        if not lines:
            raise ValueError(f"{path} is empty: nothing to score")
    if len(hyps) != len(refs):
        raise ValueError(f"{hyp} has {len(hyps)} lines but {ref_path} has {len(refs)}")
    return corpus_score(metric, hyps, refs, tokenize=tokenize)
