"""`codat.checkpoint`: directory checkpoints written through safetensors, YAML and JSON only.

Checks, on a tiny DATransformer, that a saved checkpoint holds exactly the expected files and no
pickles, that load_weights gives a fresh model identical tensors (keeping the tied embedding) and
identical eval outputs, that load_optimizer restores AdamW so a further identical step gives
identical parameters, and that a failing save leaves neither a checkpoint nor a temporary
directory behind (and keeps an older checkpoint intact). Every safetensors file carries
{"format": "pt", "codat_version": ...} metadata, and the marker file the version too.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import safetensors
import safetensors.torch
import torch

import codat
import codat.checkpoint as ckpt
from codat.checkpoint import (
    average_checkpoints,
    load_checkpoint_config,
    load_optimizer,
    load_weights,
    save_checkpoint,
)
from codat.config import ModelConfig, RunConfig
from codat.dat import DATransformer

MODEL_CFG = ModelConfig(
    vocab_size=50,
    dim=32,
    heads=4,
    ffn_dim=64,
    encoder_layers=1,
    decoder_layers=1,
    upsample_scale=2,
    max_source_positions=16,
    max_graph_positions=32,
)
RUN_CFG = RunConfig(model=MODEL_CFG, run_dir="runs/tiny")
STATE = {"step": 1, "best": [[0.5, "step1"]], "epoch": 0}


def _model(seed: int) -> DATransformer:
    torch.manual_seed(seed)
    return DATransformer(MODEL_CFG)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    return src, torch.tensor([4, 3])


def _step(model: DATransformer, opt: torch.optim.Optimizer) -> None:
    """One deterministic (eval-mode) update whose loss reaches every used parameter."""
    model.eval()
    out = model(*_inputs())
    trans = out.trans_logp.masked_fill(torch.isinf(out.trans_logp), 0.0)
    loss = out.token_logits.pow(2).mean() - trans.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _adamw(model: DATransformer) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a model after one AdamW step; returns (dir, model, optimizer)."""
    model = _model(0)
    opt = _adamw(model)
    _step(model, opt)
    spm_file = tmp_path / "spm.model"
    spm_file.write_bytes(b"not really a sentencepiece model \x00\x01")
    path = tmp_path / "run" / "last"
    save_checkpoint(path, model, RUN_CFG, spm_file, optimizer=opt, state=STATE)
    return path, model, opt


def _listing(d: pathlib.Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_checkpoint_contains_the_expected_files_and_no_pickles(saved, tmp_path):
    path, _, _ = saved
    names = set(_listing(path))
    assert {
        ".codat",  # the marker: a complete checkpoint written by codat
        "model.safetensors",
        "config.yaml",
        "spm.model",
        "optimizer.safetensors",
        "optimizer.json",
        "trainer_state.json",
    } == names
    assert not [
        p for p in path.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin")
    ]
    assert _listing(path.parent) == ["last"]  # no temporary sibling left
    assert (path / "spm.model").read_bytes() == (tmp_path / "spm.model").read_bytes()
    assert json.loads((path / "trainer_state.json").read_text()) == STATE


def test_checkpoint_without_optimizer_or_state_has_only_model_files(tmp_path):
    (tmp_path / "spm.model").write_bytes(b"x")
    save_checkpoint(tmp_path / "best", _model(0), RUN_CFG, tmp_path / "spm.model")
    assert _listing(tmp_path / "best") == [
        ".codat",
        "config.yaml",
        "model.safetensors",
        "spm.model",
    ]


def test_checkpoint_config_round_trips(saved):
    path, _, _ = saved
    assert load_checkpoint_config(path) == RUN_CFG


def test_load_weights_gives_identical_tensors_and_keeps_the_tie(saved):
    path, model, _ = saved
    fresh = _model(1)
    assert not torch.equal(fresh.embed.weight, model.embed.weight)  # the load has work to do
    load_weights(path, fresh)
    ref, got = model.state_dict(), fresh.state_dict()
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert fresh.encoder.embed.weight.data_ptr() == fresh.embed.weight.data_ptr()


def test_load_weights_gives_identical_eval_outputs(saved):
    path, model, _ = saved
    fresh = _model(1)
    load_weights(path, fresh)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        a, b = model(*_inputs()), fresh(*_inputs())
    assert torch.equal(a.token_logits, b.token_logits)
    assert torch.equal(a.trans_logp, b.trans_logp)
    assert torch.equal(a.graph_lens, b.graph_lens)
    # the token head is the (tied) embedding matrix: changing it changes the logits
    with torch.no_grad():
        fresh.embed.weight.mul_(2)
        assert not torch.equal(fresh(*_inputs()).token_logits, a.token_logits)


def test_load_weights_without_model_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_weights(tmp_path, _model(0))


def test_load_optimizer_restores_state_so_the_next_step_matches(saved):
    path, model, opt = saved
    fresh = _model(1)
    load_weights(path, fresh)
    fresh_opt = _adamw(fresh)
    load_optimizer(path, fresh_opt, "cpu")

    ref_sd, got_sd = opt.state_dict(), fresh_opt.state_dict()
    assert ref_sd["state"].keys() == got_sd["state"].keys() and ref_sd["state"]
    for pid, entry in ref_sd["state"].items():
        assert entry.keys() == got_sd["state"][pid].keys()
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got_sd["state"][pid][key]))
    assert got_sd["param_groups"][0]["lr"] == ref_sd["param_groups"][0]["lr"]
    assert tuple(got_sd["param_groups"][0]["betas"]) == (0.9, 0.98)

    # a model whose optimizer starts from scratch takes a different second step
    control = _model(1)
    load_weights(path, control)
    control_opt = _adamw(control)

    _step(model, opt)
    _step(fresh, fresh_opt)
    _step(control, control_opt)
    ref_params = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, ref_params[name]), name
    assert any(not torch.equal(p, ref_params[name]) for name, p in control.named_parameters()), (
        "the restored optimizer state made no difference"
    )


def test_save_overwrites_an_existing_checkpoint(saved, tmp_path):
    path, _, _ = saved
    other = _model(2)
    save_checkpoint(path, other, RUN_CFG, tmp_path / "spm.model")
    assert "optimizer.safetensors" not in _listing(path)
    fresh = _model(1)
    load_weights(path, fresh)
    assert torch.equal(fresh.embed.weight, other.embed.weight)
    assert _listing(path.parent) == ["last"]


def test_failed_save_leaves_no_checkpoint_and_no_temp_dir(tmp_path, monkeypatch):
    (tmp_path / "spm.model").write_bytes(b"x")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_config", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ckpts" / "step1", _model(0), RUN_CFG, tmp_path / "spm.model")
    assert _listing(tmp_path / "ckpts") == []


def test_failed_save_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    path, model, _ = saved
    before = {n: (path / n).read_bytes() for n in _listing(path)}
    with pytest.raises(FileNotFoundError):  # the spm model to copy is missing
        save_checkpoint(path, _model(2), RUN_CFG, tmp_path / "missing.model")
    assert _listing(path.parent) == ["last"]
    assert {n: (path / n).read_bytes() for n in _listing(path)} == before


def test_weights_that_are_not_finite_are_never_written(saved, tmp_path):
    path, _, _ = saved
    before = {n: (path / n).read_bytes() for n in _listing(path)}
    bad = _model(3)
    with torch.no_grad():
        next(bad.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        save_checkpoint(path, bad, RUN_CFG, tmp_path / "spm.model")
    assert {n: (path / n).read_bytes() for n in _listing(path)} == before
    assert _listing(path.parent) == ["last"]


def test_average_refuses_to_replace_a_directory_codat_did_not_write(saved, tmp_path):
    path, _, _ = saved
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a checkpoint written by codat"):
        average_checkpoints([path], out)
    assert (out / "notes.txt").read_text() == "precious"
    average_checkpoints([path], tmp_path / "avg")
    average_checkpoints([path], tmp_path / "avg")  # its own output: replaced
    assert (tmp_path / "avg" / "model.safetensors").is_file()


def _metadata(file: pathlib.Path) -> dict:
    with safetensors.safe_open(str(file), framework="pt") as f:
        return f.metadata()


def test_every_tensor_file_records_the_format_and_the_codat_version(saved, tmp_path):
    path, model, opt = saved
    want = {"format": "pt", "codat_version": codat.__version__}
    # save_model also records the tied embedding ({"encoder.embed.weight": "embed.weight"})
    assert _metadata(path / "model.safetensors").items() >= want.items()
    assert _metadata(path / "optimizer.safetensors") == want
    rng = ckpt.rng_state(torch.Generator())
    save_checkpoint(tmp_path / "r", model, RUN_CFG, path / "spm.model", optimizer=opt, rng=rng)
    assert _metadata(tmp_path / "r" / "rng.safetensors") == want
    average_checkpoints([path, tmp_path / "r"], tmp_path / "avg")
    assert _metadata(tmp_path / "avg" / "model.safetensors").items() >= want.items()
    assert ckpt.checkpoint_version(path) == codat.__version__
    marker = json.loads((path / ".codat").read_text())
    assert marker == {"kind": "checkpoint", "codat_version": codat.__version__}


def test_a_checkpoint_without_recorded_version_reads_as_none(saved, tmp_path):
    path, _, _ = saved
    tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
    safetensors.torch.save_file(tensors, str(path / "model.safetensors"))  # as before 0.1
    assert ckpt.checkpoint_version(path) is None
    load_weights(path, _model(1))  # still loads
