"""`codat train CONFIG.yaml [key=value ...]`: the one DAT training loop, read top to bottom.

Single process, or many under `torchrun --nproc_per_node=N -m codat train ...` (DDP). Rank 0 writes
the run directory: config.yaml, metrics.jsonl, checkpoints/ (the best `keep_best` by validation
BLEU), best/ (the best one) and last/ (with optimizer state, for --resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import shutil
import time
from dataclasses import dataclass, replace

import sacrebleu
import sentencepiece as spm
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from codat import distributed
from codat.checkpoint import (
    load_checkpoint_config,
    load_optimizer,
    load_weights,
    save_checkpoint,
)
from codat.config import RunConfig, TrainConfig, save_config
from codat.contrastive import sample_terms
from codat.data import Batch, ParallelData, read_meta, shard, token_batches
from codat.families import dat_loss, family, family_of, sample_settings
from codat.generate import resolve_checkpoint, translate_ids
from codat.glancing import glance_ratio

__all__ = ["dat_loss", "learning_rate", "sample_settings", "train", "training_loss"]

log = logging.getLogger(__name__)


def inverse_sqrt_lr(step: int, *, lr: float, warmup: int, init_lr: float) -> float:
    """fairseq's inverse_sqrt: linear warm-up from init_lr, then lr * sqrt(warmup / step)."""
    if warmup > 0 and step < warmup:
        return init_lr + (lr - init_lr) * step / warmup
    return lr * math.sqrt(max(warmup, 1) / max(step, 1))


def learning_rate(step: int, tc: TrainConfig) -> float:
    if tc.lr_schedule == "constant":
        if tc.warmup_steps > 0 and step < tc.warmup_steps:
            return tc.warmup_init_lr + (tc.lr - tc.warmup_init_lr) * step / tc.warmup_steps
        return tc.lr
    return inverse_sqrt_lr(step, lr=tc.lr, warmup=tc.warmup_steps, init_lr=tc.warmup_init_lr)


def training_loss(
    model: torch.nn.Module,  # possibly DDP-wrapped
    core: torch.nn.Module,  # the unwrapped module
    batch: Batch,
    *,
    tc: TrainConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch for the model's family and the configured objective."""
    return family_of(core).loss(
        model, core, batch, tc=tc, ratio=ratio, generator=generator, autocast=autocast
    )


@dataclass(frozen=True)
class Validation:
    """What validation needs: the split, its raw references and the tokenizer."""

    data: ParallelData
    refs: list[str]
    sp: spm.SentencePieceProcessor
    spm_path: pathlib.Path
    device: torch.device
    autocast: contextlib.AbstractContextManager

    @classmethod
    def load(cls, cfg: RunConfig, device: torch.device, autocast) -> Validation:
        spm_path = pathlib.Path(cfg.data.dir) / "spm.model"
        data = ParallelData.load(cfg.data.dir, cfg.data.valid_split)
        refs_path = pathlib.Path(cfg.data.dir) / f"{cfg.data.valid_split}.ref.txt"
        refs = refs_path.read_text(encoding="utf-8").splitlines()
        if cfg.train.eval_max_sentences > 0:
            n = cfg.train.eval_max_sentences
            data, refs = ParallelData(data.src[:n], data.tgt[:n]), refs[:n]
        sp = spm.SentencePieceProcessor(model_file=str(spm_path))
        return cls(data, refs, sp, spm_path, device, autocast)

    @torch.no_grad()
    def dp_loss(self, core: torch.nn.Module, cfg: RunConfig) -> float:
        """Mean per-sentence, length-normalised loss (no glancing) of the split: DAT's DP loss,
        or the family's own (`Family.sentence_loss`); sentences without a path count 0."""
        was_training = core.training
        core.eval()
        sentence_loss = family_of(core).sentence_loss
        total, count = 0.0, 0
        sizes = torch.maximum(self.data.src_lens, self.data.tgt_lens)
        for idx in token_batches(sizes, max_tokens=cfg.train.max_tokens, shuffle=False):
            b = self.data.collate(idx).to(self.device)
            with self.autocast:
                per = sentence_loss(core, b).float()
            per = torch.where(torch.isfinite(per), per, torch.zeros_like(per))
            total, count = total + float(per.sum()), count + len(idx)
        core.train(was_training)
        return total / max(count, 1)

    @torch.no_grad()
    def sample_stats(self, core: torch.nn.Module, cfg: RunConfig) -> dict:
        """The contrastive loss of the first `eval_cl_sentences` sentences (paper Figure 2), with
        no DP gate, plus the mean and oracle (best-of-K) sentence BLEU of their samples."""
        n = min(cfg.train.eval_cl_sentences, len(self.data))
        settings = sample_settings(cfg.train, objective="codat", alpha=math.inf)
        generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        core.eval()
        sums: dict[str, float] = {}
        sizes = torch.maximum(self.data.src_lens[:n], self.data.tgt_lens[:n])
        max_tokens = max(cfg.train.max_tokens // 4, 64)  # K samples per sentence
        for idx in token_batches(sizes, max_tokens=max_tokens, shuffle=False):
            b = self.data.collate(idx).to(self.device)
            with self.autocast:
                out = core(b.src_ids, b.src_lens)
            _, stats = sample_terms(out, b, settings, generator)
            for key in ("cl_loss", "sample_bleu", "oracle_bleu"):
                sums[key] = sums.get(key, 0.0) + stats.get(key, 0.0) * len(idx)
        core.train()
        return {f"valid_{k}": v / max(n, 1) for k, v in sums.items()}

    def evaluate(self, core: torch.nn.Module, cfg: RunConfig) -> dict:
        """Validation loss (no glancing) and sacreBLEU of the configured decoder."""
        result = {"valid_loss": self.dp_loss(core, cfg)}
        if cfg.train.eval_cl_sentences > 0 and cfg.model.arch == "dat":
            result.update(self.sample_stats(core, cfg))
        core.eval()
        with torch.no_grad(), self.autocast:
            hyp_ids = translate_ids(core, self.data.src, cfg.decode, device=self.device)
        core.train()
        hyps = [self.sp.decode(h) for h in hyp_ids]
        bleu = sacrebleu.corpus_bleu(hyps, [self.refs])
        return {**result, "valid_bleu": bleu.score, "example": hyps[0]}


def build_model(cfg: RunConfig) -> tuple[RunConfig, torch.nn.Module]:
    fam = family(cfg.model.arch)
    if cfg.train.objective not in fam.objectives:
        raise ValueError(
            f"train.objective='{cfg.train.objective}' does not apply to model.arch="
            f"{cfg.model.arch} (choose from {', '.join(fam.objectives)})"
        )
    fam.decoder(cfg.decode.decoder)  # an unknown decoder fails now, not at the first evaluation
    meta = read_meta(cfg.data.dir)
    if cfg.model.vocab_size == 0:
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=meta["vocab_size"]))
    elif cfg.model.vocab_size != meta["vocab_size"]:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} but the data has {meta['vocab_size']}"
        )
    return cfg, fam.build(cfg.model)


def train(cfg: RunConfig, *, resume: bool = False) -> dict:
    dist = distributed.DistInfo.from_env()
    distributed.setup(dist)
    device = dist.device()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed + dist.rank)
    run_dir = pathlib.Path(cfg.run_dir)
    last_dir = run_dir / "last"
    if dist.is_main and not resume and (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run: pass --resume or choose another run_dir"
        )
    if resume and not (last_dir / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume: {last_dir}/trainer_state.json not found")

    if cfg.train.init_from and not resume:
        init_dir = resolve_checkpoint(cfg.train.init_from)
        init_cfg = load_checkpoint_config(init_dir)
        if init_cfg.model != replace(cfg.model, vocab_size=init_cfg.model.vocab_size):
            log.info("train.init_from: using the model config of %s", init_dir)
        cfg = replace(cfg, model=init_cfg.model)
    if resume:
        # The run's own resolved config wins for what stage 2 computed or inherited.
        saved = load_checkpoint_config(last_dir)
        cfg = replace(cfg, model=saved.model)
        if cfg.train.objective != "dp" and cfg.train.cl_alpha <= 0:
            cfg = replace(cfg, train=replace(cfg.train, cl_alpha=saved.train.cl_alpha))
    cfg, core = build_model(cfg)
    if cfg.train.init_from and not resume:
        load_weights(init_dir, core, device)
    core.to(device)
    train_data = ParallelData.load(cfg.data.dir, cfg.data.train_split)
    # Only the upsampling families (DAG / CTC) need a long enough graph for the target.
    upsampled = cfg.model.arch in ("dat", "ctc")
    ok = train_data.trainable_mask(
        upsample_scale=cfg.model.upsample_scale if upsampled else None,
        max_ratio=cfg.data.max_ratio,
    )
    if cfg.model.arch in ("nat", "cmlm"):  # the length classifier covers 0..max_length
        ok &= (train_data.tgt_lens - 2) <= cfg.model.max_length
    train_idx = ok.nonzero().squeeze(1).tolist()

    optimizer = torch.optim.AdamW(
        core.parameters(),
        lr=cfg.train.lr,
        betas=cfg.train.betas,
        weight_decay=cfg.train.weight_decay,
    )
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": [], "elapsed_s": 0.0}
    if resume:
        load_weights(last_dir, core, device)
        load_optimizer(last_dir, optimizer, device)
        state = json.loads((last_dir / "trainer_state.json").read_text())
    model = DistributedDataParallel(core) if dist.world_size > 1 else core
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.bf16
        else contextlib.nullcontext()
    )
    validation = Validation.load(cfg, device, autocast)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + dist.rank)
    if cfg.train.objective != "dp" and cfg.train.cl_alpha <= 0 and not resume:
        # alpha = the warmed-up model's mean validation DP loss (paper §3.3), stored in config.yaml.
        alpha = validation.dp_loss(core, cfg)
        cfg = replace(cfg, train=replace(cfg.train, cl_alpha=round(alpha, 4)))
        if dist.is_main:
            log.info("train.cl_alpha = %.4f (mean validation DP loss of the initial model)", alpha)

    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        n_params = sum(p.numel() for p in core.parameters())
        log.info(
            "model: %.2fM parameters; train pairs %d (of %d); device %s; world %d",
            n_params / 1e6,
            len(train_idx),
            len(train_data),
            device,
            dist.world_size,
        )
    metrics = open(run_dir / "metrics.jsonl", "a") if dist.is_main else None

    sizes = torch.maximum(train_data.src_lens, train_data.tgt_lens)
    start_time = time.time() - state["elapsed_s"]
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=state["step"],
        disable=not dist.is_main,
        unit="step",
        dynamic_ncols=True,
    )
    window_tokens, window_start = 0, time.time()
    stop = False
    while not stop:
        batches = token_batches(
            sizes,
            max_tokens=cfg.train.max_tokens,
            shuffle=True,
            seed=cfg.train.seed + state["epoch"],
            indices=train_idx,
        )
        batches = shard(batches, dist.rank, dist.world_size)
        updates = len(batches) // cfg.train.update_freq
        while state["batch_in_epoch"] < updates:
            step = state["step"]
            lr = learning_rate(step, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ratio = glance_ratio(
                step,
                start=cfg.train.glance_start,
                end=cfg.train.glance_end,
                anneal_steps=cfg.train.glance_anneal_steps,
            )
            if not family_of(core).glances:
                ratio = 0.0
            first = state["batch_in_epoch"] * cfg.train.update_freq
            micro = batches[first : first + cfg.train.update_freq]
            loss_sum, stats = 0.0, {}
            for k, idx in enumerate(micro):
                batch = train_data.collate(idx).to(device)
                sync = k == len(micro) - 1 or dist.world_size == 1
                ctx = contextlib.nullcontext() if sync else model.no_sync()
                with ctx:
                    loss, stats = training_loss(
                        model,
                        core,
                        batch,
                        tc=cfg.train,
                        ratio=ratio,
                        generator=generator,
                        autocast=autocast,
                    )
                    (loss / len(micro)).backward()
                loss_sum += float(loss.detach()) / len(micro)
                window_tokens += int(batch.tgt_lens.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            bar.update(1)
            if state["step"] % cfg.train.log_every == 0:
                tok_s = window_tokens * dist.world_size / max(time.time() - window_start, 1e-9)
                loss_avg = float(
                    distributed.all_reduce_mean(torch.tensor(loss_sum, device=device), dist)
                )
                row = {
                    "step": state["step"],
                    "loss": round(loss_avg, 4),
                    "lr": lr,
                    "glance": round(ratio, 4),
                    "grad_norm": round(float(grad_norm), 4),
                    "tokens_per_s": round(tok_s, 1),
                    "epoch": state["epoch"],
                    "elapsed_s": round(time.time() - start_time, 1),
                    **stats,
                }
                bar.set_postfix(loss=f"{loss_avg:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.1e}")
                if metrics:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                window_tokens, window_start = 0, time.time()
            out_of_time = (
                cfg.train.max_minutes > 0 and time.time() - start_time > cfg.train.max_minutes * 60
            )
            # Each rank has its own clock: agree, or one rank would wait forever in a collective.
            out_of_time = distributed.any_rank(out_of_time, dist, device)
            stop = state["step"] >= cfg.train.max_steps or out_of_time
            if state["step"] % cfg.train.eval_every == 0 or stop:
                state["elapsed_s"] = time.time() - start_time
                if dist.is_main:
                    _eval_and_checkpoint(core, optimizer, cfg, state, validation, metrics, bar)
                distributed.barrier(dist)
            if stop:
                break
        if not stop:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    if metrics:
        metrics.close()
    distributed.teardown(dist)
    return state


def _eval_and_checkpoint(core, optimizer, cfg, state, validation, metrics, bar) -> None:
    run_dir = pathlib.Path(cfg.run_dir)
    result = validation.evaluate(core, cfg)
    row = {
        "step": state["step"],
        "valid_loss": round(result["valid_loss"], 4),
        "valid_bleu": round(result["valid_bleu"], 2),
        **{k: round(v, 4) for k, v in result.items() if k.startswith("valid_") and "_" in k[6:]},
        "elapsed_s": round(state["elapsed_s"], 1),
    }
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()
    bar.write(
        f"step {state['step']}: valid loss {row['valid_loss']:.3f}, BLEU {row['valid_bleu']:.2f}"
        f" | {result['example']}"
    )
    name = f"step{state['step']}"
    best = state["best"] + [[result["valid_bleu"], state["step"], name]]
    best.sort(key=lambda e: (-e[0], -e[1]))
    keep, drop = best[: cfg.train.keep_best], best[cfg.train.keep_best :]
    if any(e[2] == name for e in keep):
        save_checkpoint(run_dir / "checkpoints" / name, core, cfg, validation.spm_path)
    for e in drop:
        shutil.rmtree(run_dir / "checkpoints" / e[2], ignore_errors=True)
    if keep[0][2] == name:
        save_checkpoint(run_dir / "best", core, cfg, validation.spm_path)
    state["best"] = keep
    save_checkpoint(
        run_dir / "last", core, cfg, validation.spm_path, optimizer=optimizer, state=state
    )
