"""Checkpoints are directories: model.safetensors + config.yaml + spm.model (+ optimizer state for
resuming). Nothing is ever unpickled: tensors go through safetensors, the rest through YAML/JSON."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import safetensors.torch
import torch
import yaml
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from codat.cmlm import CMLM
from codat.config import ModelConfig, RunConfig, load_config, save_config
from codat.ctc import CTCModel
from codat.dat import DATransformer
from codat.nat import VanillaNAT
from codat.transformer import ATransformer

# The model class of each model.arch (glat is the vanilla NAT trained with glancing).
MODELS: dict[str, type[nn.Module]] = {
    "dat": DATransformer,
    "at": ATransformer,
    "nat": VanillaNAT,
    "glat": VanillaNAT,
    "ctc": CTCModel,
    "cmlm": CMLM,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of `cfg.arch`."""
    return MODELS[cfg.arch](cfg)


def resolve_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """Accept a checkpoint directory or a run directory (then its `best` checkpoint)."""
    path = pathlib.Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if (path / "best" / "model.safetensors").is_file():
        return path / "best"
    raise FileNotFoundError(
        f"{path} is neither a checkpoint directory nor a run directory with best/"
    )


def load_model(
    path: str | pathlib.Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig]:
    """The model of a checkpoint (or run) directory, on `device` in eval mode, and its config."""
    path = resolve_checkpoint(path)
    cfg = load_checkpoint_config(path)
    model = build_model(cfg.model)
    load_weights(path, model, device)
    return model.to(device).eval(), cfg


def save_checkpoint(
    path: str | pathlib.Path,
    model: nn.Module,
    cfg: RunConfig,
    spm_model: str | pathlib.Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict | None = None,
) -> None:
    """Write the checkpoint to a temporary sibling and rename it into place (never half-written)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"))  # handles the tied embeddings
        save_config(cfg, tmp / "config.yaml")
        shutil.copy(spm_model, tmp / "spm.model")
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_weights(
    path: str | pathlib.Path, model: nn.Module, device: str | torch.device = "cpu"
) -> None:
    file = pathlib.Path(path) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"no model.safetensors in {path}")
    safetensors.torch.load_model(model, str(file), device=str(device))


def load_checkpoint_config(path: str | pathlib.Path) -> RunConfig:
    """The run config stored with a checkpoint (keys renamed since it was written are migrated)."""
    return load_config(pathlib.Path(path) / "config.yaml", migrate=True)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(path: str | pathlib.Path, optimizer: torch.optim.Optimizer, device) -> None:
    path = pathlib.Path(path)
    tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for entry in state.values():
        if "step" in entry and torch.is_tensor(entry["step"]):
            entry["step"] = entry["step"].cpu()
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def average_checkpoints(paths: list[pathlib.Path], out: str | pathlib.Path) -> None:
    """Write a checkpoint whose weights are the element-wise mean of `paths` (same config)."""
    if not paths:
        raise ValueError("no checkpoints to average")
    models = {
        json.dumps(yaml.safe_load((pathlib.Path(p) / "config.yaml").read_text())["model"])
        for p in paths
    }
    if len(models) != 1:
        raise ValueError(f"checkpoints have different model configs: {[str(p) for p in paths]}")
    total: dict[str, torch.Tensor] = {}
    for p in paths:
        for key, value in load_file(str(pathlib.Path(p) / "model.safetensors")).items():
            total[key] = total[key] + value.double() if key in total else value.double()
    averaged = {k: (v / len(paths)).to(torch.float32) for k, v in total.items()}
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(averaged, str(tmp / "model.safetensors"))
        shutil.copy(pathlib.Path(paths[0]) / "config.yaml", tmp / "config.yaml")
        shutil.copy(pathlib.Path(paths[0]) / "spm.model", tmp / "spm.model")
        (tmp / "averaged_from.json").write_text(json.dumps([str(p) for p in paths], indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
