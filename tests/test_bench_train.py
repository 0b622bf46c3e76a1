"""codat.bench_train (`codat benchmark train`) on a tiny prepared copy task: no timing assertions.

Checked: the result lists the plain and the fast steps with finite, positive seconds, tokens/s,
FLOPs and % of the measured matmul peak (fast counts fewer FLOPs: pass 1 reuses pass 2's encoder);
the speed-up is the median of the per-repetition time ratios, by wall and by CPU time (1 for the
baseline); each timed turn runs its untimed warm-up steps first, outside the timed span; the
report names both steps and their settings; a non-DAT config, too few batches and a negative
warm-up are refused.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from corpus import prepare_copy_task

from codat import memory
from codat.bench_train import VARIANTS, format_train_report, matmul_peak, run_train_benchmark
from codat.config import config_from_dict
from codat.memory import keep_freed_memory

SMALL = {"dim": 16, "heads": 2, "ffn_dim": 32, "encoder_layers": 1, "decoder_layers": 1}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    data = prepare_copy_task(tmp_path_factory.mktemp("bench_train"))
    return config_from_dict(
        {
            "data": {"dir": str(data)},
            "model": {"arch": "dat", "upsample_scale": 3.0, **SMALL},
            "train": {"max_tokens": 64, "bf16": True, "glance_start": 0.5},
        }
    )


def test_train_benchmark_reports_both_steps(cfg):
    result = run_train_benchmark(cfg, batches=2, repeats=2, peak_size=32)
    assert list(result["variants"]) == list(VARIANTS) == ["plain", "fast", "fast+mem"]
    assert result["relative_to"] == "plain" and result["repeats"] == 2
    assert result["warmup_steps"] == 1
    assert result["matmul_peak_flops"] == max(result["matmul_peaks"]) > 0
    assert "glance_ratio=0.5" in result["config"] and "bf16=True" in result["config"]
    plain, fast = result["variants"]["plain"], result["variants"]["fast"]
    for row in (plain, fast):
        assert len(row["seconds"]) == len(row["cpu_seconds"]) == 2
        assert all(s > 0 for s in row["seconds"] + row["cpu_seconds"])
        assert row["target_tokens_per_s"] > 0 and row["flops_per_step"] > 0
        assert 0 < row["peak_percent"] and math.isfinite(row["peak_percent"])
    assert plain["speedup"] == 1.0
    ratios = [p / f for p, f in zip(plain["seconds"], fast["seconds"], strict=True)]
    assert fast["speedup"] == pytest.approx(statistics.median(ratios))
    cpu_ratios = [p / f for p, f in zip(plain["cpu_seconds"], fast["cpu_seconds"], strict=True)]
    assert fast["cpu_speedup"] == pytest.approx(statistics.median(cpu_ratios))
    assert fast["flops_per_step"] < plain["flops_per_step"]  # one encoder forward fewer
    report = format_train_report(result)
    assert "plain" in report and "fast+mem" in report and "attention_matmul" in report
    assert "keep_freed_memory" in report and "fused_heads" in report
    assert "all settings off" in report


@pytest.mark.parametrize("warmup", [0, 2])
def test_train_benchmark_runs_the_untimed_warmup_steps_before_each_turn(cfg, warmup, monkeypatch):
    from codat import bench_train

    events = []  # ("step", variant) and ("clock", None), in order
    original = bench_train.StepRunner.step

    def step(self, batch, variant):
        events.append(("step", variant))
        original(self, batch, variant)

    def clock():
        events.append(("clock", None))
        return float(len(events))

    monkeypatch.setattr(bench_train.StepRunner, "step", step)
    monkeypatch.setattr(bench_train.time, "perf_counter", clock)
    result = run_train_benchmark(cfg, batches=2, repeats=2, peak_size=32, warmup=warmup)
    assert result["warmup_steps"] == warmup
    reads = [i for i, (kind, _) in enumerate(events) if kind == "clock"]
    # per variant: the first pass and the FLOP-counting pass, then one span per repetition
    assert len(reads) == 2 * (2 + 2) * len(VARIANTS)
    reads = reads[2 * 2 * len(VARIANTS) :]
    for start, stop in zip(reads[::2], reads[1::2], strict=True):
        timed = events[start + 1 : stop]
        assert len(timed) == 2 and timed[0] == timed[1]  # the two batches, one variant
        before = events[start - warmup : start]  # its warm-up steps come just before the span
        assert before == [timed[0]] * warmup


def test_train_benchmark_refuses_other_archs_and_too_few_batches(cfg):
    with pytest.raises(ValueError, match="model.arch=at"):
        run_train_benchmark(replace(cfg, model=replace(cfg.model, arch="at")), batches=1)
    with pytest.raises(ValueError, match="--batches=100000"):
        run_train_benchmark(cfg, batches=100000, repeats=1)
    with pytest.raises(ValueError, match="--warmup >= 0"):
        run_train_benchmark(cfg, batches=1, repeats=1, warmup=-1)


def test_keep_freed_memory_toggles_glibc_malloc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc mallopt: Linux only")
    assert keep_freed_memory(True) is True
    assert keep_freed_memory(False) is True
    x = torch.ones(8 << 20)  # 32 MB: served by mmap again, and correct either way
    assert float(x.sum()) == 8 << 20


_FAULTS_SCRIPT = """
import resource, sys
import torch
from codat.memory import keep_freed_memory

assert keep_freed_memory(sys.argv[1] == "on") is True
x = torch.ones(256 << 18)  # float32: 256 MB, every page touched
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(64 << 18)  # 64 MB
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_after_a_freed_block(setting: str) -> int:
    """Minor page faults of allocating and filling 64 MB right after 256 MB were freed, in a
    fresh interpreter (this one's heap may border other mappings after many tests)."""
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT, setting], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


def test_keep_freed_memory_reuses_freed_pages_without_page_faults():
    """With the setting on, freed memory stays in the heap, resident: the next tensor faults
    (almost) no page in; with glibc's defaults all 16,384 pages of 64 MB fault in (mmap and
    unmap per tensor). The setting's trim threshold must fit mallopt's C int: 2**40 became 0,
    which trims the heap whenever a freed block borders its top."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc mallopt: Linux only")
    assert ctypes.c_int(memory._NO_TRIM).value == memory._NO_TRIM > 1 << 30
    kept, default = (_faults_after_a_freed_block(s) for s in ("on", "off"))
    pages = (64 << 20) // 4096
    assert kept < pages // 16 and default > pages // 2, (kept, default)


def test_keep_freed_memory_on_cpu_only_and_unless_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv("CODAT_KEEP_FREED_MEMORY", raising=False)
    assert memory.keep_freed_memory_on_cpu(torch.device("cpu")) is True and calls == [1]
    assert memory.keep_freed_memory_on_cpu("cpu") is True and calls == [1, 1]
    assert memory.keep_freed_memory_on_cpu("cuda:0") is False and calls == [1, 1]
    monkeypatch.setenv("CODAT_KEEP_FREED_MEMORY", "0")
    assert memory.keep_freed_memory_on_cpu("cpu") is False and calls == [1, 1]


def test_matmul_peak_is_positive():
    assert matmul_peak(dtype=torch.float32, size=16, repeats=2) > 0
