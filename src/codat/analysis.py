"""`codat analyze` (NCM, Oracle BLEU: the sampling space, paper §4.2) and `codat tune-beta`
(the rerank weight of sample decoding, chosen on validation, paper Appendix D)."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Iterator
from dataclasses import replace

import sacrebleu
import torch
from tqdm import tqdm

from codat.config import DecodeConfig
from codat.dag import dag_log_likelihood
from codat.data import PAD_ID, Batch, ParallelData, token_batches
from codat.decode import DagSamples, pick_best, rerank_scores
from codat.generate import Translator, draw_samples
from codat.objectives import gather_token_logp
from codat.rewards import sentence_bleu


def _load_split(data_dir: str | pathlib.Path, split: str) -> tuple[ParallelData, list[str]]:
    data = ParallelData.load(data_dir, split)
    refs_path = pathlib.Path(data_dir) / f"{split}.ref.txt"
    if not refs_path.is_file():
        raise FileNotFoundError(f"{refs_path} not found (written by codat prepare)")
    refs = refs_path.read_text(encoding="utf-8").splitlines()
    if len(refs) != len(data):
        raise ValueError(f"{refs_path} has {len(refs)} lines but the split has {len(data)} pairs")
    return data, refs


@torch.no_grad()
def sample_split(
    translator: Translator, data: ParallelData, dc: DecodeConfig, *, progress: bool = True
) -> Iterator[tuple[Batch, torch.Tensor, DagSamples]]:
    """For each batch of the split: the batch, its reference DP log-likelihood (B,) and K samples
    per sentence (drawn with `dc`'s samples / temperature / top_p / top_tokens / seed)."""
    model, device = translator.model, translator.device
    model.eval()
    generator = torch.Generator(device=device).manual_seed(dc.seed)
    sizes = torch.floor(
        torch.maximum(data.src_lens, data.tgt_lens).double() * model.cfg.upsample_scale
    ).long()
    batches = token_batches(sizes, max_tokens=dc.max_tokens, shuffle=False)
    for idx in tqdm(batches, desc="sample", unit="batch", disable=not progress, leave=False):
        b = data.collate(idx).to(device)
        out = model(b.src_ids, b.src_lens)
        tok = gather_token_logp(out.token_logits, b.tgt_ids)
        ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, b.tgt_lens)
        samples = draw_samples(out, dc, generator)
        yield b, ll, samples


def _ids(row: torch.Tensor) -> list[int]:
    return [t for t in row.tolist() if t != PAD_ID]


def analyze(translator: Translator, data: ParallelData, refs: list[str], dc: DecodeConfig) -> dict:
    """NCM = E[-log p(y|x)] / E[|y|] over the split (|y| counts <s> and </s>, as the DP loss
    does), Oracle BLEU (corpus BLEU of the best-of-K sample per sentence by sentence BLEU), the
    corpus BLEU of the reranked sample (`dc.sample_beta`), mean sentence BLEU of all samples, and
    the mean number of distinct samples per sentence."""
    n = len(data)
    oracle: list[list[int]] = [[] for _ in range(n)]
    reranked: list[list[int]] = [[] for _ in range(n)]
    nll, length, no_path, mean_bleu, distinct = 0.0, 0, 0, 0.0, 0.0
    for b, ll, samples in sample_split(translator, data, dc):
        finite = torch.isfinite(ll)
        no_path += int((~finite).sum())
        nll += float(-ll[finite].sum())
        length += int(b.tgt_lens[finite].sum())
        bleu = sentence_bleu(samples.tokens, samples.lengths, b.tgt_ids[:, 1:], b.tgt_lens - 2)
        mean_bleu += float(bleu.mean(1).sum())
        distinct += sum(len({tuple(_ids(r)) for r in sent}) for sent in samples.tokens.cpu())
        best_oracle = pick_best(samples, bleu, pad_id=PAD_ID).cpu()
        best_rerank = pick_best(
            samples, rerank_scores(samples, beta=dc.sample_beta), pad_id=PAD_ID
        ).cpu()
        for row, i in enumerate(b.indices.tolist()):
            oracle[i], reranked[i] = _ids(best_oracle[row]), _ids(best_rerank[row])
    sp = translator.sp
    return {
        "sentences": n,
        "ncm": nll / max(length, 1),
        "no_path": no_path,
        "oracle_bleu": sacrebleu.corpus_bleu([sp.decode(h) for h in oracle], [refs]).score,
        "rerank_bleu": sacrebleu.corpus_bleu([sp.decode(h) for h in reranked], [refs]).score,
        "mean_sample_sentence_bleu": mean_bleu / max(n, 1),
        "distinct_per_sentence": distinct / max(n, 1),
        "samples": dc.samples,
        "temperature": dc.temperature,
        "top_p": dc.top_p,
        "top_tokens": dc.top_tokens,
        "sample_beta": dc.sample_beta,
    }


def tune_beta(
    translator: Translator,
    data: ParallelData,
    refs: list[str],
    dc: DecodeConfig,
    betas: list[float],
) -> dict:
    """Corpus BLEU of sample decoding for each rerank weight beta; the samples are drawn once
    and reranked for every beta, so the betas are compared on identical hypotheses."""
    n = len(data)
    chosen = {beta: [[] for _ in range(n)] for beta in betas}
    for b, _, samples in sample_split(translator, data, dc):
        for beta in betas:
            best = pick_best(samples, rerank_scores(samples, beta=beta), pad_id=PAD_ID).cpu()
            for row, i in enumerate(b.indices.tolist()):
                chosen[beta][i] = _ids(best[row])
    sp = translator.sp
    bleu = {
        beta: sacrebleu.corpus_bleu([sp.decode(h) for h in chosen[beta]], [refs]).score
        for beta in betas
    }
    best_beta = max(betas, key=lambda x: (bleu[x], -abs(x - 0.5)))
    return {"bleu": {str(k): v for k, v in bleu.items()}, "best_beta": best_beta}


def _common_args(p: argparse.ArgumentParser, default_split: str) -> None:
    p.add_argument("run_dir", help="run directory (its best/) or checkpoint directory")
    p.add_argument("--data-dir", required=True, help="prepared data directory (codat prepare)")
    p.add_argument("--split", default=default_split, help=f"split name (default {default_split})")
    p.add_argument("--samples", type=int, default=None, help="samples per sentence")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-sentences", type=int, default=0, help="only the first N (0 = all)")
    p.add_argument("--output", "-o", default=None, help="also write the result as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def _setup(a: argparse.Namespace) -> tuple[Translator, ParallelData, list[str], DecodeConfig]:
    translator = Translator.from_dir(a.run_dir, device=a.device)
    arch = translator.model.cfg.arch
    if arch != "dat":
        raise ValueError(f"{a.run_dir} is a model.arch={arch} run: this command samples DAGs (dat)")
    data, refs = _load_split(a.data_dir, a.split)
    if a.max_sentences > 0:
        data = ParallelData(data.src[: a.max_sentences], data.tgt[: a.max_sentences])
        refs = refs[: a.max_sentences]
    options = {
        "samples": a.samples,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_tokens": a.top_tokens,
        "seed": a.seed,
        "sample_beta": getattr(a, "beta", None),
    }
    dc = replace(translator.decode_cfg, **{k: v for k, v in options.items() if v is not None})
    return translator, data, refs, dc


def _emit(result: dict, output: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        path = pathlib.Path(output)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)


def main_analyze(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="codat analyze",
        description="NCM and Oracle BLEU (best of K samples) of a trained DAT on a prepared split.",
    )
    _common_args(p, "val")
    p.add_argument("--beta", type=float, default=None, help="rerank weight for rerank_bleu")
    a = p.parse_args(argv)
    _emit(analyze(*_setup(a)), a.output)
    return 0


def main_tune_beta(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="codat tune-beta",
        description="Pick the sample-decoding rerank weight beta by corpus BLEU on validation.",
    )
    _common_args(p, "val")
    p.add_argument("--betas", default="0.3,0.5,0.7", help="comma-separated candidates")
    a = p.parse_args(argv)
    try:
        betas = [float(x) for x in a.betas.split(",")]
    except ValueError:
        raise ValueError(f"--betas '{a.betas}' is not a comma-separated list of numbers") from None
    _emit(tune_beta(*_setup(a), betas), a.output)
    return 0
