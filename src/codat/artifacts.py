"""What codat writes to disk, and the only way it replaces or deletes it.

Every directory codat writes (a prepared data directory, a run directory, a checkpoint) carries a
marker file, `.codat`, naming its kind; it is written last, so a directory with the marker is
complete. `--force` replaces a directory only if it carries the marker: codat never deletes a
directory it did not write. Directories are written to a temporary sibling (`.NAME.tmp-XXXX`),
fsynced, and swapped in by renames; `recover_dir` repairs what a crash in the swap left behind.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile

from codat import __version__

log = logging.getLogger(__name__)

MARKER = ".codat"


def write_marker(directory: pathlib.Path, kind: str) -> None:
    """Mark `directory` as a complete codat artifact of `kind` (data, run, checkpoint, export),
    written by this codat version."""
    marker = {"kind": kind, "codat_version": __version__}
    (pathlib.Path(directory) / MARKER).write_text(json.dumps(marker) + "\n")


def artifact_kind(directory: str | pathlib.Path) -> str | None:
    """The kind in `directory`'s marker file, or None when it has none (not written by codat)."""
    try:
        return json.loads((pathlib.Path(directory) / MARKER).read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def temp_dir(path: pathlib.Path) -> pathlib.Path:
    """A fresh temporary sibling of `path` to write its new content into."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: pathlib.Path) -> None:
    """Flush every file under `directory`, then the directories themselves, to disk."""
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(pathlib.Path(root) / name)
        _fsync(pathlib.Path(root))


def _old(path: pathlib.Path) -> pathlib.Path:
    return path.parent / f".{path.name}.old"


def replace_dir(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Swap the complete directory `tmp` into `path`: fsync, `path` -> `.NAME.old`, `tmp` ->
    `path`, then delete the old copy. At every instant `path` or `.NAME.old` is complete; an
    exception (Ctrl-C included) between the renames puts the old copy back."""
    old = _old(path)
    if old.exists() and path.exists():
        shutil.rmtree(old)  # a swap that crashed after its second rename
    fsync_tree(tmp)
    if path.exists():
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.rename(old, path)
        raise
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: pathlib.Path) -> None:
    """Repair `path` after a crash: bring back the complete copy of an interrupted swap, then
    delete codat's stranded temporary siblings (`.NAME.tmp-*`, `.NAME.old`) of it."""
    old = _old(path)
    if not path.exists() and old.is_dir():
        os.rename(old, path)
        log.warning("%s: restored the checkpoint of an interrupted write", path)
    temps = sorted(path.parent.glob(f".{path.name}.tmp-*"), key=lambda p: p.stat().st_mtime)
    complete = [t for t in temps if t.is_dir() and artifact_kind(t)]
    if not path.exists() and complete:
        os.rename(complete[-1], path)
        log.warning("%s: completed an interrupted write", path)
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), old]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            log.info("removed the stranded temporary directory %s", stale)


def check_output_dir(
    out: pathlib.Path, *, kind: str, force: bool, inputs: list[pathlib.Path], flag: str
) -> None:
    """Refuse an output directory codat may not write: a file, the current directory or one of
    its parents, a directory holding an input, or a non-empty directory unless `force` and it is
    a codat artifact of `kind` (its marker file).

    Raises:
        ValueError: naming `flag`, the path and why.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} exists and is not a directory")
    target, cwd = out.resolve(), pathlib.Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"{flag} {out} is the current directory or one of its parents")
    for p in inputs:
        if target == p.resolve() or target in p.resolve().parents:
            raise ValueError(f"{flag} {out} contains the input {p}: choose another {flag}")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not force:
        raise ValueError(f"{flag} {out} exists and is not empty (use --force to replace it)")
    if artifact_kind(out) != kind:
        raise ValueError(
            f"--force refuses to replace {out}: it is not a {kind} directory written by codat "
            f"(no {MARKER} marker file); delete it yourself or choose another {flag}"
        )


def check_output_file(path: str | pathlib.Path, flag: str) -> None:
    """Fail before any work if `path` ("-" = stdout) cannot be written.

    Raises:
        ValueError: naming `flag` and the path.
    """
    if str(path) == "-":
        return
    p = pathlib.Path(path)
    parent = p.parent if str(p.parent) else pathlib.Path(".")
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a directory")
    if not parent.is_dir():
        raise ValueError(f"{flag} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{flag} {p} is not writable")


def write_text_atomic(path: str | pathlib.Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it and rename it into place."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_lines_atomic(path: str | pathlib.Path, lines: list[str]) -> None:
    """Write one line per string (a newline inside one becomes a space), atomically."""
    write_text_atomic(path, "".join(x.replace("\n", " ") + "\n" for x in lines))
