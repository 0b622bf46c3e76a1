"""DAG maths of DA-Transformer as pure tensor functions (method.md §3).

Conventions: `token_logp (B, L, N)` holds log P(y_i | v_j) at [b, j, i] (vertex axis before target
axis); `trans_logp (B, L, L)` holds log P(v_k -> v_j) at [b, k, j], -inf unless k < j < L_b.
A path is 0 = a_0 < a_1 < ... < a_{N_b-1} = L_b - 1. Everything runs in float32 (or float64 when
given float64) and is -inf safe: unreachable cells stay -inf and get zero, never NaN, gradients.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """log(x) for x >= 0 with log(0) = -inf and a zero (not NaN) gradient there."""
    positive = x > 0
    return torch.where(positive, torch.log(torch.where(positive, x, torch.ones_like(x))), NEG_INF)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x)).detach()


def logsumexp_safe(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """logsumexp whose value is -inf and whose gradient is 0 on all -inf slices."""
    m = _finite_or_zero(x.amax(dim=dim, keepdim=True))
    out = safe_log((x - m).exp().sum(dim=dim, keepdim=True)) + m
    return out if keepdim else out.squeeze(dim)


def log_softmax_safe(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log_softmax that returns -inf (not NaN) on slices that are all -inf."""
    lse = logsumexp_safe(x, dim, keepdim=True)
    finite = torch.isfinite(lse)
    return torch.where(finite, x - torch.where(finite, lse, torch.zeros_like(lse)), NEG_INF)


def _check_dag_args(token_logp, trans_logp, graph_lens, target_lens) -> None:
    if token_logp.dim() != 3 or trans_logp.dim() != 3:
        raise ValueError(
            f"expected token_logp (B, L, N) and trans_logp (B, L, L), got "
            f"{tuple(token_logp.shape)} and {tuple(trans_logp.shape)}"
        )
    B, L, N = token_logp.shape
    if trans_logp.shape != (B, L, L):
        raise ValueError(f"trans_logp shape {tuple(trans_logp.shape)} != {(B, L, L)}")
    if graph_lens.shape != (B,) or target_lens.shape != (B,):
        raise ValueError(
            f"graph_lens {tuple(graph_lens.shape)} and target_lens {tuple(target_lens.shape)} "
            f"must both be ({B},)"
        )
    if B == 0:
        return
    if int(graph_lens.min()) < 1 or int(graph_lens.max()) > L:
        raise ValueError(f"graph_lens must lie in [1, {L}], got {graph_lens.tolist()}")
    if int(target_lens.min()) < 1 or int(target_lens.max()) > N:
        raise ValueError(f"target_lens must lie in [1, {N}], got {target_lens.tolist()}")


def dag_log_likelihood(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,)
    """log P(Y | X) = log sum over all paths a of prod_i P(y_i | v_{a_i}) prod_i P(a_{i+1} | a_i).

    Forward algorithm (CoDAT eq. (3)): alpha_0 = e_0 * M[0, 0] and
    alpha_t[j] = M[j, t] + log sum_k exp(alpha_{t-1}[k] + E[k, j]);
    the answer is alpha_{N_b-1}[L_b-1].
    The inner sum is a log-space matrix product: exp(alpha - max) @ exp(E - colmax), one batched
    matmul per target step, so autograd keeps O(B * L) per step instead of a (B, L, L) tensor.
    Sentences with no path (L_b < N_b) get -inf and zero gradients.
    """
    _check_dag_args(token_logp, trans_logp, graph_lens, target_lens)
    B, L, N = token_logp.shape
    dtype = torch.float64 if token_logp.dtype == torch.float64 else torch.float32
    token_logp = token_logp.to(dtype)
    trans_logp = trans_logp.to(dtype)
    # Column-wise stabiliser: exp(E - colmax) has a 1 in every reachable column.
    col_max = _finite_or_zero(trans_logp.amax(dim=1))  # (B, L)
    trans_exp = (trans_logp - col_max.unsqueeze(1)).exp()  # (B, L, L) in [0, 1]
    first = torch.zeros(L, dtype=torch.bool, device=token_logp.device)
    first[0] = True
    alpha = token_logp[:, :, 0].masked_fill(~first, NEG_INF)  # (B, L)
    last = (graph_lens - 1).long().unsqueeze(1)  # (B, 1)
    at_last = [alpha.gather(1, last)]
    for t in range(1, N):
        m = _finite_or_zero(alpha.amax(dim=1, keepdim=True))  # (B, 1)
        # Full-width product on purpose: slicing trans_exp per step makes autograd allocate a
        # zero (B, L, L) gradient per step, which cost more than the skipped multiply-adds.
        p = (alpha - m).exp().unsqueeze(1)  # (B, 1, L); unreachable vertices give 0
        s = torch.bmm(p, trans_exp).squeeze(1)  # (B, L)
        alpha = safe_log(s) + m + col_max + token_logp[:, :, t]
        at_last.append(alpha.gather(1, last))
    scores = torch.cat(at_last, dim=1)  # (B, N)
    result = scores.gather(1, (target_lens - 1).long().unsqueeze(1)).squeeze(1)
    # A sentence whose every path scores -inf must pass no gradient back (not even finite parts).
    return torch.where(torch.isfinite(result), result, torch.full_like(result, NEG_INF))


@torch.no_grad()
def dag_best_path(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L) long, (B,)
    """The max-product alignment of the target to the DAG (used by glancing, method.md §3-4).

    Same recursion as `dag_log_likelihood` with max in place of logsumexp, then a backtrace from
    (N_b - 1, L_b - 1). Returns `path[b, j]` = index of the target token aligned to vertex j, or -1
    where no token is, and the best path's log score (-inf, with an all -1 path, when none exists).
    """
    _check_dag_args(token_logp, trans_logp, graph_lens, target_lens)
    B, L, N = token_logp.shape
    dtype = torch.float64 if token_logp.dtype == torch.float64 else torch.float32
    token_logp = token_logp.to(dtype)
    trans_logp = trans_logp.to(dtype)
    alpha = token_logp[:, :, 0].clone()
    alpha[:, 1:] = NEG_INF
    last = (graph_lens - 1).long()
    rows = torch.arange(B, device=token_logp.device)
    backs = []  # backs[t - 1][b, j] = best predecessor of vertex j at step t
    at_last = [alpha[rows, last]]
    for t in range(1, N):
        best, arg = (alpha.unsqueeze(2) + trans_logp).max(dim=1)  # (B, L) over source vertex
        alpha = best + token_logp[:, :, t]
        backs.append(arg)
        at_last.append(alpha[rows, last])
    scores = torch.stack(at_last, dim=1)  # (B, N)
    score = scores[rows, (target_lens - 1).long()]
    path = torch.full((B, L), -1, dtype=torch.long, device=token_logp.device)
    ok = torch.isfinite(score)
    vertex = last.clone()
    for t in range(N - 1, 0, -1):
        active = ok & (target_lens - 1 >= t)
        path[rows[active], vertex[active]] = t
        vertex = torch.where(active, backs[t - 1][rows, vertex], vertex)
    path[rows[ok], vertex[ok]] = 0
    return path, score
