"""Decoding: the `DECODERS[arch][name]` choice point, batched decoding of id sequences, and the
Python API (`codat.load(run_dir).generate([...])`); `codat generate` and `codat distill` call it.

`codat generate` batches a file by --max-tokens (`translate_file`) and streams one line at a time
from a terminal or with --interactive (`translate_stream`).

Every decoder has one signature, `decoder(model, src_ids (B, S), src_lens (B,), dc, generator)
-> (B, T)` ids without specials, PAD_ID padded, computed without grad in the model's current mode.
The DAT decoders live in `dat_decode.py`; each baseline's decoders live in its model file.
"""

from __future__ import annotations

import logging
import pathlib
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import fields, replace
from typing import BinaryIO, TextIO

import sentencepiece as spm
import torch
from torch import nn
from tqdm import tqdm

from codat.artifacts import check_output_file, write_lines_atomic
from codat.checkpoint import load_model, resolve_checkpoint
from codat.cmlm import mask_predict_decoder
from codat.config import DecodeConfig, check_decode
from codat.ctc import ctc_greedy_decoder
from codat.dat_decode import (
    dat_greedy_decoder,
    dat_lookahead_decoder,
    dat_sample_decoder,
    dat_viterbi_decoder,
)
from codat.data import EOS_ID, PAD_ID, read_lines, token_batches
from codat.layers import float32_logits
from codat.nat import nat_argmax_decoder, nat_npd_decoder
from codat.transformer import at_beam_decoder, at_greedy_decoder

log = logging.getLogger(__name__)

Decoder = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, DecodeConfig, torch.Generator | None], torch.Tensor
]


# The decoders of each model.arch; the first one is the default (DecodeConfig.decoder '').
DECODERS: dict[str, dict[str, Decoder]] = {
    "dat": {
        "lookahead": dat_lookahead_decoder,
        "greedy": dat_greedy_decoder,
        "viterbi": dat_viterbi_decoder,
        "sample": dat_sample_decoder,
    },
    "at": {"beam": at_beam_decoder, "greedy": at_greedy_decoder},
    "nat": {"argmax": nat_argmax_decoder, "npd": nat_npd_decoder},
    "glat": {"argmax": nat_argmax_decoder, "npd": nat_npd_decoder},
    "ctc": {"greedy": ctc_greedy_decoder},
    "cmlm": {"mask-predict": mask_predict_decoder},
}


# The DecodeConfig fields each decoder reads, besides decoder, max_tokens and precision (which
# all do):
# setting another one for it is an error (`check_options`).
DECODER_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "dat": {
        "lookahead": ("lookahead_token_weight",),
        "greedy": (),
        "viterbi": ("viterbi_length_exponent",),
        "sample": (
            "samples",
            "temperature",
            "top_p",
            "top_tokens",
            "rerank_token_weight",
            "sampler",
            "rerank",
            "seed",
        ),
    },
    "at": {
        "beam": ("beam", "length_penalty", "max_len_a", "max_len_b"),
        "greedy": ("max_len_a", "max_len_b"),
    },
    "nat": {"argmax": ("length_beam",), "npd": ("length_beam", "samples", "noise", "seed")},
    "glat": {"argmax": ("length_beam",), "npd": ("length_beam", "samples", "noise", "seed")},
    "ctc": {"greedy": ()},
    "cmlm": {"mask-predict": ("length_beam", "iterations")},
}


def check_options(arch: str, decoder: str, given: list[str], name=lambda f: f) -> None:
    """Refuse DecodeConfig fields in `given` that decoder `decoder` of `arch` does not read;
    `name(field)` names them (e.g. as command-line flags).

    Raises:
        ValueError: naming the fields, the decoder and the fields it does use.
    """
    decoder_for(arch, decoder)
    decoder = decoder or next(iter(DECODERS[arch]))
    used = ("decoder", "max_tokens", "precision", *DECODER_OPTIONS[arch][decoder])
    unused = [name(f) for f in given if f not in used]
    if unused:
        uses = ", ".join(name(f) for f in used[3:]) or "no options"
        raise ValueError(
            f"{', '.join(unused)} does not apply to the {decoder} decoder of model.arch={arch} "
            f"(it uses {uses})"
        )


def decoder_for(arch: str, name: str) -> Decoder:
    """The decoder `name` of model.arch `arch` ('' = its default), or a ValueError naming the
    choices."""
    if arch not in DECODERS:
        raise ValueError(f"model.arch='{arch}' has no decoders (have {', '.join(DECODERS)})")
    choices = DECODERS[arch]
    name = name or next(iter(choices))
    if name not in choices:
        raise ValueError(
            f"decoder '{name}' does not apply to model.arch={arch} "
            f"(choose from {', '.join(choices)})"
        )
    return choices[name]


def too_long(sources: list[torch.Tensor], model: nn.Module) -> list[int]:
    """Indices of the sources longer than the model's source positions (counting </s>)."""
    max_src = model.cfg.max_source_positions
    return [i for i, s in enumerate(sources) if len(s) + 1 > max_src]


def batch_sources(
    sources: list[torch.Tensor],
    model: nn.Module,
    max_tokens: int,
    *,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], torch.Tensor, list[list[int]]]:
    """Truncate to the model's source limit (`too_long` says which are) and bucket by the
    decoder positions each source needs (`model.output_lengths`; for a DAT with model.upsample
    predict, `predicted_sizes`): (sources, lengths counting </s>, batches of indices)."""
    max_src = model.cfg.max_source_positions
    sources = [s[: max_src - 1] for s in sources]
    lens = torch.tensor([len(s) + 1 for s in sources], dtype=torch.long)
    if model.cfg.upsample == "predict":
        sizes = predicted_sizes(model, sources, lens, max_tokens, device=device)
    else:
        sizes = model.output_lengths(lens)
    return sources, lens, token_batches(sizes, max_tokens=max_tokens, shuffle=False)


@torch.no_grad()
def predicted_sizes(
    model: nn.Module,  # a DATransformer with model.upsample predict
    sources: list[torch.Tensor],
    lens: torch.Tensor,  # (n,) counting </s>
    max_tokens: int,
    *,
    device: torch.device | str,
) -> torch.Tensor:  # (n,)
    """The graph size the length head gives each source (`encode`, in the model's current mode):
    one encoder pass, in batches of at most max_tokens source tokens, before decoding."""
    sizes = torch.empty_like(lens)
    for idx in token_batches(lens, max_tokens=max_tokens, shuffle=False):
        src = source_tensor(sources, lens, idx).to(device)
        sizes[idx] = model.encode(src, lens[idx].to(device)).graph_lens.cpu()
    return sizes


def source_tensor(
    sources: list[torch.Tensor], lens: torch.Tensor, idx: list[int]
) -> torch.Tensor:  # (B, S)
    """The padded, </s>-terminated source batch of the examples `idx`."""
    src = torch.full((len(idx), int(lens[idx].max())), PAD_ID, dtype=torch.long)
    for row, i in enumerate(idx):
        src[row, : len(sources[i])] = sources[i]
        src[row, len(sources[i])] = EOS_ID
    return src


@torch.no_grad()
def translate_ids(
    model: nn.Module,  # any arch's model; its cfg.arch picks the decoder
    sources: list[torch.Tensor],  # each 1-D ids without </s>
    dc: DecodeConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[list[int]]:
    """Decode id sequences in token-bucketed batches (eval mode); results in input order."""
    decoder = decoder_for(model.cfg.arch, dc.decoder)
    was_training = model.training
    model.eval()
    sources, lens, batches = batch_sources(sources, model, dc.max_tokens, device=device)
    generator = torch.Generator(device=device).manual_seed(dc.seed)
    results: list[list[int]] = [[] for _ in sources]
    bar = {} if progress else {"disable": True}  # shown: TQDM_* settings (TQDM_DISABLE=1) apply
    autocast = torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=dc.precision == "bf16"
    )
    for idx in tqdm(batches, desc="decode", unit="batch", leave=False, **bar):
        src = source_tensor(sources, lens, idx)
        with autocast, float32_logits(dc.precision == "bf16"):
            ids = decoder(model, src.to(device), lens[idx].to(device), dc, generator).cpu()
        for row, i in enumerate(idx):
            results[i] = [t for t in ids[row].tolist() if t != PAD_ID]
    model.train(was_training)
    return results


class Translator:
    """A trained model with its tokenizer and the run's decoding settings:
    `codat.load(run_dir).generate(["ein Satz ."])`."""

    def __init__(
        self,
        model: nn.Module,
        sp: spm.SentencePieceProcessor,
        decode: DecodeConfig,
        device: torch.device | str,
    ) -> None:
        self.model, self.sp, self.decode_cfg, self.device = model, sp, decode, device

    @classmethod
    def from_dir(cls, path: str | pathlib.Path, *, device: str = "cpu") -> Translator:
        """Load a checkpoint directory, or a run directory's best/ checkpoint."""
        path = resolve_checkpoint(path)
        model, cfg = load_model(path, device)
        sp = spm.SentencePieceProcessor(model_file=str(path / "spm.model"))
        return cls(model, sp, cfg.decode, device)

    def check(self, decode: DecodeConfig) -> None:
        """Refuse decoding settings out of range (`check_decode`) and, like the command line,
        options changed from the run's settings that the chosen decoder does not read
        (`check_options`).

        Raises:
            ValueError: naming the field (and, for an option, the decoder and what it uses).
        """
        check_decode(decode)
        changed = [
            f.name
            for f in fields(DecodeConfig)
            if f.name != "decoder" and getattr(decode, f.name) != getattr(self.decode_cfg, f.name)
        ]
        check_options(self.model.cfg.arch, decode.decoder, changed)

    def settings(self, decoder: str = "") -> DecodeConfig:
        """The run's decoding settings, with another decoder when `decoder` is given."""
        return replace(self.decode_cfg, decoder=decoder or self.decode_cfg.decoder)

    def generate(
        self,
        sentences: list[str],
        decode: DecodeConfig | None = None,
        *,
        progress: bool = False,
        truncate: bool = True,
    ) -> list[str]:
        """Translate sentences with `decode` (default: the run's settings, `self.decode_cfg`);
        e.g. `t.generate(s, replace(t.decode_cfg, decoder="sample", rerank_token_weight=0.3))`.
        Returns one string per sentence; an empty (or blank) sentence gives "". Sources longer
        than the model's positions are truncated with a warning saying how many, or refused
        when `truncate` is False.

        Raises:
            TypeError: `sentences` is a single string (pass `[text]`).
            ValueError: a decoding setting out of range or that the decoder does not read
                (`check`), or too-long inputs with `truncate` False (naming the first lines,
                1-based).
        """
        if isinstance(sentences, str):
            raise TypeError(
                "Translator.generate takes a list of sentences, got a single string: "
                "use generate([text])"
            )
        dc = self.decode_cfg if decode is None else decode
        self.check(dc)
        texts = [s.strip() for s in sentences]
        full = [i for i, s in enumerate(texts) if s]  # blank lines are not decoded
        ids = [torch.tensor(x, dtype=torch.long) for x in self.sp.encode([texts[i] for i in full])]
        long = [full[i] for i in too_long(ids, self.model)]
        limit = self.model.cfg.max_source_positions
        if long and not truncate:
            lines = ", ".join(str(i + 1) for i in long[:5])
            raise ValueError(
                f"{len(long)} inputs are longer than the model's max_source_positions={limit} "
                f"(lines {lines}{', ...' if len(long) > 5 else ''}); drop --no-truncate to "
                "truncate them"
            )
        if long:
            log.warning(
                "truncated %d of %d inputs to the model's max_source_positions=%d",
                len(long),
                len(texts),
                limit,
            )
        out = translate_ids(self.model, ids, dc, device=self.device, progress=progress)
        hyps = [""] * len(texts)
        for i, x in zip(full, out, strict=True):
            hyps[i] = self.sp.decode(x)
        return hyps


def translate_file(
    translator: Translator,
    src: str | pathlib.Path,
    out: str | pathlib.Path,
    decode: DecodeConfig | None = None,
    *,
    truncate: bool = True,
) -> int:
    """Translate a text file, one sentence per line (`data.read_lines`), into `out` ("-": stdin /
    stdout, else written atomically); returns the number of sentences. `out` is checked before
    anything is decoded."""
    check_output_file(out, "--output")
    lines = read_lines(src)
    hyps = translator.generate(lines, decode, progress=str(out) != "-", truncate=truncate)
    if str(out) == "-":
        print("".join(h.replace("\n", " ") + "\n" for h in hyps), end="")
    else:
        write_lines_atomic(out, hyps)
    return len(hyps)


def translate_stream(
    translator: Translator,
    src: BinaryIO,
    out: TextIO,
    decode: DecodeConfig | None = None,
    *,
    truncate: bool = True,
    name: str = "<stdin>",
) -> int:
    """Translate `src` line by line ("\\n" ends a line, as in `data.split_lines`), writing and
    flushing each output line as soon as it is decoded (a terminal, `codat generate
    --interactive`); returns the number of lines. Checks `decode` before reading anything.

    Raises:
        ValueError: a bad decoding setting, or a line that is not UTF-8 (naming `name` and the
            line).
    """
    dc = translator.decode_cfg if decode is None else decode
    translator.check(dc)
    n = 0
    while raw := src.readline():
        n += 1
        try:
            line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}:{n}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
        (hyp,) = translator.generate([line], dc, truncate=truncate)
        out.write(hyp.replace("\n", " ") + "\n")
        out.flush()
    return n


def stream_file(
    translator: Translator,
    src: str | pathlib.Path,
    out: str | pathlib.Path,
    decode: DecodeConfig | None = None,
    *,
    truncate: bool = True,
) -> int:
    """`translate_stream` from a file or stdin ("-") to a file or stdout ("-"); a file output
    is written line by line as the translations come (not atomically)."""
    check_output_file(out, "--output")
    if str(src) != "-" and not pathlib.Path(src).is_file():
        raise FileNotFoundError(f"file not found: {src}")
    fin = nullcontext(sys.stdin.buffer) if str(src) == "-" else open(src, "rb")
    fout = nullcontext(sys.stdout) if str(out) == "-" else open(out, "w", encoding="utf-8")
    with fin as f, fout as g:
        name = "<stdin>" if str(src) == "-" else str(src)
        return translate_stream(translator, f, g, decode, truncate=truncate, name=name)


def distill(
    translator: Translator,
    src: str | pathlib.Path,
    out: str | pathlib.Path,
    decode: DecodeConfig | None = None,
    *,
    truncate: bool = True,
) -> int:
    """Sequence-level knowledge distillation (Kim & Rush, 2016): decode every line of `src`
    (plain or .gz) and write the outputs to `out`, line for line, atomically (a temporary sibling
    renamed into place). Returns the number of sentences."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_output_file(out, "OUT")
    lines = read_lines(src)  # errors name the file (and line)
    hyps = translator.generate(lines, decode, progress=True, truncate=truncate)
    write_lines_atomic(out, hyps)
    return len(hyps)
