"""`codat benchmark train`: the DAT training step with its speed settings off ("plain": the step as
first written) against on ("fast": `StepOptions()`, attention in its matmul mode on CPU and the
fused transition head), timed side by side in one process on the same batches, plus the bf16 (or
float32) matmul peak of the same machine measured in the same run.

Both steps train the same model with one optimizer (forward, backward, clip, AdamW step, as
`train.Loop.update`), taking turns on every repetition (order alternating), so a slower or faster
phase of a shared machine affects both alike; the reported speed-up is the median over the
repetitions of plain time / fast time. Timing only: that the settings change no result is what
tests/test_glancing.py checks.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from codat.checkpoint import build_model
from codat.config import RunConfig
from codat.dat_train import StepOptions, dat_step
from codat.data import Batch, token_batches
from codat.layers import set_cpu_half_attention
from codat.loop import example_sizes
from codat.memory import keep_freed_memory
from codat.train import resolve_model_config, trainable_pairs


@dataclass(frozen=True)
class Variant:
    """One way to run the step: its `StepOptions`, the model's two speed settings (the attention
    mode on CPU, `layers.CPU_HALF_ATTENTION`, and `DATransformer.fused_heads`), whether
    AdamW uses its fused kernel (`torch.optim.AdamW(fused=True)`, as train.py builds it) and
    whether freed memory stays in the heap (`memory.keep_freed_memory`, as train.py sets it on
    CPU)."""

    options: StepOptions
    attention: str
    fused_heads: bool
    fused_adamw: bool = False
    keep_freed_memory: bool = False


VARIANTS = {
    "plain": Variant(StepOptions.plain(), attention="sdpa", fused_heads=False),
    "fast": Variant(StepOptions(), attention="matmul", fused_heads=True, fused_adamw=True),
    "fast+mem": Variant(
        StepOptions(),
        attention="matmul",
        fused_heads=True,
        fused_adamw=True,
        keep_freed_memory=True,
    ),
}


def matmul_peak(*, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:  # FLOP/s
    """The best FLOP/s of a (size x size) @ (size x size) matmul in `dtype` over `repeats` runs
    (after one untimed run), by this process's CPU time (per thread): what the step's matmuls
    could reach at most on this machine."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, (time.process_time() - t0) / torch.get_num_threads())
    return 2 * size**3 / best


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FLOP counter knows the GPU SDPA kernels only; the CPU one is counted by the same
# formulas, so that each attention mode's matmul FLOPs count alike.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


class StepRunner:
    """One model, optimizer and batch list; `run(variant)` trains one step per batch."""

    def __init__(self, cfg: RunConfig, batches: list[Batch], *, ratio: float) -> None:
        self.cfg, self.batches, self.ratio = cfg, batches, ratio
        self.model = build_model(cfg.model)
        self.model.train()
        self.optimizers = {  # each keeps its own moments; only their speed is compared
            fused: torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, fused=fused)
            for fused in (False, True)
        }
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            if cfg.train.bf16
            else contextlib.nullcontext
        )

    def step(self, batch: Batch, variant: Variant) -> None:
        set_cpu_half_attention(self.model, variant.attention)
        self.model.fused_heads = variant.fused_heads
        loss, _ = dat_step(
            self.model,
            batch,
            cfg=self.cfg,
            ratio=self.ratio,
            generator=self.generator,
            autocast=self.autocast(),
            options=variant.options,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_norm)
        optimizer = self.optimizers[variant.fused_adamw]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run(self, variant: Variant, *, warmup: int = 0) -> tuple[float, float]:
        """Train one step per batch with `variant`, after `warmup` untimed steps on the first
        batch; returns the wall and CPU (this process) seconds of the timed steps."""
        keep_freed_memory(variant.keep_freed_memory)
        for _ in range(warmup):
            self.step(self.batches[0], variant)
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in self.batches:
            self.step(batch, variant)
        return time.perf_counter() - t0, time.process_time() - c0

    def flops(self, variant: Variant) -> float:  # FLOPs of one pass over the batches
        counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS)
        with counter:
            self.run(variant)
        return float(counter.get_total_flops())


def benchmark_batches(cfg: RunConfig, *, count: int, seed: int) -> list[Batch]:
    """`count` training batches of `cfg` (train.max_tokens each, as the training loop draws)."""
    model = build_model(cfg.model)
    data, indices = trainable_pairs(cfg, model)
    sizes = example_sizes(cfg.train, model, data)
    order = token_batches(
        sizes, max_tokens=cfg.train.max_tokens, shuffle=True, seed=seed, indices=indices
    )
    if len(order) < count:
        raise ValueError(f"{cfg.data.dir} has {len(order)} batches, fewer than --batches={count}")
    return [data.collate(idx) for idx in order[:count]]


def run_train_benchmark(
    cfg: RunConfig,
    *,
    batches: int = 4,
    repeats: int = 5,
    ratio: float | None = None,
    seed: int = 0,
    peak_size: int = 2048,
    warmup: int = 1,
) -> dict:
    """Time the plain and the fast DAT step (`VARIANTS`) on the same `batches` batches of cfg's
    data, `repeats` times each, alternating; measure the matmul peak in the same run. `ratio`:
    the glancing ratio (default: the run's first, train.glance_start). `warmup`: untimed steps
    before each timed turn, so that each variant is timed in the steady state of its own memory
    setting, as a training run has it: after another variant's turn (and the peak's matmuls) the
    heap holds other blocks, and `fast+mem`'s first step would page-fault its large tensors in
    again, once per turn instead of once per training run."""
    if cfg.model.arch != "dat":
        raise ValueError(f"benchmark train times the DAT step: model.arch={cfg.model.arch}")
    if repeats < 1 or batches < 1 or warmup < 0:
        raise ValueError(
            f"need --repeats >= 1, --batches >= 1 and --warmup >= 0, got {repeats}, {batches}, "
            f"{warmup}"
        )
    cfg = resolve_model_config(cfg, resume=False)
    tc = cfg.train
    if ratio is None:
        ratio = tc.glance_start
    torch.manual_seed(seed)
    data = benchmark_batches(cfg, count=batches, seed=seed)
    runner = StepRunner(cfg, data, ratio=ratio)
    tokens = sum(int(b.tgt_lens.sum()) for b in data)
    dtype = torch.bfloat16 if tc.bf16 else torch.float32
    names = list(VARIANTS)
    for name in names:  # warm-up, and the FLOPs each variant does
        runner.run(VARIANTS[name])
    flops = {name: runner.flops(VARIANTS[name]) / batches for name in names}
    seconds = {name: [] for name in names}
    cpu_seconds = {name: [] for name in names}
    peaks = []
    for r in range(repeats):
        peaks.append(matmul_peak(dtype=dtype, size=peak_size))
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = runner.run(VARIANTS[name], warmup=warmup)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
    result = summarise(
        cfg, seconds, cpu_seconds, flops, peaks, tokens=tokens, batches=batches, ratio=ratio
    )
    result["warmup_steps"] = warmup
    return result


def summarise(
    cfg: RunConfig,
    seconds: dict[str, list[float]],
    cpu_seconds: dict[str, list[float]],
    flops: dict[str, float],
    peaks: list[float],
    *,
    tokens: int,
    batches: int,
    ratio: float,
) -> dict:
    """The result dict: per variant the median wall and CPU s/step, target tokens/s (wall), the
    FLOPs/step and the % of the best measured matmul peak they reach (by CPU time per thread),
    and the median per-repetition speed-up of each over the first, by wall time and by CPU
    time (the steadier one on a shared machine: other processes' load does not count)."""
    names = list(seconds)
    base = names[0]
    peak = max(peaks)
    threads = torch.get_num_threads()

    def speedup(times: dict[str, list[float]], name: str) -> float:
        return statistics.median(b / s for b, s in zip(times[base], times[name], strict=True))

    rows = {}
    for name in names:
        per_step = statistics.median(seconds[name]) / batches
        cpu_per_step = statistics.median(cpu_seconds[name]) / batches
        rows[name] = {
            "s_per_step": per_step,
            "cpu_s_per_step": cpu_per_step,
            "target_tokens_per_s": tokens / batches / per_step,
            "target_tokens_per_cpu_s": tokens / batches / cpu_per_step,
            "flops_per_step": flops[name],
            "peak_percent": 100.0 * flops[name] / (cpu_per_step / threads) / peak,
            "speedup": speedup(seconds, name),
            "cpu_speedup": speedup(cpu_seconds, name),
            "seconds": seconds[name],
            "cpu_seconds": cpu_seconds[name],
            "settings": describe(VARIANTS[name]),
        }
    m = cfg.model
    return {
        "config": f"dim={m.dim} layers={m.encoder_layers}+{m.decoder_layers} "
        f"lambda={m.upsample_scale} V={m.vocab_size} max_tokens={cfg.train.max_tokens} "
        f"bf16={cfg.train.bf16} objective={cfg.train.objective} glance_ratio={ratio}",
        "batches": batches,
        "target_tokens_per_step": tokens / batches,
        "repeats": len(peaks),
        "torch_version": torch.__version__,
        "torch_threads": threads,
        "matmul_peak_flops": peak,
        "matmul_peaks": peaks,
        "relative_to": base,
        "variants": rows,
    }


def describe(variant: Variant) -> str:
    on = [k for k, v in vars(variant.options).items() if v]
    if variant.attention != "sdpa":
        on.append(f"attention_{variant.attention}")
    on += [k for k in ("fused_heads", "fused_adamw", "keep_freed_memory") if getattr(variant, k)]
    return "all settings off" if not on else " ".join(on)


def format_train_report(result: dict) -> str:
    """A table: variant, wall and CPU s/step, target tok/s, GFLOP/step, % of the matmul peak,
    speed-up by wall and by CPU time."""
    r = result
    dtype = "bf16" if "bf16=True" in r["config"] else "fp32"
    lines = [
        f"DAT training step: {r['config']}",
        f"{r['batches']} batches ({r['target_tokens_per_step']:.0f} target tokens/step) x "
        f"{r['repeats']} repetitions, alternating, {r.get('warmup_steps', 0)} untimed step(s) "
        f"before each; threads={r['torch_threads']}, "
        f"torch {r['torch_version']}; {dtype} matmul peak {r['matmul_peak_flops'] / 1e9:.0f} "
        "GFLOP/s per thread (best 2048^3 matmul)",
        "",
        f"{'step':<10}{'s/step':>8}{'cpu s':>8}{'tok/s':>7}{'GFLOP':>7}{'%peak':>6}"
        f"{'speed-up':>9}{'cpu':>7}  settings",
    ]
    for name, row in r["variants"].items():
        lines.append(
            f"{name:<10}{row['s_per_step']:>8.2f}{row['cpu_s_per_step']:>8.2f}"
            f"{row['target_tokens_per_s']:>7.0f}{row['flops_per_step'] / 1e9:>7.0f}"
            f"{row['peak_percent']:>6.1f}{row['speedup']:>8.2f}x{row['cpu_speedup']:>6.2f}x"
            f"  {row['settings']}"
        )
    lines.append(
        f"\nspeed-up = median over repetitions of (time of {r['relative_to']} / time of the "
        "row), by wall time and by this process's CPU time; GFLOP per step (counted); %peak: "
        "of the matmul peak, by CPU time per thread"
    )
    return "\n".join(lines)
