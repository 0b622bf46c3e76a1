"""A tiny synthetic copy task (German-looking words, target = source) prepared with `codat prepare`
through the CLI, for end-to-end tests. Written in the test's temporary directory only."""

from __future__ import annotations

import pathlib
import random

import pytest

from codat.cli import main

WORDS = "ein mann eine frau hund spielt im park mit dem ball auf der straße".split()


def run_cli(argv: list[str]) -> None:
    """`codat ARGV...` in-process; fails the test unless it exits with 0."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, f"codat {' '.join(argv)} exited with {e.value.code}"


def prepare_copy_task(
    tmp: pathlib.Path, *, sizes=(("train", 120), ("val", 12), ("test", 6)), seed: int = 0
) -> pathlib.Path:
    """Random 3-7 word sentences, target = source; returns the prepared data directory."""
    rng = random.Random(seed)
    raw = tmp / "raw"
    raw.mkdir()
    for split, n in sizes:
        src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n)]
        for lang in ("de", "en"):
            (raw / f"{split}.{lang}").write_text("".join(s + "\n" for s in src), encoding="utf-8")
    data = tmp / "data"
    run_cli(
        [
            "prepare",
            "--src",
            "de",
            "--tgt",
            "en",
            "--train",
            str(raw / "train"),
            "--valid",
            str(raw / "val"),
            "--test",
            str(raw / "test"),
            "--out",
            str(data),
            "--vocab-size",
            "60",
            "--upsample-scale",
            "3",
        ]
    )
    return data
