"""`codat generate` and the Python API: load a checkpoint directory, decode text or id batches."""

from __future__ import annotations

import argparse
import pathlib
import sys
from dataclasses import replace

import sentencepiece as spm
import torch
from tqdm import tqdm

from codat.checkpoint import load_checkpoint_config, load_weights
from codat.config import ARCHS, DecodeConfig
from codat.data import EOS_ID, PAD_ID, token_batches
from codat.families import DAT_DECODERS, FAMILIES, draw_samples, family, family_of

__all__ = ["DAT_DECODERS", "Translator", "draw_samples", "translate_ids"]


def batch_sources(
    sources: list[torch.Tensor], model: torch.nn.Module, max_tokens: int
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
    model: torch.nn.Module,  # any family's model (its cfg.arch picks the decoders)
    sources: list[torch.Tensor],  # each 1-D ids without </s>
    dc: DecodeConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[list[int]]:
    """Decode id sequences in token-bucketed batches; results come back in input order."""
    decoder = family_of(model).decoder(dc.decoder)
    was_training = model.training
    model.eval()
    sources, lens, batches = batch_sources(sources, model, dc.max_tokens)
    generator = torch.Generator(device=device).manual_seed(dc.seed)
    results: list[list[int]] = [[] for _ in sources]
    for idx in tqdm(batches, desc="decode", unit="batch", disable=not progress, leave=False):
        src = source_tensor(sources, lens, idx)
        ids = decoder(model, src.to(device), lens[idx].to(device), dc, generator).cpu()
        for row, i in enumerate(idx):
            results[i] = [t for t in ids[row].tolist() if t != PAD_ID]
    model.train(was_training)
    return results


class Translator:
    """A trained model with its tokenizer: `codat.load(run_dir).generate(["ein Satz ."])`."""

    def __init__(
        self,
        model: torch.nn.Module,
        sp: spm.SentencePieceProcessor,
        decode: DecodeConfig,
        device: torch.device | str,
    ) -> None:
        self.model, self.sp, self.decode_cfg, self.device = model, sp, decode, device

    @classmethod
    def from_dir(cls, path: str | pathlib.Path, *, device: str = "cpu") -> Translator:
        path = resolve_checkpoint(path)
        cfg = load_checkpoint_config(path)
        model = family(cfg.model.arch).build(cfg.model)
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
        prog="codat generate", description="Translate text with a trained model."
    )
    p.add_argument(
        "run_dir", help="run directory (uses its best/ checkpoint) or checkpoint directory"
    )
    p.add_argument(
        "--input", "-i", default="-", help="source text file, one sentence per line (- = stdin)"
    )
    p.add_argument("--output", "-o", default="-", help="output file (- = stdout)")
    names = sorted({n for arch in ARCHS if arch in FAMILIES for n in FAMILIES[arch].decoders})
    p.add_argument(
        "--decoder",
        choices=names,
        default=None,
        help="default: the run's config; dat: lookahead greedy viterbi sample; at: beam greedy; "
        "nat: argmax npd; ctc: greedy; cmlm: mask-predict",
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
    p.add_argument("--seed", type=int, default=None, help="sample / npd: random seed")
    p.add_argument("--beam", type=int, default=None, help="at: beam size")
    p.add_argument("--length-penalty", type=float, default=None, help="at: beam length penalty")
    p.add_argument("--length-beam", type=int, default=None, help="nat / cmlm: lengths tried")
    p.add_argument("--noise", type=float, default=None, help="npd: std of the input noise")
    p.add_argument("--iterations", type=int, default=None, help="cmlm: mask-predict iterations")
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
            ("beam", a.beam),
            ("length_penalty", a.length_penalty),
            ("length_beam", a.length_beam),
            ("noise", a.noise),
            ("iterations", a.iterations),
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


def main_distill(argv: list[str] | None = None) -> int:
    """`codat distill RUN_DIR SRC OUT`: sequence-level knowledge distillation (Kim & Rush, 2016).

    Decodes every line of SRC (plain or .gz) with the run's model -- by default an AT with beam
    search -- and writes the outputs to OUT, line for line, atomically (a temporary sibling renamed
    into place), so that `codat prepare` can pair SRC with OUT as a distilled training set.
    """
    from codat.prepare import read_lines

    p = argparse.ArgumentParser(
        prog="codat distill",
        description="Decode a training source file with a trained model (sequence-level KD).",
    )
    p.add_argument("run_dir", help="run or checkpoint directory of the teacher (usually an AT)")
    p.add_argument("src", help="source sentences, one per line (.gz allowed)")
    p.add_argument("out", help="distilled target file to write")
    p.add_argument("--decoder", default=None, help="default: the run's config (AT: beam)")
    p.add_argument("--beam", type=int, default=None, help="at: beam size")
    p.add_argument("--max-tokens", type=int, default=None, help="decoding batch size in tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    lines = read_lines(pathlib.Path(a.src))  # errors name the file (and line)
    translator = Translator.from_dir(a.run_dir, device=a.device)
    options = {k: v for k, v in (("beam", a.beam), ("max_tokens", a.max_tokens)) if v is not None}
    hyps = translator.generate(lines, decoder=a.decoder, progress=True, **options)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"distilled {len(hyps)} sentences -> {out}", file=sys.stderr)
    return 0
