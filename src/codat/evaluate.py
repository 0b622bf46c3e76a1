"""Evaluation: validation during training (`Validation`: loss, CoDAT's sample statistics, BLEU
and the selection score `data.valid_metric` of `train.valid_decoder`), `codat analyze` (NCM with
an AT scorer run, Oracle BLEU: the sampling space, paper §4.2) and `codat tune-beta` (the rerank
token weight of sample decoding, chosen on validation, paper Appendix D). References are one per
line (SPLIT.ref.txt) or several (SPLIT.refs.jsonl, when `codat prepare` found PREFIX.refs.jsonl
beside the split).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import sentencepiece as spm
import torch
from torch import nn
from tqdm import tqdm

from codat.artifacts import write_text_atomic
from codat.cmlm import cmlm_sentence_loss
from codat.config import DecodeConfig, RunConfig
from codat.ctc import ctc_sentence_loss
from codat.dag import dag_log_likelihood
from codat.dat_decode import draw_samples, marginal_scores
from codat.dat_train import codat_term, dat_sentence_loss
from codat.data import PAD_ID, Batch, ParallelData, read_lines, token_batches
from codat.decode import DagSamples, pick_best, rerank_scores
from codat.generate import Translator, decoder_for, translate_ids
from codat.metrics import Refs, corpus_bleu, corpus_score, read_refs_jsonl
from codat.nat import nat_sentence_loss
from codat.objectives import gather_token_logp
from codat.rewards import sentence_bleu
from codat.transformer import at_sentence_loss

log = logging.getLogger(__name__)

# Each model.arch's per-sentence, length-normalised loss (B,), inf where a sentence has no
# alignment: the validation loss, and what CoDAT's alpha gate is calibrated on.
SENTENCE_LOSSES: dict[str, Callable[[nn.Module, Batch], torch.Tensor]] = {
    "dat": dat_sentence_loss,
    "at": at_sentence_loss,
    "nat": nat_sentence_loss,
    "glat": nat_sentence_loss,
    "ctc": ctc_sentence_loss,
    "cmlm": cmlm_sentence_loss,
}


@dataclass(frozen=True)
class SourceSensitivity:
    """Per-sentence losses (`SENTENCE_LOSSES`, per token) of the references given their own
    source and given another sentence's source; `finite` marks the sentences where both are
    finite (a source-sized DAT graph can be too short for the reference under another source)."""

    own: torch.Tensor  # (n,)
    shuffled: torch.Tensor  # (n,)
    finite: torch.Tensor  # (n,) bool
    source_of: torch.Tensor  # (n,) long: the sentence whose source `shuffled` used


@torch.no_grad()
def source_sensitivity(
    model: nn.Module,
    arch: str,
    data: ParallelData,
    *,
    max_tokens: int = 4096,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SourceSensitivity:
    """Does a model read its source? Each reference's loss with its own source against its loss
    with the source of another sentence of the split (a random derangement: no sentence keeps
    its own). A model that ignores its input scores both the same."""
    n = len(data)
    if n < 2:
        raise ValueError(f"source_sensitivity needs at least 2 sentences, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    source_of = torch.empty(n, dtype=torch.long)
    source_of[order] = torch.tensor(order[1:] + order[:1])  # one cycle: no sentence keeps its own
    shuffled = ParallelData([data.src[j] for j in source_of.tolist()], data.tgt)
    sentence_loss = SENTENCE_LOSSES[arch]
    was_training = model.training
    model.eval()
    own, other = torch.empty(n), torch.empty(n)
    sizes = torch.maximum(torch.maximum(data.src_lens, shuffled.src_lens), data.tgt_lens)
    for idx in token_batches(sizes, max_tokens=max_tokens, shuffle=False):
        for split, out in ((data, own), (shuffled, other)):
            out[idx] = sentence_loss(model, split.collate(idx).to(device)).float().cpu()
    model.train(was_training)
    return SourceSensitivity(own, other, torch.isfinite(own) & torch.isfinite(other), source_of)


def load_split(data_dir: str | pathlib.Path, split: str) -> tuple[ParallelData, Refs]:
    """A prepared split and its raw references, written by codat prepare: several per sentence
    from `SPLIT.refs.jsonl` when it exists, else one per sentence from `SPLIT.ref.txt`."""
    data = ParallelData.load(data_dir, split)
    multi_path = pathlib.Path(data_dir) / f"{split}.refs.jsonl"
    refs_path = pathlib.Path(data_dir) / f"{split}.ref.txt"
    if multi_path.is_file():
        refs, refs_path = read_refs_jsonl(multi_path), multi_path
    elif refs_path.is_file():
        refs = read_lines(refs_path)
    else:
        raise FileNotFoundError(f"{refs_path} not found (written by codat prepare)")
    if len(refs) != len(data):
        raise ValueError(f"{refs_path} has {len(refs)} lines but the split has {len(data)} pairs")
    return data, refs


def truncate_sources(data: ParallelData, max_positions: int, *, split: str) -> ParallelData:
    """`data` with every source cut to `max_positions` - 1 tokens (+ </s>: the model's
    max_source_positions), logging how many were cut; targets untouched."""
    long = int((data.src_lens > max_positions).sum())
    if not long:
        return data
    log.warning(
        "%s: %d of %d sources are longer than model.max_source_positions=%d: truncated",
        split,
        long,
        len(data),
        max_positions,
    )
    return ParallelData([s[: max_positions - 1] for s in data.src], data.tgt)


def first_sentences(data: ParallelData, refs: Refs, n: int) -> tuple[ParallelData, Refs]:
    """The first `n` sentence pairs and references (all of them when n <= 0)."""
    if n <= 0:
        return data, refs
    return ParallelData(data.src[:n], data.tgt[:n]), refs[:n]


@dataclass(frozen=True)
class Validation:
    """What validation needs: the split, its raw references (one or several per sentence) and
    the tokenizer."""

    data: ParallelData
    refs: Refs
    sp: spm.SentencePieceProcessor
    spm_path: pathlib.Path
    device: torch.device
    autocast: contextlib.AbstractContextManager

    @classmethod
    def load(
        cls, cfg: RunConfig, device: torch.device, autocast: contextlib.AbstractContextManager
    ) -> Validation:
        """The validation split of `cfg.data` (its first `train.eval_max_sentences` if > 0).
        An unknown `decode.decoder` fails here, before a run starts, not at its first validation.
        Sources longer than `model.max_source_positions` are truncated (and counted in the log)."""
        decoder_for(cfg.model.arch, cfg.decode.decoder)
        decoder_for(cfg.model.arch, cfg.train.valid_decoder)
        spm_path = pathlib.Path(cfg.data.dir) / "spm.model"
        data, refs = load_split(cfg.data.dir, cfg.data.valid_split)
        data, refs = first_sentences(data, refs, cfg.train.eval_max_sentences)
        data = truncate_sources(data, cfg.model.max_source_positions, split=cfg.data.valid_split)
        sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        return cls(data, refs, sp, spm_path, device, autocast)

    @torch.no_grad()
    def dp_loss(self, core: nn.Module, cfg: RunConfig) -> float:
        """Mean per-sentence, length-normalised loss (no glancing) of the split: DAT's DP loss,
        or the arch's own (`SENTENCE_LOSSES`); sentences without an alignment count 0."""
        was_training = core.training
        core.eval()
        sentence_loss = SENTENCE_LOSSES[cfg.model.arch]
        total, count = 0.0, 0
        sizes = torch.maximum(self.data.src_lens, self.data.tgt_lens)
        for idx in token_batches(sizes, max_tokens=cfg.train.max_tokens, shuffle=False):
            b = self.data.collate(idx).to(self.device)
            with self.autocast:
                per = sentence_loss(core, b).float()  # (B,)
            per = torch.where(torch.isfinite(per), per, torch.zeros_like(per))
            total, count = total + float(per.sum()), count + len(idx)
        core.train(was_training)
        return total / max(count, 1)

    @torch.no_grad()
    def sample_stats(self, core: nn.Module, cfg: RunConfig) -> dict[str, float]:
        """CoDAT's contrastive loss on the first `codat.eval_sentences` sentences (paper Figure
        2), with no DP gate, and the mean and oracle (best-of-K) sentence BLEU of their samples,
        on the graph training samples from (model.upsample predict: sized by the reference)."""
        n = min(cfg.codat.eval_sentences, len(self.data))
        generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        was_training = core.training
        core.eval()
        sums: dict[str, float] = {}
        sizes = torch.maximum(self.data.src_lens[:n], self.data.tgt_lens[:n])
        max_tokens = max(cfg.train.max_tokens // 4, 64)  # K samples per sentence
        for idx in token_batches(sizes, max_tokens=max_tokens, shuffle=False):
            b = self.data.collate(idx).to(self.device)
            with self.autocast:
                out = core(b.src_ids, b.src_lens, tgt_lens=b.tgt_lens)  # as training sizes it
            _, stats = codat_term(
                out, b, objective="codat", codat=cfg.codat, alpha=math.inf, generator=generator
            )
            for key in ("cl_loss", "sample_bleu", "oracle_bleu"):
                sums[key] = sums.get(key, 0.0) + stats.get(key, 0.0) * len(idx)
        core.train(was_training)
        return {f"valid_{k}": v / max(n, 1) for k, v in sums.items()}

    @torch.no_grad()
    def length_stats(self, core: nn.Module, cfg: RunConfig) -> dict[str, float]:
        """model.upsample predict: how well the length head sizes the graphs decoding builds,
        over the split: "valid_length_acc" (its argmax equals the reference length, counting <s>
        and </s>, as the training row's length_acc) and "valid_length_mae" (mean absolute error in
        tokens)."""
        was_training = core.training
        core.eval()
        hits, error = 0, 0
        for idx in token_batches(
            self.data.src_lens, max_tokens=cfg.train.max_tokens, shuffle=False
        ):
            b = self.data.collate(idx).to(self.device)
            with self.autocast:
                predicted = core.encode(b.src_ids, b.src_lens).length_logits.argmax(-1)
            hits += int((predicted == b.tgt_lens).sum())
            error += int((predicted - b.tgt_lens).abs().sum())
        core.train(was_training)
        n = max(len(self.data), 1)
        return {"valid_length_acc": hits / n, "valid_length_mae": error / n}

    def evaluate(self, core: nn.Module, cfg: RunConfig) -> dict:
        """Validation loss (no glancing), for DAT with `codat.eval_sentences` > 0 the sample
        statistics, the corpus BLEU of `train.valid_decoder` ('' = decode.decoder, the decoder
        that is reported; "valid_bleu", tokenizer
        `data.tokenize`), for model.upsample predict the length head's `length_stats`, its first
        hypothesis ("example"), and the checkpoint selection score
        "valid_score" of `data.valid_metric` (= valid_bleu for bleu; for rouge also each ROUGE
        type as "valid_score_rouge1", ...; for chrf "valid_score_chrf")."""
        result = {"valid_loss": self.dp_loss(core, cfg)}
        if cfg.model.arch == "dat" and cfg.codat.eval_sentences > 0:
            result.update(self.sample_stats(core, cfg))
        if cfg.model.arch == "dat" and cfg.model.upsample == "predict":
            result.update(self.length_stats(core, cfg))
        was_training = core.training
        core.eval()
        with torch.no_grad(), self.autocast:
            dc = replace(cfg.decode, decoder=cfg.train.valid_decoder or cfg.decode.decoder)
            hyp_ids = translate_ids(core, self.data.src, dc, device=self.device)
        core.train(was_training)
        hyps = [self.sp.decode(h) for h in hyp_ids]
        bleu = corpus_bleu(hyps, self.refs, tokenize=cfg.data.tokenize).score
        result.update(valid_bleu=bleu, valid_score=bleu, example=hyps[0])
        if cfg.data.valid_metric != "bleu":
            score = corpus_score(cfg.data.valid_metric, hyps, self.refs)
            result["valid_score"] = score.score
            parts = score.parts or {score.metric: score.score}
            result.update({f"valid_score_{k}": v for k, v in parts.items()})
        return result


@torch.no_grad()
def sample_split(
    translator: Translator,
    data: ParallelData,
    dc: DecodeConfig,
    *,
    progress: bool = True,
    scores: bool = False,
) -> Iterator[tuple[Batch, torch.Tensor, DagSamples, torch.Tensor | None]]:
    """For each batch of the split: the batch, its reference DP log-likelihood (B,), K samples
    per sentence (drawn with `dc`'s samples / temperature / top_p / top_tokens / seed) and, with
    `scores`, their scores s_k (B, K) (`marginal_scores`: a K-sample DP), else None."""
    model, device = translator.model, translator.device
    model.eval()
    generator = torch.Generator(device=device).manual_seed(dc.seed)
    sizes = model.output_lengths(torch.maximum(data.src_lens, data.tgt_lens))
    batches = token_batches(sizes, max_tokens=dc.max_tokens, shuffle=False)
    for idx in tqdm(batches, desc="sample", unit="batch", disable=not progress, leave=False):
        b = data.collate(idx).to(device)
        out = model(b.src_ids, b.src_lens)
        tok = gather_token_logp(out.token_logits, b.tgt_ids)
        ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, b.tgt_lens)
        samples = draw_samples(out, dc, generator)
        yield b, ll, samples, marginal_scores(out, samples) if scores else None


def average_ranks(x: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B, K) float64
    """The 1-based rank of each entry within its row, ties given their average rank."""
    x = x.double()
    less = (x.unsqueeze(2) > x.unsqueeze(1)).sum(2)  # entries below x[b, k]
    equal = (x.unsqueeze(2) == x.unsqueeze(1)).sum(2)  # including itself
    return less.double() + (equal.double() + 1) / 2


def spearman_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B, K) x2 -> (B,)
    """Spearman's rank correlation of x[b] and y[b] per row: Pearson's correlation of the average
    ranks; NaN for a row where x or y is constant (no ranking to correlate)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(1, keepdim=True), ry - ry.mean(1, keepdim=True)
    den = (rx.square().sum(1) * ry.square().sum(1)).sqrt()
    cov = (rx * ry).sum(1)
    return torch.where(den > 0, cov / den.clamp_min(1e-300), torch.full_like(cov, math.nan))


def _ids(row: torch.Tensor) -> list[int]:
    return [t for t in row.tolist() if t != PAD_ID]


def _check_dat(translator: Translator) -> None:
    arch = translator.model.cfg.arch
    if arch != "dat":
        raise ValueError(f"the model is a model.arch={arch} model: this command samples DAGs (dat)")


def analyze(
    translator: Translator,
    data: ParallelData,
    refs: Refs,
    dc: DecodeConfig,
    *,
    metric: str = "bleu",
    tokenize: str = "13a",
    scorer: Translator | None = None,
) -> dict:
    """The reference's DAG loss "dp_loss_per_token" = sum -log q(y|x) / sum |y| over the split
    (|y| counts <s> and </s>, as the DP loss does), with `scorer` (an AT run) the paper's "ncm"
    (`ncm`: the scorer's NLL per token of the sample decoder's outputs), Oracle BLEU (corpus
    BLEU of the best-of-K sample per sentence by sentence BLEU against the split's target), the
    corpus BLEU of the reranked sample (`dc.rerank_token_weight`), mean
    sentence BLEU of all samples, the mean number of distinct samples per sentence, and
    "spearman_score_bleu": the mean over sentences of Spearman's correlation between the K
    samples' scores s_k (length-normalised DAG marginal, eq. 10's score) and their sentence BLEU
    (sentences where either is constant are left out; "spearman_sentences" counts the rest;
    None when none is left). With
    `metric` chrf or rouge, also "oracle_score" and "rerank_score": that metric of the same
    two hypothesis sets (against every reference of `refs`)."""
    _check_dat(translator)
    n = len(data)
    oracle: list[list[int]] = [[] for _ in range(n)]
    reranked: list[list[int]] = [[] for _ in range(n)]
    nll, length, no_path, mean_bleu, distinct = 0.0, 0, 0, 0.0, 0.0
    rho_sum, rho_rows = 0.0, 0
    for b, ll, samples, marginal in sample_split(translator, data, dc, scores=True):
        finite = torch.isfinite(ll)
        no_path += int((~finite).sum())
        nll += float(-ll[finite].sum())
        length += int(b.tgt_lens[finite].sum())
        bleu = sentence_bleu(samples.tokens, samples.lengths, b.tgt_ids[:, 1:], b.tgt_lens - 2)
        mean_bleu += float(bleu.mean(1).sum())
        rho = spearman_rows(marginal, bleu)
        rho_sum, rho_rows = rho_sum + float(rho.nansum()), rho_rows + int((~rho.isnan()).sum())
        distinct += sum(len({tuple(_ids(r)) for r in sent}) for sent in samples.tokens.cpu())
        best_oracle = pick_best(samples, bleu, pad_id=PAD_ID).cpu()
        rerank = rerank_scores(samples, beta=dc.rerank_token_weight)
        best_rerank = pick_best(samples, rerank, pad_id=PAD_ID).cpu()
        for row, i in enumerate(b.indices.tolist()):
            oracle[i], reranked[i] = _ids(best_oracle[row]), _ids(best_rerank[row])
    sp = translator.sp
    oracle_text, rerank_text = [sp.decode(h) for h in oracle], [sp.decode(h) for h in reranked]
    scores = {}
    if metric != "bleu":
        scores = {
            "metric": metric,
            "oracle_score": corpus_score(metric, oracle_text, refs).score,
            "rerank_score": corpus_score(metric, rerank_text, refs).score,
        }
    return {
        "sentences": n,
        "dp_loss_per_token": nll / max(length, 1),
        **({} if scorer is None else ncm(translator, scorer, data, dc)),
        "no_path": no_path,
        "oracle_bleu": corpus_bleu(oracle_text, refs, tokenize=tokenize).score,
        "rerank_bleu": corpus_bleu(rerank_text, refs, tokenize=tokenize).score,
        **scores,
        "mean_sample_sentence_bleu": mean_bleu / max(n, 1),
        "distinct_per_sentence": distinct / max(n, 1),
        "spearman_score_bleu": rho_sum / rho_rows if rho_rows else None,
        "spearman_sentences": rho_rows,
        "samples": dc.samples,
        "temperature": dc.temperature,
        "top_p": dc.top_p,
        "top_tokens": dc.top_tokens,
        "rerank_token_weight": dc.rerank_token_weight,
    }


@torch.no_grad()
def ncm(translator: Translator, scorer: Translator, data: ParallelData, dc: DecodeConfig) -> dict:
    """NCM as the paper (§4.2): decode the split with `translator`'s model and decoder `dc`, then
    "ncm" = the `scorer` model's (an AT run with the same tokenizer) NLL per token of those
    outputs under teacher forcing: sum over sentences of -log p(y_hat </s> | x) / sum of
    (|y_hat| + 1), the tokens `at_sentence_loss` averages over. Also "ncm_tokens"."""
    if scorer.model.cfg.arch != "at":
        raise ValueError(f"--ncm-scorer: need an at run, got model.arch={scorer.model.cfg.arch}")
    if scorer.sp.serialized_model_proto() != translator.sp.serialized_model_proto():
        raise ValueError("--ncm-scorer: the scorer run uses another spm.model than the model")
    hyps = translate_ids(translator.model, data.src, dc, device=translator.device)
    outputs = ParallelData(data.src, [torch.tensor(h, dtype=torch.long) for h in hyps])
    model, was_training = scorer.model, scorer.model.training
    model.eval()
    nll, tokens = 0.0, 0
    sizes = torch.maximum(outputs.src_lens, outputs.tgt_lens)
    for idx in token_batches(sizes, max_tokens=dc.max_tokens, shuffle=False):
        b = outputs.collate(idx).to(scorer.device)
        n = b.tgt_lens - 1  # y_hat and </s>
        nll += float((at_sentence_loss(model, b).double() * n).sum())
        tokens += int(n.sum())
    model.train(was_training)
    return {"ncm": nll / max(tokens, 1), "ncm_tokens": tokens}


def tune_beta(
    translator: Translator,
    data: ParallelData,
    refs: Refs,
    dc: DecodeConfig,
    weights: list[float],
    *,
    metric: str = "bleu",
    tokenize: str = "13a",
) -> dict:
    """Corpus BLEU ("bleu") and `metric` ("scores") of sample decoding for each rerank token
    weight; the samples are drawn once and reranked for every weight, so the weights are
    compared on identical hypotheses. The best by `metric` is `best_beta` (ties go to the weight
    nearest 0.5)."""
    _check_dat(translator)
    if not weights:
        raise ValueError("tune-beta: no rerank token weights to compare")
    n = len(data)
    chosen = {w: [[] for _ in range(n)] for w in weights}
    for b, _, samples, _ in sample_split(translator, data, dc):
        for w in weights:
            best = pick_best(samples, rerank_scores(samples, beta=w), pad_id=PAD_ID).cpu()
            for row, i in enumerate(b.indices.tolist()):
                chosen[w][i] = _ids(best[row])
    texts = {w: [translator.sp.decode(h) for h in chosen[w]] for w in weights}
    bleu = {w: corpus_bleu(texts[w], refs, tokenize=tokenize).score for w in weights}
    score = bleu
    if metric != "bleu":
        score = {w: corpus_score(metric, texts[w], refs).score for w in weights}
    best = max(weights, key=lambda x: (score[x], -abs(x - 0.5)))
    return {
        "bleu": {str(k): v for k, v in bleu.items()},
        "metric": metric,
        "scores": {str(k): v for k, v in score.items()},
        "best_beta": best,
    }


def write_json(result: dict, path: str | pathlib.Path) -> None:
    """Write `result` as indented JSON, atomically (a temporary sibling renamed into place)."""
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
