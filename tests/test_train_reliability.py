"""Training reliability (`codat.train`, `codat.runs`, `codat.artifacts`): a diverged step is
skipped and a diverged run stops with an error naming the step, never saving non-finite weights;
kill -9 then --resume reproduces the uninterrupted run exactly (dropout and glancing on, CPU);
SIGINT saves last/ and exits with one line; a checkpoint swap interrupted at any point is
recovered; --resume refuses a changed config; a crashed run without a checkpoint starts again;
0 trainable pairs is an error before the loop."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from corpus import prepare_copy_task
from safetensors.torch import load_file

from codat.artifacts import recover_dir, replace_dir, write_marker
from codat.config import load_config
from codat.runs import Interrupted, StopSignals, TrainingStopped, check_resume_config, open_run
from codat.train import train

CONFIG = """run_dir: {run}
data: {{dir: {data}, max_ratio: 3.0}}
model: {{dim: 16, heads: 2, ffn_dim: 32, encoder_layers: 1, decoder_layers: 1,
  upsample_scale: 3.0, dropout: 0.1}}
train: {{lr: 3.0e-3, warmup_steps: 4, max_tokens: 160, max_steps: {steps}, log_every: 1,
  eval_every: 4, eval_max_sentences: 4, glance_start: 0.5, glance_end: 0.3,
  glance_anneal_steps: 20, clip_norm: 1.0, threads: 1, seed: 3}}
decode: {{max_tokens: 256}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    return prepare_copy_task(
        tmp_path_factory.mktemp("corpus"), sizes=(("train", 60), ("val", 4), ("test", 2))
    )


def _config(tmp: pathlib.Path, data: pathlib.Path, name: str, steps: int) -> pathlib.Path:
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(run=tmp / name, data=data, steps=steps))
    return path


def _rows(run: pathlib.Path) -> list[dict]:
    text = (run / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.split("\n") if x.strip()]


def _losses(run: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}


def _spawn(cfg: pathlib.Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "codat", "train", str(cfg), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > end:
            proc.kill()
            pytest.fail("the run did not get there in time")
        time.sleep(0.02)


def _checkpointed(run: pathlib.Path, at_least: int):
    def done() -> bool:
        state = run / "last" / "trainer_state.json"
        return state.is_file() and json.loads(state.read_text())["step"] >= at_least

    return done


# ------------------------------------------------------------------ exact resume after kill -9


def test_kill9_then_resume_gives_the_uninterrupted_losses_and_weights(tmp_path, data):
    """Dropout 0.1 and glancing on: the resumed run's per-step losses and final weights are
    identical (difference 0) to the uninterrupted run's."""
    steps = 12
    train(load_config(_config(tmp_path, data, "whole", steps)))
    cfg = _config(tmp_path, data, "killed", 100000)
    proc = _spawn(cfg)
    _wait_for(_checkpointed(tmp_path / "killed", 4), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = json.loads((tmp_path / "killed" / "last" / "trainer_state.json").read_text())["step"]
    assert 4 <= at < steps, f"killed too late (checkpoint at step {at})"
    resumed = load_config(cfg, [f"train.max_steps={steps}"])
    train(resumed, resume=True, allow_change=["train.max_steps"])
    want, got = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, steps + 1))
    assert max(abs(got[s] - want[s]) for s in want) == 0.0
    a = load_file(str(tmp_path / "whole" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_saves_last_and_exits_with_one_line(tmp_path, data):
    cfg = _config(tmp_path, data, "run", 100000)
    proc = _spawn(cfg)
    _wait_for(
        lambda: (tmp_path / "run" / "metrics.jsonl").is_file() and _losses(tmp_path / "run"), proc
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    last_line = err.strip().split("\n")[-1]
    assert last_line.startswith("codat train: SIGINT: stopped at step ") and "--resume" in last_line
    step = int(last_line.split("stopped at step ")[1].split(",")[0])
    state = json.loads((tmp_path / "run" / "last" / "trainer_state.json").read_text())
    assert state["step"] == step
    assert not [
        p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name or p.name.endswith(".old")
    ]


def test_a_second_signal_abandons_at_once():
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.signum == signal.SIGTERM


# ------------------------------------------------------------------ divergence


def test_diverged_run_skips_steps_then_stops_naming_the_step(tmp_path, data):
    cfg = load_config(
        _config(tmp_path, data, "nan", 50),
        [
            "train.lr=1e30",
            "train.lr_schedule=constant",
            "train.warmup_steps=0",
            "train.clip_norm=1e30",
            "train.max_skipped_steps=3",
        ],
    )
    with pytest.raises(
        TrainingStopped, match=r"3 steps in a row \(steps \d+-\d+; train.max_skipped"
    ):
        train(cfg)
    rows = [r for r in _rows(tmp_path / "nan") if "loss" in r]
    skipped = [r for r in rows if r["loss"] is None or r["grad_norm"] is None]
    assert len(skipped) >= 3 and rows[-1]["skipped"] >= 3
    for name in ("best", "last"):  # whatever was saved holds finite weights only
        if (tmp_path / "nan" / name).exists():
            weights = load_file(str(tmp_path / "nan" / name / "model.safetensors"))
            assert all(bool(v.isfinite().all()) for v in weights.values())


# ------------------------------------------------------------------ start, resume, refuse


def test_zero_trainable_pairs_is_an_error_before_the_loop(tmp_path, data):
    cfg = load_config(_config(tmp_path, data, "none", 5), ["model.max_source_positions=2"])
    with pytest.raises(ValueError, match="no trainable pairs .*max_source_positions=2"):
        train(cfg)


def test_crashed_run_without_checkpoint_starts_again_and_resume_auto(tmp_path, data):
    cfg = load_config(_config(tmp_path, data, "run", 4))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # crashed before step 4
    with pytest.raises(FileNotFoundError, match="--resume auto"):
        train(cfg, resume=True)
    train(cfg, resume="auto")  # no checkpoint: starts
    assert sorted(_losses(run)) == [1, 2, 3, 4]
    with pytest.raises(FileExistsError, match="checkpoint at step 4: pass --resume"):
        train(cfg)
    more = load_config(_config(tmp_path, data, "run", 6))
    train(more, resume="auto", allow_change=["train.max_steps"])  # a checkpoint: resumes
    assert sorted(_losses(run)) == list(range(1, 7))


def test_run_dir_that_codat_did_not_create_is_refused(tmp_path, data):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("precious")
    with pytest.raises(FileExistsError, match="codat did not create"):
        open_run(tmp_path / "mine", resume=False, is_main=True)
    assert (tmp_path / "mine" / "config.yaml").read_text() == "precious"


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, data):
    saved = load_config(_config(tmp_path, data, "a", 4))
    spm = data / "spm.model"

    def check(overrides, allow=()):
        now = load_config(_config(tmp_path, data, "a", 4), overrides)
        return check_resume_config(now, saved, allow=list(allow), data_spm=spm, run_spm=spm)

    assert check([]) == []
    with pytest.raises(ValueError, match=r"model.dim \(16 -> 32\).*cannot change"):
        check(["model.dim=32"])
    with pytest.raises(ValueError, match="data.dir"):
        check([f"data.dir={tmp_path}"])
    with pytest.raises(ValueError, match="--allow-change train.lr"):
        check(["train.lr=1e-3"])
    assert check(["train.lr=1e-3"], allow=["train.lr"]) == ["train.lr"]
    with pytest.raises(ValueError, match="--allow-change model.dim: only these keys"):
        check([], allow=["model.dim"])
    other = tmp_path / "other.model"
    other.write_bytes(spm.read_bytes() + b"x")
    with pytest.raises(ValueError, match="not the sentencepiece model"):
        check_resume_config(saved, saved, allow=[], data_spm=other, run_spm=spm)


# ------------------------------------------------------------------ atomic checkpoint swap


def _complete(path: pathlib.Path, text: str) -> pathlib.Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(text)
    write_marker(path, "checkpoint")
    return path


def test_replace_dir_swaps_and_leaves_no_temp(tmp_path):
    _complete(tmp_path / "last", "old")
    replace_dir(_complete(tmp_path / ".last.tmp-1", "new"), tmp_path / "last")
    assert (tmp_path / "last" / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_failed_second_rename_puts_the_old_copy_back(tmp_path):
    _complete(tmp_path / "last", "old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / ".last.tmp-gone", tmp_path / "last")
    assert (tmp_path / "last" / "model.safetensors").read_text() == "old"


def test_kill_between_the_renames_is_recovered_on_the_next_start(tmp_path):
    _complete(tmp_path / ".last.old", "old")  # last/ renamed away, the new one not yet in
    (tmp_path / ".last.tmp-x").mkdir()  # an incomplete write (no marker)
    recover_dir(tmp_path / "last")
    assert (tmp_path / "last" / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_complete_temp_copy_is_used_when_nothing_else_is_left(tmp_path):
    _complete(tmp_path / ".last.tmp-x", "new")
    recover_dir(tmp_path / "last")
    assert (tmp_path / "last" / "model.safetensors").read_text() == "new"


def test_stranded_temp_dirs_are_cleaned_when_a_run_opens(tmp_path):
    run = tmp_path / "run"
    _complete(run / "last", "x")
    (run / "last" / "trainer_state.json").write_text('{"step": 4}')
    (run / ".last.tmp-abc").mkdir()
    (run / ".best.tmp-abc").mkdir()
    (run / "checkpoints" / ".step8.tmp-abc").mkdir(parents=True)
    assert open_run(run, resume="auto", is_main=True) is True
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "last"]
    assert list((run / "checkpoints").iterdir()) == []
