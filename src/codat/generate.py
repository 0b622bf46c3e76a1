"""`codat generate` and the Python API: load a checkpoint directory, decode text or id batches."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable
from dataclasses import replace

import sentencepiece as spm
import torch
from tqdm import tqdm

from codat.checkpoint import load_checkpoint_config, load_weights
from codat.config import DecodeConfig
from codat.dat import DagOutput, DATransformer
from codat.data import EOS_ID, PAD_ID, SPECIAL_IDS, token_batches
from codat.decode import (
    DagSamples,
    greedy_decode,
    joint_viterbi_decode,
    lookahead_decode,
    pick_best,
    rerank_scores,
    sample_dag,
)

Decoder = Callable[[DagOutput, DecodeConfig, torch.Generator], torch.Tensor]


def _lookahead(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    logp = torch.log_softmax(out.token_logits.float(), dim=-1)
    return lookahead_decode(
        logp, out.trans_logp, out.graph_lens, beta=dc.beta, special_ids=SPECIAL_IDS, pad_id=PAD_ID
    )


def _greedy(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    logp = torch.log_softmax(out.token_logits.float(), dim=-1)
    return greedy_decode(
        logp, out.trans_logp, out.graph_lens, special_ids=SPECIAL_IDS, pad_id=PAD_ID
    )


def _joint_viterbi(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    logp = torch.log_softmax(out.token_logits.float(), dim=-1)
    return joint_viterbi_decode(
        logp,
        out.trans_logp,
        out.graph_lens,
        length_beta=dc.viterbi_beta,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def draw_samples(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> DagSamples:
    """K samples per sentence with `dc`'s samples / temperature / top_p / top_tokens."""
    return sample_dag(
        torch.log_softmax(out.token_logits.float(), dim=-1),
        out.trans_logp,
        out.graph_lens,
        num_samples=dc.samples,
        temperature=dc.temperature,
        top_p=dc.top_p,
        top_tokens=dc.top_tokens,
        generator=generator,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def _sample(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    samples = draw_samples(out, dc, generator)
    return pick_best(samples, rerank_scores(samples, beta=dc.sample_beta), pad_id=PAD_ID)


DECODERS: dict[str, Decoder] = {
    "lookahead": _lookahead,
    "greedy": _greedy,
    "viterbi": _joint_viterbi,
    "sample": _sample,
}


def batch_sources(
    sources: list[torch.Tensor], model: DATransformer, max_tokens: int
) -> tuple[list[torch.Tensor], torch.Tensor, list[list[int]]]:
    """Truncate to the model's limit, bucket by graph size: (sources, lengths + </s>, batches)."""
    max_src = model.cfg.max_source_positions
    sources = [s[: max_src - 1] for s in sources]
    lens = torch.tensor([len(s) + 1 for s in sources], dtype=torch.long)
    graph = torch.floor(lens.double() * model.cfg.upsample_scale).long()
    return sources, lens, token_batches(graph, max_tokens=max_tokens, shuffle=False)


def source_tensor(sources: list[torch.Tensor], lens: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """The padded, </s>-terminated source batch of the examples `idx`."""
    src = torch.full((len(idx), int(lens[idx].max())), PAD_ID, dtype=torch.long)
    for row, i in enumerate(idx):
        src[row, : len(sources[i])] = sources[i]
        src[row, len(sources[i])] = EOS_ID
    return src


@torch.no_grad()
def translate_ids(
    model: DATransformer,
    sources: list[torch.Tensor],  # each 1-D ids without </s>
    dc: DecodeConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[list[int]]:
    """Decode id sequences in token-bucketed batches; results come back in input order."""
    if dc.decoder not in DECODERS:
        raise ValueError(f"unknown decoder '{dc.decoder}' (choose from {', '.join(DECODERS)})")
    decoder = DECODERS[dc.decoder]
    was_training = model.training
    model.eval()
    sources, lens, batches = batch_sources(sources, model, dc.max_tokens)
    generator = torch.Generator(device=device).manual_seed(dc.seed)
    results: list[list[int]] = [[] for _ in sources]
    for idx in tqdm(batches, desc="decode", unit="batch", disable=not progress, leave=False):
        src = source_tensor(sources, lens, idx)
        out = model(src.to(device), lens[idx].to(device))
        ids = decoder(out, dc, generator).cpu()
        for row, i in enumerate(idx):
            results[i] = [t for t in ids[row].tolist() if t != PAD_ID]
    model.train(was_training)
    return results


class Translator:
    """A trained DAT with its tokenizer: `codat.load(run_dir).generate(["ein Satz ."])`."""

    def __init__(
        self,
        model: DATransformer,
        sp: spm.SentencePieceProcessor,
        decode: DecodeConfig,
        device: torch.device | str,
    ) -> None:
        self.model, self.sp, self.decode_cfg, self.device = model, sp, decode, device

    @classmethod
    def from_dir(cls, path: str | pathlib.Path, *, device: str = "cpu") -> Translator:
        path = resolve_checkpoint(path)
        cfg = load_checkpoint_config(path)
        model = DATransformer(cfg.model)
        load_weights(path, model, device)
        model.to(device).eval()
        sp = spm.SentencePieceProcessor(model_file=str(path / "spm.model"))
        return cls(model, sp, cfg.decode, device)

    def generate(
        self,
        sentences: list[str],
        *,
        decoder: str | None = None,
        beta: float | None = None,
        progress: bool = False,
        **decode_options,
    ) -> list[str]:
        """Decode sentences. `beta` is the lookahead token weight, or for `sample` the rerank
        weight; other `DecodeConfig` fields (samples, temperature, top_p, ...) pass by name."""
        dc = replace(self.decode_cfg, **decode_options)
        dc = replace(dc, decoder=decoder or dc.decoder)
        if beta is not None:
            dc = replace(dc, **{"sample_beta" if dc.decoder == "sample" else "beta": beta})
        ids = [
            torch.tensor(x, dtype=torch.long)
            for x in self.sp.encode([s.strip() for s in sentences])
        ]
        out = translate_ids(self.model, ids, dc, device=self.device, progress=progress)
        return [self.sp.decode(x) for x in out]


def resolve_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """Accept a checkpoint directory or a run directory (then its `best` checkpoint)."""
    path = pathlib.Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "best" / "model.safetensors").is_file():
        return path / "best"
    raise FileNotFoundError(
        f"{path} is neither a checkpoint directory nor a run directory with best/"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="codat generate", description="Translate text with a trained DAT."
    )
    p.add_argument(
        "run_dir", help="run directory (uses its best/ checkpoint) or checkpoint directory"
    )
    p.add_argument(
        "--input", "-i", default="-", help="source text file, one sentence per line (- = stdin)"
    )
    p.add_argument("--output", "-o", default="-", help="output file (- = stdout)")
    p.add_argument(
        "--decoder", choices=sorted(DECODERS), default=None, help="default: the run's config"
    )
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="lookahead: token-score weight; sample: rerank weight of the token score",
    )
    p.add_argument("--samples", type=int, default=None, help="sample: hypotheses per sentence")
    p.add_argument("--temperature", type=float, default=None, help="sample: temperature")
    p.add_argument("--top-p", type=float, default=None, help="sample: top-p of each step")
    p.add_argument("--top-tokens", type=int, default=None, help="sample: tokens per vertex")
    p.add_argument("--seed", type=int, default=None, help="sample: random seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    translator = Translator.from_dir(a.run_dir, device=a.device)
    if a.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        lines = pathlib.Path(a.input).read_text(encoding="utf-8").splitlines()
    options = {
        k: v
        for k, v in (
            ("samples", a.samples),
            ("temperature", a.temperature),
            ("top_p", a.top_p),
            ("top_tokens", a.top_tokens),
            ("seed", a.seed),
        )
        if v is not None
    }
    hyps = translator.generate(
        lines, decoder=a.decoder, beta=a.beta, progress=a.output != "-", **options
    )
    text = "".join(h + "\n" for h in hyps)
    if a.output == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(a.output).write_text(text, encoding="utf-8")
    return 0
