"""`codat plot`: metrics.jsonl parsing and the validation-curve figure."""

import json
import os

import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_hex  # noqa: E402

from codat import plot  # noqa: E402
from codat.cli import run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

FINETUNE_ROWS = [
    {"step": 10, "loss": 3.2, "dp_loss": 3.0, "cl_loss": 0.2, "reward_loss": 0.1, "kept": 0.9},
    {"step": 20, "loss": 2.9, "dp_loss": 2.8, "cl_loss": 0.1},
    {"step": 20, "valid_loss": 3.1, "valid_bleu": 12.5, "valid_cl_loss": 0.4, "valid_reward": 0.3},
    {"step": 30, "loss": 2.7},
    {"step": 40, "valid_loss": 2.9, "valid_bleu": 14.0, "valid_cl_loss": 0.35},
]
DAT_ROWS = [
    {"step": 10, "loss": 4.0},
    {"step": 10, "valid_loss": 3.8, "valid_bleu": 5.0},
    {"step": 20, "loss": 3.6},
    {"step": 20, "valid_loss": 3.5},  # no BLEU on this one
]


def write_run(path, rows, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (path / "metrics.jsonl").write_text(text)
    return path


@pytest.fixture
def finetune(tmp_path):
    return write_run(tmp_path / "codat", FINETUNE_ROWS)


@pytest.fixture
def dat(tmp_path):
    return write_run(tmp_path / "dat", DAT_ROWS)


def is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def texts(ax):
    return [t.get_text() for t in ax.texts]


def test_load_metrics_splits_rows(finetune, dat):
    train, valid = plot.load_metrics(finetune)
    assert [r["step"] for r in train] == [10, 20, 30]
    assert [r["step"] for r in valid] == [20, 40]
    assert all("valid_loss" in r for r in valid) and not any("valid_loss" in r for r in train)
    assert valid[0]["valid_cl_loss"] == 0.4
    train, valid = plot.load_metrics(str(dat))  # str paths too
    assert len(train) == 2 and len(valid) == 2
    assert all("valid_cl_loss" not in r for r in valid)


def test_load_metrics_ignores_truncated_last_line(tmp_path):
    run = write_run(tmp_path / "r", DAT_ROWS, tail='{"step": 30, "valid_lo')
    train, valid = plot.load_metrics(run)
    assert len(train) == 2 and len(valid) == 2
    # also when the truncated line is followed by blank lines, and blank lines elsewhere are fine
    run = write_run(tmp_path / "r2", DAT_ROWS[:2], tail='\n{"step": 3\n\n')
    assert [len(x) for x in plot.load_metrics(run)] == [1, 1]


def test_load_metrics_corrupt_middle_line(tmp_path):
    run = tmp_path / "bad"
    run.mkdir()
    lines = [json.dumps(DAT_ROWS[0]), '{"step": 10, "valid_', json.dumps(DAT_ROWS[1])]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        plot.load_metrics(run)
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        plot.load_metrics(run)


def test_load_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot.load_metrics(tmp_path / "nope")


def test_series_sorts_and_keeps_later_duplicate():
    rows = [
        {"step": 20, "valid_loss": 2.0},
        {"step": 10, "valid_loss": 3.0},
        {"step": 20, "valid_loss": 1.5},  # a resumed run logged step 20 again
        {"step": 30},  # key missing
    ]
    assert plot._series(rows, "valid_loss") == ([10, 20], [3.0, 1.5])


def test_figure_panels(finetune, dat):
    plt = plot._pyplot()
    _, ft_valid = plot.load_metrics(finetune)
    _, dat_valid = plot.load_metrics(dat)
    fig = plot._figure(plt, [("codat", ft_valid), ("dat", dat_valid)])
    try:
        a, b, c = fig.axes
        assert "DP loss" in a.get_title() and "contrastive" in b.get_title()
        assert "BLEU" in c.get_title()
        assert [line.get_label() for line in a.lines] == ["codat", "dat"]
        assert [line.get_label() for line in b.lines] == ["codat"]  # dat has no valid_cl_loss
        assert list(b.lines[0].get_ydata()) == [0.4, 0.35]
        assert list(c.lines[1].get_xdata()) == [10]  # the row without BLEU is skipped
        assert texts(b) == []
    finally:
        plt.close(fig)
    # dat first: codat keeps its own colour (C1) in panel (b), where dat has no line
    fig = plot._figure(plt, [("dat", dat_valid), ("codat", ft_valid)])
    try:
        colours = [[to_hex(line.get_color()) for line in ax.lines] for ax in fig.axes]
        c0, c1 = to_hex("C0"), to_hex("C1")
        assert colours == [[c0, c1], [c1], [c0, c1]]
    finally:
        plt.close(fig)
    fig = plot._figure(plt, [("dat", dat_valid)])
    try:
        assert texts(fig.axes[1]) == ["no contrastive loss logged"]
        assert len(fig.axes[1].lines) == 0 and len(fig.axes[0].lines) == 1
    finally:
        plt.close(fig)


def test_plot_run_one_run_default_out(finetune):
    out = plot.plot_run([finetune])
    assert out == finetune / "curves.png"
    assert is_png(out)
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in finetune.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_plot_run_two_runs(tmp_path, finetune, dat):
    out = plot.plot_run([finetune, dat], tmp_path / "figs" / "fig2.png", labels=["CoDAT", "DAT"])
    assert out == tmp_path / "figs" / "fig2.png"
    assert is_png(out)
    assert os.listdir(out.parent) == ["fig2.png"]  # no temp file left behind


def test_plot_run_errors(tmp_path, finetune, dat):
    with pytest.raises(ValueError, match="labels"):
        plot.plot_run([finetune, dat], tmp_path / "x.png", labels=["one"])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot.plot_run([finetune, tmp_path / "missing"], tmp_path / "x.png")
    no_valid = write_run(tmp_path / "novalid", [r for r in DAT_ROWS if "valid_loss" not in r])
    with pytest.raises(ValueError, match="novalid"):
        plot.plot_run([finetune, no_valid], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_main_end_to_end(tmp_path, finetune, dat, capsys):
    out = tmp_path / "fig2.png"
    assert run(["plot", str(finetune), str(dat), "--out", str(out), "--labels", "codat, dat"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert is_png(out)
    assert run(["plot", str(dat)]) == 0
    assert capsys.readouterr().out.strip() == str(dat / "curves.png")
    assert is_png(dat / "curves.png")


def test_main_errors(tmp_path, finetune, dat):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        run(["plot", str(tmp_path / "missing")])
    no_valid = write_run(tmp_path / "novalid", DAT_ROWS[:1])
    with pytest.raises(ValueError, match="novalid"):
        run(["plot", str(no_valid)])
    with pytest.raises(ValueError, match="1 labels for 2 run directories"):
        run(["plot", str(finetune), str(dat), "--labels", "only-one"])
    with pytest.raises(SystemExit) as e:
        run(["plot"])
    assert e.value.code == 2
