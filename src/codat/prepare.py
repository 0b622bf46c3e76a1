"""`codat prepare`: raw parallel text -> joint sentencepiece BPE model -> id tensors on disk.

Reads PREFIX.LANG or PREFIX.LANG.gz (UTF-8, one sentence per line) for each split, and for an
evaluation split PREFIX.refs.jsonl when it exists (several references per line, e.g. SciTLDR's:
copied as NAME.refs.jsonl and scored against instead of NAME.ref.txt). Every input is read and
checked before anything is written; the output directory appears only when complete.

Long sources (more than max_positions - 1 pieces) are truncated in every split, so that nothing
downstream meets a source longer than the model's max_source_positions (`long_sources="drop"`
drops such training pairs instead). The length-ratio filter (`max_ratio`) is a per-task choice:
2 for translation, 0 (off) for summarisation; dropping more than `DROP_WARN` of the training
pairs is warned about loudly.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import sentencepiece as spm
import torch

from codat.artifacts import check_output_dir, replace_dir, temp_dir, write_marker
from codat.dat import graph_lengths
from codat.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ParallelData
from codat.data import read_lines as data_read_lines
from codat.metrics import read_refs_jsonl

log = logging.getLogger(__name__)

LONG_SOURCES = ("truncate", "drop")
DROP_WARN = 0.05  # warn when more than this fraction of the non-empty training pairs is dropped


class PrepareError(ValueError):
    """Bad input for `codat prepare`; the message names the file (and line)."""


def find_file(prefix: str, lang: str) -> pathlib.Path:
    for cand in (pathlib.Path(f"{prefix}.{lang}"), pathlib.Path(f"{prefix}.{lang}.gz")):
        if cand.is_file():
            return cand
    raise PrepareError(f"missing file: {prefix}.{lang} (or {prefix}.{lang}.gz)")


def read_lines(path: pathlib.Path) -> list[str]:
    """Lines of a plain or gzipped UTF-8 file (`data.read_lines`: split on newlines only),
    whitespace-stripped; invalid UTF-8 raises naming the file and line."""
    try:
        return [line.strip() for line in data_read_lines(path)]
    except ValueError as e:
        raise PrepareError(str(e)) from None


def read_pair(prefix: str, src: str, tgt: str) -> tuple[list[str], list[str], pathlib.Path]:
    src_path, tgt_path = find_file(prefix, src), find_file(prefix, tgt)
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise PrepareError(
            f"line counts differ: {src_path} has {len(src_lines)} lines, "
            f"{tgt_path} has {len(tgt_lines)}"
        )
    return src_lines, tgt_lines, tgt_path


def train_sentencepiece(sentences: list[str], out_prefix: pathlib.Path, vocab_size: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,  # tiny corpora get a smaller vocabulary instead of an error
        num_threads=2,
        minloglevel=2,
    )


def _check_output_dir(
    out_dir: pathlib.Path, force: bool, prefixes: list[str], src: str, tgt: str
) -> None:
    """Refuse an output path codat may not write (`artifacts.check_output_dir`): a file, the
    current directory or a parent of an input, a non-empty directory unless `force` and it is a
    prepared data directory written by codat.

    Raises:
        PrepareError: naming --out and why.
    """
    inputs = [pathlib.Path(f"{p}.{lang}") for p in prefixes for lang in (src, tgt)]
    try:
        check_output_dir(out_dir, kind="data", force=force, inputs=inputs, flag="--out")
    except ValueError as e:
        raise PrepareError(str(e)) from None


def _split_prefixes(train: str, valid: str | None, tests: list[str]) -> dict[str, str]:
    """Map each split name to its file prefix: "train", then valid and tests by base name.

    Raises:
        PrepareError: two of valid and tests share a base name (or one is named "train").
    """
    splits = {"train": train}
    for prefix in ([valid] if valid else []) + list(tests):
        name = pathlib.Path(prefix).name
        if name in splits:
            raise PrepareError(
                f"two splits would both be named '{name}' ({splits[name]} and {prefix}): "
                "the split name is the prefix's base name and must be unique"
            )
        splits[name] = prefix
    return splits


def _nonempty_pairs(
    src_lines: list[str], tgt_lines: list[str], *, train: str, src: str
) -> list[tuple[str, str]]:
    """The training pairs with both sides non-empty.

    Raises:
        PrepareError: there are none; the message names the train source file.
    """
    nonempty = [(s, t) for s, t in zip(src_lines, tgt_lines, strict=True) if s and t]
    if not nonempty:
        raise PrepareError(f"{find_file(train, src)}: no non-empty sentence pairs")
    return nonempty


def _train_tokenizer(
    pairs: list[tuple[str, str]], out_prefix: pathlib.Path, vocab_size: int
) -> spm.SentencePieceProcessor:
    """Train the joint BPE model on both sides of `pairs` as OUT_PREFIX.model and load it.

    Raises:
        PrepareError: sentencepiece training failed (e.g. a vocabulary size too small).
    """
    try:
        sentences = [s for s, _ in pairs] + [t for _, t in pairs]
        train_sentencepiece(sentences, out_prefix, vocab_size)
    except RuntimeError as e:
        raise PrepareError(f"sentencepiece failed with --vocab-size {vocab_size}: {e}") from None
    return spm.SentencePieceProcessor(model_file=f"{out_prefix}.model")


def _encode(
    sp: spm.SentencePieceProcessor, src_lines: list[str], tgt_lines: list[str]
) -> ParallelData:
    """Both sides of a split as int32 id tensors, one per line, in a `ParallelData`."""
    return ParallelData(
        [torch.tensor(x, dtype=torch.int32) for x in sp.encode(src_lines)],
        [torch.tensor(x, dtype=torch.int32) for x in sp.encode(tgt_lines)],
    )


def _truncate_sources(data: ParallelData, max_positions: int) -> tuple[ParallelData, int]:
    """`data` with each source longer than `max_positions` (counting </s>) cut to its first
    max_positions - 1 pieces, and how many were cut (0 = no limit)."""
    if max_positions <= 0:
        return data, 0
    long = int((data.src_lens > max_positions).sum())
    if long:
        data = ParallelData([s[: max_positions - 1] for s in data.src], data.tgt)
    return data, long


def _read_multi_refs(prefix: str, lines: int) -> list[str] | None:
    """PREFIX.refs.jsonl as normalised JSON lines, or None when there is none.

    Raises:
        PrepareError: a bad line, or a line count other than the split's `lines`.
    """
    path = pathlib.Path(f"{prefix}.refs.jsonl")
    if not path.is_file():
        return None
    try:
        refs = read_refs_jsonl(path)
    except ValueError as e:
        raise PrepareError(str(e)) from None
    if len(refs) != lines:
        raise PrepareError(f"{path} has {len(refs)} lines but the split has {lines}")
    return [json.dumps([" ".join(r.split()) for r in item], ensure_ascii=False) for item in refs]


def _drop_untrainable(
    data: ParallelData,
    src_lines: list[str],
    tgt_lines: list[str],
    *,
    upsample_scale: float,
    max_ratio: float,
    max_positions: int,
) -> tuple[ParallelData, dict[str, int]]:
    """Drop the pairs with an empty side, those longer than `max_positions` (source + </s> or
    <s> + target + </s>; 0 = no limit), and those DAT cannot train on (length ratio above
    `max_ratio`, or a graph of floor(upsample_scale * m) vertices shorter than the target).
    N below is the number of pairs in `data`.

    Returns:
        The kept pairs and the counts dropped: "dropped_empty", "dropped_too_long" (non-empty)
        and "dropped_untrainable" (the other non-empty pairs).
    """
    empty = torch.tensor([not (s and t) for s, t in zip(src_lines, tgt_lines, strict=True)])  # (N,)
    too_long = _too_long(data, max_positions) & ~empty  # (N,) bool
    graph = graph_lengths(data.src_lens, upsample_scale=upsample_scale, max_positions=2**31 - 1)
    ok = data.trainable_mask(max_target_lens=graph, max_ratio=max_ratio) & ~empty & ~too_long
    keep = ok.nonzero().squeeze(1).tolist()
    kept = ParallelData([data.src[i] for i in keep], [data.tgt[i] for i in keep])
    counts = {
        "dropped_empty": int(empty.sum()),
        "dropped_too_long": int(too_long.sum()),
        "dropped_untrainable": int((~ok & ~empty & ~too_long).sum()),
    }
    return kept, counts


def _too_long(data: ParallelData, max_positions: int) -> torch.Tensor:  # (N,) bool
    """Pairs whose source (+ </s>) or target (+ <s> </s>) exceeds `max_positions` (0 = none)."""
    if max_positions <= 0:
        return torch.zeros(len(data), dtype=torch.bool)
    return (data.src_lens > max_positions) | (data.tgt_lens > max_positions)


def _write_split(
    tmp: pathlib.Path,
    name: str,
    sp: spm.SentencePieceProcessor,
    src_lines: list[str],
    tgt_lines: list[str],
    *,
    upsample_scale: float,
    max_ratio: float,
    max_positions: int,
    long_sources: str = "truncate",
    multi_refs: list[str] | None = None,
) -> dict:
    """Encode one split and write it into `tmp`: NAME.safetensors, and for an evaluation split
    also NAME.src.txt and NAME.ref.txt (its normalised text) and NAME.refs.jsonl (`multi_refs`).
    Sources longer than `max_positions` are truncated (train with `long_sources` "drop": dropped
    by `_drop_untrainable`). The train split is filtered with `_drop_untrainable` and the counts
    logged; an evaluation split keeps every line (its references must stay aligned) and counts
    its targets longer than `max_positions`.

    Returns:
        The split's meta data: "lines", "truncated_sources", for train "dropped_empty",
        "dropped_too_long" and "dropped_untrainable", for an evaluation split "too_long" (its
        targets), and "kept".
    """
    data = _encode(sp, src_lines, tgt_lines)
    info = {"lines": len(data), "truncated_sources": 0}
    if name != "train" or long_sources == "truncate":
        data, info["truncated_sources"] = _truncate_sources(data, max_positions)
    if info["truncated_sources"]:
        log.warning(
            "%s: truncated %d of %d sources to %d positions (--max-positions)",
            name,
            info["truncated_sources"],
            len(data),
            max_positions,
        )
    if name == "train":
        data, counts = _drop_untrainable(
            data,
            src_lines,
            tgt_lines,
            upsample_scale=upsample_scale,
            max_ratio=max_ratio,
            max_positions=max_positions,
        )
        info.update(counts)
        log.info(
            "train: kept %d of %d pairs; dropped %d with an empty side, %d longer than %d "
            "positions, %d with length ratio > %g or graph size floor(%g*m) < n",
            len(data),
            info["lines"],
            info["dropped_empty"],
            info["dropped_too_long"],
            max_positions,
            info["dropped_untrainable"],
            max_ratio,
            upsample_scale,
        )
    else:
        info["too_long"] = int(_too_long(data, max_positions).sum())
        if info["too_long"]:
            log.warning(
                "%s: %d targets are longer than %d positions (kept: evaluation splits keep "
                "every line)",
                name,
                info["too_long"],
                max_positions,
            )
        (tmp / f"{name}.ref.txt").write_text("".join(t + "\n" for t in tgt_lines), "utf-8")
        (tmp / f"{name}.src.txt").write_text("".join(s + "\n" for s in src_lines), "utf-8")
        if multi_refs is not None:
            (tmp / f"{name}.refs.jsonl").write_text("".join(r + "\n" for r in multi_refs), "utf-8")
            info["refs_jsonl"] = True
    info["kept"] = len(data)
    data.save(tmp / f"{name}.safetensors")
    return info


def prepare(
    *,
    src: str,
    tgt: str,
    train: str,
    valid: str | None,
    tests: list[str],
    out: str,
    vocab_size: int,
    upsample_scale: float,
    max_ratio: float,
    max_positions: int = 256,
    long_sources: str = "truncate",
    force: bool = False,
) -> dict:
    """Build the prepared directory; returns its meta data (also written as meta.json).
    `force` replaces only a directory an earlier `codat prepare` wrote (its marker file).
    `long_sources`: "truncate" (every split) or "drop" (training pairs; evaluation splits are
    always truncated) sources longer than `max_positions`."""
    out_dir = pathlib.Path(out)
    splits = _split_prefixes(train, valid, tests)
    _check_output_dir(out_dir, force, list(splits.values()), src, tgt)
    if max_positions < 0:
        raise PrepareError(f"--max-positions {max_positions} must be >= 0 (0 = no limit)")
    if max_positions == 1:
        raise PrepareError("--max-positions 1 leaves no room for a token besides </s>")
    if long_sources not in LONG_SOURCES:
        raise PrepareError(f"--long-sources '{long_sources}': choose truncate or drop")
    texts = {name: read_pair(prefix, src, tgt) for name, prefix in splits.items()}
    multi = {
        name: _read_multi_refs(prefix, len(texts[name][0]))
        for name, prefix in splits.items()
        if name != "train"
    }
    train_src, train_tgt, _ = texts["train"]
    nonempty = _nonempty_pairs(train_src, train_tgt, train=train, src=src)

    tmp = temp_dir(out_dir)
    try:
        sp = _train_tokenizer(nonempty, tmp / "spm", vocab_size)
        meta = {"src_lang": src, "tgt_lang": tgt, "vocab_size": sp.get_piece_size(), "splits": {}}
        for name, (s_lines, t_lines, _) in texts.items():
            meta["splits"][name] = _write_split(
                tmp,
                name,
                sp,
                s_lines,
                t_lines,
                upsample_scale=upsample_scale,
                max_ratio=max_ratio,
                max_positions=max_positions,
                long_sources=long_sources,
                multi_refs=multi.get(name),
            )
        meta.update(max_positions=max_positions, max_ratio=max_ratio, long_sources=long_sources)
        _warn_if_many_dropped(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        write_marker(tmp, "data")
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty directory: nothing of anyone's is lost
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def dropped_warning(meta: dict) -> str | None:
    """The warning when the length filters dropped more than `DROP_WARN` of the non-empty
    training pairs, naming the flags to change; None otherwise."""
    tr = meta["splits"]["train"]
    nonempty = tr["lines"] - tr["dropped_empty"]
    dropped = tr.get("dropped_too_long", 0) + tr["dropped_untrainable"]
    if nonempty <= 0 or dropped <= DROP_WARN * nonempty:
        return None
    hint = "raise --max-positions (and the model's max positions) or --upsample-scale"
    if meta.get("max_ratio", 0) > 0 and tr["dropped_untrainable"]:
        hint = "for summarisation (long source, short target) use --max-ratio 0"
    return (
        f"WARNING: the length filters dropped {dropped} of {nonempty} non-empty training pairs "
        f"({100 * dropped / nonempty:.1f}%): {tr.get('dropped_too_long', 0)} too long for "
        f"--max-positions {meta.get('max_positions')}, {tr['dropped_untrainable']} with length "
        f"ratio > --max-ratio {meta.get('max_ratio')} or a target longer than the graph "
        f"(--upsample-scale); {hint}"
    )


def _warn_if_many_dropped(meta: dict) -> None:
    warning = dropped_warning(meta)
    if warning:
        log.warning("%s", warning)


def _eval_summary(name: str, info: dict) -> str:
    cut = info.get("truncated_sources", 0)
    return f"{name} {info['kept']}" + (f" ({cut} sources truncated)" if cut else "")


def summary(meta: dict, out: str | pathlib.Path) -> str:
    """The vocabulary and the pairs kept, dropped and truncated of each split in `meta`, and
    `dropped_warning` on a second line when it applies."""
    tr = meta["splits"]["train"]
    line = (
        f"prepared {out}: vocab {meta['vocab_size']}; train kept {tr['kept']}/{tr['lines']} "
        f"(dropped {tr['dropped_empty']} empty, {tr.get('dropped_too_long', 0)} too long, "
        f"{tr['dropped_untrainable']} untrainable; "
        f"{tr.get('truncated_sources', 0)} sources truncated); "
        + ", ".join(_eval_summary(k, v) for k, v in meta["splits"].items() if k != "train")
    )
    warning = dropped_warning(meta)
    return line + ("\n" + warning if warning else "")
