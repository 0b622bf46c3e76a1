"""Prepared parallel data on disk, token-bucketed batching and padded batches.

A prepared split is `SPLIT.safetensors` (flat int32 ids + int64 offsets for source and target,
without specials) in the directory written by `codat prepare`. Specials are added at collate time:
source = ids + </s>, target = <s> + ids + </s> (method.md §8.1: n counts both).
"""

from __future__ import annotations

import gzip
import json
import math
import pathlib
import random
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID)


@dataclass(frozen=True)
class Batch:
    src_ids: torch.Tensor  # (B, S) long, </s>-terminated, PAD_ID padded
    src_lens: torch.Tensor  # (B,)
    tgt_ids: torch.Tensor  # (B, N) long, <s> ... </s>, PAD_ID padded
    tgt_lens: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,) positions of the examples in their split

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (self.src_ids, self.src_lens, self.tgt_ids, self.tgt_lens, self.indices)
            )
        )


class ParallelData:
    """Source/target id sequences of one split, held as lists of 1-D int tensors (no specials)."""

    def __init__(self, src: list[torch.Tensor], tgt: list[torch.Tensor]) -> None:
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} source vs {len(tgt)} target sequences")
        self.src, self.tgt = src, tgt
        self.src_lens = torch.tensor([len(s) + 1 for s in src], dtype=torch.long)  # + </s>
        self.tgt_lens = torch.tensor([len(t) + 2 for t in tgt], dtype=torch.long)  # + <s> </s>

    def __len__(self) -> int:
        return len(self.src)

    @classmethod
    def load(cls, data_dir: str | pathlib.Path, split: str) -> ParallelData:
        path = pathlib.Path(data_dir) / f"{split}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"prepared split not found: {path} (run `codat prepare`)")
        t = load_file(str(path))
        return cls(
            _unflatten(t["src_ids"], t["src_offsets"]), _unflatten(t["tgt_ids"], t["tgt_offsets"])
        )

    def save(self, path: str | pathlib.Path) -> None:
        src_ids, src_off = _flatten(self.src)
        tgt_ids, tgt_off = _flatten(self.tgt)
        save_file(
            {
                "src_ids": src_ids,
                "src_offsets": src_off,
                "tgt_ids": tgt_ids,
                "tgt_offsets": tgt_off,
            },
            str(path),
        )

    def trainable_mask(
        self,
        *,
        max_target_lens: torch.Tensor | None = None,  # (n,) per pair, counting <s> and </s>
        max_ratio: float,
    ) -> torch.Tensor:  # (n,) bool
        """Pairs a model can learn: non-empty, target within `max_target_lens` (a model's capacity
        for each source, e.g. DAT's graph size; None = no limit), and content-length ratio (either
        way) at most max_ratio (0 = no limit)."""
        src_core = (self.src_lens - 1).clamp(min=1).double()
        tgt_core = (self.tgt_lens - 2).clamp(min=1).double()
        ratio = torch.maximum(src_core / tgt_core, tgt_core / src_core)
        ok = (self.src_lens > 1) & (self.tgt_lens > 2)
        if max_target_lens is not None:
            ok &= self.tgt_lens <= max_target_lens
        if max_ratio > 0:
            ok &= ratio <= max_ratio
        return ok

    def collate(self, indices: list[int]) -> Batch:
        B = len(indices)
        src_lens = self.src_lens[indices]
        tgt_lens = self.tgt_lens[indices]
        src = torch.full((B, int(src_lens.max())), PAD_ID, dtype=torch.long)
        tgt = torch.full((B, int(tgt_lens.max())), PAD_ID, dtype=torch.long)
        for row, i in enumerate(indices):
            s, t = self.src[i], self.tgt[i]
            src[row, : len(s)] = s
            src[row, len(s)] = EOS_ID
            tgt[row, 0] = BOS_ID
            tgt[row, 1 : len(t) + 1] = t
            tgt[row, len(t) + 1] = EOS_ID
        return Batch(src, src_lens, tgt, tgt_lens, torch.tensor(indices, dtype=torch.long))


def _flatten(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lens, 0)
    flat = (
        torch.cat([s.to(torch.int32) for s in seqs]) if seqs else torch.zeros(0, dtype=torch.int32)
    )
    return flat, offsets


def _unflatten(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    flat = flat.long()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def token_batches(
    sizes: torch.Tensor,  # (n,) cost of one example: its longest padded length
    *,
    max_tokens: int,
    shuffle: bool,
    seed: int = 0,
    indices: list[int] | None = None,
) -> list[list[int]]:
    """Group examples of similar size so that batch_size * longest size <= max_tokens.

    Sorting by size (with random tie-breaking when shuffling) keeps padding low; the batch order is
    then shuffled. An example longer than max_tokens becomes a batch of its own.
    """
    rng = random.Random(seed)
    pool = list(range(len(sizes))) if indices is None else list(indices)
    if shuffle:
        rng.shuffle(pool)
    pool.sort(key=lambda i: int(sizes[i]))
    batches, cur, cur_max = [], [], 0
    for i in pool:
        size = int(sizes[i])
        if cur and max(cur_max, size) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, size)
    if cur:
        batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
    return batches


def split_lines(raw: bytes, *, name: str = "<bytes>") -> list[str]:
    """UTF-8 text split into lines on "\\n" only ("\\r\\n" tolerated): the one definition of a
    line for every text codat reads. Characters Python's `str.splitlines` also breaks on (\\x1c,
    \\x85, \\u2028, a lone \\r ...) stay inside their line.

    Raises:
        ValueError: invalid UTF-8, naming `name` and the line.
    """
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for no, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}:{no}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
        out.append(text[:-1] if text.endswith("\r") else text)
    return out


def read_lines(path: str | pathlib.Path) -> list[str]:
    """The lines (`split_lines`) of a UTF-8 text file, gzipped if its name ends in .gz; "-"
    reads stdin.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable or invalid UTF-8 (file and line).
    """
    if str(path) == "-":
        return split_lines(sys.stdin.buffer.read(), name="<stdin>")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    return split_lines(raw, name=str(path))


def read_meta(data_dir: str | pathlib.Path) -> dict:
    path = pathlib.Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: is {data_dir} a directory made by `codat prepare`?"
        )
    return json.loads(path.read_text())


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Every rank gets the same number of batches (the tail that does not divide is dropped)."""
    per_rank = math.floor(len(batches) / world)
    if world > 1 and per_rank == 0:
        raise ValueError(
            f"{len(batches)} batches cannot feed {world} ranks: lower train.max_tokens"
        )
    return batches[rank * per_rank : (rank + 1) * per_rank] if world > 1 else batches
