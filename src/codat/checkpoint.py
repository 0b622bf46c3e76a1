"""Checkpoints are directories: model.safetensors + config.yaml + spm.model (+ optimizer state for
resuming). Nothing is ever unpickled: tensors go through safetensors, the rest through YAML/JSON.
Every safetensors file carries the metadata {"format": "pt", "codat_version": ...}
(`tensor_metadata`; `checkpoint_version` reads it)."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import safetensors
import safetensors.torch
import torch
import yaml
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from codat import __version__
from codat.artifacts import artifact_kind, replace_dir, temp_dir, write_marker
from codat.cmlm import CMLM
from codat.config import ModelConfig, RunConfig, load_config, save_config
from codat.ctc import CTCModel
from codat.dat import DATransformer
from codat.nat import VanillaNAT
from codat.transformer import ATransformer

log = logging.getLogger(__name__)

# The model class of each model.arch (glat is the vanilla NAT trained with glancing).
MODELS: dict[str, type[nn.Module]] = {
    "dat": DATransformer,
    "at": ATransformer,
    "nat": VanillaNAT,
    "glat": VanillaNAT,
    "ctc": CTCModel,
    "cmlm": CMLM,
}


def tensor_metadata() -> dict[str, str]:
    """The metadata of every safetensors file codat writes: "pt" tells loaders (transformers
    among them) the tensors are PyTorch's; the version says which codat wrote them. A new dict
    each time: safetensors' save_model adds the tied weights' names to the one it is given."""
    return {"format": "pt", "codat_version": __version__}


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
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the checkpoint to a temporary sibling, fsync it and swap it into place
    (`artifacts.replace_dir`): a complete copy exists at every instant. Weights that are not
    all finite are never written.

    Raises:
        ValueError: a weight is NaN or infinite (naming it and `path`).
    """
    path = pathlib.Path(path)
    bad = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise ValueError(f"refusing to write {path}: weights are not finite ({', '.join(bad[:3])})")
    tmp = temp_dir(path)
    try:
        write_model_files(tmp, model, cfg, spm_model)
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=tensor_metadata())
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        if rng is not None:
            rng = {k: v.contiguous() for k, v in rng.items()}
            save_file(rng, str(tmp / "rng.safetensors"), metadata=tensor_metadata())
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        write_marker(tmp, "checkpoint")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_files(
    directory: pathlib.Path, model: nn.Module, cfg: RunConfig, spm_model: str | pathlib.Path
) -> None:
    """What loading a model needs, into `directory`: model.safetensors (`tensor_metadata`),
    config.yaml and spm.model."""
    # save_model handles the tied embeddings
    save_model(model, str(directory / "model.safetensors"), metadata=tensor_metadata())
    save_config(cfg, directory / "config.yaml")
    shutil.copy(spm_model, directory / "spm.model")


def checkpoint_version(path: str | pathlib.Path) -> str | None:
    """The codat version that wrote the checkpoint at `path` (its model.safetensors metadata);
    None for one written before versions were recorded."""
    file = resolve_checkpoint(path) / "model.safetensors"
    with safetensors.safe_open(str(file), framework="pt") as f:
        return (f.metadata() or {}).get("codat_version")


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every random state training draws from: torch's CPU (dropout on CPU), each CUDA
    device's (dropout on GPU) and the loop's generator (glancing, CoDAT's samples). Data order
    needs none (token_batches is seeded by train.seed + epoch)."""
    states = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(states["torch_cpu"])
    generator.set_state(states["generator"])
    for key, value in states.items():
        if key.startswith("cuda") and int(key[4:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(value, int(key[4:]))


def gather_rng_states(generator: torch.Generator, dist) -> dict[str, torch.Tensor]:
    """Every rank's `rng_state`, keyed rank{r}.NAME (a collective under DDP: call on all ranks;
    `dist` is the run's `distributed.DistInfo`)."""
    everyone = [rng_state(generator)]
    if dist.world_size > 1:
        everyone = [None] * dist.world_size
        torch.distributed.all_gather_object(everyone, rng_state(generator))
    return {f"rank{r}.{k}": v for r, st in enumerate(everyone) for k, v in st.items()}


def restore_rng_states(path: str | pathlib.Path, generator: torch.Generator, rank: int) -> None:
    """Rank `rank`'s random states as the checkpoint at `path` saved them (a resumed run then
    draws the dropout masks, glancing choices and samples of the uninterrupted one)."""
    file = pathlib.Path(path) / "rng.safetensors"
    saved = load_file(str(file)) if file.is_file() else {}
    prefix = f"rank{rank}."
    mine = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    if not mine:
        log.warning("%s holds no random state of rank %d: the run will not reproduce", path, rank)
        return
    set_rng_state(mine, generator)


def save_run_checkpoints(
    model: nn.Module,
    cfg: RunConfig,
    spm_model: pathlib.Path,
    optimizer: torch.optim.Optimizer,
    state: dict,
    rng: dict[str, torch.Tensor],
    bleu: float | None,
) -> None:
    """A run's checkpoints at state["step"]: when validated (`bleu`), keep the
    `train.keep_best` best by validation BLEU in checkpoints/ (state["best"]) and the best in
    best/; then last/ with the optimizer, trainer and random states."""
    run_dir, step = pathlib.Path(cfg.run_dir), state["step"]
    if bleu is not None:
        name = f"step{step}"
        best = sorted(state["best"] + [[bleu, step, name]], key=lambda e: (-e[0], -e[1]))
        keep, drop = best[: cfg.train.keep_best], best[cfg.train.keep_best :]
        if any(e[2] == name for e in keep):
            save_checkpoint(run_dir / "checkpoints" / name, model, cfg, spm_model)
        for e in drop:
            if artifact_kind(run_dir / "checkpoints" / e[2]) in ("checkpoint", None):
                shutil.rmtree(run_dir / "checkpoints" / e[2], ignore_errors=True)
        if keep[0][2] == name:
            save_checkpoint(run_dir / "best", model, cfg, spm_model)
        state["best"] = keep
    save_checkpoint(
        run_dir / "last", model, cfg, spm_model, optimizer=optimizer, state=state, rng=rng
    )


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
    if out.exists() and artifact_kind(out) != "checkpoint":
        raise ValueError(
            f"--out {out} exists and is not a checkpoint written by codat: choose another --out"
        )
    tmp = temp_dir(out)
    try:
        save_file(averaged, str(tmp / "model.safetensors"), metadata=tensor_metadata())
        shutil.copy(pathlib.Path(paths[0]) / "config.yaml", tmp / "config.yaml")
        shutil.copy(pathlib.Path(paths[0]) / "spm.model", tmp / "spm.model")
        (tmp / "averaged_from.json").write_text(json.dumps([str(p) for p in paths], indent=2))
        write_marker(tmp, "checkpoint")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
