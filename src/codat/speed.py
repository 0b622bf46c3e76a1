"""Decoding latency at batch size 1 (the paper's protocol): `codat benchmark decode` (lookahead vs
K-sample decoding + rerank of one run) and `codat benchmark speed` (every decoder of many runs and
the speed-up over the first, the paper's Table 1). Timing only; correctness lives in tests/.
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
from codat.generate import Translator


def run_decode_benchmark(
    jobs: dict[str, Callable[[str], object]],
    sentences: list[str],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    warmup: int = 5,
) -> dict:
    """Mean latency per sentence (ms) of each named job (a function decoding one sentence), one
    sentence at a time (the paper's batch-size-1 protocol), averaged over `repeats` passes over
    `sentences`. The jobs take turns within every pass (order alternating between passes), so a
    slower or faster machine phase affects all of them alike. The first job is the baseline of
    `ratio` (latency / baseline latency) and `speedup` (baseline latency / latency)."""
    if repeats < 1 or not sentences or not jobs:
        raise ValueError("need repeats >= 1, at least one sentence and one decoder")
    dev = torch.device(device)
    names = list(jobs)
    for name in names:
        for s in sentences[:warmup]:
            jobs[name](s)
    totals = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(dev)
            t0 = time.perf_counter()
            for s in sentences:
                jobs[name](s)
            sync(dev)
            totals[name].append((time.perf_counter() - t0) * 1000.0 / len(sentences))
    ms = {name: statistics.mean(v) for name, v in totals.items()}
    base = names[0]
    return {
        "sentences": len(sentences),
        "repeats": repeats,
        "device": str(dev),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ms_per_sentence": ms,
        "per_pass_ms": totals,
        "relative_to": base,
        "ratio": {name: ms[name] / ms[base] for name in names},
        "speedup": {name: ms[base] / ms[name] for name in names},
    }


def format_decode_report(result: dict, settings: dict[str, str], *, speedup: bool = False) -> str:
    """A table: decoder, ms/sentence, latency ratio (or speed-up) vs the first, its settings."""
    r = result
    column = ("speed-up" if speedup else "vs " + r["relative_to"])[:15]
    lines = [
        f"Decoding latency, batch size 1: {r['sentences']} sentences x {r['repeats']} passes, "
        f"device={r['device']}, threads={r['torch_threads']}, torch {r['torch_version']}",
        "",
        f"{'decoder':<22}{'ms/sentence':>13}{column:>16}  settings",
    ]
    for name, ms in r["ms_per_sentence"].items():
        value = r["speedup" if speedup else "ratio"][name]
        lines.append(f"{name:<22}{ms:>13.2f}{value:>15.2f}x  {settings[name]}")
    if speedup:
        lines.append(f"\nspeed-up = latency of {r['relative_to']} / latency of the row")
    return "\n".join(lines)


def read_sentences(path: str | pathlib.Path, max_sentences: int) -> list[str]:
    """The first `max_sentences` lines of a text file (all when <= 0)."""
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return lines[:max_sentences] if max_sentences > 0 else lines


def describe(dc: DecodeConfig, fields: tuple[str, ...]) -> str:
    """`decoder=... field=value ...` of the named `DecodeConfig` fields."""
    return " ".join(f"{k}={getattr(dc, k)}" for k in ("decoder", *fields))


# The DecodeConfig fields of the sample decoder (`codat benchmark decode` prints them).
SAMPLE_FIELDS = ("samples", "temperature", "top_p", "top_tokens", "rerank_token_weight")


def _job(translator: Translator, dc: DecodeConfig) -> Callable[[str], object]:
    return lambda sentence: translator.generate([sentence], dc)


def decode_benchmark(
    translator: Translator,
    sentences: list[str],
    lookahead: DecodeConfig,
    sample: DecodeConfig,
    *,
    device: torch.device | str = "cpu",
    repeats: int = 3,
) -> tuple[dict, dict[str, str]]:
    """Batch-1 latency of lookahead decoding with `lookahead` against sample decoding with
    `sample` (their decoder fields are set here): (result, settings per row)."""
    settings = {
        "lookahead": replace(lookahead, decoder="lookahead"),
        f"sample-{sample.samples}": replace(sample, decoder="sample"),
    }
    jobs = {name: _job(translator, dc) for name, dc in settings.items()}
    with torch.inference_mode():
        result = run_decode_benchmark(jobs, sentences, device=device, repeats=repeats)
    look, samp = settings.values()
    described = {
        "lookahead": describe(look, ("lookahead_token_weight",)),
        f"sample-{sample.samples}": describe(samp, SAMPLE_FIELDS),
    }
    return result, described


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
) -> tuple[dict, dict[str, str]]:
    """Batch-1 latency of every decoder (`speed_settings`) of every (label, run directory) and
    the speed-up over the first row (put the AT first: its beam search is the baseline)."""
    jobs, described = {}, {}
    for label, run_dir in runs:
        translator = Translator.from_dir(run_dir, device=str(device))
        arch = translator.model.cfg.arch
        for name, fields in speed_settings(arch, samples=samples, iterations=iterations).items():
            key = f"{label} {name}"
            if key in jobs:
                raise ValueError(f"label '{label}' is used twice")
            dc = replace(translator.decode_cfg, **fields)
            jobs[key] = _job(translator, dc)
            described[key] = f"arch={arch} " + " ".join(f"{k}={v}" for k, v in fields.items())
    with torch.inference_mode():
        result = run_decode_benchmark(jobs, sentences, device=device, repeats=repeats)
    return result, described
