"""Checkpoint averaging: the averaged weights equal the element-wise mean computed by hand, and
`codat average` picks the run's kept best checkpoints (and names a directory that is no run)."""

from __future__ import annotations

import json

import pytest
import torch

from codat.checkpoint import average_checkpoints, load_weights, save_checkpoint
from codat.cli import run
from codat.config import ModelConfig, RunConfig
from codat.dat import DATransformer


def _model(seed: int) -> DATransformer:
    torch.manual_seed(seed)
    return DATransformer(
        ModelConfig(vocab_size=30, dim=16, heads=2, ffn_dim=32, encoder_layers=1, decoder_layers=1)
    )


def test_average_is_elementwise_mean(tmp_path):
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"not a real model")
    cfg = RunConfig(model=_model(0).cfg)
    models = [_model(s) for s in (1, 2, 3)]
    for i, m in enumerate(models):
        save_checkpoint(tmp_path / f"c{i}", m, cfg, spm)
    average_checkpoints([tmp_path / f"c{i}" for i in range(3)], tmp_path / "avg")
    avg = _model(9)
    load_weights(tmp_path / "avg", avg)
    for name, value in avg.state_dict().items():
        want = sum(m.state_dict()[name] for m in models) / 3
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    # The tied embedding stays tied after loading.
    assert avg.encoder.embed.weight.data_ptr() == avg.embed.weight.data_ptr()


def test_average_command_uses_kept_best(tmp_path, capsys):
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"x")
    cfg = RunConfig(model=_model(0).cfg)
    run_dir = tmp_path / "run"
    for step in (10, 20):
        save_checkpoint(run_dir / "checkpoints" / f"step{step}", _model(step), cfg, spm)
    state = {"step": 20, "best": [[30.0, 20, "step20"], [29.0, 10, "step10"]]}
    save_checkpoint(run_dir / "last", _model(20), cfg, spm, state=state)
    assert run(["average", str(run_dir)]) == 0
    assert "averaged 2 checkpoints" in capsys.readouterr().out
    sources = json.loads((run_dir / "averaged" / "averaged_from.json").read_text())
    assert sources[0].endswith("step20") and sources[1].endswith("step10")


def test_average_rejects_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        run(["average", str(tmp_path)])
