"""The update loop of `codat train` (`train.train` builds everything and hands it over): the
learning-rate schedule, token-bucketed epochs, gradient accumulation, skipped non-finite steps,
logging, the time budget, signals, validation and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import signal
import sys
import time

import torch
from tqdm import tqdm

from codat import distributed
from codat.checkpoint import (
    gather_rng_states,
    save_run_checkpoints,
)
from codat.config import TrainConfig
from codat.data import ParallelData, shard, token_batches
from codat.glancing import glance_ratio
from codat.runs import (
    Interrupted,
    StopSignals,
    TrainingStopped,
    bar_options,
    checkpoint_step,
    expected_stop,
)

log = logging.getLogger(__name__)


def inverse_sqrt_lr(step: int, *, lr: float, warmup: int, init_lr: float) -> float:
    """fairseq's inverse_sqrt: linear warm-up from init_lr, then lr * sqrt(warmup / step)."""
    if warmup > 0 and step < warmup:
        return init_lr + (lr - init_lr) * step / warmup
    return lr * math.sqrt(max(warmup, 1) / max(step, 1))


def learning_rate(step: int, tc: TrainConfig) -> float:
    """The learning rate of update `step` (train.lr_schedule, after train.warmup_steps)."""
    if tc.lr_schedule in ("constant", "linear"):
        if tc.warmup_steps > 0 and step < tc.warmup_steps:
            return tc.warmup_init_lr + (tc.lr - tc.warmup_init_lr) * step / tc.warmup_steps
        if tc.lr_schedule == "constant":
            return tc.lr
        left = max(tc.max_steps - step, 0) / max(tc.max_steps - tc.warmup_steps, 1)
        return tc.lr * left
    return inverse_sqrt_lr(step, lr=tc.lr, warmup=tc.warmup_steps, init_lr=tc.warmup_init_lr)


def example_sizes(tc: TrainConfig, model: torch.nn.Module, data: ParallelData) -> torch.Tensor:
    """The size of every pair that train.max_tokens bounds (batch size * largest size):
    max(source, target) length, or with train.batch_by graph max(source length, the model's
    decoder positions in training, `train_positions`)."""
    if tc.batch_by == "graph":
        return torch.maximum(data.src_lens, model.train_positions(data.src_lens, data.tgt_lens))
    return torch.maximum(data.src_lens, data.tgt_lens)


class Loop:
    """The update loop: token-bucketed epochs, gradient accumulation, logging, the time budget,
    validation and checkpoints. `state` (step, epoch, batch_in_epoch, best, elapsed_s, skipped,
    bad_streak) is what last/ stores for --resume, with every random state (`rng_state`)."""

    def __init__(self, cfg, dist, device, core, model, optimizer, validation, state) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        self.core, self.model, self.optimizer = core, model, optimizer
        self.validation, self.state = validation, state
        seed = cfg.train.seed * 1000 + dist.rank
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.start_time = time.time() - state["elapsed_s"]
        self.metrics = (
            open(pathlib.Path(cfg.run_dir) / "metrics.jsonl", "a") if dist.is_main else None
        )
        self.window_tokens, self.window_start = 0, time.time()
        self.session = (time.time(), state["step"])  # this process's start, for the bar's pace

    def run(self, data: ParallelData, indices: list[int], signals: StopSignals) -> None:
        tc, state = self.cfg.train, self.state
        sizes = example_sizes(tc, self.core, data)
        self.bar = tqdm(total=tc.max_steps, initial=state["step"], **bar_options(self.dist.is_main))
        try:
            while True:
                batches = token_batches(
                    sizes,
                    max_tokens=tc.max_tokens,
                    shuffle=True,
                    seed=tc.seed + state["epoch"],
                    indices=indices,
                )
                batches = shard(batches, self.dist.rank, self.dist.world_size)
                updates = len(batches) // tc.update_freq
                if updates == 0:
                    raise ValueError(
                        f"an epoch has {len(batches)} batches, fewer than train.update_freq="
                        f"{tc.update_freq}: lower train.update_freq or train.max_tokens"
                    )
                while state["batch_in_epoch"] < updates:
                    first = state["batch_in_epoch"] * tc.update_freq
                    self.update(data, batches[first : first + tc.update_freq])
                    if self.after_update(signals):
                        return
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
        finally:
            self.bar.close()
            if self.metrics:
                self.metrics.close()

    def update(self, data: ParallelData, micro: list[list[int]]) -> None:
        """One optimizer step over the micro-batches (DDP syncs only on the last one); skipped,
        optimizer untouched, when the loss or the gradient is not finite on any rank."""
        tc, step = self.cfg.train, self.state["step"]
        lr = learning_rate(step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ratio = glance_ratio(
            step, start=tc.glance_start, end=tc.glance_end, anneal_steps=tc.glance_anneal_steps
        )
        loss_sum, stats = 0.0, {}
        for k, idx in enumerate(micro):
            batch = data.collate(idx).to(self.device)
            sync = k == len(micro) - 1 or self.dist.world_size == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                loss, stats = self.model(batch, ratio, self.generator)
                (loss / len(micro)).backward()
            loss_sum += float(loss.detach()) / len(micro)
            self.window_tokens += int(batch.tgt_lens.sum())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.core.parameters(), tc.clip_norm))
        diverged = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
        diverged = distributed.any_rank(diverged, self.dist, self.device)
        if not diverged:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["skipped"] += int(diverged)
        self.state["bad_streak"] = self.state["bad_streak"] + 1 if diverged else 0
        self.state["step"] += 1
        self.state["batch_in_epoch"] += 1
        self.update_bar()
        if diverged or self.state["step"] % tc.log_every == 0:
            loss_sum = math.nan if diverged else loss_sum  # a skipped step has no loss
            self.log_update(loss_sum, stats, lr=lr, ratio=ratio, grad_norm=grad_norm)
        if diverged:
            self.check_divergence()

    def update_bar(self) -> None:
        """Advance the bar; its total is the step the run will really stop at (`expected_stop`),
        so its ETA is that of max_steps or max_minutes, whichever ends first."""
        tc, step = self.cfg.train, self.state["step"]
        session_start, session_step = self.session
        total = expected_stop(
            step,
            max_steps=tc.max_steps,
            max_s=tc.max_minutes * 60,
            elapsed_s=time.time() - self.start_time,
            pace=(step - session_step) / max(time.time() - session_start, 1e-9),
        )
        if total != self.bar.total:
            self.bar.total = total
            self.bar.set_description(
                "" if total == tc.max_steps else f"max_minutes={tc.max_minutes:g}", refresh=False
            )
        self.bar.update(1)

    def check_divergence(self) -> None:
        """Warn about a skipped step; stop after train.max_skipped_steps in a row."""
        tc, state = self.cfg.train, self.state
        step, streak = state["step"], state["bad_streak"]
        log.warning("step %d: non-finite loss or gradient: step skipped", step)
        if streak >= tc.max_skipped_steps:
            last = checkpoint_step(pathlib.Path(self.cfg.run_dir))
            raise TrainingStopped(
                f"training diverged: the loss or gradient was not finite at {streak} steps in "
                f"a row (steps {step - streak + 1}-{step}; train.max_skipped_steps="
                f"{tc.max_skipped_steps}); last/ holds step {last}: lower train.lr or raise "
                "train.warmup_steps, then --resume or start again"
            )

    def log_update(self, loss_sum: float, stats: dict, *, lr, ratio, grad_norm) -> None:
        elapsed = max(time.time() - self.window_start, 1e-9)
        tok_s = self.window_tokens * self.dist.world_size / elapsed
        loss = torch.tensor(loss_sum, device=self.device)
        loss_avg = float(distributed.all_reduce_mean(loss, self.dist))
        row = {
            "step": self.state["step"],
            "loss": loss_avg if math.isfinite(loss_avg) else None,
            "lr": lr,
            "glance": round(ratio, 4),
            "grad_norm": round(grad_norm, 4) if math.isfinite(grad_norm) else None,
            "skipped": self.state["skipped"],
            "tokens_per_s": round(tok_s, 1),
            "epoch": self.state["epoch"],
            "elapsed_s": round(time.time() - self.start_time, 1),
            **stats,
        }
        self.bar.set_postfix(
            loss=f"{loss_avg:.3f}",
            skipped=self.state["skipped"],
            tok_s=f"{tok_s:.0f}",
            lr=f"{lr:.1e}",
        )
        if self.metrics:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        self.window_tokens, self.window_start = 0, time.time()

    def after_update(self, signals: StopSignals) -> bool:
        """Validate and checkpoint when due (or save last/ when a signal came); True when the
        run is over. Raises `Interrupted` after saving when SIGINT / SIGTERM came."""
        tc, state = self.cfg.train, self.state
        out_of_time = tc.max_minutes > 0 and time.time() - self.start_time > tc.max_minutes * 60
        # Each rank has its own clock and signals: agree, or one would wait in a collective.
        out_of_time = distributed.any_rank(out_of_time, self.dist, self.device)
        signalled = distributed.any_rank(signals.signum is not None, self.dist, self.device)
        stop = state["step"] >= tc.max_steps or out_of_time
        due = state["step"] % tc.eval_every == 0 or stop
        if due or signalled:
            state["elapsed_s"] = time.time() - self.start_time
            if not all(bool(p.isfinite().all()) for p in self.core.parameters()):
                raise TrainingStopped(
                    f"step {state['step']}: the model's weights are not finite; nothing was "
                    f"saved (last/ holds step {checkpoint_step(pathlib.Path(self.cfg.run_dir))})"
                )
            result = self.validate() if due and self.dist.is_main else None
            rng = gather_rng_states(self.generator, self.dist)
            if self.dist.is_main:
                self.checkpoint(result, rng)
            distributed.barrier(self.dist)
        if signalled:
            signum = signals.signum or signal.SIGTERM
            raise Interrupted(
                f"{signal.Signals(signum).name}: stopped at step {state['step']}, saved in "
                f"{pathlib.Path(self.cfg.run_dir) / 'last'}: continue with --resume",
                signum,
            )
        return stop

    def validate(self) -> dict:
        """Validation loss, BLEU (and CoDAT's sample statistics) of the current model, logged."""
        state = self.state
        result = self.validation.evaluate(self.core, self.cfg)
        row = {
            "step": state["step"],
            "valid_loss": round(result["valid_loss"], 4),
            "valid_bleu": round(result["valid_bleu"], 2),
            "valid_score": round(result["valid_score"], 2),  # data.valid_metric: selects best/
            **{
                k: round(v, 4) for k, v in result.items() if k.startswith("valid_") and "_" in k[6:]
            },
            "elapsed_s": round(state["elapsed_s"], 1),
        }
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        example = " ".join(str(result["example"]).split())  # one line, whatever it holds
        self.bar.write(
            f"step {state['step']}: valid loss {row['valid_loss']:.3f}, "
            f"BLEU {row['valid_bleu']:.2f}{self._metric_text(row)} | {example}"
        )
        sys.stdout.flush()  # shown now, also when stdout is a pipe or a file
        return result

    def _metric_text(self, row: dict) -> str:
        """', rouge 31.20' when the selection metric (data.valid_metric) is not BLEU."""
        metric = self.cfg.data.valid_metric
        return "" if metric == "bleu" else f", {metric} {row['valid_score']:.2f}"

    def checkpoint(self, result: dict | None, rng: dict[str, torch.Tensor]) -> None:
        """checkpoints/ and best/ when validated (`result`), then last/ (`save_run_checkpoints`)."""
        bleu = None if result is None else result["valid_score"]  # data.valid_metric
        save_run_checkpoints(
            self.core, self.cfg, self.validation.spm_path, self.optimizer, self.state, rng, bleu
        )
