"""Decoding speed: `codat benchmark decode` (lookahead vs K-sample decoding + rerank of one run) and
`codat benchmark speed` (every decoder of many runs and the speed-up over the first, the paper's
Table 1), at batch size 1 (the paper's latency protocol) or larger (throughput), optionally under
bf16 autocast. Each row also reports the mean output length, so that a model that emits
degenerate (short) outputs cannot pass for a faster decoder. Timing only; correctness lives in
tests/.
"""

from __future__ import annotations

import pathlib
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from codat.benchmark import sync
from codat.config import DecodeConfig
from codat.data import read_lines
from codat.generate import Translator


def run_decode_benchmark(
    jobs: dict[str, Callable[[list[str]], list[str] | None]],
    sentences: list[str],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    warmup: int = 5,
    batch_size: int = 1,
) -> dict:
    """Mean time per sentence (ms) of each named job (a function decoding a list of sentences,
    returning the outputs or None), `batch_size` sentences per call (1: the paper's latency
    protocol), averaged over `repeats` passes over `sentences`. The jobs take turns within every
    pass (order alternating between passes), so a slower or faster machine phase affects all of
    them alike. The first job is the baseline of `ratio` (time / baseline time) and `speedup`
    (baseline time / time). `mean_output_words`: the mean whitespace-token length of a job's
    outputs in its first pass (None when it returns none)."""
    if repeats < 1 or not sentences or not jobs or batch_size < 1:
        raise ValueError("need repeats >= 1, batch_size >= 1, one sentence and one decoder")
    dev = torch.device(device)
    names = list(jobs)
    batches = [sentences[i : i + batch_size] for i in range(0, len(sentences), batch_size)]
    for name in names:
        for batch in batches[: max(1, warmup // batch_size)]:
            jobs[name](batch)
    totals = {name: [] for name in names}
    lengths: dict[str, float | None] = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            outputs = []
            sync(dev)
            t0 = time.perf_counter()
            for batch in batches:
                outputs.append(jobs[name](batch))
            sync(dev)
            totals[name].append((time.perf_counter() - t0) * 1000.0 / len(sentences))
            lengths.setdefault(name, mean_words(outputs))
    ms = {name: statistics.mean(v) for name, v in totals.items()}
    base = names[0]
    return {
        "sentences": len(sentences),
        "repeats": repeats,
        "batch_size": batch_size,
        "device": str(dev),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ms_per_sentence": ms,
        "sentences_per_s": {name: 1000.0 / v for name, v in ms.items()},
        "mean_output_words": {name: lengths[name] for name in names},
        "per_pass_ms": totals,
        "relative_to": base,
        "ratio": {name: ms[name] / ms[base] for name in names},
        "speedup": {name: ms[base] / ms[name] for name in names},
    }


def mean_words(outputs: list[list[str] | None]) -> float | None:
    """Mean whitespace-token count of the output sentences of one pass (None without outputs)."""
    texts = [t for batch in outputs if batch is not None for t in batch]
    return statistics.mean(len(t.split()) for t in texts) if texts else None


def format_decode_report(result: dict, settings: dict[str, str], *, speedup: bool = False) -> str:
    """A table: decoder, ms/sentence, sentences/s, mean output length (words), time ratio (or
    speed-up) vs the first, its settings."""
    r = result
    column = ("speed-up" if speedup else "vs " + r["relative_to"])[:15]
    lines = [
        f"Decoding speed, batch size {r.get('batch_size', 1)}: {r['sentences']} sentences x "
        f"{r['repeats']} passes, device={r['device']}, threads={r['torch_threads']}, "
        f"torch {r['torch_version']}",
        "",
        f"{'decoder':<22}{'ms/sentence':>13}{'sent/s':>9}{'out words':>11}{column:>16}  settings",
    ]
    for name, ms in r["ms_per_sentence"].items():
        value = r["speedup" if speedup else "ratio"][name]
        words = r.get("mean_output_words", {}).get(name)
        shown = "-" if words is None else f"{words:.1f}"
        lines.append(
            f"{name:<22}{ms:>13.2f}{1000.0 / ms:>9.1f}{shown:>11}{value:>15.2f}x  {settings[name]}"
        )
    if speedup:
        lines.append(f"\nspeed-up = time of {r['relative_to']} / time of the row")
    lines.append("out words: mean whitespace tokens per output (short, degenerate output is fast)")
    return "\n".join(lines)


def read_sentences(path: str | pathlib.Path, max_sentences: int) -> list[str]:
    """The first `max_sentences` lines of a text file (all when <= 0)."""
    lines = read_lines(path)  # one line per \n, as every codat input
    return lines[:max_sentences] if max_sentences > 0 else lines


def describe(dc: DecodeConfig, fields: tuple[str, ...]) -> str:
    """`decoder=... field=value ...` of the named `DecodeConfig` fields."""
    return " ".join(f"{k}={getattr(dc, k)}" for k in ("decoder", *fields))


# The DecodeConfig fields of the sample decoder (`codat benchmark decode` prints them).
SAMPLE_FIELDS = ("samples", "temperature", "top_p", "top_tokens", "rerank_token_weight")


def _job(
    translator: Translator, dc: DecodeConfig, *, bf16: bool = False
) -> Callable[[list[str]], list[str]]:
    """Decode a list of sentences with `dc`; `bf16`: with decode.precision bf16 (the model's
    matmuls under bf16 autocast; the DP, log-softmax and transitions stay float32)."""
    dc = replace(dc, precision="bf16") if bf16 else dc

    def job(sentences: list[str]) -> list[str]:
        return translator.generate(sentences, dc)

    return job


def decode_benchmark(
    translator: Translator,
    sentences: list[str],
    lookahead: DecodeConfig,
    sample: DecodeConfig,
    *,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    batch_size: int = 1,
    bf16: bool = False,
) -> tuple[dict, dict[str, str]]:
    """Lookahead decoding with `lookahead` against sample decoding with `sample` (their decoder
    fields are set here), `batch_size` sentences per call; `bf16`: each also under bf16 autocast
    (`with_bf16_rows`). Returns (result, settings per row)."""
    settings = {
        # Only the lookahead knobs: the sampling flags of `sample` do not apply to lookahead.
        "lookahead": replace(
            translator.decode_cfg,
            decoder="lookahead",
            lookahead_token_weight=lookahead.lookahead_token_weight,
            max_tokens=lookahead.max_tokens,
        ),
        f"sample-{sample.samples}": replace(sample, decoder="sample"),
    }
    look, samp = settings.values()
    jobs = {name: _job(translator, dc) for name, dc in settings.items()}
    described = {
        "lookahead": describe(look, ("lookahead_token_weight",)),
        f"sample-{sample.samples}": describe(samp, SAMPLE_FIELDS),
    }
    if bf16:
        bf16_jobs = {name: _job(translator, dc, bf16=True) for name, dc in settings.items()}
        jobs, described = with_bf16_rows(jobs, bf16_jobs, described)
    with torch.inference_mode():
        result = run_decode_benchmark(
            jobs, sentences, device=device, repeats=repeats, batch_size=batch_size
        )
    return result, described


def with_bf16_rows(
    jobs: dict[str, Callable], bf16_jobs: dict[str, Callable], described: dict[str, str]
) -> tuple[dict[str, Callable], dict[str, str]]:
    """Every row followed by its bf16-autocast twin, named `NAME bf16`."""
    out_jobs, out_described = {}, {}
    for name, job in jobs.items():
        out_jobs[name], out_described[name] = job, described[name]
        out_jobs[f"{name} bf16"] = bf16_jobs[name]
        out_described[f"{name} bf16"] = described[name] + " autocast=bf16"
    return out_jobs, out_described


def speed_settings(arch: str, *, samples: int, iterations: list[int]) -> dict[str, dict]:
    """The decoders `codat benchmark speed` times for one model.arch (the paper's Table 1), as
    the `DecodeConfig` fields each row sets."""
    if arch == "at":
        return {"beam": {"decoder": "beam"}, "greedy": {"decoder": "greedy"}}
    if arch == "dat":
        return {
            "greedy": {"decoder": "greedy"},
            "lookahead": {"decoder": "lookahead"},
            "viterbi": {"decoder": "viterbi"},
            f"sample-{samples}": {"decoder": "sample", "samples": samples},
        }
    if arch in ("nat", "glat"):
        return {
            "argmax": {"decoder": "argmax"},
            f"npd-{samples}": {"decoder": "npd", "samples": samples},
        }
    if arch == "ctc":
        return {"greedy": {"decoder": "greedy"}}
    if arch == "cmlm":
        return {f"iter-{i}": {"decoder": "mask-predict", "iterations": i} for i in iterations}
    raise ValueError(f"no speed settings for model.arch={arch}")


def speed_benchmark(
    runs: list[tuple[str, str | pathlib.Path]],
    sentences: list[str],
    *,
    samples: int,
    iterations: list[int],
    device: torch.device | str = "cpu",
    repeats: int = 3,
    batch_size: int = 1,
    bf16: bool = False,
) -> tuple[dict, dict[str, str]]:
    """Time per sentence of every decoder (`speed_settings`) of every (label, run directory),
    `batch_size` sentences per call, and the speed-up over the first row (put the AT first: its
    beam search is the baseline); `bf16`: each also under bf16 autocast (`with_bf16_rows`)."""
    jobs, bf16_jobs, described = {}, {}, {}
    for label, run_dir in runs:
        translator = Translator.from_dir(run_dir, device=str(device))
        arch = translator.model.cfg.arch
        for name, fields in speed_settings(arch, samples=samples, iterations=iterations).items():
            key = f"{label} {name}"
            if key in jobs:
                raise ValueError(f"label '{label}' is used twice")
            dc = replace(translator.decode_cfg, **fields)
            jobs[key] = _job(translator, dc)
            bf16_jobs[key] = _job(translator, dc, bf16=True)
            described[key] = f"arch={arch} " + " ".join(f"{k}={v}" for k, v in fields.items())
    if bf16:
        jobs, described = with_bf16_rows(jobs, bf16_jobs, described)
    with torch.inference_mode():
        result = run_decode_benchmark(
            jobs, sentences, device=device, repeats=repeats, batch_size=batch_size
        )
    return result, described
