"""The run directory around the training loop: starting, resuming and stopping a run.

A run directory holds config.yaml, metrics.jsonl, checkpoints/, best/ and last/ (the checkpoint
--resume continues from) and the marker file of a codat run. `open_run` repairs what a crash left
(an interrupted checkpoint swap, stranded temporary directories) and decides whether the run
starts or resumes; `check_resume_config` refuses a changed config; `StopSignals` turns SIGINT and
SIGTERM into a clean stop; `expected_stop` and `bar_options` make the progress bar's total and
ETA those of the real bound and let TQDM_* settings apply. Nothing here imports torch: the CLI
imports the exceptions at start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import signal
import threading

from codat.artifacts import artifact_kind, recover_dir, write_lines_atomic, write_marker
from codat.config import RESUME_MAY_CHANGE, RunConfig, config_to_dict

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training cannot go on (it diverged); the message names the step and what last/ holds."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, which it replaces
    """SIGINT or SIGTERM stopped the run; the message says what was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _clean_temps(run_dir: pathlib.Path) -> None:
    """Repair last/ and best/ after a crash and delete the stranded temporary directories of
    every checkpoint codat writes in `run_dir`."""
    for name in ("last", "best"):
        recover_dir(run_dir / name)
    ckpts = run_dir / "checkpoints"
    names = {p.name.split(".")[1] for p in ckpts.glob(".step*.*")} if ckpts.is_dir() else set()
    for name in names:
        recover_dir(ckpts / name)


def checkpoint_step(run_dir: pathlib.Path) -> int | None:
    """The step of the run's last/ checkpoint, None when it has none."""
    state = run_dir / "last" / "trainer_state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else None


def open_run(run_dir: pathlib.Path, *, resume: bool | str, is_main: bool) -> bool:
    """Make `run_dir` ready (main rank: repair a crashed checkpoint write, drop the metrics rows
    a resumed run redoes) and decide: True = resume from last/. `resume` is False (start;
    refused when a checkpoint exists), True (resume; refused without one) or "auto" (whichever
    applies). A run that crashed before its first checkpoint simply starts again.

    Raises:
        FileExistsError / FileNotFoundError: naming run_dir and what to do instead.
    """
    if is_main and run_dir.is_dir():
        _clean_temps(run_dir)
    step = checkpoint_step(run_dir)
    if resume == "auto":
        resume = step is not None
    if resume and step is None:
        raise FileNotFoundError(
            f"--resume: {run_dir} has no checkpoint (last/trainer_state.json): start it "
            "without --resume, or pass --resume auto"
        )
    if not resume and step is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run with a checkpoint at step {step}: pass --resume "
            "(or --resume auto), or choose another run_dir"
        )
    foreign = run_dir.is_dir() and any(run_dir.iterdir()) and artifact_kind(run_dir) != "run"
    if foreign and step is None and not (run_dir / "metrics.jsonl").is_file():
        raise FileExistsError(
            f"run_dir {run_dir} is a non-empty directory that codat did not create: choose "
            "another run_dir"
        )
    if is_main:
        if resume:
            trim_metrics(run_dir / "metrics.jsonl", step)
        elif (run_dir / "metrics.jsonl").exists():
            log.warning("%s has no checkpoint: starting the run again", run_dir)
            (run_dir / "metrics.jsonl").unlink()
    return bool(resume)


def bar_options(is_main: bool) -> dict:
    """tqdm options of the training bar: TQDM_* environment variables (TQDM_DISABLE=1,
    TQDM_MININTERVAL=10, ...) win over these defaults, as tqdm applies them only to options
    not passed; ranks other than 0 show no bar."""
    defaults = {"unit": "step", "dynamic_ncols": True}
    options = {k: v for k, v in defaults.items() if f"TQDM_{k.upper()}" not in os.environ}
    return options if is_main else {**options, "disable": True}


def expected_stop(step: int, *, max_steps: int, max_s: float, elapsed_s: float, pace: float) -> int:
    """The step training will stop at: max_steps, or, with a time budget (`max_s` > 0
    seconds, `elapsed_s` spent), the step reached when the budget ends at `pace` steps per
    second (validation included), if that comes first. The loop stops after the first step
    past the budget, hence the + 1."""
    if max_s <= 0 or pace <= 0:
        return max_steps
    by_time = step + math.ceil(max(max_s - elapsed_s, 0.0) * pace) + 1
    return min(max_steps, by_time)


def mark_run(run_dir: pathlib.Path) -> None:
    """Create `run_dir` (once the run is known to start) with the marker of a codat run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, "run")


def trim_metrics(path: pathlib.Path, step: int) -> None:
    """Drop the rows a killed run logged after its checkpoint at `step` (they are redone)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        write_lines_atomic(path, kept)


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resume_config(
    cfg: RunConfig, saved: RunConfig, *, allow: list[str], data_spm: pathlib.Path, run_spm
) -> list[str]:
    """Refuse a resumed run whose config differs from its checkpoint's, except in the keys of
    `RESUME_MAY_CHANGE` named in `allow` (--allow-change); returns the changed keys.
    `model.vocab_size` 0 and `codat.alpha` 0 mean "resolved at start" and match any value.

    Raises:
        ValueError: naming the changed keys (old -> new) and the flag that accepts them.
    """
    for key in allow:
        if key not in RESUME_MAY_CHANGE:
            raise ValueError(
                f"--allow-change {key}: only these keys may change in a resumed run: "
                f"{', '.join(RESUME_MAY_CHANGE)}"
            )
    now, then = _flat(config_to_dict(cfg)), _flat(config_to_dict(saved))
    for key in ("model.vocab_size", "codat.alpha"):
        if now.get(key) == 0:
            now[key] = then.get(key)
    changed = sorted(k for k in now if now[k] != then.get(k))
    described = {k: f"{k} ({then.get(k)!r} -> {now[k]!r})" for k in changed}
    fixed = [described[k] for k in changed if k not in RESUME_MAY_CHANGE]
    if fixed:
        raise ValueError(
            f"--resume: the config differs from the run's checkpoint in {', '.join(fixed)}; "
            "these cannot change in a resumed run: start a new run_dir instead"
        )
    if pathlib.Path(data_spm).read_bytes() != pathlib.Path(run_spm).read_bytes():
        raise ValueError(
            f"--resume: {data_spm} is not the sentencepiece model the run was trained with "
            f"({run_spm}): data.dir was prepared again"
        )
    unallowed = [k for k in changed if k not in allow]
    if unallowed:
        raise ValueError(
            f"--resume: the config differs from the run's checkpoint in "
            f"{', '.join(described[k] for k in unallowed)}: pass --allow-change "
            f"{','.join(unallowed)} to continue with the new values"
        )
    for k in changed:
        log.warning("--resume: %s (allowed by --allow-change)", described[k])
    return changed


class StopSignals:
    """Within the block, the first SIGINT or SIGTERM only sets `signum` (the loop then stops at
    the end of its step and saves last/); a second raises `Interrupted` at once, abandoning any
    checkpoint write (which cleans up after itself). Only the main thread can catch signals."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._before: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise Interrupted(f"{name} again: stopped at once, without saving", signum)
        self.signum = signum
        log.warning(
            "%s: finishing this step and saving last/ (%s again to stop at once)", name, name
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
