"""Evaluation (`codat.evaluate`) on tiny untrained models and the copy task's prepared data:
`SENTENCE_LOSSES` covers every arch; `Validation.dp_loss` equals the mean of the arch's sentence
loss over the split computed in one batch (batching-invariant, no-path sentences counted 0);
`sample_stats` are `codat_term`'s statistics averaged over sentences; `evaluate` reports the
corpus BLEU of `translate_ids` and adds the sample statistics only for DAT; `analyze`'s NCM
equals the DP log-likelihood recomputed directly and its Oracle BLEU is at least the reranked
BLEU; its Spearman statistic is the mean of `loop_spearman` (textbook ranks) over the rows of
s_k and sentence BLEU, and `spearman_rows` equals that loop with ties and constant rows;
`tune_beta` reranks the same samples with every weight (ties: nearest 0.5); `source_sensitivity`
scores each reference with another sentence's source, and a model blind to its source scores both
the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import shutil

import pytest
import torch
from conftest import make_model
from corpus import prepare_copy_task
from reference import loop_spearman

from codat.checkpoint import save_checkpoint
from codat.cli import run
from codat.config import (
    ARCHS,
    CodatConfig,
    DataConfig,
    DecodeConfig,
    RunConfig,
    TrainConfig,
)
from codat.dag import dag_log_likelihood
from codat.dat_decode import marginal_scores
from codat.dat_train import codat_term
from codat.data import BOS_ID, EOS_ID, ParallelData, read_meta, token_batches
from codat.evaluate import (
    SENTENCE_LOSSES,
    Validation,
    analyze,
    average_ranks,
    first_sentences,
    load_split,
    sample_split,
    source_sensitivity,
    spearman_rows,
    truncate_sources,
    tune_beta,
    write_json,
)
from codat.generate import Translator, translate_ids
from codat.metrics import corpus_bleu, corpus_score
from codat.objectives import gather_token_logp
from codat.rewards import sentence_bleu

NULL = contextlib.nullcontext()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    return prepare_copy_task(tmp_path_factory.mktemp("evaluate"))


def _cfg(data: pathlib.Path, arch: str, **train) -> RunConfig:
    model = make_model(arch, vocab_size=read_meta(data)["vocab_size"]).cfg
    glance = {"glance_start": 0.0, "glance_end": 0.0}
    return RunConfig(
        model=model,
        data=DataConfig(dir=str(data)),
        train=TrainConfig(**{"max_tokens": 64, **glance, **train}),
        codat=CodatConfig(samples=4, eval_sentences=5),
        decode=DecodeConfig(max_tokens=64, samples=4),
    )


def _model(cfg: RunConfig) -> torch.nn.Module:
    return make_model(cfg.model.arch, vocab_size=cfg.model.vocab_size)


def test_sentence_losses_cover_every_arch():
    assert set(SENTENCE_LOSSES) == set(ARCHS)
    assert SENTENCE_LOSSES["glat"] is SENTENCE_LOSSES["nat"]


def test_load_split_and_first_sentences(data, tmp_path):
    split, refs = load_split(data, "val")
    assert len(split) == len(refs) == 12
    few, few_refs = first_sentences(split, refs, 5)
    assert len(few) == 5 and few_refs == refs[:5]
    assert first_sentences(split, refs, 0) == (split, refs)
    (tmp_path / "val.safetensors").write_bytes((data / "val.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="val.ref.txt"):
        load_split(tmp_path, "val")


def test_validation_load_keeps_eval_max_sentences(data):
    valid = Validation.load(_cfg(data, "dat", eval_max_sentences=7), torch.device("cpu"), NULL)
    assert len(valid.data) == len(valid.refs) == 7
    assert valid.spm_path == data / "spm.model"


@pytest.mark.parametrize("arch", ARCHS)
def test_dp_loss_is_the_mean_sentence_loss_whatever_the_batching(data, arch):
    cfg = _cfg(data, arch)
    model = _model(cfg).train()
    valid = Validation.load(cfg, torch.device("cpu"), NULL)
    sizes = torch.maximum(valid.data.src_lens, valid.data.tgt_lens)
    assert int(sizes.max()) * len(valid.data) > cfg.train.max_tokens  # several batches
    got = valid.dp_loss(model, cfg)
    assert model.training
    model.eval()
    with torch.no_grad():
        per = SENTENCE_LOSSES[arch](model, valid.data.collate(list(range(len(valid.data)))))
    per = torch.where(torch.isfinite(per), per, torch.zeros_like(per))
    assert got == pytest.approx(float(per.mean()), rel=1e-5)


def test_sample_stats_average_codat_term_over_sentences(data):
    cfg = _cfg(data, "dat")
    model = _model(cfg).eval()
    valid = Validation.load(cfg, torch.device("cpu"), NULL)
    stats = valid.sample_stats(model, cfg)
    assert set(stats) == {"valid_cl_loss", "valid_sample_bleu", "valid_oracle_bleu"}
    assert not model.training
    # The same batches (max(max_tokens // 4, 64) = 64 tokens) and generator stream, by hand.
    generator = torch.Generator().manual_seed(cfg.train.seed)
    sums = dict.fromkeys(("cl_loss", "sample_bleu", "oracle_bleu"), 0.0)
    n = cfg.codat.eval_sentences
    sizes = torch.maximum(valid.data.src_lens[:n], valid.data.tgt_lens[:n])
    with torch.no_grad():
        for idx in token_batches(sizes, max_tokens=64, shuffle=False):
            b = valid.data.collate(idx)
            out = model(b.src_ids, b.src_lens)
            _, s = codat_term(
                out, b, objective="codat", codat=cfg.codat, alpha=math.inf, generator=generator
            )
            for key in sums:
                sums[key] += s[key] * len(idx)
    for key, total in sums.items():
        assert stats[f"valid_{key}"] == pytest.approx(total / n, abs=1e-6)
    assert stats["valid_oracle_bleu"] >= stats["valid_sample_bleu"] >= 0


@pytest.mark.parametrize("arch", ["dat", "at"])
def test_evaluate_reports_bleu_of_the_configured_decoder(data, arch):
    cfg = _cfg(data, arch, eval_max_sentences=6)
    model = _model(cfg).train()
    valid = Validation.load(cfg, torch.device("cpu"), NULL)
    result = valid.evaluate(model, cfg)
    assert model.training
    sample_keys = {"valid_cl_loss", "valid_sample_bleu", "valid_oracle_bleu"}
    assert set(result) == {"valid_loss", "valid_bleu", "valid_score", "example"} | (
        sample_keys if arch == "dat" else set()
    )
    hyps = [valid.sp.decode(h) for h in translate_ids(model, valid.data.src, cfg.decode)]
    assert result["valid_bleu"] == corpus_bleu(hyps, valid.refs).score
    assert result["valid_score"] == result["valid_bleu"]  # data.valid_metric bleu selects
    assert result["example"] == hyps[0]
    assert result["valid_loss"] == pytest.approx(valid.dp_loss(model, cfg))


# --- analyze / tune-beta ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def translator(data) -> Translator:
    cfg = _cfg(data, "dat")
    model = _model(cfg)
    path = data.parent / "dat_ckpt"
    save_checkpoint(path, model, cfg, data / "spm.model")
    return Translator.from_dir(path)


def test_analyze_ncm_and_bleus(data, translator):
    split, refs = load_split(data, "val")
    dc = DecodeConfig(samples=4, temperature=0.5, max_tokens=64)
    result = analyze(translator, split, refs, dc)
    assert result["sentences"] == 12 and result["samples"] == 4 and result["no_path"] == 0
    assert result["rerank_token_weight"] == dc.rerank_token_weight
    assert 1 <= result["distinct_per_sentence"] <= 4
    assert 0 <= result["mean_sample_sentence_bleu"] <= 100
    assert result["oracle_bleu"] >= 0 and 0 <= result["rerank_bleu"] <= 100
    b = split.collate(list(range(len(split))))
    with torch.no_grad():
        out = translator.model(b.src_ids, b.src_lens)
        tok = gather_token_logp(out.token_logits, b.tgt_ids)
        ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, b.tgt_lens)
    want = float(-ll.sum() / b.tgt_lens.sum())
    assert result["dp_loss_per_token"] == pytest.approx(want, rel=1e-5)
    assert "ncm" not in result  # the paper's NCM needs an AT scorer (--ncm-scorer)
    assert analyze(translator, split, refs, dc) == result  # the seed fixes the samples
    assert 0 <= result["spearman_sentences"] <= 12
    rho = result["spearman_score_bleu"]
    assert rho is None or -1 <= rho <= 1


def test_spearman_rows_equals_the_textbook_loop_with_ties_and_constant_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40, 9), generator=gen).double()  # many ties
    y = torch.randn(40, 9, generator=gen).round(decimals=0)
    x[3], y[5] = 2.0, 0.0  # constant rows: no correlation
    x[7], y[7] = torch.arange(9.0), torch.arange(9.0) * 3  # monotone: 1
    x[8], y[8] = torch.arange(9.0), -torch.arange(9.0)  # reversed: -1
    got = spearman_rows(x, y)
    for b in range(40):
        want = loop_spearman(x[b].tolist(), y[b].tolist())
        if math.isnan(want):
            assert math.isnan(got[b])
        else:
            assert float(got[b]) == pytest.approx(want, abs=1e-12)
    assert float(got[7]) == pytest.approx(1.0) and float(got[8]) == pytest.approx(-1.0)
    assert math.isnan(got[3]) and math.isnan(got[5])
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, -math.inf]])).tolist() == [[3.5, 2, 3.5, 1]]


def test_analyze_spearman_is_the_mean_of_the_rows_of_scores_and_bleu(data, translator):
    split, refs = load_split(data, "val")
    dc = DecodeConfig(samples=6, temperature=2.0, max_tokens=64)
    result = analyze(translator, split, refs, dc)
    rhos = []
    for b, _, samples, marginal in sample_split(translator, split, dc, progress=False, scores=True):
        assert marginal.shape == samples.lengths.shape
        want = marginal_scores(translator.model(b.src_ids, b.src_lens), samples)
        torch.testing.assert_close(marginal, want)
        bleu = sentence_bleu(samples.tokens, samples.lengths, b.tgt_ids[:, 1:], b.tgt_lens - 2)
        for row in range(len(bleu)):
            rho = loop_spearman(marginal[row].tolist(), bleu[row].tolist())
            if not math.isnan(rho):
                rhos.append(rho)
    assert result["spearman_sentences"] == len(rhos)
    if rhos:
        assert result["spearman_score_bleu"] == pytest.approx(sum(rhos) / len(rhos))


def test_tune_beta_compares_weights_on_the_same_samples(data, translator):
    split, refs = load_split(data, "val")
    dc = DecodeConfig(samples=4, temperature=0.5, max_tokens=64)
    result = tune_beta(translator, split, refs, dc, [0.3, 0.5, 0.7])
    assert set(result["bleu"]) == {"0.3", "0.5", "0.7"}
    top = max(result["bleu"].values())
    best = [w for w in (0.3, 0.5, 0.7) if result["bleu"][str(w)] == top]
    assert result["best_beta"] == min(best, key=lambda w: abs(w - 0.5))
    # The reranked BLEU of analyze at weight 0.5 is tune_beta's BLEU at 0.5.
    at_half = analyze(translator, split, refs, dc)["rerank_bleu"]
    assert result["bleu"]["0.5"] == pytest.approx(at_half)
    with pytest.raises(ValueError, match="no rerank token weights"):
        tune_beta(translator, split, refs, dc, [])


def test_analyze_rejects_a_model_that_is_not_a_dat(data, tmp_path):
    cfg = _cfg(data, "at")
    save_checkpoint(tmp_path / "at", _model(cfg), cfg, data / "spm.model")
    split, refs = load_split(data, "val")
    with pytest.raises(ValueError, match="model.arch=at"):
        analyze(Translator.from_dir(tmp_path / "at"), split, refs, DecodeConfig(samples=2))


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    write_json({"a": 1.5}, path)
    assert json.loads(path.read_text()) == {"a": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_parallel_data_prefix_is_a_copy_of_the_first_pairs(data):
    split, refs = load_split(data, "val")
    few, _ = first_sentences(split, refs, 3)
    assert isinstance(few, ParallelData)
    assert [t.tolist() for t in few.tgt] == [t.tolist() for t in split.tgt[:3]]


# --- the validation metric, several references, long sources ----------------------------------


def _multi_ref_data(data: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the prepared data whose val split has two references per line (the second a
    dummy), as `codat prepare` writes it from PREFIX.refs.jsonl."""
    out = tmp_path / "multi"
    shutil.copytree(data, out)
    refs = (data / "val.ref.txt").read_text().splitlines()
    (out / "val.refs.jsonl").write_text("".join(json.dumps([r, "x y z"]) + "\n" for r in refs))
    return out


@pytest.mark.parametrize("metric", ["rouge", "chrf"])
def test_evaluate_selects_by_the_configured_metric_against_every_reference(data, tmp_path, metric):
    multi = _multi_ref_data(data, tmp_path)
    cfg = _cfg(multi, "at", eval_max_sentences=6)
    cfg = dataclasses.replace(cfg, data=DataConfig(dir=str(multi), valid_metric=metric))
    valid = Validation.load(cfg, torch.device("cpu"), NULL)
    assert all(isinstance(r, list) and len(r) == 2 for r in valid.refs)
    model = _model(cfg)
    result = valid.evaluate(model, cfg)
    hyps = [valid.sp.decode(h) for h in translate_ids(model, valid.data.src, cfg.decode)]
    expect = corpus_score(metric, hyps, valid.refs)
    assert result["valid_score"] == pytest.approx(expect.score)
    assert result["valid_bleu"] == pytest.approx(corpus_bleu(hyps, valid.refs).score)
    parts = {f"valid_score_{k}" for k in (expect.parts or {metric: 0})}
    assert parts <= set(result)
    assert all("_" in k[6:] for k in parts)  # logged by the training loop's metrics row


def test_validation_truncates_sources_longer_than_the_model_allows(data, caplog):
    cfg = _cfg(data, "at")
    limit = int(ParallelData.load(data, "val").src_lens.max()) - 2
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_source_positions=limit))
    with caplog.at_level("WARNING"):
        valid = Validation.load(cfg, torch.device("cpu"), NULL)
    assert int(valid.data.src_lens.max()) == limit
    assert f"max_source_positions={limit}: truncated" in caplog.text
    full = ParallelData.load(data, "val")
    assert [s.tolist() for s in valid.data.tgt] == [t.tolist() for t in full.tgt]
    same = truncate_sources(full, 10**6, split="val")
    assert same is full


def test_analyze_and_tune_beta_score_with_the_chosen_metric(data, translator):
    split, refs = load_split(data, "val")
    dc = DecodeConfig(samples=4, temperature=0.5, max_tokens=64)
    result = analyze(translator, split, refs, dc, metric="rouge")
    assert result["metric"] == "rouge"
    assert 0 <= result["oracle_score"] <= 100 and 0 <= result["rerank_score"] <= 100
    assert result["rerank_bleu"] == analyze(translator, split, refs, dc)["rerank_bleu"]
    tuned = tune_beta(translator, split, refs, dc, [0.3, 0.7], metric="chrf")
    assert tuned["metric"] == "chrf" and set(tuned["scores"]) == {"0.3", "0.7"}
    top = max(tuned["scores"].values())
    assert tuned["scores"][str(tuned["best_beta"])] == top


def test_cli_tune_beta_takes_metric_flag_and_else_the_runs_metric(data, translator, capsys):
    ckpt = str(data.parent / "dat_ckpt")
    base = ["tune-beta", ckpt, "--data-dir", str(data), "--split", "val", "--samples", "4"]
    assert run([*base, "--betas", "0.5", "--metric", "rouge", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == "rouge"
    assert run([*base, "--betas", "0.5", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == "bleu"  # the run's data.valid_metric
    with pytest.raises(ValueError, match="--metric 'x'"):
        run([*base, "--metric", "x", "--device", "cpu"])


# --- NCM with an AT scorer run, and the validation decoder ------------------------------------


@pytest.fixture(scope="module")
def at_scorer(data) -> Translator:
    cfg = _cfg(data, "at")
    path = data.parent / "at_scorer"
    save_checkpoint(path, _model(cfg), cfg, data / "spm.model")
    return Translator.from_dir(path)


def test_ncm_is_the_scorer_nll_per_token_of_the_decoded_outputs_by_hand(
    data, translator, at_scorer
):
    split, refs = load_split(data, "val")
    split, refs = first_sentences(split, refs, 5)
    dc = DecodeConfig(decoder="sample", samples=3, temperature=0.5, max_tokens=64)
    result = analyze(translator, split, refs, dc, scorer=at_scorer)
    hyps = translate_ids(translator.model, split.src, dc)
    # By hand: one sentence at a time, teacher forcing <s> y -> y </s>, summed NLL / tokens.
    nll, tokens = 0.0, 0
    model = at_scorer.model.eval()
    with torch.no_grad():
        for src, hyp in zip(split.src, hyps, strict=True):
            src_ids = torch.tensor([[*src.tolist(), EOS_ID]])
            prev = torch.tensor([[BOS_ID, *hyp]])
            target = [*hyp, EOS_ID]
            logp = torch.log_softmax(model(src_ids, torch.tensor([len(src) + 1]), prev)[0], -1)
            nll -= sum(float(logp[t, y]) for t, y in enumerate(target))
            tokens += len(target)
    assert result["ncm_tokens"] == tokens
    assert result["ncm"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["ncm"] > 0


def test_ncm_scorer_must_be_an_at_run_with_the_same_tokenizer(data, translator):
    split, refs = first_sentences(*load_split(data, "val"), 2)
    dc = DecodeConfig(samples=2, max_tokens=64)
    with pytest.raises(ValueError, match="need an at run"):
        analyze(translator, split, refs, dc, scorer=translator)


def test_validation_bleu_uses_train_valid_decoder(data):
    cfg = _cfg(data, "dat", valid_decoder="greedy", eval_max_sentences=6)
    cfg = dataclasses.replace(cfg, codat=CodatConfig(samples=4, eval_sentences=0))
    model = _model(cfg).eval()
    valid = Validation.load(cfg, torch.device("cpu"), NULL)
    result = valid.evaluate(model, cfg)
    with torch.no_grad():
        greedy = translate_ids(model, valid.data.src, DecodeConfig(decoder="greedy", max_tokens=64))
    hyps = [valid.sp.decode(h) for h in greedy]
    assert result["valid_bleu"] == pytest.approx(corpus_bleu(hyps, valid.refs).score)
    with pytest.raises(ValueError, match="bogus"):
        Validation.load(_cfg(data, "dat", valid_decoder="bogus"), torch.device("cpu"), NULL)


@pytest.mark.parametrize("arch", ["at", "dat", "glat"])
def test_source_sensitivity_scores_each_reference_with_another_sentences_source(arch):
    """`source_sensitivity`: a derangement of the sources; `own` and `shuffled` equal the arch's
    sentence loss of each pair computed alone; a model that never reads its source ids (same
    lengths) scores both the same, while the untrained model does not."""
    g = torch.Generator().manual_seed(3)
    src = [torch.randint(4, 40, (6,), generator=g) for _ in range(7)]
    tgt = [torch.randint(4, 40, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
           for _ in range(7)]  # fmt: skip
    data = ParallelData(src, tgt)
    model = make_model(arch).eval()
    r = source_sensitivity(model, arch, data, max_tokens=20, seed=5)
    assert sorted(r.source_of.tolist()) == list(range(7))
    assert all(j != i for i, j in enumerate(r.source_of.tolist()))
    loss = SENTENCE_LOSSES[arch]
    for i, j in enumerate(r.source_of.tolist()):
        alone = ParallelData([src[i]], [tgt[i]]).collate([0])
        other = ParallelData([src[j]], [tgt[i]]).collate([0])
        assert float(r.own[i]) == pytest.approx(float(loss(model, alone)[0]), abs=1e-5)
        assert float(r.shuffled[i]) == pytest.approx(float(loss(model, other)[0]), abs=1e-5)
    assert bool(r.finite.all())
    assert float((r.shuffled - r.own).abs().max()) > 1e-4

    encode = model.encode

    def blind(src_ids, src_lens, **kw):  # reads only the lengths
        return encode(torch.full_like(src_ids, 5), src_lens, **kw)

    model.encode = blind
    r = source_sensitivity(model, arch, data, max_tokens=20, seed=5)
    assert torch.allclose(r.own, r.shuffled, atol=1e-6)
