"""`codat train CONFIG.yaml [key=value ...]`: set up a run, read top to bottom, and hand it to
the update loop (`codat.loop.Loop`).

Single process, or many under `torchrun --nproc_per_node=N -m codat train ...` (DDP). The model's
training step is looked up once, in `STEPS`, and runs inside `TrainingStep`. Rank 0 writes the
run directory: config.yaml, metrics.jsonl, checkpoints/ (the best `keep_best` by the validation
metric), best/ (the best one) and last/ (with optimizer and random states, for an exact
--resume); `codat.runs` starts, resumes and stops the run around the loop. A step whose loss or
gradient is not finite is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from codat import distributed
from codat.checkpoint import (
    build_model,
    load_checkpoint_config,
    load_optimizer,
    load_weights,
    resolve_checkpoint,
    restore_rng_states,
)
from codat.cmlm import cmlm_step
from codat.config import RunConfig, save_config
from codat.ctc import ctc_step
from codat.dat_train import dat_step
from codat.data import Batch, ParallelData, read_meta
from codat.evaluate import Validation
from codat.loop import Loop
from codat.memory import keep_freed_memory_on_cpu
from codat.nat import glat_step, nat_step
from codat.runs import (
    StopSignals,
    check_resume_config,
    mark_run,
    open_run,
)
from codat.transformer import at_step

log = logging.getLogger(__name__)

# The training step of each model.arch: (model, batch, cfg=, ratio=, generator=, autocast=)
# -> (loss, stats). nat never glances; glat is the same model trained with glancing.
STEPS: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "dat": dat_step,
    "at": at_step,
    "nat": nat_step,
    "glat": glat_step,
    "ctc": ctc_step,
    "cmlm": cmlm_step,
}


class TrainingStep(nn.Module):
    """The model and its arch's training step as one module: wrapped in DDP, every forward the
    step makes (glancing pass, trained pass, CoDAT's un-glanced pass) is one DDP forward."""

    def __init__(self, model: nn.Module, cfg: RunConfig, autocast) -> None:
        super().__init__()
        self.model, self.cfg, self.autocast = model, cfg, autocast
        self.step = STEPS[cfg.model.arch]

    def forward(
        self, batch: Batch, ratio: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        return self.step(
            self.model,
            batch,
            cfg=self.cfg,
            ratio=ratio,
            generator=generator,
            autocast=self.autocast,
        )


def train(
    cfg: RunConfig, *, resume: bool | str = False, allow_change: list[str] | tuple = ()
) -> dict:
    """Train `cfg.model` on `cfg.data` until `max_steps` or `max_minutes`; returns the final
    trainer state (step, epoch, best checkpoints, elapsed seconds, skipped steps). `resume`:
    False (a new run), True (continue from last/) or "auto" (continue if there is a checkpoint);
    `allow_change` names the config keys a resumed run may change (`RESUME_MAY_CHANGE`)."""
    dist = distributed.DistInfo.from_env()
    distributed.setup(dist)
    device = dist.device()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    keep_freed_memory_on_cpu(device)  # no page faults for every large tensor of every step
    torch.manual_seed(cfg.train.seed + dist.rank)
    run_dir = pathlib.Path(cfg.run_dir)
    if dist.is_main:
        resume = open_run(run_dir, resume=resume, is_main=True)
    distributed.barrier(dist)
    if not dist.is_main:
        resume = open_run(run_dir, resume=resume, is_main=False)

    cfg = resolve_model_config(cfg, resume=resume, allow_change=list(allow_change))
    core = build_model(cfg.model)
    if resume:
        load_weights(run_dir / "last", core, device)
    elif cfg.train.init_from:
        load_weights(resolve_checkpoint(cfg.train.init_from), core, device)
    core.to(device)
    train_data, train_idx = trainable_pairs(cfg, core)
    optimizer = torch.optim.AdamW(
        core.parameters(),
        lr=cfg.train.lr,
        betas=cfg.train.adam_betas,
        weight_decay=cfg.train.weight_decay,
        fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters: ~4x faster on CPU
    )
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": [], "elapsed_s": 0.0}
    if resume:
        load_optimizer(run_dir / "last", optimizer, device)
        state = json.loads((run_dir / "last" / "trainer_state.json").read_text())
    state = {"skipped": 0, "bad_streak": 0, **state}
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.bf16
        else contextlib.nullcontext()
    )
    validation = Validation.load(cfg, device, autocast)
    if cfg.train.objective != "dp" and cfg.codat.alpha <= 0:
        cfg = calibrate_alpha(cfg, core, validation, is_main=dist.is_main)
    if dist.is_main:
        mark_run(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        log.info(
            "model: %.2fM parameters; train pairs %d (of %d); device %s; world %d",
            sum(p.numel() for p in core.parameters()) / 1e6,
            len(train_idx),
            len(train_data),
            device,
            dist.world_size,
        )
    model = TrainingStep(core, cfg, autocast)
    if dist.world_size > 1:
        model = DistributedDataParallel(model)
    loop = Loop(cfg, dist, device, core, model, optimizer, validation, state)
    if resume:
        restore_rng_states(run_dir / "last", loop.generator, dist.rank)
    try:
        with StopSignals() as signals:
            loop.run(train_data, train_idx, signals)
    finally:
        distributed.teardown(dist)
    return state


def resolve_model_config(
    cfg: RunConfig, *, resume: bool, allow_change: list[str] | None = None
) -> RunConfig:
    """The model config the run really trains: a resumed run's own (and its calibrated alpha;
    any other change refused by `check_resume_config`), else the init_from checkpoint's
    (stage 2), else the file's with the data's vocabulary."""
    if resume:
        last = pathlib.Path(cfg.run_dir) / "last"
        saved = load_checkpoint_config(last)
        data_spm = pathlib.Path(cfg.data.dir) / "spm.model"
        check_resume_config(
            cfg, saved, allow=allow_change or [], data_spm=data_spm, run_spm=last / "spm.model"
        )
        cfg = replace(cfg, model=saved.model)
        if cfg.train.objective != "dp" and cfg.codat.alpha <= 0:
            cfg = replace(cfg, codat=replace(cfg.codat, alpha=saved.codat.alpha))
    elif cfg.train.init_from:
        init_dir = resolve_checkpoint(cfg.train.init_from)
        init_cfg = load_checkpoint_config(init_dir)
        if init_cfg.model != replace(cfg.model, vocab_size=init_cfg.model.vocab_size):
            log.info("train.init_from: using the model config of %s", init_dir)
        cfg = replace(cfg, model=init_cfg.model)
    vocab_size = read_meta(cfg.data.dir)["vocab_size"]
    if cfg.model.vocab_size == 0:
        return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size))
    if cfg.model.vocab_size != vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} but the data has {vocab_size}")
    return cfg


def trainable_pairs(cfg: RunConfig, model: nn.Module) -> tuple[ParallelData, list[int]]:
    """The training split and the indices of the pairs the model can learn (its capacity for
    each source, and data.max_ratio)."""
    data = ParallelData.load(cfg.data.dir, cfg.data.train_split)
    ok = data.trainable_mask(
        max_target_lens=model.max_target_lens(data.src_lens), max_ratio=cfg.data.max_ratio
    )
    ok &= data.src_lens <= cfg.model.max_source_positions
    indices = ok.nonzero().squeeze(1).tolist()
    if not indices:
        raise ValueError(
            f"no trainable pairs in {cfg.data.dir}/{cfg.data.train_split}.safetensors: none of "
            f"its {len(data)} pairs fits the model (source within model.max_source_positions="
            f"{cfg.model.max_source_positions}, target within the model's capacity) and "
            f"data.max_ratio={cfg.data.max_ratio}"
        )
    return data, indices


def calibrate_alpha(
    cfg: RunConfig, model: nn.Module, validation: Validation, *, is_main: bool
) -> RunConfig:
    """codat.alpha = the initial model's mean validation loss (paper §3.3), stored in config."""
    alpha = validation.dp_loss(model, cfg)
    if is_main:
        log.info("codat.alpha = %.4f (mean validation DP loss of the initial model)", alpha)
    return replace(cfg, codat=replace(cfg.codat, alpha=round(alpha, 4)))
