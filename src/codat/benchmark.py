"""`codat benchmark dag`: time `codat.dag.dag_log_likelihood` against a dense DAT-style reference.

The reference, `naive_dag_log_likelihood`, is the forward algorithm as the original DA-Transformer
torch code writes it: at every target step a (B, L, L) broadcast-add of alpha and the transition
matrix followed by a -inf-safe logsumexp over the source vertex. `dag_log_likelihood` does the same
sum as one log-space batched matmul per step. `run_dag_benchmark` times both, interleaved in the
same run, forward only and forward + backward, and checks that they agree in value and gradient.
It also times `mat_vec_floor`, the work any DP that sums a step as a matmul must do, so that
naive / floor bounds the speed-up such a DP can show on the machine, and `block_floor`, our DP
with its exactness work taken out, so that naive / blocks bounds what a DP of our design can show.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from codat.dag import (
    _CUT,
    _EXP_FLOOR,
    _FLT_MIN,
    _LIFT,
    _LOG_TINY,
    _blocks,
    _exp_floor,
    dag_log_likelihood,
)

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


# --- the floor of a scaled-space DP ---------------------------------------------------------------


class _MatVecFloor(torch.autograd.Function):
    """The work every scaled-space DP does, and nothing else: exp(E) once, one batched mat-vec
    per target step forward and one backward (each vector rescaled by its max, as any such DP
    must), and the transition gradient as one bmm and one product. No log, no token
    probabilities, no exactness work: its value means nothing, but naive time / floor time is
    the largest speed-up a DP that sums each step as a matmul can show at a shape on a machine.
    E is clamped at -20 first, so every factor and product is a normal float (a subnormal one
    would slow the bmm down and flatter the bound)."""

    @staticmethod
    def forward(ctx, token_logp, trans_logp):  # noqa: D102
        B, L, N = token_logp.shape
        trans = trans_logp.clamp_min(-20.0).exp_()
        vec = trans.new_ones(B, 1, L)
        kept = trans.new_empty(B, max(N - 1, 1), L)
        for t in range(N - 1):
            kept[:, t] = vec[:, 0]
            vec = torch.bmm(vec, trans)
            vec /= vec.amax(dim=2, keepdim=True)
        ctx.save_for_backward(trans, kept)
        return vec.sum(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        trans, kept = ctx.saved_tensors
        B, L, _ = trans.shape
        grads = trans.new_empty(kept.shape)
        vec = trans.new_ones(B, 1, L)
        trans_t = trans.transpose(1, 2)
        for t in range(kept.shape[1] - 1, -1, -1):
            grads[:, t] = vec[:, 0]
            vec = torch.bmm(vec, trans_t)
            vec /= vec.amax(dim=2, keepdim=True)
        grad_trans = trans * torch.bmm(kept.transpose(1, 2), grads)
        return None, grad_trans * grad_out.view(B, 1, 1)


def mat_vec_floor(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,), meaningless
    """`_MatVecFloor` with the signature of the DP functions (lengths unused)."""
    return _MatVecFloor.apply(token_logp, trans_logp.float())


class _BlockFloor(torch.autograd.Function):
    """codat's DP with every exactness check taken out: the least work its design (method.md §3,
    `codat.dag._ForwardDP`) does. Per target step: alpha cut into blocks of vertices, each scaled
    by its own max (p = e^lift exp(alpha - m_b)); the block sums as one bmm against the lifted
    exp(E - c_bj); the nb sums of every column combined in log space (log, + m_b + c_bj, max,
    exp, sum, log); and in the backward the weights exp(m_b + c_bj - ell_j) dZ/dell_j, cut below
    the smallest normal float as the DP cuts them, one bmm per step and the transition gradient
    as one bmm. No check of which blocks are exact, no log-space recomputation, no dead or
    ragged columns (every sentence is taken at its full length), no float64 shifts: on inputs
    where no block sum underflows it gives the DP's value, elsewhere a wrong one. naive / block
    floor is the largest speed-up a DP built this way can show at a shape on a machine."""

    @staticmethod
    def forward(ctx, token_logp, trans_logp):  # noqa: D102
        B, L, N = token_logp.shape
        bs, nb = _blocks(L)
        trans = trans_logp.new_full((B, nb * bs, L), NEG_INF)
        trans[:, :L] = trans_logp
        trans = trans.view(B, nb, bs, L)
        col_max = trans.amax(dim=2, keepdim=True).nan_to_num_(neginf=0.0)  # (B, nb, 1, L)
        trans_exp = _exp_floor(trans - (col_max - _LIFT), _LIFT + _CUT)
        alpha = token_logp.new_full((B, 1, nb * bs), NEG_INF)
        alpha[:, 0, 0] = 0.0
        T = max(N - 1, 1)
        probs = token_logp.new_empty(B, nb, T, 1, bs)
        maxima = token_logp.new_empty(B, nb, T, 1, 1)
        ells = token_logp.new_empty(B, T, 1, L)
        total = token_logp[:, 0, 0].clone()
        tiny = math.exp(_LOG_TINY + 2 * _LIFT)  # nothing smaller is logged (log(0) is slow)
        for t in range(1, N):
            a_blk = alpha.view(B, 1, nb, bs).transpose(1, 2)  # (B, nb, 1, bs)
            m = torch.amax(a_blk, dim=3, keepdim=True, out=maxima[:, :, t - 1])
            lift = m.nan_to_num(neginf=0.0) - _LIFT
            p = _exp_floor(torch.sub(a_blk, lift, out=probs[:, :, t - 1]), _LIFT + _CUT)
            s = torch.bmm(p.view(B * nb, 1, bs), trans_exp.view(B * nb, bs, L)).view(B, nb, 1, L)
            v = s.clamp_min_(tiny).log_().add_(col_max).add_(m - 2 * _LIFT)
            top = v.amax(dim=1, keepdim=True)
            ell = v.sub_(top).clamp_min_(_EXP_FLOOR).exp_().sum(dim=1).log_().add_(top[:, 0])
            ells[:, t - 1] = ell
            alpha_t = ell + token_logp[:, :, t].unsqueeze(1)
            shift = alpha_t.amax(dim=2, keepdim=True)
            total += shift.view(B)
            torch.sub(alpha_t, shift, out=alpha[:, :, :L])  # the padding vertices stay -inf
        ctx.save_for_backward(trans_exp, col_max, probs, maxima, ells)
        return total + alpha[:, 0, L - 1]

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        trans_exp, col_max, probs, maxima, ells = ctx.saved_tensors
        B, nb, T, _, bs = probs.shape
        L = trans_exp.shape[3]
        grads = trans_exp.new_zeros(B, L, T + 1)  # dZ/dtoken_logp[:, :, t]
        d_alpha = trans_exp.new_zeros(B, 1, L)
        d_alpha[:, 0, L - 1] = grad_out
        weights = trans_exp.new_empty(B, nb, T, 1, L)
        trans_exp_t = trans_exp.view(B * nb, bs, L).transpose(1, 2)
        for t in range(T, 0, -1):
            grads[:, :, t] = d_alpha[:, 0]
            ds = torch.sub(col_max, ells[:, t - 1].unsqueeze(1), out=weights[:, :, t - 1])
            ds.add_(maxima[:, :, t - 1] - _LIFT).clamp_min_(_EXP_FLOOR).exp_()
            ds.mul_(d_alpha.unsqueeze(1))
            torch.ops.aten.hardshrink.out(ds, _FLT_MIN, out=ds)
            d_prev = torch.bmm(ds.view(B * nb, 1, L), trans_exp_t).view(B, nb, 1, bs)
            d_prev.mul_(probs[:, :, t - 1]).mul_(math.exp(-_LIFT))
            d_alpha = d_prev.transpose(1, 2).reshape(B, 1, nb * bs)[:, :, :L]
        grads[:, 0, 0] = d_alpha[:, 0, 0]
        grad_trans = torch.bmm(
            probs.view(B * nb, -1, bs).transpose(1, 2), weights.view(B * nb, -1, L)
        ).view(B, nb, bs, L)
        grad_trans.mul_(trans_exp).mul_(math.exp(-_LIFT))
        return grads, grad_trans.view(B, nb * bs, L)[:, :L]


def block_floor(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,): the DP's value where no block sum underflows
    """`_BlockFloor` with the signature of the DP functions (lengths unused: full lengths)."""
    return _BlockFloor.apply(token_logp.float(), trans_logp.float())


# --- inputs ---------------------------------------------------------------------------------------


def make_dag_inputs(
    batch_size: int,
    target_len: int,
    graph_len: int,
    *,
    seed: int = 0,
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random, realistic, ragged batch: (token_logp, trans_logp, graph_lens, target_lens).

    Sample 0 has the full sizes (L = graph_len, N = target_len); about one sample in four gets a
    shorter graph; target lengths are drawn in [N/2, N] and never exceed the graph length, so
    every sentence has a path. `token_logp[b, j, i]` is the log-softmax over a vocabulary of random
    logits, read at a random target token; `trans_logp` rows are log-softmaxes of random scores
    over the valid successors k < j < L_b, and -inf elsewhere. `scale` multiplies both sets of
    logits: 10 or 30 gives the peaky distributions of a well-trained model.
    """
    if not 1 <= target_len <= graph_len:
        raise ValueError(f"need 1 <= target_len <= graph_len, got {target_len}, {graph_len}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
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

    logits = 3.0 * scale * torch.randn(B, L, _VOCAB, generator=g)
    targets = torch.randint(0, _VOCAB, (B, 1, N), generator=g).expand(B, L, N)
    token_logp = torch.log_softmax(logits, dim=-1).gather(2, targets)  # (B, L, N)

    k = torch.arange(L).view(1, L, 1)
    j = torch.arange(L).view(1, 1, L)
    valid = (k < j) & (j < graph_lens.view(B, 1, 1))  # (B, L, L)
    scores = 2.0 * scale * torch.randn(B, L, L, generator=g)
    trans_logp = torch.log_softmax(scores.masked_fill(~valid, NEG_INF), dim=2)
    trans_logp = torch.where(valid, trans_logp, NEG_INF)  # also clears the NaN of empty rows

    return (
        token_logp.to(device=device, dtype=dtype),
        trans_logp.to(device=device, dtype=dtype),
        graph_lens.to(device),
        target_lens.to(device),
    )


# --- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall time includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of `fn` in milliseconds (device work included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000.0


def _peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory allocated by `fn` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _vm_hwm_kib() -> int:
    """This process's peak resident set size in KiB (VmHWM of /proc/self/status)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _peak_rss_child(path: str, name: str, threads: int) -> None:
    """In a fresh process: print the growth of the peak resident set size (MiB) over one
    forward + backward of `name` ("codat" or "naive") on the inputs saved at `path`."""
    torch.set_num_threads(threads)
    fn = {"codat": dag_log_likelihood, "naive": naive_dag_log_likelihood}[name]
    inputs = torch.load(path)
    _forward_backward_job(fn, make_dag_inputs(1, 2, 4))()  # pages in the code paths first
    job = _forward_backward_job(fn, inputs)  # the input copies and their grads count as base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set size
    before = _vm_hwm_kib()
    job()
    print((_vm_hwm_kib() - before) / 1024.0)


def _peak_rss_mb(inputs: DagInputs, threads: int) -> dict[str, float]:
    """Peak CPU memory of one forward + backward per function, measured honestly despite torch's
    own allocator being invisible to tracemalloc: each function runs once in its own subprocess,
    and the result is how far that process's peak resident set size (Linux VmHWM, reset just
    before the call) rose during the call (inputs loaded, gradient buffers not yet allocated).
    It counts every page torch touched at the peak (temporaries, saved tensors, gradients);
    freed heap pages that the allocator reuses are not counted twice. Linux only.
    (ru_maxrss would not do: it keeps the parent's peak across fork + exec.)"""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.pt")
        torch.save(inputs, path)
        for name in ("naive", "codat"):
            code = (
                "from codat.benchmark import _peak_rss_child; "
                f"_peak_rss_child({path!r}, {name!r}, {threads})"
            )
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            out[name] = float(done.stdout.split()[-1])
    return out


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, counting equal infinities as equal and any other mismatch of non-finite values
    as infinite."""
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    diff = torch.where(diff.isnan(), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


DagInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
DagFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _forward_job(fn: DagFunction, inputs: DagInputs) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(*inputs)

    return run


def _forward_backward_job(fn: DagFunction, inputs: DagInputs) -> Callable[[], object]:
    token_logp, trans_logp, graph_lens, target_lens = inputs
    tok = token_logp.detach().clone().requires_grad_(True)
    trans = trans_logp.detach().clone().requires_grad_(True)

    def run():
        tok.grad = None
        trans.grad = None
        fn(tok, trans, graph_lens, target_lens).sum().backward()

    return run


def _median_times(
    fns: dict[str, DagFunction], inputs: DagInputs, *, repeats: int, warmup: int, dev: torch.device
) -> dict[tuple[str, str], float]:
    """Median ms of each (phase, name); the four jobs take turns within every round, the order
    of the functions alternating from round to round."""
    jobs = {}
    for name, fn in fns.items():
        jobs[("forward", name)] = _forward_job(fn, inputs)
        jobs[("forward_backward", name)] = _forward_backward_job(fn, inputs)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    names = list(fns)
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for phase in ("forward", "forward_backward"):
            for name in order:
                ms = _timed(jobs[(phase, name)], dev)
                if r >= warmup:
                    times[(phase, name)].append(ms)
    return {key: statistics.median(v) for key, v in times.items()}


def _agreement(fns: dict[str, DagFunction], inputs: DagInputs) -> dict[str, float]:
    """max |codat - naive| of the values and of both gradients, and the largest |value|."""
    token_logp, trans_logp, graph_lens, target_lens = inputs
    outs, grads = {}, {}
    for name, fn in fns.items():
        tok = token_logp.detach().clone().requires_grad_(True)
        trans = trans_logp.detach().clone().requires_grad_(True)
        out = fn(tok, trans, graph_lens, target_lens)
        outs[name] = out.detach()
        grads[name] = torch.autograd.grad(out.sum(), (tok, trans))
    return {
        "max_abs_diff_value": _max_abs_diff(outs["codat"], outs["naive"]),
        "max_abs_value": float(outs["naive"].abs().max()),
        "max_abs_diff_grad_token_logp": _max_abs_diff(grads["codat"][0], grads["naive"][0]),
        "max_abs_diff_grad_trans_logp": _max_abs_diff(grads["codat"][1], grads["naive"][1]),
    }


def run_dag_benchmark(
    *,
    batch_size: int = 32,
    target_len: int = 30,
    graph_len: int = 240,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    scale: float = 1.0,
    threads: int | None = None,
    device: str = "cpu",
    cpu_memory: bool = True,
) -> dict:
    """Time `dag_log_likelihood` ("codat") against `naive_dag_log_likelihood` ("naive").

    Forward only (under no_grad) and forward + backward (of the sum of the outputs, w.r.t. both
    token_logp and trans_logp) are each timed `repeats` times after `warmup` untimed rounds, the
    four measurements interleaved within every round (with the order of the two functions
    alternating from round to round); medians are reported in milliseconds. Also returns the
    max |difference| of values and gradients (float32), and the peak memory of one forward +
    backward: on CUDA the allocator's peak, on CPU (unless `cpu_memory` is False) the growth of
    the peak resident set size in a subprocess per function (`_peak_rss_mb`). `scale` sharpens
    the inputs (`make_dag_inputs`); `threads` sets torch's
    intra-op threads for the run (restored afterwards).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    dev = torch.device(device)
    inputs = make_dag_inputs(batch_size, target_len, graph_len, seed=seed, scale=scale, device=dev)
    fns = {"codat": dag_log_likelihood, "naive": naive_dag_log_likelihood}
    timed = {**fns, "blocks": block_floor, "floor": mat_vec_floor}
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        med = _median_times(timed, inputs, repeats=repeats, warmup=warmup, dev=dev)
        torch_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    if dev.type == "cuda":
        memory = {
            name: _peak_memory_mb(_forward_backward_job(fn, inputs), dev)
            for name, fn in fns.items()
        }
        memory_kind = "CUDA max_memory_allocated above the start, one forward + backward"
    elif cpu_memory:
        memory = _peak_rss_mb(inputs, torch_threads)
        memory_kind = "CPU peak RSS (VmHWM) growth over one forward + backward, own process"
    else:
        memory, memory_kind = None, None
    token_logp, _, graph_lens, target_lens = inputs
    return {
        "batch_size": batch_size,
        "target_len": target_len,
        "graph_len": graph_len,
        "graph_lens": graph_lens.tolist(),
        "target_lens": target_lens.tolist(),
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "scale": scale,
        "device": str(dev),
        "dtype": str(token_logp.dtype).removeprefix("torch."),
        "torch_version": torch.__version__,
        "torch_threads": torch_threads,
        "forward_ms": {name: med[("forward", name)] for name in timed},
        "forward_backward_ms": {name: med[("forward_backward", name)] for name in timed},
        "forward_speedup": med[("forward", "naive")] / med[("forward", "codat")],
        "forward_backward_speedup": (
            med[("forward_backward", "naive")] / med[("forward_backward", "codat")]
        ),
        "forward_floor_speedup": med[("forward", "naive")] / med[("forward", "floor")],
        "forward_blocks_speedup": med[("forward", "naive")] / med[("forward", "blocks")],
        "forward_backward_blocks_speedup": (
            med[("forward_backward", "naive")] / med[("forward_backward", "blocks")]
        ),
        "forward_backward_floor_speedup": (
            med[("forward_backward", "naive")] / med[("forward_backward", "floor")]
        ),
        **_agreement(fns, inputs),
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
    }


# --- report -------------------------------------------------------------------------------------


def format_dag_report(result: dict) -> str:
    """A small table of the timings, speed-ups and max differences of `run_dag_benchmark`."""
    r = result
    lines = [
        "DAG log-likelihood: codat.dag.dag_log_likelihood vs dense DAT-style reference",
        f"B={r['batch_size']}  N={r['target_len']}  L={r['graph_len']}  device={r['device']}  "
        f"dtype={r['dtype']}  scale={r.get('scale', 1.0)}  torch {r['torch_version']}  "
        f"threads={r['torch_threads']}  "
        f"repeats={r['repeats']} (median, warmup {r['warmup']})",
        "",
        f"{'':<18}{'naive ms':>12}{'codat ms':>12}{'speed-up':>11}"
        f"{'blocks ms':>12}{'bound':>9}{'floor ms':>12}{'bound':>9}",
    ]
    for label, key in (("forward", "forward"), ("forward+backward", "forward_backward")):
        ms = r[f"{key}_ms"]
        speedup = r[f"{key}_speedup"]
        row = f"{label:<18}{ms['naive']:>12.2f}{ms['codat']:>12.2f}{speedup:>10.2f}x"
        if "blocks" in ms:
            row += f"{ms['blocks']:>12.2f}{r[f'{key}_blocks_speedup']:>8.2f}x"
        if "floor" in ms:
            row += f"{ms['floor']:>12.2f}{r[f'{key}_floor_speedup']:>8.2f}x"
        lines.append(row)
    memory = r.get("peak_memory_mb")
    if memory:
        ratio = memory["naive"] / memory["codat"] if memory["codat"] else float("inf")
        lines.append(
            f"{'peak memory MB':<18}{memory['naive']:>12.1f}{memory['codat']:>12.1f}{ratio:>10.2f}x"
        )
        lines.append(f"  (memory: {r.get('peak_memory_kind')})")
    lines += [
        "",
        f"max |Δ| log-likelihood   {r['max_abs_diff_value']:.3e}"
        f"  (values up to {r['max_abs_value']:.1f} in magnitude)",
        f"max |Δ| grad token_logp  {r['max_abs_diff_grad_token_logp']:.3e}",
        f"max |Δ| grad trans_logp  {r['max_abs_diff_grad_trans_logp']:.3e}",
    ]
    if "blocks" in r["forward_ms"]:
        lines += [
            "",
            "blocks: this DP with its exactness work taken out (per-block shifts, the block",
            "sums as one bmm, their log-space combine; no exactness checks or recomputation,",
            "full lengths); bound = naive / blocks, the largest speed-up a DP built this way",
            "can show here.",
        ]
    if "floor" in r["forward_ms"]:
        lines += [
            "",
            "floor: exp(E) once, one batched mat-vec per step each way and the transition gradient",
            "as one bmm, with no shift, log or exactness work; bound = naive / floor, the largest",
            "speed-up a DP that sums each step as a matmul can show here.",
        ]
    return "\n".join(lines)
