"""One function per `codat` verb: the parsed command line (see `codat.cli`) -> the verb
module's plain Python functions. Decoding flags become a `DecodeConfig` here, once
(`decode_config`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from codat.config import DecodeConfig

# benchmark decode's sample settings unless flags say otherwise (the paper's settings).
_SAMPLE_BENCHMARK = {
    "samples": 128,
    "temperature": 0.05,
    "top_p": 0.5,
    "top_tokens": 1,
    "rerank_token_weight": 0.5,
}


def decode_config(
    base: DecodeConfig, a: argparse.Namespace, arch: str | None = None, decoder: str | None = None
) -> DecodeConfig:
    """`base` with the decoding flags that were given on the command line, each checked in
    range under its flag's name; with `arch`, a flag the chosen decoder (`decoder`, else
    --decoder, else the run's) does not read is an error.

    Raises:
        ValueError: naming the flag.
    """
    from codat.cli import flag_name
    from codat.config import check_decode
    from codat.generate import check_options

    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(DecodeConfig)}
    given = {k: v for k, v in given.items() if v is not None}
    dc = dataclasses.replace(base, **given)
    check_decode(dc, name=flag_name)
    if arch is not None:
        chosen = decoder if decoder is not None else dc.decoder
        check_options(arch, chosen, [k for k in given if k != "decoder"], name=flag_name)
    return dc


def device_of(a: argparse.Namespace) -> str:
    """The torch device of `--device` (default: cuda if available), after `--threads`."""
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    return a.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _write_json(result: dict, path: str | None) -> None:
    if path:
        from codat.evaluate import write_json

        write_json(result, path)


def data(a: argparse.Namespace) -> int:
    from codat.datasets import CORPORA, download

    if a.name not in CORPORA:
        raise ValueError(f"corpus '{a.name}': choose one of {', '.join(CORPORA)}")
    target = download(CORPORA[a.name], a.to, base_url=a.base_url, progress=not a.no_progress)
    print(f"{a.name}: {target} (every pinned sha256 verified)")
    return 0


def prepare(a: argparse.Namespace) -> int:
    from codat.prepare import prepare, summary

    meta = prepare(
        src=a.src,
        tgt=a.tgt,
        train=a.train,
        valid=a.valid,
        tests=a.test,
        out=a.out,
        vocab_size=a.vocab_size,
        upsample_scale=a.upsample_scale,
        max_ratio=a.max_ratio,
        max_positions=a.max_positions,
        long_sources=a.long_sources,
        force=a.force,
    )
    print(summary(meta, a.out))
    return 0


def train(a: argparse.Namespace) -> int:
    from codat import recipes
    from codat.config import load_config
    from codat.train import train

    allowed = [k.strip() for item in a.allow_change for k in item.split(",") if k.strip()]
    resume = {None: False, "yes": True, "auto": "auto"}[a.resume]
    cfg = load_config(recipes.resolve(a.config), a.overrides)
    train(cfg, resume=resume, allow_change=allowed)
    return 0


def generate(a: argparse.Namespace) -> int:
    from codat.artifacts import check_output_file
    from codat.generate import Translator, stream_file, translate_file
    from codat.memory import keep_freed_memory_on_cpu

    check_output_file(a.output, "--output")
    translator = Translator.from_dir(a.run_dir, device=device_of(a))
    keep_freed_memory_on_cpu(translator.device)  # no page faults for each batch's logits
    dc = decode_config(translator.decode_cfg, a, translator.model.cfg.arch)
    terminal = a.input == "-" and sys.stdin.isatty()
    if terminal:
        print("codat generate: one sentence per line; Ctrl-D ends", file=sys.stderr)
    if a.interactive or terminal:
        stream_file(translator, a.input, a.output, dc, truncate=a.truncate)
    else:
        translate_file(translator, a.input, a.output, dc, truncate=a.truncate)
    return 0


def export(a: argparse.Namespace) -> int:
    from codat.export import export_run

    out = export_run(a.run_dir, a.out, checkpoint=a.checkpoint, force=a.force)
    print(f"exported {a.run_dir} -> {out} (load it with codat.load({str(out)!r}))")
    return 0


def distill(a: argparse.Namespace) -> int:
    from codat.generate import Translator, distill
    from codat.memory import keep_freed_memory_on_cpu

    translator = Translator.from_dir(a.run_dir, device=device_of(a))
    keep_freed_memory_on_cpu(translator.device)
    arch, base = translator.model.cfg.arch, translator.decode_cfg
    if arch == "at":  # KD decodes with the beam, whatever the run validated with; --decoder wins
        base = dataclasses.replace(base, decoder="beam")
    dc = decode_config(base, a, arch)
    n = distill(translator, a.src, a.out, dc, truncate=a.truncate)
    print(f"distilled {n} sentences -> {a.out}", file=sys.stderr)
    return 0


def average(a: argparse.Namespace) -> int:
    from codat.checkpoint import average_checkpoints

    run = pathlib.Path(a.run_dir)
    state_file = run / "last" / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} not found: is {run} a codat run directory?")
    best = json.loads(state_file.read_text())["best"]  # [[valid score, step, name], ...]
    paths = [run / "checkpoints" / name for _, _, name in best]
    missing = [str(x) for x in paths if not (x / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"missing checkpoints: {missing}")
    out = pathlib.Path(a.out) if a.out else run / "averaged"
    average_checkpoints(paths, out)
    scores = [round(b[0], 2) for b in best]
    print(f"averaged {len(paths)} checkpoints (valid score {scores}) -> {out}")
    return 0


def score(a: argparse.Namespace) -> int:
    from codat.metrics import score_files

    result = score_files(
        a.hyp, a.ref, metric=a.metric, tokenize=a.tokenize, refs_jsonl=a.refs_jsonl
    )
    print(result.text)
    print(f"signature: {result.signature}")
    return 0


def _sampling_setup(a: argparse.Namespace):
    """The translator, split, references and sampling settings of analyze / tune-beta, and the
    metric keywords: --metric / --tokenize, else the run's data.valid_metric / data.tokenize."""
    from codat.checkpoint import load_checkpoint_config, resolve_checkpoint
    from codat.evaluate import first_sentences, load_split, truncate_sources
    from codat.generate import Translator
    from codat.metrics import METRICS, TOKENIZERS

    translator = Translator.from_dir(a.run_dir, device=device_of(a))
    data, refs = first_sentences(*load_split(a.data_dir, a.split), a.max_sentences)
    data = truncate_sources(data, translator.model.cfg.max_source_positions, split=a.split)
    arch = translator.model.cfg.arch  # a non-DAT model is refused by the verb itself
    dc = decode_config(translator.decode_cfg, a, arch if arch == "dat" else None, "sample")
    run_data = load_checkpoint_config(resolve_checkpoint(a.run_dir)).data
    metric = a.metric or run_data.valid_metric
    tokenize = a.tokenize or run_data.tokenize
    if metric not in METRICS:
        raise ValueError(f"--metric '{metric}': choose one of {', '.join(METRICS)}")
    if tokenize not in TOKENIZERS:
        raise ValueError(f"--tokenize '{tokenize}': choose one of {', '.join(TOKENIZERS)}")
    return (translator, data, refs, dc), {"metric": metric, "tokenize": tokenize}


def analyze(a: argparse.Namespace) -> int:
    from codat.evaluate import analyze
    from codat.generate import Translator

    args, metric = _sampling_setup(a)
    scorer = None
    if a.ncm_scorer is not None:
        scorer = Translator.from_dir(a.ncm_scorer, device=device_of(a))
    result = analyze(*args, **metric, scorer=scorer)
    print(json.dumps(result, indent=2))
    _write_json(result, a.output)
    return 0


def tune_beta(a: argparse.Namespace) -> int:
    from codat.evaluate import tune_beta

    try:
        weights = [float(x) for x in a.betas.split(",")]
    except ValueError:
        raise ValueError(f"--betas '{a.betas}' is not a comma-separated list of numbers") from None
    args, metric = _sampling_setup(a)
    result = tune_beta(*args, weights, **metric)
    print(json.dumps(result, indent=2))
    _write_json(result, a.output)
    return 0


def plot(a: argparse.Namespace) -> int:
    from codat.plot import plot_run

    labels = [s.strip() for s in a.labels.split(",")] if a.labels else None
    print(plot_run(a.run_dirs, a.out, labels=labels))
    return 0


def benchmark_dag(a: argparse.Namespace) -> int:
    from codat.benchmark import format_dag_report, run_dag_benchmark

    device_of(a)  # --threads
    counts = [int(x) for x in a.thread_counts.split(",") if x.strip()] or [None]
    if any(c is not None and c < 1 for c in counts):
        raise ValueError(f"--thread-counts={a.thread_counts}: each count must be >= 1")
    results = []
    for threads in counts:
        result = run_dag_benchmark(
            batch_size=a.batch_size,
            target_len=a.target_len,
            graph_len=a.graph_len,
            repeats=a.repeats,
            warmup=a.warmup,
            seed=a.seed,
            scale=a.scale,
            threads=threads,
            device=a.device or "cpu",
        )
        print(format_dag_report(result))
        results.append(result)
    _write_json(results[0] if len(results) == 1 else {"runs": results}, a.json)
    return 0


def benchmark_decode(a: argparse.Namespace) -> int:
    from codat.generate import Translator
    from codat.speed import decode_benchmark, format_decode_report, read_sentences

    lines = read_sentences(a.input, a.max_sentences)
    device = device_of(a)
    translator = Translator.from_dir(a.run_dir, device=device)
    lookahead = decode_config(translator.decode_cfg, a)
    sample = decode_config(dataclasses.replace(translator.decode_cfg, **_SAMPLE_BENCHMARK), a)
    result, described = decode_benchmark(
        translator,
        lines,
        lookahead,
        sample,
        device=device,
        repeats=a.repeats,
        batch_size=a.batch_size,
        bf16=a.bf16,
    )
    print(format_decode_report(result, described))
    _write_json(result, a.json)
    return 0


def benchmark_speed(a: argparse.Namespace) -> int:
    from codat.speed import format_decode_report, read_sentences, speed_benchmark

    runs = []
    for spec in a.runs:
        label, sep, run_dir = spec.partition("=")
        if not sep or not label or not run_dir:
            raise ValueError(f"run '{spec}': expected LABEL=RUN_DIR")
        runs.append((label, run_dir))
    iterations = [int(x) for x in a.iterations.split(",") if x.strip()]
    result, described = speed_benchmark(
        runs,
        read_sentences(a.input, a.max_sentences),
        samples=a.samples,
        iterations=iterations,
        device=device_of(a),
        repeats=a.repeats,
        batch_size=a.batch_size,
        bf16=a.bf16,
    )
    print(format_decode_report(result, described, speedup=True))
    _write_json(result, a.json)
    return 0


def benchmark_train(a: argparse.Namespace) -> int:
    import torch

    from codat import recipes
    from codat.bench_train import format_train_report, run_train_benchmark
    from codat.config import load_config

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = load_config(recipes.resolve(a.config), a.overrides)
    result = run_train_benchmark(
        cfg, batches=a.batches, repeats=a.repeats, ratio=a.ratio, seed=a.seed, warmup=a.warmup
    )
    print(format_train_report(result))
    _write_json(result, a.json)
    return 0
