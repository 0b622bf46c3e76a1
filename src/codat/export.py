"""`codat export RUN_DIR OUT`: a self-contained model directory, ready to publish.

OUT holds model.safetensors (with {"format": "pt", "codat_version": ...} metadata), config.yaml,
spm.model and a model card, README.md: how to use it, the data (the prepared directory's
meta.json), the model and training settings and the scores measured during training
(metrics.jsonl). `codat.load(OUT)` and `codat generate OUT` read it like a checkpoint. It is
written to a temporary sibling and swapped in complete (`artifacts.replace_dir`).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import yaml

from codat import __version__
from codat.artifacts import check_output_dir, replace_dir, temp_dir, write_marker
from codat.checkpoint import load_model, resolve_checkpoint, write_model_files
from codat.config import RunConfig, config_to_dict
from codat.generate import DECODERS


def export_run(
    run_dir: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    checkpoint: str | pathlib.Path | None = None,
    force: bool = False,
) -> pathlib.Path:
    """Write the export of `run_dir`'s best/ checkpoint (or of `checkpoint`) to `out`; returns
    `out`. `force` replaces only an earlier export (its marker file).

    Raises:
        FileNotFoundError: no checkpoint in `run_dir` (or `checkpoint`).
        ValueError: `out` may not be written (`check_output_dir`).
    """
    run_dir, out = pathlib.Path(run_dir), pathlib.Path(out)
    ckpt = resolve_checkpoint(checkpoint if checkpoint is not None else run_dir)
    check_output_dir(out, kind="export", force=force, inputs=[run_dir, ckpt], flag="OUT")
    model, cfg = load_model(ckpt)
    params = sum(p.numel() for p in model.parameters())
    tmp = temp_dir(out)
    try:
        write_model_files(tmp, model, cfg, ckpt / "spm.model")
        card = model_card(cfg, run_dir, ckpt, params=params)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_marker(tmp, "export")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty directory: nothing of anyone's is lost
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metrics(run_dir: pathlib.Path) -> tuple[list[dict], list[dict]]:
    """The training rows and the validation rows of the run's metrics.jsonl ([] if none)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "valid_bleu" in r]


def _data_section(cfg: RunConfig) -> list[str]:
    meta_file = pathlib.Path(cfg.data.dir) / "meta.json"
    if not meta_file.is_file():
        return [f"Prepared data directory `{cfg.data.dir}` (its meta.json was not found)."]
    meta = json.loads(meta_file.read_text())
    lines = [
        f"{meta['src_lang']} -> {meta['tgt_lang']}, prepared by `codat prepare` in "
        f"`{cfg.data.dir}`: a joint sentencepiece vocabulary of {meta['vocab_size']} pieces "
        f"(spm.model here). Sentence pairs per split (kept of read):",
        "",
        "| split | pairs kept | lines read |",
        "|---|---|---|",
    ]
    for name, split in meta["splits"].items():
        lines.append(f"| {name} | {split.get('kept', '?')} | {split.get('lines', '?')} |")
    return lines


def _scores_section(run_dir: pathlib.Path, cfg: RunConfig) -> list[str]:
    train_rows, valid_rows = read_metrics(run_dir)
    if not valid_rows:
        return [f"No validation scores: {run_dir / 'metrics.jsonl'} holds none."]
    best = max(valid_rows, key=lambda r: (r["valid_bleu"], r["step"]))
    last = valid_rows[-1]
    n = cfg.train.eval_max_sentences
    on = f"the first {n} sentences of" if n > 0 else "all of"
    metric = cfg.data.valid_metric
    scorer = {
        "bleu": f"sacreBLEU, tokenize {cfg.data.tokenize}",
        "chrf": "sacreBLEU chrF",
        "rouge": "ROUGE-1/2/L F1 mean",
    }.get(metric, metric)
    metric = {"bleu": "BLEU", "chrf": "chrF", "rouge": "ROUGE"}.get(metric, metric)
    lines = [
        f"Measured during training on {on} the `{cfg.data.valid_split}` split with the run's "
        f"decoding settings (decoder {_decoder(cfg)}), {scorer}, on detokenised text:",
        "",
        f"| | step | valid {metric} | valid loss |",
        "|---|---|---|---|",
        f"| best | {best['step']} | {best['valid_bleu']:.2f} | {best['valid_loss']:.3f} |",
        f"| last | {last['step']} | {last['valid_bleu']:.2f} | {last['valid_loss']:.3f} |",
    ]
    if train_rows:
        t = train_rows[-1]
        lines += ["", f"Trained {t['step']} steps ({t.get('elapsed_s', 0) / 60:.1f} min)."]
    return lines


def _decoder(cfg: RunConfig) -> str:
    return cfg.decode.decoder or next(iter(DECODERS[cfg.model.arch]))


def _languages(header: dict) -> str:
    langs = header.get("language")
    return f", {langs[0]} -> {langs[1]}" if langs else ""


def _checkpoint_line(run_dir: pathlib.Path, ckpt: pathlib.Path) -> str:
    state_file = run_dir / "last" / "trainer_state.json"
    best = json.loads(state_file.read_text()).get("best", []) if state_file.is_file() else []
    if best and ckpt.resolve() == (run_dir / "best").resolve():
        bleu, step = best[0][0], best[0][1]
        return f"the run's best checkpoint (step {step}, valid BLEU {bleu:.2f})"
    return f"the checkpoint `{ckpt}`"


def model_card(cfg: RunConfig, run_dir: pathlib.Path, ckpt: pathlib.Path, *, params: int) -> str:
    """README.md of an export: use, data, model, scores (metrics.jsonl) and the full config."""
    m = cfg.model
    header = {"library_name": "codat", "tags": ["translation", "non-autoregressive", m.arch]}
    meta_file = pathlib.Path(cfg.data.dir) / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        header["language"] = [meta["src_lang"], meta["tgt_lang"]]
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).strip(),
        "---",
        "",
        f"# codat {m.arch} model{_languages(header)}",
        "",
        f"Exported by codat {__version__} from the run `{run_dir}`: "
        f"{_checkpoint_line(run_dir, ckpt)}.",
        "",
        "## Use",
        "",
        "```python",
        "import codat",
        "",
        'translator = codat.load("THIS_DIRECTORY")',
        'print(translator.generate(["a sentence to translate ."]))',
        "```",
        "",
        "or `codat generate THIS_DIRECTORY --input source.txt --output hypotheses.txt`.",
        "",
        "## Data",
        "",
        *_data_section(cfg),
        "",
        "The weights are derived from this data: check its licence before publishing them.",
        "",
        "## Model",
        "",
        f"model.arch={m.arch}, {params / 1e6:.2f}M parameters: dim {m.dim}, {m.heads} heads, "
        f"ffn {m.ffn_dim}, {m.encoder_layers} encoder / {m.decoder_layers} decoder layers; "
        f"train.objective={cfg.train.objective}.",
        "",
        "## Scores",
        "",
        *_scores_section(run_dir, cfg),
        "",
        "## Configuration (config.yaml)",
        "",
        "```yaml",
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)
