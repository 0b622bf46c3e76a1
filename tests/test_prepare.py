"""`codat prepare` on a tiny synthetic corpus written into tmp_path.

Checks the happy path (output files, split sizes, ids that decode back to the normalised text,
gzipped and plain inputs), the dropping and counting of empty and untrainable training pairs, and
that every input error raises PrepareError naming the file (and line) while leaving neither an
output directory nor a temporary directory behind. Also drives `codat.cli.main(['prepare', ...])`
for its exit codes and printed counts.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import random

import pytest
import sentencepiece as spm

from codat.cli import main as cli_main
from codat.cli import run
from codat.data import ParallelData, read_meta
from codat.prepare import PrepareError, prepare, summary

WORDS = "ein mann eine frau hund spielt im park mit dem ball auf der straße".split()
LONG_TARGET = " ".join(WORDS[:12])  # 12 words: at least 12 pieces whatever BPE learns
EMPTY_PAIRS = [("", "mann hund"), ("frau park", ""), ("   ", "  ")]  # whitespace-only is empty
UNTRAINABLE_PAIRS = [("ein", LONG_TARGET), ("hund", LONG_TARGET)]


def _write(path: pathlib.Path, lines: list[str], *, gz: bool = False, eol: str = "\n") -> None:
    data = "".join(line + eol for line in lines).encode("utf-8")
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _sentences(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Source sentences and their word-reversed targets.

    Sentencepiece never merges across spaces, so a permutation of the words has exactly as many
    pieces as the original: ratio 1, and floor(2 * (k + 1)) >= k + 2 keeps every pair trainable at
    upsample scale 2.
    """
    rng = random.Random(seed)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n)]
    return src, [" ".join(reversed(s.split())) for s in src]


def _corpus(root: pathlib.Path) -> dict[str, str]:
    """raw/train.{de.gz,en} (60 good + 3 empty + 2 untrainable pairs), raw/val.{de,en.gz} with
    CRLF line ends, raw/test.{de,en}; returns the prefixes."""
    raw = root / "raw"
    raw.mkdir()
    src, tgt = _sentences(60, seed=0)
    pairs = list(zip(src, tgt, strict=True))
    pairs[10:10] = EMPTY_PAIRS
    pairs[30:30] = UNTRAINABLE_PAIRS
    _write(raw / "train.de", [s for s, _ in pairs], gz=True)
    _write(raw / "train.en", [t for _, t in pairs])
    vsrc, vtgt = _sentences(8, seed=1)
    _write(raw / "val.de", vsrc, eol="\r\n")
    _write(raw / "val.en", vtgt, gz=True, eol="\r\n")
    tsrc, ttgt = _sentences(5, seed=2)
    _write(raw / "test.de", tsrc)
    _write(raw / "test.en", ttgt)
    return {"train": str(raw / "train"), "valid": str(raw / "val"), "test": str(raw / "test")}


def _kwargs(prefixes: dict[str, str], out: pathlib.Path, **over) -> dict:
    kw = dict(
        src="de",
        tgt="en",
        train=prefixes["train"],
        valid=prefixes["valid"],
        tests=[prefixes["test"]],
        out=str(out),
        vocab_size=60,
        upsample_scale=2.0,
        max_ratio=2.0,
    )
    kw.update(over)
    return kw


def _listing(d: pathlib.Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def prefixes(tmp_path):
    return _corpus(tmp_path)


@pytest.fixture
def prepared(tmp_path, prefixes):
    out = tmp_path / "bin"
    meta = prepare(**_kwargs(prefixes, out))
    return out, meta


def test_prepare_writes_complete_output_dir_and_no_temp_dirs(tmp_path, prepared):
    out, meta = prepared
    names = set(_listing(out))
    expected = {
        "spm.model",
        "meta.json",
        "train.safetensors",
        "val.safetensors",
        "val.ref.txt",
        "val.src.txt",
        "test.safetensors",
        "test.ref.txt",
        "test.src.txt",
    }
    assert expected <= names
    assert not any(n.startswith(".") for n in _listing(tmp_path)), _listing(tmp_path)
    assert read_meta(out) == meta
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert meta["vocab_size"] == sp.get_piece_size() <= 60
    assert (meta["src_lang"], meta["tgt_lang"]) == ("de", "en")
    assert set(meta["splits"]) == {"train", "val", "test"}


def test_prepare_eval_splits_keep_every_line_with_crlf_stripped(prepared):
    out, meta = prepared
    for split, n in (("val", 8), ("test", 5)):
        ref = (out / f"{split}.ref.txt").read_text("utf-8")
        src = (out / f"{split}.src.txt").read_text("utf-8")
        assert "\r" not in ref + src
        assert len(ref.splitlines()) == len(src.splitlines()) == n
        assert meta["splits"][split] == {
            "lines": n,
            "truncated_sources": 0,
            "too_long": 0,
            "kept": n,
        }
        assert len(ParallelData.load(out, split)) == n
    vsrc, vtgt = _sentences(8, seed=1)
    assert (out / "val.ref.txt").read_text("utf-8").splitlines() == vtgt
    assert (out / "val.src.txt").read_text("utf-8").splitlines() == vsrc


def test_prepare_ids_decode_back_to_the_normalised_text(prepared):
    out, _ = prepared
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in ("val", "test"):
        data = ParallelData.load(out, split)
        ref = (out / f"{split}.ref.txt").read_text("utf-8").splitlines()
        src = (out / f"{split}.src.txt").read_text("utf-8").splitlines()
        assert [sp.decode(t.tolist()) for t in data.tgt] == ref
        assert [sp.decode(s.tolist()) for s in data.src] == src
    train = ParallelData.load(out, "train")
    src, tgt = _sentences(60, seed=0)  # the kept pairs, in input order
    assert [sp.decode(s.tolist()) for s in train.src] == src
    assert [sp.decode(t.tolist()) for t in train.tgt] == tgt
    assert all(int(x.min()) > 3 for x in train.src + train.tgt)  # no specials stored


def test_prepare_drops_and_counts_empty_and_untrainable_train_pairs(prepared):
    _, meta = prepared
    assert meta["splits"]["train"] == {
        "lines": 65,
        "truncated_sources": 0,
        "dropped_empty": 3,
        "dropped_too_long": 0,
        "dropped_untrainable": 2,
        "kept": 60,
    }


def test_prepare_max_ratio_alone_drops_pairs_and_zero_disables_it(tmp_path, prefixes):
    # upsample scale 100: the graph is always large enough, so only the 1:12 length ratio can drop.
    meta = prepare(**_kwargs(prefixes, tmp_path / "r2", upsample_scale=100.0, max_ratio=2.0))
    assert meta["splits"]["train"]["dropped_untrainable"] == 2
    meta = prepare(**_kwargs(prefixes, tmp_path / "r0", upsample_scale=100.0, max_ratio=0.0))
    assert meta["splits"]["train"]["dropped_untrainable"] == 0
    assert meta["splits"]["train"]["kept"] == 62


def test_prepare_force_replaces_a_directory_an_earlier_prepare_wrote(tmp_path, prefixes):
    out = tmp_path / "bin"
    prepare(**_kwargs(prefixes, out, vocab_size=50))
    (out / "stale.txt").write_text("old")  # inside codat's own directory: replaced with it
    meta = prepare(**_kwargs(prefixes, out, force=True))
    assert not (out / "stale.txt").exists()
    assert read_meta(out) == meta and (out / ".codat").is_file()
    assert not any(n.startswith(".") for n in _listing(tmp_path))


def test_prepare_accepts_an_existing_empty_output_dir(tmp_path, prefixes):
    out = tmp_path / "bin"
    out.mkdir()
    prepare(**_kwargs(prefixes, out))
    assert (out / "meta.json").is_file()


# ---------------------------------------------------------------- errors


def _assert_prepare_error(tmp_path: pathlib.Path, kwargs: dict, *fragments: str) -> str:
    """prepare(**kwargs) raises PrepareError mentioning every fragment and writes nothing."""
    before = _listing(tmp_path)
    with pytest.raises(PrepareError) as info:
        prepare(**kwargs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert _listing(tmp_path) == before
    assert isinstance(info.value, ValueError)
    return msg


def test_prepare_error_is_a_value_error():
    assert issubclass(PrepareError, ValueError)


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path, prefixes):
    raw = tmp_path / "raw"
    _write(raw / "val.de", _sentences(7, seed=1)[0])  # val.en.gz keeps 8 lines
    _assert_prepare_error(
        tmp_path,
        _kwargs(prefixes, tmp_path / "bin"),
        f"{raw / 'val.de'} has 7 lines",
        f"{raw / 'val.en.gz'} has 8",
    )


def test_invalid_utf8_names_file_and_line(tmp_path, prefixes):
    raw = tmp_path / "raw"
    lines = [s.encode() for s in _sentences(5, seed=2)[1]]
    lines[3] = b"mann \xff\xfe hund"
    (raw / "test.en").write_bytes(b"\n".join(lines) + b"\n")
    _assert_prepare_error(
        tmp_path, _kwargs(prefixes, tmp_path / "bin"), f"{raw / 'test.en'}:4", "UTF-8"
    )


def test_invalid_utf8_in_gzipped_file_names_file_and_line(tmp_path, prefixes):
    raw = tmp_path / "raw"
    with gzip.open(raw / "train.de.gz", "wb") as f:
        f.write(b"ein mann\n\xc3\x28 frau\n")
    _assert_prepare_error(tmp_path, _kwargs(prefixes, tmp_path / "bin"), f"{raw / 'train.de.gz'}:2")


def test_corrupt_gzip_names_the_file(tmp_path, prefixes):
    raw = tmp_path / "raw"
    (raw / "val.en.gz").write_bytes(b"this is not gzip data\n")
    _assert_prepare_error(tmp_path, _kwargs(prefixes, tmp_path / "bin"), str(raw / "val.en.gz"))


def test_missing_file_is_named(tmp_path, prefixes):
    (tmp_path / "raw" / "test.en").unlink()
    _assert_prepare_error(tmp_path, _kwargs(prefixes, tmp_path / "bin"), f"{prefixes['test']}.en")


def test_missing_file_for_an_unknown_language(tmp_path, prefixes):
    _assert_prepare_error(
        tmp_path, _kwargs(prefixes, tmp_path / "bin", tgt="fr"), f"{prefixes['train']}.fr"
    )


def test_non_empty_output_dir_without_force_is_left_untouched(tmp_path, prefixes):
    out = tmp_path / "bin"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_prepare_error(tmp_path, _kwargs(prefixes, out), str(out), "--force")
    assert _listing(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_all_empty_training_data_is_an_error(tmp_path, prefixes):
    raw = tmp_path / "raw"
    (raw / "train.de.gz").unlink()
    _write(raw / "train.de", ["", "  ", ""])
    _write(raw / "train.en", ["a", "", "b"])
    _assert_prepare_error(tmp_path, _kwargs(prefixes, tmp_path / "bin"), str(raw / "train.de"))


def test_test_split_named_like_valid_split_does_not_replace_it(tmp_path, prefixes):
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "val.de", ["ein mann"])
    _write(other / "val.en", ["mann ein"])
    with pytest.raises(PrepareError, match="'val'"):
        prepare(**_kwargs(prefixes, tmp_path / "bin", tests=[str(other / "val")]))
    assert not (tmp_path / "bin").exists()


def test_too_small_vocab_raises_prepare_error(tmp_path, prefixes):
    with pytest.raises(PrepareError, match="vocab-size 3"):
        prepare(**_kwargs(prefixes, tmp_path / "bin", vocab_size=3))
    assert not (tmp_path / "bin").exists()


def test_output_path_that_is_a_file_raises_prepare_error(tmp_path, prefixes):
    (tmp_path / "bin").write_text("x")
    with pytest.raises(PrepareError):
        prepare(**_kwargs(prefixes, tmp_path / "bin"))


# ---------------------------------------------------------------- CLI


def _argv(prefixes: dict[str, str], out: pathlib.Path) -> list[str]:
    return [
        "--src",
        "de",
        "--tgt",
        "en",
        "--train",
        prefixes["train"],
        "--valid",
        prefixes["valid"],
        "--test",
        prefixes["test"],
        "--out",
        str(out),
        "--vocab-size",
        "60",
        "--upsample-scale",
        "2",
        "--max-ratio",
        "2",
    ]


def test_prepare_command_prints_kept_and_dropped_counts(tmp_path, prefixes, capsys):
    assert run(["prepare", *_argv(prefixes, tmp_path / "bin")]) == 0
    out = capsys.readouterr().out
    assert "train kept 60/65" in out
    assert "dropped 3 empty, 0 too long, 2 untrainable" in out
    assert "val 8" in out and "test 5" in out
    meta = json.loads((tmp_path / "bin" / "meta.json").read_text())
    assert out.strip() == summary(meta, tmp_path / "bin")


def test_cli_prepare_exits_zero_and_writes_the_directory(tmp_path, prefixes, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["prepare", *_argv(prefixes, tmp_path / "bin")])
    assert info.value.code == 0
    assert "dropped 3 empty, 0 too long, 2 untrainable" in capsys.readouterr().out
    assert json.loads((tmp_path / "bin" / "meta.json").read_text())["splits"]["train"]["kept"] == 60


def test_cli_prepare_error_exits_one_with_message_on_stderr(tmp_path, prefixes, capsys):
    (tmp_path / "raw" / "val.de").unlink()
    before = _listing(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli_main(["prepare", *_argv(prefixes, tmp_path / "bin")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "error" in err
    assert f"{prefixes['valid']}.de" in err
    assert _listing(tmp_path) == before


# ---------------------------------------------------------------- what --force may delete


def test_force_refuses_a_directory_codat_did_not_write_and_leaves_it(tmp_path, prefixes):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    _assert_prepare_error(tmp_path, _kwargs(prefixes, out, force=True), "not a data directory")
    assert (out / "notes.txt").read_text() == "precious"


def test_force_refuses_the_folder_of_the_raw_corpus(tmp_path, prefixes):
    raw = pathlib.Path(prefixes["train"]).parent
    before = _listing(raw)
    _assert_prepare_error(tmp_path, _kwargs(prefixes, raw, force=True), "contains the input")
    assert _listing(raw) == before


def test_force_refuses_the_current_directory(tmp_path, prefixes, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", ".."):
        with pytest.raises(PrepareError, match="current directory"):
            prepare(**_kwargs(prefixes, pathlib.Path(out), force=True))
    assert (work / "keep.txt").read_text() == "x"


def test_max_positions_drops_and_counts_long_train_pairs(tmp_path, prefixes):
    meta = prepare(**_kwargs(prefixes, tmp_path / "short", max_positions=6, long_sources="drop"))
    train = meta["splits"]["train"]
    assert train["dropped_too_long"] > 0 and train["truncated_sources"] == 0
    assert (
        train["kept"]
        + train["dropped_empty"]
        + train["dropped_too_long"]
        + train["dropped_untrainable"]
        == train["lines"]
    )
    data = ParallelData.load(tmp_path / "short", "train")
    assert int(data.src_lens.max()) <= 6 and int(data.tgt_lens.max()) <= 6
    assert meta["splits"]["val"]["kept"] == 8  # evaluation splits keep every line
    assert meta["splits"]["val"]["too_long"] > 0


# ---------------------------------------------------------------- long sources, ratio, refs


def test_long_sources_are_truncated_in_every_split_and_counted(tmp_path, prefixes):
    full = prepare(**_kwargs(prefixes, tmp_path / "full", max_ratio=0.0, upsample_scale=100.0))
    meta = prepare(
        **_kwargs(prefixes, tmp_path / "cut", max_positions=5, max_ratio=0.0, upsample_scale=100.0)
    )
    for split in ("val", "test"):  # evaluation splits keep every line
        whole = ParallelData.load(tmp_path / "full", split)
        cut = ParallelData.load(tmp_path / "cut", split)
        n_long = int((whole.src_lens > 5).sum())
        assert n_long > 0 and meta["splits"][split]["truncated_sources"] == n_long
        assert len(cut) == len(whole) == meta["splits"][split]["kept"]
        for a, b in zip(whole.src, cut.src, strict=True):
            assert b.tolist() == a.tolist()[:4]
    # train: truncated, then pairs whose target is too long dropped
    assert meta["splits"]["train"]["truncated_sources"] > 0
    assert int(ParallelData.load(tmp_path / "cut", "train").src_lens.max()) <= 5
    assert full["splits"]["train"]["truncated_sources"] == 0
    assert "sources truncated" in summary(meta, tmp_path / "cut")


def test_unknown_long_sources_mode_is_an_error(tmp_path, prefixes):
    _assert_prepare_error(tmp_path, _kwargs(prefixes, tmp_path / "o", long_sources="x"), "--long")


def _summarisation_corpus(root: pathlib.Path) -> dict[str, str]:
    """Sources of 10-14 words, targets of 2: every pair has a length ratio above 2."""
    rng = random.Random(3)
    raw = root / "sum"
    raw.mkdir()
    for name, n in (("train", 40), ("dev", 6)):
        src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 14))) for _ in range(n)]
        _write(raw / f"{name}.src", src)
        _write(raw / f"{name}.tgt", [" ".join(s.split()[:2]) for s in src])
    return {"train": str(raw / "train"), "valid": str(raw / "dev")}


def test_ratio_filter_that_drops_many_pairs_warns_loudly(tmp_path, caplog):
    pre = _summarisation_corpus(tmp_path)
    kw = dict(src="src", tgt="tgt", train=pre["train"], valid=pre["valid"], tests=[])
    kw.update(vocab_size=60, upsample_scale=2.0)
    with caplog.at_level("WARNING"):
        meta = prepare(out=str(tmp_path / "r2"), max_ratio=2.0, **kw)
    assert meta["splits"]["train"]["dropped_untrainable"] == 40 - meta["splits"]["train"]["kept"]
    assert meta["splits"]["train"]["kept"] < 10
    text = summary(meta, tmp_path / "r2")
    assert "WARNING" in text and "--max-ratio 0" in text
    assert "--max-ratio 0" in caplog.text
    meta = prepare(out=str(tmp_path / "r0"), max_ratio=0.0, **kw)
    assert meta["splits"]["train"]["kept"] == 40 and meta["max_ratio"] == 0.0
    assert "WARNING" not in summary(meta, tmp_path / "r0")


def test_refs_jsonl_beside_an_eval_split_is_copied_and_scored_against(tmp_path, prefixes):
    from codat.evaluate import load_split

    refs = [[f"ref {i} a", f"ref  {i}   b"] for i in range(8)]
    _write(tmp_path / "raw" / "val.refs.jsonl", [json.dumps(r) for r in refs])
    meta = prepare(**_kwargs(prefixes, tmp_path / "bin"))
    assert meta["splits"]["val"]["refs_jsonl"] is True
    assert "refs_jsonl" not in meta["splits"]["test"]
    data, loaded = load_split(tmp_path / "bin", "val")
    assert loaded == [[f"ref {i} a", f"ref {i} b"] for i in range(8)]  # whitespace collapsed
    assert len(data) == 8
    _, single = load_split(tmp_path / "bin", "test")
    assert all(isinstance(r, str) for r in single)


@pytest.mark.parametrize(
    ("lines", "match"),
    [(['["a"]'] * 3, "has 3 lines but the split has 8"), (['["a"]', "{"] * 4, "line 2")],
)
def test_bad_refs_jsonl_names_the_file(tmp_path, prefixes, lines, match):
    _write(tmp_path / "raw" / "val.refs.jsonl", lines)
    _assert_prepare_error(tmp_path, _kwargs(prefixes, tmp_path / "bin"), match)


def test_cli_long_sources_flag_reaches_prepare(tmp_path, prefixes, capsys):
    argv = [*_argv(prefixes, tmp_path / "bin"), "--max-positions", "5", "--long-sources", "drop"]
    assert run(["prepare", *argv]) == 0
    meta = json.loads((tmp_path / "bin" / "meta.json").read_text())
    assert meta["long_sources"] == "drop" and meta["splits"]["train"]["truncated_sources"] == 0
    assert meta["splits"]["val"]["truncated_sources"] > 0
