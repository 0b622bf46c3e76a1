"""`codat.metrics`: BLEU / chrF through sacreBLEU and ROUGE through rouge-score, with one or
several references per hypothesis, and `codat score` on files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from codat.cli import main as cli_main
from codat.metrics import (
    as_multi,
    bleu_score,
    chrf_score,
    corpus_bleu,
    corpus_score,
    read_refs_jsonl,
    rouge_score,
    score_files,
)

HYPS = ["the cats are running in the park", "a man rides a horse"]
REFS = ["the cat runs in the park", "a woman is riding a brown horse"]
MULTI = [["the cat runs in the park", "cats run in a park"], ["a man is riding a horse"]]


def test_single_references_match_sacrebleu_and_rouge_score():
    assert corpus_bleu(HYPS, REFS).score == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert chrf_score(HYPS, REFS).score == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = [scorer.score(r, h) for h, r in zip(HYPS, REFS, strict=True)]
    expect = {k: 100 * sum(s[k].fmeasure for s in per) / 2 for k in ("rouge1", "rouge2", "rougeL")}
    got = rouge_score(HYPS, REFS)
    for key, value in expect.items():
        assert got.parts[key] == pytest.approx(value)
    assert got.parts["rougeLsum"] == pytest.approx(got.parts["rougeL"])  # one-line summaries
    assert got.score == pytest.approx(sum(expect.values()) / 3)


def test_rouge_stems_without_nltk_data(tmp_path):
    # "cats"/"cat" and "running"/"runs" match only through the Porter stemmer; an empty NLTK_DATA
    # path shows that no NLTK data download is needed.
    code = (
        "from codat.metrics import rouge_score;"
        "print(rouge_score(['cats running'], ['cat runs']).parts['rouge1'])"
    )
    env = {"NLTK_DATA": str(tmp_path), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(100.0)


def test_rouge_takes_the_best_reference_per_sentence():
    best = rouge_score(HYPS, MULTI)
    singles = [rouge_score(HYPS, [[a], [b]]) for a in MULTI[0] for b in MULTI[1]]
    assert best.parts["rouge1"] == pytest.approx(max(s.parts["rouge1"] for s in singles))
    assert "max-of-2" in best.signature


def test_bleu_and_chrf_use_every_reference_with_a_varying_count():
    streams = [[MULTI[0][0], MULTI[1][0]], [MULTI[0][1], None]]
    assert bleu_score(HYPS, MULTI).score == sacrebleu.corpus_bleu(HYPS, streams).score
    assert chrf_score(HYPS, MULTI).score == sacrebleu.corpus_chrf(HYPS, streams).score
    assert bleu_score(HYPS, MULTI).score > bleu_score(HYPS, [m[1:] or m for m in MULTI]).score


def test_identical_hypotheses_score_100_on_every_metric():
    for metric in ("bleu", "chrf", "rouge"):
        assert corpus_score(metric, REFS, REFS).score == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: corpus_score("meteor", HYPS, REFS), "metric 'meteor'"),
        (lambda: corpus_score("bleu", HYPS, REFS, tokenize="nope"), "tokenize 'nope'"),
        (lambda: corpus_score("rouge", HYPS, REFS[:1]), "2 hypotheses vs 1 references"),
        (lambda: corpus_score("chrf", HYPS, [["a"], []]), "has no reference"),
    ],
)
def test_bad_arguments_name_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_as_multi_wraps_single_references():
    assert as_multi(["a", ["b", "c"]]) == [["a"], ["b", "c"]]


def test_read_refs_jsonl_and_its_errors(tmp_path):
    good = tmp_path / "refs.jsonl"
    good.write_text('["a", "b"]\n"c"\n')
    assert read_refs_jsonl(good) == [["a", "b"], ["c"]]
    bad = (('["a"]\n[1]\n', "line 2"), ("[]\n", "line 1"), ("{\n", "line 1: not JSON"))
    for text, match in bad:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(ValueError, match=match):
            read_refs_jsonl(tmp_path / "bad.jsonl")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "hyp.txt").write_text("".join(h + "\n" for h in HYPS))
    (tmp_path / "ref.txt").write_text("".join(r + "\n" for r in REFS))
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(m) + "\n" for m in MULTI))
    return tmp_path


def test_score_files_one_or_several_references(files):
    one = score_files(files / "hyp.txt", files / "ref.txt", metric="rouge")
    assert one.score == pytest.approx(rouge_score(HYPS, REFS).score)
    many = score_files(files / "hyp.txt", metric="chrf", refs_jsonl=files / "refs.jsonl")
    assert many.score == pytest.approx(chrf_score(HYPS, MULTI).score)
    with pytest.raises(ValueError, match="exactly one"):
        score_files(files / "hyp.txt", files / "ref.txt", refs_jsonl=files / "refs.jsonl")
    with pytest.raises(ValueError, match="exactly one"):
        score_files(files / "hyp.txt")
    (files / "short.jsonl").write_text('["x"]\n')
    with pytest.raises(ValueError, match="short.jsonl has 1"):
        score_files(files / "hyp.txt", refs_jsonl=files / "short.jsonl")


@pytest.mark.parametrize("metric", ["bleu", "chrf", "rouge"])
def test_cli_score_prints_the_metric_and_its_signature(files, capsys, metric):
    argv = ["score", str(files / "hyp.txt"), "--refs-jsonl", str(files / "refs.jsonl")]
    with pytest.raises(SystemExit) as info:
        cli_main([*argv, "--metric", metric])
    assert info.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == corpus_score(metric, HYPS, MULTI).text
    assert out[1].startswith("signature: ")


def test_cli_score_rejects_an_unknown_metric(files, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["score", str(files / "hyp.txt"), str(files / "ref.txt"), "--metric", "x"])
    assert info.value.code == 1
    assert "--metric 'x'" in capsys.readouterr().err
