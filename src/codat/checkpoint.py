"""Checkpoints are directories: model.safetensors + config.yaml + spm.model (+ optimizer state for
resuming). Nothing is ever unpickled: tensors go through safetensors, the rest through YAML/JSON."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from codat.config import RunConfig, load_config, save_config


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
    load_model(model, str(file), device=str(device))


def load_checkpoint_config(path: str | pathlib.Path) -> RunConfig:
    return load_config(pathlib.Path(path) / "config.yaml")


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
