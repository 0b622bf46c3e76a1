"""`codat data NAME --to DIR`: download a corpus from its public upstream (a pinned commit of a
GitHub repository), verify it, and lay it out as DIR/NAME/ (the layout `codat prepare` and the
recipes expect).

Every upstream file is checked against the sha256 pinned here before anything is processed, and
every processed file whose bytes are pinned (all but the re-gzipped SciTLDR raw files, whose gzip
headers are not reproducible) is checked after processing; a mismatch is an error naming the
file. The directory appears only when complete (written to a temporary sibling, then renamed).

Corpora (their licences: research use; cite the papers named in each DIR/NAME/SOURCE.md):
- multi30k: Multi30k task 1 raw text (multi30k/dataset), the gzipped files copied as they are.
- qqp: Quora Question Pairs, DiffuSeq's valid/test split (Shark-NLP/DiffuSeq) and a cleaned,
  leak-free train set built from ParaGEN's dev+val pairs (exfoxz/ParaGEN).
- scitldr: SciTLDR-A (allenai/scitldr): abstract -> TLDR, with every reference of dev/test in
  SPLIT.refs.jsonl.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import pathlib
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from codat.artifacts import fsync_tree, temp_dir

log = logging.getLogger(__name__)

GITHUB_RAW = "https://raw.githubusercontent.com"


class DownloadError(ValueError):
    """A download that failed or did not verify; the message names the URL or file."""


@dataclass(frozen=True)
class Upstream:
    """One file of a corpus at its upstream: `repo` at `commit`, `path` inside it; `name` is
    its key for the corpus's `build`."""

    name: str
    repo: str
    commit: str
    path: str
    sha256: str

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class Corpus:
    """A corpus: its upstream files, `build` (upstream name -> bytes) to (path under DIR/NAME ->
    bytes), the sha256 of the built files that must reproduce, and its SOURCE.md note."""

    name: str
    upstreams: tuple[Upstream, ...]
    build: Callable[[dict[str, bytes]], dict[str, bytes]]
    outputs: dict[str, str]
    note: str


# --- processing (each reproduces the layout of the corpus as distributed to the project) --------


def _lines(data: bytes) -> list[str]:
    """UTF-8 lines split on "\\n" only (a final newline ends the last line)."""
    text = data.decode("utf-8")
    return (text[:-1] if text.endswith("\n") else text).split("\n")


def _text(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in _lines(data) if line.strip()]


def build_multi30k(files: dict[str, bytes]) -> dict[str, bytes]:
    """The upstream gzipped files, as they are."""
    return dict(files)


def _norm(question: str) -> str:
    return re.sub(r"[^a-z0-9]", "", question.lower())


def qqp_train_pairs(pairs: list[tuple[str, str]], held_out: set[str]) -> list[tuple[str, str]]:
    """ParaGEN pairs cleaned into the train split: strip; drop pairs whose sides are equal
    after normalisation (lowercase, [a-z0-9] only); drop repeated pairs (either order, same
    normalisation; the first is kept); drop pairs with a question in `held_out` (normalised
    valid/test questions). File order is kept."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for a, b in ((a.strip(), b.strip()) for a, b in pairs):
        na, nb = _norm(a), _norm(b)
        key = (min(na, nb), max(na, nb))
        if na == nb or key in seen:
            continue
        seen.add(key)
        if na not in held_out and nb not in held_out:
            kept.append((a, b))
    return kept


def build_qqp(files: dict[str, bytes]) -> dict[str, bytes]:
    """raw/ copies; valid/test from DiffuSeq's jsonl (src -> .src, trg -> .tgt, stripped);
    train from ParaGEN dev + val (`qqp_train_pairs`)."""
    out = {f"raw/{name}": data for name, data in files.items()}
    held_out: set[str] = set()
    for split in ("valid", "test"):
        rows = _jsonl(files[f"diffuseq/{split}.jsonl"])
        out[f"{split}.src"] = _text([r["src"].strip() for r in rows])
        out[f"{split}.tgt"] = _text([r["trg"].strip() for r in rows])
        held_out |= {_norm(r[k]) for r in rows for k in ("src", "trg")}
    pairs = []
    for part in ("dev", "val"):
        q1, q2 = _lines(files[f"paragen/{part}.q1"]), _lines(files[f"paragen/{part}.q2"])
        if len(q1) != len(q2):
            raise DownloadError(f"ParaGEN {part}.q1 has {len(q1)} lines but {part}.q2 {len(q2)}")
        pairs += list(zip(q1, q2, strict=True))
    train = qqp_train_pairs(pairs, held_out)
    out["train.src"] = _text([a for a, _ in train])
    out["train.tgt"] = _text([b for _, b in train])
    return out


def _collapse(text: str) -> str:
    return " ".join(text.split())


def build_scitldr(files: dict[str, bytes]) -> dict[str, bytes]:
    """raw/SPLIT.jsonl.gz; SPLIT.src (the source sentences joined), SPLIT.tgt (the first
    target), and for dev/test SPLIT.refs.jsonl (every target); whitespace collapsed."""
    out = {}
    for split in ("train", "dev", "test"):
        data = files[f"{split}.jsonl"]
        out[f"raw/{split}.jsonl.gz"] = gzip.compress(data, mtime=0)
        rows = _jsonl(data)
        out[f"{split}.src"] = _text([_collapse(" ".join(r["source"])) for r in rows])
        out[f"{split}.tgt"] = _text([_collapse(r["target"][0]) for r in rows])
        if split != "train":
            refs = [[_collapse(t) for t in r["target"]] for r in rows]
            out[f"{split}.refs.jsonl"] = _text([json.dumps(x, ensure_ascii=False) for x in refs])
    return out


# --- download, verify, write ----------------------------------------------------------------------


def fetch(url: str, sha256: str, *, progress: bool = True, timeout: float = 60.0) -> bytes:
    """The bytes at `url`, with a progress bar, checked against `sha256`.

    Raises:
        DownloadError: the request failed, or the bytes have another checksum; naming the URL.
    """
    digest = hashlib.sha256()
    chunks = []
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            name = url.rsplit("/", 1)[-1]
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress)
            with bar:
                while chunk := response.read(1 << 16):
                    digest.update(chunk)
                    chunks.append(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"download of {url} failed: {e}") from None
    if digest.hexdigest() != sha256:
        raise DownloadError(
            f"{url}: sha256 {digest.hexdigest()} does not match the pinned {sha256} "
            "(a changed or corrupted upstream file)"
        )
    return b"".join(chunks)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source_note(corpus: Corpus, base_url: str) -> bytes:
    lines = [f"# {corpus.name} (written by `codat data {corpus.name}`)", "", corpus.note, ""]
    lines += ["## Upstream files (sha256 verified)", ""]
    lines += [f"- {u.url(base_url)}  sha256 {u.sha256}" for u in corpus.upstreams]
    return _text(lines)


def is_complete(corpus: Corpus, directory: pathlib.Path) -> bool:
    """Whether `directory` holds every built file of `corpus` whose sha256 is pinned."""
    return all(
        (directory / rel).is_file() and _sha((directory / rel).read_bytes()) == sha
        for rel, sha in corpus.outputs.items()
    )


def download(
    corpus: Corpus, to: str | pathlib.Path, *, base_url: str = GITHUB_RAW, progress: bool = True
) -> pathlib.Path:
    """Download, verify, build and write `corpus` as TO/NAME; returns that directory. A complete
    TO/NAME (every pinned file matches) is left as it is.

    Raises:
        DownloadError: a failed download, an upstream or built file with another checksum, or a
            TO/NAME that exists but is not a complete copy.
    """
    target = pathlib.Path(to) / corpus.name
    if target.exists():
        if target.is_dir() and is_complete(corpus, target):
            log.info("%s is already complete", target)
            return target
        raise DownloadError(
            f"{target} exists but is not a complete {corpus.name} copy: remove it or choose "
            "another --to"
        )
    files = {u.name: fetch(u.url(base_url), u.sha256, progress=progress) for u in corpus.upstreams}
    built = corpus.build(files)
    for rel, sha in corpus.outputs.items():
        if rel not in built or _sha(built[rel]) != sha:
            raise DownloadError(
                f"{corpus.name}/{rel}: the processed file does not reproduce the pinned "
                f"sha256 {sha}"
            )
    built["SOURCE.md"] = _source_note(corpus, base_url)
    tmp = temp_dir(target)
    try:
        for rel, data in built.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        fsync_tree(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --- the pinned manifest: upstream files and the sha256 of what they must build into ------------

_M30K = ("multi30k/dataset", "a3d2e0d26b56f3846f66a952536ffed4e401d05a")
_MULTI30K_FILES = {
    "test_2016_flickr.cs.gz": "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "test_2017_flickr.de.gz": "a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee",
    "test_2017_flickr.en.gz": "76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074",
    "test_2017_flickr.fr.gz": "3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496",
    "train.cs.gz": "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.cs.gz": "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
}
_DIFFUSEQ = ("Shark-NLP/DiffuSeq", "4764c7c193b02718f41f8ca92924f041d1c441ce")
_PARAGEN = ("exfoxz/ParaGEN", "bd935769c5a9c5c606f49c117b3b6c4250d6381b")
_SCITLDR = ("allenai/scitldr", "5ccad9c00a60ad75c9e04abf7f27d0f53f983b20")

_QQP_UPSTREAM = {
    "diffuseq/valid.jsonl": "9c371c9871abc6b6302b26b97003aad403337e70e1427ea633dc1a2fca5b7752",
    "diffuseq/test.jsonl": "7ed05233164f266b2a9d80a9a0dfb7829dc2f745a690116325af6aefac8ab15a",
    "paragen/dev.q1": "5fdd63905ed7f33dc2d38594e27a3b965c7c9c7e8a58097224b084f87eb86cd1",
    "paragen/dev.q2": "8ee0b188495768f288e26f0b4d1170d52ce29b22841bc07536908d84121b050f",
    "paragen/val.q1": "2750acd9d38b3030c3dcdd2394fbe0d93c606f1c21738d1ca945d38544ca9317",
    "paragen/val.q2": "6e1fbdf4282d30d012d31094ace980699e34399630257d85b9a4961b12444113",
}
_QQP_BUILT = {
    "train.src": "b475873dffaa52edcf3597a30075b126afad9cbc30cfdbb329433af5ec94c729",
    "train.tgt": "2d41e4f558a04d191248f1d2653f196d330e8c620d52e8a3a84ee7c9cb461ec4",
    "valid.src": "ab5009fed703d0bf41d8eb254c0b034e27459eb7ecdf8c4d8b04a10a8ea191ea",
    "valid.tgt": "88d4decb1c39671190fdf773d6709850e70e73734c849e800e5d0a34c69d41c9",
    "test.src": "a6b123aa197530ac0bee4b887fc519b6f7b43c6df36a2bc144c8746c4e2c027e",
    "test.tgt": "1137f1b2cac4300877339b20f9ba6785c804124b3e6756e83fb2d593eecba7ef",
}
_SCITLDR_UPSTREAM = {
    "train.jsonl": "b222771d387be585cfdf5ae957b36757138415a352e0a3e3b23f73f87c3b1119",
    "dev.jsonl": "3191fa98ccc09521332b7a1cd63b1930be4e8df125a235ccd31e40329709525e",
    "test.jsonl": "fb42dd6cd4f4a1928ae8a01a189456fbfe994a07e938bd49f68653933f6503c9",
}
_SCITLDR_BUILT = {
    "train.src": "5a4a662689d5ca5694b87ed2083ecce1271240eb230c0d29f43efae1dfedc2b3",
    "train.tgt": "ccbc27c0a6b3944ba10296976009186c850ac03d1d9a39614d1684d47f39baa6",
    "dev.src": "1de1fa20828ec4f4006d5b827b3877715c9dbbfc4d7ddd2102e909bbcf8b0d83",
    "dev.tgt": "d8f547c38e4fe01a4a45364f86077c45c8c6fb0306adee3f19e3dc6fe2435bc6",
    "dev.refs.jsonl": "5b9aef02979a3081b80ebb3a30b23e22cb3d11c7b210a097d3cb96914584c5e6",
    "test.src": "23c5645d7a8ebe703128aad6ec3ae45964a5da0b2b83bbba8dfef6e608af5628",
    "test.tgt": "9c198e7330a81c8fe2376d489ca5d99bbc8c36bd06ed6f43fce8cb0a3eeffd78",
    "test.refs.jsonl": "3406dd0c77e416c9ac57b9f9547ba3425c91177cabfe2c8f844e388cb28cecda",
}


def _qqp_upstream(name: str, sha256: str) -> Upstream:
    if name.startswith("diffuseq/"):
        return Upstream(name, *_DIFFUSEQ, f"datasets/QQP/{name.split('/')[1]}", sha256)
    return Upstream(name, *_PARAGEN, f"para_data/quora/{name.split('/')[1]}", sha256)


CORPORA: dict[str, Corpus] = {
    "multi30k": Corpus(
        "multi30k",
        tuple(Upstream(n, *_M30K, f"data/task1/raw/{n}", s) for n, s in _MULTI30K_FILES.items()),
        build_multi30k,
        dict(_MULTI30K_FILES),
        "Multi30k task 1, raw (untokenised) text; SPLIT.LANG.gz aligned by line. Non-commercial "
        "research and educational use only (the repository's README); cite Elliott et al. 2016, "
        "2017 and Barrault et al. 2018.",
    ),
    "qqp": Corpus(
        "qqp",
        tuple(_qqp_upstream(n, s) for n, s in _QQP_UPSTREAM.items()),
        build_qqp,
        {**{f"raw/{n}": s for n, s in _QQP_UPSTREAM.items()}, **_QQP_BUILT},
        "Quora Question Pairs paraphrases: valid/test = DiffuSeq's split (2048 / 2500 pairs); "
        "train = 7945 pairs cleaned from ParaGEN's dev+val (no pair shares a question with "
        "valid/test). Quora's text: non-commercial research use; cite the Quora release and "
        "DiffuSeq (Gong et al., ICLR 2023). Not comparable with results on the full 144k set.",
    ),
    "scitldr": Corpus(
        "scitldr",
        tuple(
            Upstream(n, *_SCITLDR, f"SciTLDR-Data/SciTLDR-A/{n}", s)
            for n, s in _SCITLDR_UPSTREAM.items()
        ),
        build_scitldr,
        dict(_SCITLDR_BUILT),
        "SciTLDR-A: paper abstract -> one-sentence TLDR (1992 / 619 / 618 pairs); dev/test have "
        "several references per paper in SPLIT.refs.jsonl (score with --refs-jsonl). Apache-2.0 "
        "repository; cite Cachola et al., Findings of EMNLP 2020.",
    ),
}
