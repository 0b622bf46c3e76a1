"""Correctness of `codat.benchmark` (the dense DP reference and its inputs agree with the fast DP
and the path enumeration) and of `codat.speed`'s bookkeeping (turn-taking, ratios, the settings
of every arch); no timing assertions: timings are only checked to exist."""

import json
import math

import pytest
import torch
from reference import brute_force_log_likelihood, random_dag

from codat.benchmark import (
    _peak_rss_mb,
    block_floor,
    format_dag_report,
    make_dag_inputs,
    mat_vec_floor,
    naive_dag_log_likelihood,
    run_dag_benchmark,
)
from codat.cli import run
from codat.config import ARCHS
from codat.dag import dag_log_likelihood
from codat.generate import DECODERS
from codat.speed import format_decode_report, run_decode_benchmark, speed_settings


def _value_and_grads(fn, token_logp, trans_logp, graph_lens, target_lens):
    tok = token_logp.detach().clone().requires_grad_(True)
    trans = trans_logp.detach().clone().requires_grad_(True)
    out = fn(tok, trans, graph_lens, target_lens)
    g_tok, g_trans = torch.autograd.grad(out.sum(), (tok, trans))
    return out.detach(), g_tok, g_trans


@pytest.mark.parametrize(
    ("L", "graph_lens", "target_lens", "drop_edges"),
    [
        (12, [12, 9, 5], [5, 3, 5], 0.0),  # ragged, full target length on a short graph
        (12, [12, 7, 3], [4, 5, 5], 0.3),  # sparse edges; L_b = 3 < N_b = 5 has no path
        (6, [6, 1, 2], [5, 1, 2], 0.0),  # single-vertex graph and a one-edge graph
    ],
)
def test_naive_matches_fast_value_and_gradient(L, graph_lens, target_lens, drop_edges):
    N = max(target_lens)
    token_logp, trans_logp = random_dag(
        3, L, graph_lens, N, drop_edges=drop_edges, pad_token_logp=0.0
    )
    gl, tl = torch.tensor(graph_lens), torch.tensor(target_lens)
    fast = _value_and_grads(dag_log_likelihood, token_logp, trans_logp, gl, tl)
    naive = _value_and_grads(naive_dag_log_likelihood, token_logp, trans_logp, gl, tl)
    assert naive[0].dtype == torch.float64
    no_path = gl < tl
    assert torch.isneginf(naive[0][no_path]).all() and torch.isneginf(fast[0][no_path]).all()
    assert torch.isfinite(naive[0][~no_path]).all()
    torch.testing.assert_close(naive[0], fast[0], rtol=1e-10, atol=1e-10)
    for g_naive, g_fast in zip(naive[1:], fast[1:], strict=True):
        assert torch.isfinite(g_naive).all()
        torch.testing.assert_close(g_naive, g_fast, rtol=1e-9, atol=1e-10)
        assert (g_naive[no_path] == 0).all()


def test_naive_matches_path_enumeration():
    graph_lens, target_lens = torch.tensor([7, 5, 2, 4]), torch.tensor([4, 5, 2, 1])
    token_logp, trans_logp = random_dag(4, 7, graph_lens, 5, drop_edges=0.2)
    naive = naive_dag_log_likelihood(token_logp, trans_logp, graph_lens, target_lens)
    brute = brute_force_log_likelihood(token_logp, trans_logp, graph_lens, target_lens)
    torch.testing.assert_close(naive, brute, rtol=1e-10, atol=1e-10)


def test_naive_float32_matches_fast():
    token_logp, trans_logp = random_dag(3, 8, [8, 6, 4], 3)
    gl, tl = torch.tensor([8, 6, 4]), torch.tensor([3, 2, 3])
    naive = naive_dag_log_likelihood(token_logp.float(), trans_logp.float(), gl, tl)
    fast = dag_log_likelihood(token_logp.float(), trans_logp.float(), gl, tl)
    assert naive.dtype == torch.float32
    torch.testing.assert_close(naive, fast, rtol=1e-5, atol=1e-5)


def test_make_dag_inputs_is_a_valid_ragged_dag():
    token_logp, trans_logp, graph_lens, target_lens = make_dag_inputs(8, 6, 20, seed=3)
    assert token_logp.shape == (8, 20, 6) and trans_logp.shape == (8, 20, 20)
    assert int(graph_lens[0]) == 20 and int(target_lens[0]) == 6
    assert (graph_lens < 20).any()  # ragged
    assert (target_lens >= 1).all() and (target_lens <= graph_lens).all()
    assert (token_logp <= 0).all() and torch.isfinite(token_logp).all()
    k = torch.arange(20).view(20, 1)
    j = torch.arange(20).view(1, 20)
    for b in range(8):
        Lb = int(graph_lens[b])
        valid = (k < j) & (j < Lb)
        assert torch.isneginf(trans_logp[b][~valid]).all()
        assert torch.isfinite(trans_logp[b][valid]).all()
        row_lse = torch.logsumexp(trans_logp[b, : Lb - 1], dim=1)
        torch.testing.assert_close(row_lse, torch.zeros(Lb - 1), atol=1e-5, rtol=0)


def test_run_dag_benchmark_tiny():
    result = run_dag_benchmark(
        batch_size=2, target_len=4, graph_len=12, repeats=1, warmup=0, seed=1
    )
    for key in ("forward_ms", "forward_backward_ms"):
        for name in ("naive", "codat"):
            assert math.isfinite(result[key][name]) and result[key][name] > 0
    for key in ("forward_speedup", "forward_backward_speedup"):
        assert math.isfinite(result[key]) and result[key] > 0
    for key in (
        "max_abs_diff_value",
        "max_abs_diff_grad_token_logp",
        "max_abs_diff_grad_trans_logp",
    ):
        assert 0 <= result[key] <= 1e-4
    assert (result["batch_size"], result["target_len"], result["graph_len"]) == (2, 4, 12)
    json.dumps(result)  # serialisable as it is

    memory = result["peak_memory_mb"]  # CPU: peak RSS growth, one subprocess per function
    assert set(memory) == {"naive", "codat"} and all(v >= 0 for v in memory.values())
    assert "VmHWM" in result["peak_memory_kind"]

    for key in ("forward", "forward_backward"):
        floor = result[f"{key}_ms"]["floor"]
        assert math.isfinite(floor) and floor > 0
        bound = result[f"{key}_floor_speedup"]
        assert bound == pytest.approx(result[f"{key}_ms"]["naive"] / floor)

    for key in ("forward", "forward_backward"):
        blocks = result[f"{key}_ms"]["blocks"]
        assert math.isfinite(blocks) and blocks > 0
        bound = result[f"{key}_blocks_speedup"]
        assert bound == pytest.approx(result[f"{key}_ms"]["naive"] / blocks)

    report = format_dag_report(result)
    assert "speed-up" in report and "floor ms" in report and "blocks ms" in report
    assert f"{result['forward_backward_blocks_speedup']:.2f}x" in report
    assert f"{result['forward_backward_floor_speedup']:.2f}x" in report
    assert "peak memory MB" in report
    assert f"{result['forward_backward_speedup']:.2f}x" in report
    assert "B=2" in report and "N=4" in report and "L=12" in report and "device=cpu" in report


def test_run_dag_benchmark_can_skip_cpu_memory():
    result = run_dag_benchmark(
        batch_size=1, target_len=2, graph_len=4, repeats=1, warmup=0, cpu_memory=False
    )
    assert result["peak_memory_mb"] is None and result["peak_memory_kind"] is None
    assert "peak memory" not in format_dag_report(result)


def test_peak_rss_sees_torch_allocations():
    """A forward + backward that must hold a (B, L, L) float32 tensor per target step shows at
    least that much peak memory growth (tracemalloc would report ~0 for torch tensors)."""
    inputs = make_dag_inputs(2, 8, 256, seed=0)
    memory = _peak_rss_mb(inputs, 1)
    saved_by_naive = 7 * 2 * 256 * 256 * 4 / 2**20  # >= N - 1 exp'd score tensors kept
    assert memory["naive"] >= saved_by_naive


def test_main_dag_prints_report_and_writes_json(tmp_path, capsys):
    path = tmp_path / "dag.json"
    argv = ["--batch-size", "2", "--target-len", "3", "--graph-len", "8", "--repeats", "1"]
    argv += ["--warmup", "0", "--json", str(path)]
    assert run(["benchmark", "dag", *argv]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "forward+backward" in printed
    saved = json.loads(path.read_text())
    assert saved["graph_len"] == 8 and saved["repeats"] == 1
    assert saved["max_abs_diff_value"] <= 1e-4


def test_run_decode_benchmark_takes_turns_and_reports_ratios():
    calls: list[tuple[str, str]] = []
    jobs = {
        name: (lambda batch, name=name: calls.extend((name, s) for s in batch))
        for name in ("a", "b")
    }
    result = run_decode_benchmark(jobs, ["x", "y"], repeats=2, warmup=1)
    # Warm-up: each job on the first sentence; then pass 1 in order a, b and pass 2 in b, a.
    assert calls == [("a", "x"), ("b", "x")] + [
        (n, s) for n in ("a", "b", "b", "a") for s in ("x", "y")
    ]
    assert result["relative_to"] == "a" and result["sentences"] == 2 and result["repeats"] == 2
    assert result["ratio"]["a"] == 1.0 and result["speedup"]["a"] == 1.0
    ms = result["ms_per_sentence"]
    assert result["speedup"]["b"] == pytest.approx(ms["a"] / ms["b"])
    assert all(len(v) == 2 for v in result["per_pass_ms"].values())
    report = format_decode_report(result, {"a": "decoder=a", "b": "decoder=b"}, speedup=True)
    assert "speed-up" in report and "decoder=b" in report
    assert "vs a" in format_decode_report(result, {"a": "", "b": ""})
    with pytest.raises(ValueError, match="repeats"):
        run_decode_benchmark(jobs, [], repeats=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_speed_settings_use_decoders_of_the_arch(arch):
    settings = speed_settings(arch, samples=16, iterations=[1, 4])
    assert settings
    for fields in settings.values():
        assert fields["decoder"] in DECODERS[arch]
    if arch == "dat":
        assert settings["sample-16"] == {"decoder": "sample", "samples": 16}
    if arch == "cmlm":
        assert list(settings) == ["iter-1", "iter-4"]


def test_speed_settings_reject_an_unknown_arch():
    with pytest.raises(ValueError, match="model.arch=rnn"):
        speed_settings("rnn", samples=2, iterations=[1])


def test_mat_vec_floor_does_one_matvec_per_step_each_way_on_normal_floats(monkeypatch):
    # The floor's time is the bound printed next to the DP's: it must do the work it claims (one
    # mat-vec per step each way, one gradient bmm) and no subnormal arithmetic that slows it down.
    token_logp, trans_logp, gl, tl = make_dag_inputs(3, 9, 40, seed=2, scale=10.0)
    tiny = torch.finfo(torch.float32).tiny
    calls = []
    bmm = torch.bmm

    def spy(a, b, *args, **kwargs):
        out = bmm(a, b, *args, **kwargs)
        calls.append((tuple(a.shape), tuple(b.shape)))
        for x in (a, b, out):
            assert not ((x != 0) & (x.abs() < tiny)).any() and torch.isfinite(x).all()
        return out

    trans = trans_logp.clone().requires_grad_(True)
    monkeypatch.setattr(torch, "bmm", spy)
    out = mat_vec_floor(token_logp, trans, gl, tl)
    out.sum().backward()
    monkeypatch.undo()
    assert calls[:8] == [((3, 1, 40), (3, 40, 40))] * 8
    assert calls[8:16] == [((3, 1, 40), (3, 40, 40))] * 8
    assert calls[16:] == [((3, 40, 8), (3, 8, 40))]
    assert trans.grad.shape == trans.shape and torch.isfinite(trans.grad).all()


def test_block_floor_is_the_dp_without_its_exactness_work(monkeypatch):
    # The block floor's time is the bound of a DP of our design: it must do that DP's work (the
    # value and both gradients on mild full-length inputs, one block bmm per step each way and one
    # gradient bmm, no subnormal input to a bmm, which would slow it and flatter the bound) and
    # none of its exactness work (on sharp inputs its value is wrong where the DP's is exact).
    B, N, L = 2, 12, 96
    token_logp, trans_logp, gl, tl = make_dag_inputs(B, N, L, seed=5)
    gl, tl = torch.full((B,), L), torch.full((B,), N)
    tiny = torch.finfo(torch.float32).tiny
    calls = []
    bmm = torch.bmm

    def spy(a, b, *args, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        for x in (a, b):
            assert not ((x != 0) & (x.abs() < tiny)).any() and torch.isfinite(x).all()
        return bmm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    got = _value_and_grads(block_floor, token_logp, trans_logp, gl, tl)
    monkeypatch.undo()
    blocks = B * 3  # 96 vertices: 3 blocks of 32
    assert calls[: N - 1] == [((blocks, 1, 32), (blocks, 32, L))] * (N - 1)
    assert calls[N - 1 : 2 * (N - 1)] == [((blocks, 1, L), (blocks, L, 32))] * (N - 1)
    assert calls[2 * (N - 1) :] == [((blocks, 32, N - 1), (blocks, N - 1, L))]
    want = _value_and_grads(
        naive_dag_log_likelihood, token_logp.double(), trans_logp.double(), gl, tl
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.nan_to_num(neginf=0.0), rtol=1e-5, atol=1e-4)

    sharp = make_dag_inputs(B, N, L, seed=5, scale=10.0)
    exact = dag_log_likelihood(sharp[0], sharp[1], gl, tl).double()
    want = naive_dag_log_likelihood(sharp[0].double(), sharp[1].double(), gl, tl)
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-3)
    assert ((block_floor(sharp[0], sharp[1], gl, tl).double() - want).abs() > 1.0).any()
