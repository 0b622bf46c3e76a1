"""`codat prepare`: raw parallel text -> joint sentencepiece BPE model -> id tensors on disk.

Reads PREFIX.LANG or PREFIX.LANG.gz (UTF-8, one sentence per line) for each split. Every input is
read and checked before anything is written; the output directory appears only when complete.
"""

from __future__ import annotations

import gzip
import json
import logging
import pathlib
import shutil
import tempfile

import sentencepiece as spm
import torch

from codat.dat import graph_lengths
from codat.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ParallelData

log = logging.getLogger(__name__)


class PrepareError(ValueError):
    """Bad input for `codat prepare`; the message names the file (and line)."""


def find_file(prefix: str, lang: str) -> pathlib.Path:
    for cand in (pathlib.Path(f"{prefix}.{lang}"), pathlib.Path(f"{prefix}.{lang}.gz")):
        if cand.is_file():
            return cand
    raise PrepareError(f"missing file: {prefix}.{lang} (or {prefix}.{lang}.gz)")


def read_lines(path: pathlib.Path) -> list[str]:
    """Lines of a plain or gzipped UTF-8 file; invalid UTF-8 raises naming the file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise PrepareError(f"{path}: cannot read: {e}") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for no, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r").strip())
        except UnicodeDecodeError as e:
            raise PrepareError(
                f"{path}:{no}: invalid UTF-8 ({e.reason} at byte {e.start})"
            ) from None
    return out


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
    force: bool = False,
) -> dict:
    """Build the prepared directory; returns its meta data (also written as meta.json)."""
    out_dir = pathlib.Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"output path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise PrepareError(f"output directory {out_dir} exists and is not empty (use --force)")
    splits = {"train": train}
    for prefix in ([valid] if valid else []) + list(tests):
        name = pathlib.Path(prefix).name
        if name in splits:
            raise PrepareError(
                f"two splits would both be named '{name}' ({splits[name]} and {prefix}): "
                "the split name is the prefix's base name and must be unique"
            )
        splits[name] = prefix
    texts = {name: read_pair(prefix, src, tgt) for name, prefix in splits.items()}
    train_src, train_tgt, _ = texts["train"]
    nonempty = [(s, t) for s, t in zip(train_src, train_tgt, strict=True) if s and t]
    if not nonempty:
        raise PrepareError(f"{find_file(train, src)}: no non-empty sentence pairs")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        try:
            sentences = [s for s, _ in nonempty] + [t for _, t in nonempty]
            train_sentencepiece(sentences, tmp / "spm", vocab_size)
        except RuntimeError as e:
            raise PrepareError(
                f"sentencepiece failed with --vocab-size {vocab_size}: {e}"
            ) from None
        sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
        meta = {"src_lang": src, "tgt_lang": tgt, "vocab_size": sp.get_piece_size(), "splits": {}}
        for name, (s_lines, t_lines, _) in texts.items():
            data = ParallelData(
                [torch.tensor(x, dtype=torch.int32) for x in sp.encode(s_lines)],
                [torch.tensor(x, dtype=torch.int32) for x in sp.encode(t_lines)],
            )
            info = {"lines": len(data)}
            if name == "train":
                empty = torch.tensor([not (s and t) for s, t in zip(s_lines, t_lines, strict=True)])
                graph = graph_lengths(
                    data.src_lens, upsample_scale=upsample_scale, max_positions=2**31 - 1
                )
                ok = data.trainable_mask(max_target_lens=graph, max_ratio=max_ratio) & ~empty
                keep = ok.nonzero().squeeze(1).tolist()
                info["dropped_empty"] = int(empty.sum())
                info["dropped_untrainable"] = int((~ok & ~empty).sum())
                data = ParallelData([data.src[i] for i in keep], [data.tgt[i] for i in keep])
                log.info(
                    "train: kept %d of %d pairs; dropped %d with an empty side, %d with length "
                    "ratio > %g or graph size floor(%g*m) < n",
                    len(data),
                    info["lines"],
                    info["dropped_empty"],
                    info["dropped_untrainable"],
                    max_ratio,
                    upsample_scale,
                )
            else:
                (tmp / f"{name}.ref.txt").write_text("".join(t + "\n" for t in t_lines), "utf-8")
                (tmp / f"{name}.src.txt").write_text("".join(s + "\n" for s in s_lines), "utf-8")
            info["kept"] = len(data)
            data.save(tmp / f"{name}.safetensors")
            meta["splits"][name] = info
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def summary(meta: dict, out: str | pathlib.Path) -> str:
    """One line: the vocabulary and the pairs kept and dropped of each split in `meta`."""
    tr = meta["splits"]["train"]
    return (
        f"prepared {out}: vocab {meta['vocab_size']}; train kept {tr['kept']}/{tr['lines']} "
        f"(dropped {tr['dropped_empty']} empty, {tr['dropped_untrainable']} untrainable); "
        + ", ".join(f"{k} {v['kept']}" for k, v in meta["splits"].items() if k != "train")
    )
