"""`codat data`: download from a local HTTP server (127.0.0.1, port 0) serving a directory laid
out like the upstream URLs (OWNER/REPO/COMMIT/PATH).

The tiny corpora are written by the tests themselves (their checksums pinned by the test), so
they run anywhere; the full reproduction tests serve the project's shared copies, when present,
and check that the pinned manifest reproduces every shared file byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import pathlib
import threading

import pytest

from codat.cli import main as cli_main
from codat.cli import run
from codat.datasets import (
    CORPORA,
    Corpus,
    DownloadError,
    download,
    is_complete,
    qqp_train_pairs,
)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve(tmp_path):
    """serve(files): put {relative URL path: bytes} under a web root and return its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def put(files: dict[str, bytes]) -> str:
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield put
    server.shutdown()
    server.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _url_path(corpus: Corpus, name: str) -> str:
    up = next(u for u in corpus.upstreams if u.name == name)
    return f"{up.repo}/{up.commit}/{up.path}"


def _tiny(corpus: Corpus, files: dict[str, bytes], outputs=None) -> Corpus:
    """`corpus` restricted to `files` (upstream name -> bytes) with their checksums pinned."""
    kept = [u for u in corpus.upstreams if u.name in files]
    ups = tuple(dataclasses.replace(u, sha256=_sha(files[u.name])) for u in kept)
    return dataclasses.replace(corpus, upstreams=ups, outputs=outputs or {})


def _lines(*lines: str) -> bytes:
    return "".join(x + "\n" for x in lines).encode()


def _qqp_files() -> dict[str, bytes]:
    valid = [{"src": "How do I learn Python? ", "trg": "What is the best way to learn Python?"}]
    test = [{"src": "Is the moon made of cheese?", "trg": " Is the moon cheese?"}]
    return {
        "diffuseq/valid.jsonl": "\n".join(json.dumps(r) for r in valid).encode(),  # no final \n
        "diffuseq/test.jsonl": _lines(*(json.dumps(r) for r in test)),
        "paragen/dev.q1": _lines("Why is the sky blue?", "Why is the sky blue ?", "A b?", "x"),
        "paragen/dev.q2": _lines(
            "What makes the sky blue?", "What makes the sky blue?", "a B", "Is the moon cheese"
        ),
        "paragen/val.q1": _lines("What makes the sky blue?", "How are you?"),
        "paragen/val.q2": _lines("Why is the sky blue?", " How do you do? "),
    }


def test_qqp_train_pairs_strip_dedupe_either_order_and_drop_held_out_questions():
    pairs = [
        ("Why is the sky blue? ", "What makes the sky blue?"),
        ("what makes the sky blue", "WHY is the sky blue"),  # the same pair, other order
        ("A b?", "a B"),  # both sides equal after normalisation
        ("x", "Is the moon cheese?"),  # a held-out question
        ("How are you?", " How do you do? "),
    ]
    held = {"isthemooncheese"}
    assert qqp_train_pairs(pairs, held) == [
        ("Why is the sky blue?", "What makes the sky blue?"),
        ("How are you?", "How do you do?"),
    ]


def test_qqp_download_builds_the_layout(serve, tmp_path):
    files = _qqp_files()
    corpus = _tiny(CORPORA["qqp"], files)
    base = serve({_url_path(corpus, n): b for n, b in files.items()})
    out = download(corpus, tmp_path / "data", base_url=base, progress=False)
    assert out == tmp_path / "data" / "qqp"
    read = lambda name: (out / name).read_text()  # noqa: E731
    assert read("valid.src") == "How do I learn Python?\n"
    assert read("test.tgt") == "Is the moon cheese?\n"
    assert read("train.src") == "Why is the sky blue?\nHow are you?\n"
    assert read("train.tgt") == "What makes the sky blue?\nHow do you do?\n"
    for name, data in files.items():
        assert (out / "raw" / name).read_bytes() == data
    assert base in read("SOURCE.md") and "DiffuSeq" in read("SOURCE.md")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["qqp"]  # no temp dir left


def test_scitldr_download_writes_sources_targets_and_every_reference(serve, tmp_path):
    rows = {
        split: [
            {"source": ["First  sentence.", "Second\tone."], "target": [f"{split} tldr ", "b  c"]},
            {"source": ["Only one."], "target": ["d"]},
        ]
        for split in ("train", "dev", "test")
    }
    files = {f"{s}.jsonl": _lines(*(json.dumps(r) for r in rs)) for s, rs in rows.items()}
    corpus = _tiny(CORPORA["scitldr"], files)
    base = serve({_url_path(corpus, n): b for n, b in files.items()})
    out = download(corpus, tmp_path, base_url=base, progress=False)
    assert (out / "train.src").read_text() == "First sentence. Second one.\nOnly one.\n"
    assert (out / "dev.tgt").read_text() == "dev tldr\nd\n"
    refs = [json.loads(x) for x in (out / "test.refs.jsonl").read_text().splitlines()]
    assert refs == [["test tldr", "b c"], ["d"]]
    assert not (out / "train.refs.jsonl").exists()
    for split in rows:
        assert (
            gzip.decompress((out / "raw" / f"{split}.jsonl.gz").read_bytes())
            == files[f"{split}.jsonl"]
        )


def test_multi30k_files_are_copied_as_they_are(serve, tmp_path):
    files = {"val.de.gz": gzip.compress(b"ein Hund\n"), "val.en.gz": gzip.compress(b"a dog\n")}
    corpus = _tiny(CORPORA["multi30k"], files, {n: _sha(b) for n, b in files.items()})
    base = serve({_url_path(corpus, n): b for n, b in files.items()})
    out = download(corpus, tmp_path, base_url=base, progress=False)
    assert {n: (out / n).read_bytes() for n in files} == files
    assert is_complete(corpus, out)


def test_a_changed_upstream_file_is_refused_naming_its_url(serve, tmp_path):
    files = {"val.de.gz": gzip.compress(b"ein Hund\n")}
    corpus = _tiny(CORPORA["multi30k"], files)
    base = serve({_url_path(corpus, "val.de.gz"): b"tampered"})
    with pytest.raises(DownloadError, match=r"val\.de\.gz: sha256 .* does not match"):
        download(corpus, tmp_path / "d", base_url=base, progress=False)
    assert not (tmp_path / "d" / "multi30k").exists()


def test_a_missing_upstream_file_names_its_url(serve, tmp_path):
    corpus = _tiny(CORPORA["multi30k"], {"val.de.gz": b"x"})
    base = serve({})
    with pytest.raises(DownloadError, match=f"download of {base}/multi30k/dataset/.*val.de.gz"):
        download(corpus, tmp_path, base_url=base, progress=False)


def test_processing_that_does_not_reproduce_the_pinned_files_is_an_error(serve, tmp_path):
    files = _qqp_files()
    corpus = _tiny(CORPORA["qqp"], files, {"train.src": "0" * 64})
    base = serve({_url_path(corpus, n): b for n, b in files.items()})
    with pytest.raises(DownloadError, match="qqp/train.src: the processed file does not"):
        download(corpus, tmp_path, base_url=base, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_a_complete_copy_is_kept_and_an_incomplete_one_refused(serve, tmp_path):
    files = {"val.en.gz": gzip.compress(b"a dog\n")}
    corpus = _tiny(CORPORA["multi30k"], files, {n: _sha(b) for n, b in files.items()})
    base = serve({_url_path(corpus, n): b for n, b in files.items()})
    out = download(corpus, tmp_path, base_url=base, progress=False)
    # complete: nothing is fetched again (this base URL serves nothing)
    assert download(corpus, tmp_path, base_url="http://127.0.0.1:9", progress=False) == out
    (out / "val.en.gz").write_bytes(b"damaged")
    with pytest.raises(DownloadError, match="not a complete multi30k copy"):
        download(corpus, tmp_path, base_url=base, progress=False)


def test_cli_data_downloads_and_refuses_unknown_names(serve, tmp_path, monkeypatch, capsys):
    files = _qqp_files()
    tiny = _tiny(CORPORA["qqp"], files)
    monkeypatch.setitem(CORPORA, "qqp", tiny)
    base = serve({_url_path(tiny, n): b for n, b in files.items()})
    assert run(["data", "qqp", "--to", str(tmp_path / "d"), "--base-url", base]) == 0
    assert "every pinned sha256 verified" in capsys.readouterr().out
    assert (tmp_path / "d" / "qqp" / "train.src").is_file()
    with pytest.raises(SystemExit) as info:
        cli_main(["data", "wmt14", "--to", str(tmp_path)])
    assert info.value.code == 1
    assert "multi30k, qqp, scitldr" in capsys.readouterr().err


def test_the_manifest_pins_every_upstream_at_a_commit():
    for name, corpus in CORPORA.items():
        assert corpus.name == name and corpus.upstreams and corpus.outputs
        for up in corpus.upstreams:
            assert len(up.commit) == 40 and len(up.sha256) == 64
            assert up.url("https://h").startswith(f"https://h/{up.repo}/{up.commit}/")


# --- the real corpora: the shared copies, served as their upstreams ------------------------------


def _upstream_bytes(name: str) -> dict[str, bytes]:
    """The upstream files of corpus `name`, recovered from the shared copy."""
    d = SHARED / name
    if name == "multi30k":
        return {p.name: p.read_bytes() for p in d.glob("*.gz")}
    if name == "qqp":
        return {str(p.relative_to(d / "raw")): p.read_bytes() for p in (d / "raw").glob("*/*")}
    return {p.name[: -len(".gz")]: gzip.decompress(p.read_bytes()) for p in d.glob("raw/*.gz")}


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared corpora are not on this machine")
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_the_pinned_manifest_reproduces_the_shared_copy(name, serve, tmp_path):
    corpus = CORPORA[name]
    upstream = _upstream_bytes(name)
    assert sorted(upstream) == sorted(u.name for u in corpus.upstreams)
    base = serve({_url_path(corpus, n): b for n, b in upstream.items()})
    out = download(corpus, tmp_path / "data", base_url=base, progress=False)
    shared = {
        str(p.relative_to(SHARED / name))
        for p in (SHARED / name).rglob("*")
        if p.is_file() and p.name != "SOURCE.md"
    }
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == shared | {"SOURCE.md"}
    for rel in shared:
        mine, theirs = (out / rel).read_bytes(), (SHARED / name / rel).read_bytes()
        if rel.endswith(".gz") and name == "scitldr":  # re-gzipped: compare the content
            mine, theirs = gzip.decompress(mine), gzip.decompress(theirs)
        assert mine == theirs, rel
