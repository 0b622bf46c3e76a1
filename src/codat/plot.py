"""`codat plot`: validation curves of one or more runs (the paper's Figure 2).

Reads each run's ``metrics.jsonl`` (written by :mod:`codat.train`) and draws three panels side by
side: (a) validation DP loss, (b) validation contrastive loss (logged by fine-tuning runs only) and
(c) validation BLEU, each against the training step, one line per run so that the dp / reward /
codat continuations can be compared.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from collections.abc import Sequence

METRICS_FILE = "metrics.jsonl"

# (key in the validation rows, panel title, y label, text when no run logged the key)
PANELS = (
    ("valid_loss", "(a) validation DP loss", "DP loss", "no DP loss logged"),
    (
        "valid_cl_loss",
        "(b) validation contrastive loss",
        "contrastive loss",
        "no contrastive loss logged",
    ),
    ("valid_bleu", "(c) validation BLEU", "BLEU", "no BLEU logged"),
)


def load_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train rows, valid rows) of ``run_dir/metrics.jsonl``, in file order.

    A row is a validation row when it has ``valid_loss``. Blank lines are skipped; the last
    non-blank line is ignored when it does not parse (the file may still be being written); any
    other line that is not a JSON object raises ``ValueError`` naming ``file:line``.
    """
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    lines = path.read_bytes().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    train_rows: list[dict] = []
    valid_rows: list[dict] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == last:
                break  # truncated by a writer that has not finished the line
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(row).__name__}")
        (valid_rows if "valid_loss" in row else train_rows).append(row)
    return train_rows, valid_rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key``, sorted by step; a repeated step (a resumed run logs the steps
    after its last checkpoint again) keeps the later row."""
    by_step: dict[float, float] = {}
    for row in rows:
        step, value = row.get("step"), row.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


MISSING_MATPLOTLIB = "codat plot needs matplotlib: pip install 'codat[plot]'"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use (matplotlib is the optional
    ``plot`` extra); ImportError with the install command when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MISSING_MATPLOTLIB) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(plt, runs: list[tuple[str, list[dict]]]):
    """The three-panel figure of ``runs`` (label, validation rows); the caller closes it."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    try:
        _draw(axes, runs)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _draw(axes, runs: list[tuple[str, list[dict]]]) -> None:
    for ax, (key, title, ylabel, empty_text) in zip(axes, PANELS, strict=True):
        drawn = False
        for i, (label, valid) in enumerate(runs):
            steps, values = _series(valid, key)
            if steps:  # colour Ci for run i in every panel, even where an earlier run is absent
                ax.plot(steps, values, f"C{i % 10}", marker="o", markersize=3, label=label)
                drawn = drawn or any(not math.isnan(v) for v in values)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if drawn:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])


def plot_run(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    labels: Sequence[str] | None = None,
) -> pathlib.Path:
    """Draw the validation curves of ``run_dirs`` into the PNG ``out`` and return its path.

    ``out`` defaults to ``curves.png`` in the first run dir; ``labels`` (one per run) default to
    the run dirs' names. The file is written atomically (temp file in the same directory, then
    ``os.replace``).
    """
    dirs = [pathlib.Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("plot_run: no run directories given")
    if labels is None:
        labels = [d.resolve().name or str(d) for d in dirs]
    labels = list(labels)
    if len(labels) != len(dirs):
        raise ValueError(f"got {len(labels)} labels for {len(dirs)} run directories")
    out = pathlib.Path(out) if out is not None else dirs[0] / "curves.png"

    runs = []
    for d, label in zip(dirs, labels, strict=True):
        _, valid = load_metrics(d)
        if not valid:
            raise ValueError(f"run {d} ({label}) has no validation rows in {d / METRICS_FILE}")
        runs.append((label, valid))

    plt = _pyplot()
    fig = _figure(plt, runs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png", dpi=120)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600
            os.replace(tmp, out)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return out
