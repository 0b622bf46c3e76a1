"""`codat benchmark dag`: time `codat.dag.dag_log_likelihood` against a dense DAT-style reference.

The reference, `naive_dag_log_likelihood`, is the forward algorithm as the original DA-Transformer
torch code writes it: at every target step a (B, L, L) broadcast-add of alpha and the transition
matrix followed by a -inf-safe logsumexp over the source vertex. `dag_log_likelihood` does the same
sum as one log-space batched matmul per step. `run_dag_benchmark` times both, interleaved in the
same run, forward only and forward + backward, and checks that they agree in value and gradient.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from collections.abc import Callable

import torch

from codat.dag import dag_log_likelihood

NEG_INF = float("-inf")
_VOCAB = 1000  # vocabulary of the synthetic model whose token log-probs feed the benchmark


# --- the dense reference --------------------------------------------------------------------------


def _dense_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over `dim` (kept) by max-subtract / exp / sum / log; -inf with zero gradient
    (never NaN) on slices that are entirely -inf."""
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    s = (x - m).exp().sum(dim=dim, keepdim=True)
    nonzero = s > 0
    log_s = torch.where(nonzero, torch.where(nonzero, s, torch.ones_like(s)).log(), NEG_INF)
    return log_s + m


def naive_dag_log_likelihood(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,)
    """log P(Y | X) by the dense forward algorithm, one (B, L, L) tensor per target step.

    alpha_0 = token_logp[:, 0, 0] at vertex 0 (-inf elsewhere);
    alpha_i[j] = token_logp[:, j, i] + logsumexp_k(alpha_{i-1}[k] + trans_logp[:, k, j]);
    the answer is alpha_{N_b - 1}[L_b - 1] (-inf, with zero gradient, when no path exists).
    """
    B, L, N = token_logp.shape
    dtype = torch.float64 if token_logp.dtype == torch.float64 else torch.float32
    token_logp = token_logp.to(dtype)
    trans_logp = trans_logp.to(dtype)
    start = torch.full((1, L, 1), NEG_INF, dtype=dtype, device=token_logp.device)
    start[:, 0] = 0.0
    alpha = token_logp[:, :, :1] + start  # (B, L, 1)
    alphas = [alpha]
    for i in range(1, N):
        scores = alpha + trans_logp  # (B, L, L): [b, k, j] = alpha[b, k] + log P(k -> j)
        alpha = _dense_logsumexp(scores, dim=1)  # (B, 1, L), summed over the source vertex k
        alpha = alpha.transpose(1, 2) + token_logp[:, :, i : i + 1]  # (B, L, 1)
        alphas.append(alpha)
    table = torch.cat(alphas, dim=2)  # (B, L, N): table[b, j, i] = alpha_i[j]
    at_last = table.gather(1, (graph_lens - 1).long().view(B, 1, 1).expand(B, 1, N)).squeeze(1)
    out = at_last.gather(1, (target_lens - 1).long().view(B, 1)).squeeze(1)
    # No path: -inf + token_logp would still pass a gradient of 1 to the token log-probs that were
    # added to an unreachable cell; the package convention is a zero gradient there.
    return torch.where(torch.isfinite(out), out, NEG_INF)


# --- inputs ---------------------------------------------------------------------------------------


def make_dag_inputs(
    batch_size: int,
    target_len: int,
    graph_len: int,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random, realistic, ragged batch: (token_logp, trans_logp, graph_lens, target_lens).

    Sample 0 has the full sizes (L = graph_len, N = target_len); about one sample in four gets a
    shorter graph; target lengths are drawn in [N/2, N] and never exceed the graph length, so
    every sentence has a path. `token_logp[b, j, i]` is the log-softmax over a vocabulary of random
    logits, read at a random target token; `trans_logp` rows are log-softmaxes of random scores
    over the valid successors k < j < L_b, and -inf elsewhere.
    """
    if not 1 <= target_len <= graph_len:
        raise ValueError(f"need 1 <= target_len <= graph_len, got {target_len}, {graph_len}")
    B, N, L = batch_size, target_len, graph_len
    g = torch.Generator().manual_seed(seed)
    graph_lens = torch.full((B,), L, dtype=torch.long)
    shorter = torch.randint(max(N, L // 2), L + 1, (B,), generator=g)
    ragged = torch.arange(B) % 4 == 3
    graph_lens = torch.where(ragged, shorter, graph_lens)
    target_lens = torch.randint(max(1, N // 2), N + 1, (B,), generator=g)
    target_lens = torch.minimum(target_lens, graph_lens)
    target_lens[0] = N
    graph_lens[0] = L

    logits = 3.0 * torch.randn(B, L, _VOCAB, generator=g)
    targets = torch.randint(0, _VOCAB, (B, 1, N), generator=g).expand(B, L, N)
    token_logp = torch.log_softmax(logits, dim=-1).gather(2, targets)  # (B, L, N)

    k = torch.arange(L).view(1, L, 1)
    j = torch.arange(L).view(1, 1, L)
    valid = (k < j) & (j < graph_lens.view(B, 1, 1))  # (B, L, L)
    scores = 2.0 * torch.randn(B, L, L, generator=g)
    trans_logp = torch.log_softmax(scores.masked_fill(~valid, NEG_INF), dim=2)
    trans_logp = torch.where(valid, trans_logp, NEG_INF)  # also clears the NaN of empty rows

    return (
        token_logp.to(device=device, dtype=dtype),
        trans_logp.to(device=device, dtype=dtype),
        graph_lens.to(device),
        target_lens.to(device),
    )


# --- timing ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of `fn` in milliseconds (device work included)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0


def _peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated by `fn` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, counting equal infinities as equal and any other mismatch of non-finite values
    as infinite."""
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    diff = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def run_dag_benchmark(
    *,
    batch_size: int = 32,
    target_len: int = 30,
    graph_len: int = 240,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Time `dag_log_likelihood` ("codat") against `naive_dag_log_likelihood` ("naive").

    Forward only (under no_grad) and forward + backward (of the sum of the outputs, w.r.t. both
    token_logp and trans_logp) are each timed `repeats` times after `warmup` untimed rounds, the
    four measurements interleaved within every round (with the order of the two functions
    alternating from round to round); medians are reported in milliseconds. Also returns the
    max |difference| of values and gradients (float32), and on CUDA the peak memory of one
    forward + backward.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = torch.device(device)
    token_logp, trans_logp, graph_lens, target_lens = make_dag_inputs(
        batch_size, target_len, graph_len, seed=seed, device=dev
    )
    args = (graph_lens, target_lens)
    fns = {"codat": dag_log_likelihood, "naive": naive_dag_log_likelihood}

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(token_logp, trans_logp, *args)

        return run

    def forward_backward(fn):
        tok = token_logp.detach().clone().requires_grad_(True)
        trans = trans_logp.detach().clone().requires_grad_(True)

        def run():
            tok.grad = None
            trans.grad = None
            fn(tok, trans, *args).sum().backward()

        return run

    jobs = {}
    for name, fn in fns.items():
        jobs[("forward", name)] = forward(fn)
        jobs[("forward_backward", name)] = forward_backward(fn)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    names = list(fns)
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for phase in ("forward", "forward_backward"):
            for name in order:
                ms = _timed(jobs[(phase, name)], dev)
                if r >= warmup:
                    times[(phase, name)].append(ms)
    med = {key: statistics.median(v) for key, v in times.items()}

    # Agreement of values and gradients.
    outs, grads = {}, {}
    for name, fn in fns.items():
        tok = token_logp.detach().clone().requires_grad_(True)
        trans = trans_logp.detach().clone().requires_grad_(True)
        out = fn(tok, trans, *args)
        outs[name] = out.detach()
        grads[name] = torch.autograd.grad(out.sum(), (tok, trans))
    value_scale = float(outs["naive"].abs().max())

    memory = {name: _peak_memory_mb(forward_backward(fn), dev) for name, fn in fns.items()}

    result = {
        "batch_size": batch_size,
        "target_len": target_len,
        "graph_len": graph_len,
        "graph_lens": graph_lens.tolist(),
        "target_lens": target_lens.tolist(),
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "device": str(dev),
        "dtype": str(token_logp.dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "forward_ms": {"naive": med[("forward", "naive")], "codat": med[("forward", "codat")]},
        "forward_backward_ms": {
            "naive": med[("forward_backward", "naive")],
            "codat": med[("forward_backward", "codat")],
        },
        "forward_speedup": med[("forward", "naive")] / med[("forward", "codat")],
        "forward_backward_speedup": (
            med[("forward_backward", "naive")] / med[("forward_backward", "codat")]
        ),
        "max_abs_diff_value": _max_abs_diff(outs["codat"], outs["naive"]),
        "max_abs_value": value_scale,
        "max_abs_diff_grad_token_logp": _max_abs_diff(grads["codat"][0], grads["naive"][0]),
        "max_abs_diff_grad_trans_logp": _max_abs_diff(grads["codat"][1], grads["naive"][1]),
        "peak_memory_mb": memory if dev.type == "cuda" else None,
    }
    return result


# --- report and entry point -----------------------------------------------------------------------


def format_dag_report(result: dict) -> str:
    """A small table of the timings, speed-ups and max differences of `run_dag_benchmark`."""
    r = result
    lines = [
        "DAG log-likelihood: codat.dag.dag_log_likelihood vs dense DAT-style reference",
        f"B={r['batch_size']}  N={r['target_len']}  L={r['graph_len']}  device={r['device']}  "
        f"dtype={r['dtype']}  torch {r['torch_version']}  threads={r['torch_threads']}  "
        f"repeats={r['repeats']} (median, warmup {r['warmup']})",
        "",
        f"{'':<18}{'naive ms':>12}{'codat ms':>12}{'speed-up':>11}",
    ]
    for label, key in (("forward", "forward"), ("forward+backward", "forward_backward")):
        ms = r[f"{key}_ms"]
        speedup = r[f"{key}_speedup"]
        lines.append(f"{label:<18}{ms['naive']:>12.2f}{ms['codat']:>12.2f}{speedup:>10.2f}x")
    memory = r.get("peak_memory_mb")
    if memory:
        ratio = memory["naive"] / memory["codat"] if memory["codat"] else float("inf")
        lines.append(
            f"{'peak memory MB':<18}{memory['naive']:>12.1f}{memory['codat']:>12.1f}{ratio:>10.2f}x"
        )
    lines += [
        "",
        f"max |Δ| log-likelihood   {r['max_abs_diff_value']:.3e}"
        f"  (values up to {r['max_abs_value']:.1f} in magnitude)",
        f"max |Δ| grad token_logp  {r['max_abs_diff_grad_token_logp']:.3e}",
        f"max |Δ| grad trans_logp  {r['max_abs_diff_grad_trans_logp']:.3e}",
    ]
    return "\n".join(lines)


def main_dag(argv: list[str] | None = None) -> int:
    """`codat benchmark dag [options]`: print the report (and optionally save it as JSON)."""
    p = argparse.ArgumentParser(
        prog="codat benchmark dag",
        description="Time the DAG forward algorithm against the dense DAT-style reference.",
    )
    p.add_argument("--batch-size", type=int, default=32, help="B (default 32)")
    p.add_argument("--target-len", type=int, default=30, help="N, longest target (default 30)")
    p.add_argument("--graph-len", type=int, default=240, help="L, longest graph (default 240)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads if > 0")
    p.add_argument("--json", metavar="PATH", help="also write the result dict as JSON")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    result = run_dag_benchmark(
        batch_size=a.batch_size,
        target_len=a.target_len,
        graph_len=a.graph_len,
        repeats=a.repeats,
        warmup=a.warmup,
        seed=a.seed,
        device=a.device,
    )
    print(format_dag_report(result))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


# --- decoding latency at batch size 1 (`codat benchmark decode`) ----------------------------------


def run_decode_benchmark(
    jobs: dict[str, Callable[[str], object]],
    sentences: list[str],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 3,
    warmup: int = 5,
) -> dict:
    """Mean latency per sentence (ms) of each named job (a function decoding one sentence), one
    sentence at a time (the paper's batch-size-1 protocol), averaged over `repeats` passes over
    `sentences`. The jobs take turns within every pass (order alternating between passes), so a
    slower or faster machine phase affects all of them alike. The first job is the baseline of
    `ratio` (latency / baseline latency) and `speedup` (baseline latency / latency)."""
    if repeats < 1 or not sentences or not jobs:
        raise ValueError("need repeats >= 1, at least one sentence and one decoder")
    dev = torch.device(device)
    names = list(jobs)
    for name in names:
        for s in sentences[:warmup]:
            jobs[name](s)
    totals = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync(dev)
            t0 = time.perf_counter()
            for s in sentences:
                jobs[name](s)
            _sync(dev)
            totals[name].append((time.perf_counter() - t0) * 1000.0 / len(sentences))
    ms = {name: statistics.mean(v) for name, v in totals.items()}
    base = names[0]
    return {
        "sentences": len(sentences),
        "repeats": repeats,
        "device": str(dev),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ms_per_sentence": ms,
        "per_pass_ms": totals,
        "relative_to": base,
        "ratio": {name: ms[name] / ms[base] for name in names},
        "speedup": {name: ms[base] / ms[name] for name in names},
    }


def format_decode_report(result: dict, settings: dict[str, str], *, speedup: bool = False) -> str:
    """A table: decoder, ms/sentence, latency ratio (or speed-up) vs the first, its settings."""
    r = result
    column = ("speed-up" if speedup else "vs " + r["relative_to"])[:15]
    lines = [
        f"Decoding latency, batch size 1: {r['sentences']} sentences x {r['repeats']} passes, "
        f"device={r['device']}, threads={r['torch_threads']}, torch {r['torch_version']}",
        "",
        f"{'decoder':<22}{'ms/sentence':>13}{column:>16}  settings",
    ]
    for name, ms in r["ms_per_sentence"].items():
        value = r["speedup" if speedup else "ratio"][name]
        lines.append(f"{name:<22}{ms:>13.2f}{value:>15.2f}x  {settings[name]}")
    if speedup:
        lines.append(f"\nspeed-up = latency of {r['relative_to']} / latency of the row")
    return "\n".join(lines)


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def _read_sentences(path: str, max_sentences: int) -> list[str]:
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return lines[:max_sentences] if max_sentences > 0 else lines


def _job(translator, options: dict) -> Callable[[str], object]:
    return lambda sentence: translator.generate([sentence], **options)


def _describe(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


def main_decode(argv: list[str] | None = None) -> int:
    """`codat benchmark decode RUN_DIR --input SRC`: lookahead vs K-sample decoding + rerank."""
    from codat.generate import Translator

    p = argparse.ArgumentParser(
        prog="codat benchmark decode",
        description="Latency at batch size 1 of lookahead vs sampling + reranking, in one run.",
    )
    p.add_argument("run_dir", help="run directory (its best/) or checkpoint directory")
    p.add_argument("--input", "-i", required=True, help="source text file, one sentence per line")
    p.add_argument("--max-sentences", type=int, default=200, help="first N lines (0 = all)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the sentences (default 3)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--top-p", type=float, default=0.5)
    p.add_argument("--top-tokens", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.5, help="sample rerank weight")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads if > 0")
    p.add_argument("--json", metavar="PATH", help="also write the result dict as JSON")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    lines = _read_sentences(a.input, a.max_sentences)
    translator = Translator.from_dir(a.run_dir, device=a.device)
    settings = {
        "lookahead": {"decoder": "lookahead"},
        f"sample-{a.samples}": {
            "decoder": "sample",
            "samples": a.samples,
            "temperature": a.temperature,
            "top_p": a.top_p,
            "top_tokens": a.top_tokens,
            "beta": a.beta,
        },
    }
    jobs = {name: _job(translator, options) for name, options in settings.items()}
    with torch.inference_mode():
        result = run_decode_benchmark(jobs, lines, device=a.device, repeats=a.repeats)
    print(format_decode_report(result, {k: _describe(v) for k, v in settings.items()}))
    _write_json(a.json, result)
    return 0


def speed_settings(arch: str, *, samples: int, iterations: list[int]) -> dict[str, dict]:
    """The decoders `codat benchmark speed` times for one model family (the paper's Table 1)."""
    if arch == "at":
        return {"beam": {"decoder": "beam"}, "greedy": {"decoder": "greedy"}}
    if arch == "dat":
        return {
            "greedy": {"decoder": "greedy"},
            "lookahead": {"decoder": "lookahead"},
            "viterbi": {"decoder": "viterbi"},
            f"sample-{samples}": {"decoder": "sample", "samples": samples},
        }
    if arch == "nat":
        return {
            "argmax": {"decoder": "argmax"},
            f"npd-{samples}": {"decoder": "npd", "samples": samples},
        }
    if arch == "ctc":
        return {"greedy": {"decoder": "greedy"}}
    if arch == "cmlm":
        return {f"iter-{i}": {"decoder": "mask-predict", "iterations": i} for i in iterations}
    raise ValueError(f"no speed settings for model.arch={arch}")


def main_speed(argv: list[str] | None = None) -> int:
    """`codat benchmark speed LABEL=RUN_DIR ... --input SRC`: batch-1 latency of every decoder of
    every run and the speed-up over the first run's first decoder (AT beam search)."""
    from codat.generate import Translator

    p = argparse.ArgumentParser(
        prog="codat benchmark speed",
        description="Batch-size-1 latency of many models' decoders and their speed-up over the "
        "first (put the AT first: its beam search is the baseline), in one run.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="LABEL=RUN_DIR",
        help="e.g. at=runs/at glat=runs/glat dat=runs/dat",
    )
    p.add_argument("--input", "-i", required=True, help="source text file, one sentence per line")
    p.add_argument("--max-sentences", type=int, default=200, help="first N lines (0 = all)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the sentences (default 3)")
    p.add_argument("--samples", type=int, default=128, help="dat sample / nat npd candidates")
    p.add_argument(
        "--iterations", default="1,4,10", help="cmlm mask-predict iteration counts (default 1,4,10)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads if > 0")
    p.add_argument("--json", metavar="PATH", help="also write the result dict as JSON")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    iterations = [int(x) for x in a.iterations.split(",") if x.strip()]
    lines = _read_sentences(a.input, a.max_sentences)
    jobs, described = {}, {}
    for spec in a.runs:
        label, sep, run_dir = spec.partition("=")
        if not sep or not label or not run_dir:
            raise ValueError(f"run '{spec}': expected LABEL=RUN_DIR")
        translator = Translator.from_dir(run_dir, device=a.device)
        arch = translator.model.cfg.arch
        for name, options in speed_settings(arch, samples=a.samples, iterations=iterations).items():
            key = f"{label} {name}"
            if key in jobs:
                raise ValueError(f"label '{label}' is used twice")
            jobs[key] = _job(translator, options)
            described[key] = f"arch={arch} " + _describe(options)
    with torch.inference_mode():
        result = run_decode_benchmark(jobs, lines, device=a.device, repeats=a.repeats)
    print(format_decode_report(result, described, speedup=True))
    _write_json(a.json, result)
    return 0
