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
    The inner sum is a log-space matrix product, exp(alpha - max) @ exp(E - colmax): one batched
    mat-vec per target step. The backward pass runs the reverse recurrence on (B, L) vectors and
    forms the whole transition gradient in one batched matmul, so memory is O(B * (L^2 + N * L)).
    Sentences with no path (L_b < N_b, or only -inf paths) get -inf and zero gradients.
    """
    _check_dag_args(token_logp, trans_logp, graph_lens, target_lens)
    return dag_log_likelihood_shared(
        token_logp.unsqueeze(1), trans_logp, graph_lens, target_lens.unsqueeze(1)
    ).squeeze(1)


def dag_log_likelihood_shared(
    token_logp: torch.Tensor,  # (B, K, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B, K)
) -> torch.Tensor:  # (B, K)
    """`dag_log_likelihood` of K targets per sentence that share one DAG (CoDAT's samples).

    `token_logp[b, k, j, i]` = log P(y^k_i | v_j). The K forward vectors of a sentence form a
    (K, L) matrix, so each target step is one batched matmul against the shared exp(E): the
    transitions are never copied K times, and their gradient sums over the K targets.
    """
    if token_logp.dim() != 4 or trans_logp.dim() != 3:
        raise ValueError(
            f"expected token_logp (B, K, L, N) and trans_logp (B, L, L), got "
            f"{tuple(token_logp.shape)} and {tuple(trans_logp.shape)}"
        )
    B, K, L, N = token_logp.shape
    if target_lens.shape != (B, K):
        raise ValueError(f"target_lens shape {tuple(target_lens.shape)} != {(B, K)}")
    if trans_logp.shape != (B, L, L) or graph_lens.shape != (B,):
        raise ValueError(
            f"trans_logp {tuple(trans_logp.shape)} and graph_lens {tuple(graph_lens.shape)} must "
            f"be {(B, L, L)} and ({B},)"
        )
    if B and (int(graph_lens.min()) < 1 or int(graph_lens.max()) > L):
        raise ValueError(f"graph_lens must lie in [1, {L}], got {graph_lens.tolist()}")
    if B and K and (int(target_lens.min()) < 1 or int(target_lens.max()) > N):
        raise ValueError(f"target_lens must lie in [1, {N}], got {target_lens.tolist()}")
    dtype = torch.float64 if token_logp.dtype == torch.float64 else torch.float32
    return _ForwardDP.apply(
        token_logp.to(dtype), trans_logp.to(dtype), graph_lens.long(), target_lens.long()
    )


class _ForwardDP(torch.autograd.Function):
    """Forward algorithm with a hand-written backward (method.md §3 alpha/beta, in scaled space).

    Works on K targets per sentence: alpha is (B, K, L) and every step is a (K, L) @ (L, L) bmm.
    """

    @staticmethod
    def forward(ctx, token_logp, trans_logp, graph_lens, target_lens):  # noqa: D102
        B, K, L, N = token_logp.shape
        last = (graph_lens - 1).view(B, 1, 1).expand(B, K, 1)
        # Column-wise stabiliser: exp(E - colmax) has a 1 in every reachable column.
        col_max = _finite_or_zero(trans_logp.amax(dim=1)).unsqueeze(1)  # (B, 1, L)
        trans_exp = (trans_logp - col_max).exp()  # (B, L, L) in [0, 1]
        alpha = torch.full((B, K, L), NEG_INF, dtype=token_logp.dtype, device=token_logp.device)
        alpha[:, :, 0] = token_logp[:, :, 0, 0]
        at_last = [alpha.gather(2, last)]
        p_all = token_logp.new_zeros(B, K, max(N - 1, 0), L)  # p_t = exp(alpha_{t-1} - m_t)
        s_all = token_logp.new_zeros(B, K, max(N - 1, 0), L)  # s_t = p_t @ exp(E - colmax)
        for t in range(1, N):
            m = _finite_or_zero(alpha.amax(dim=2, keepdim=True))  # (B, K, 1)
            p = (alpha - m).exp()  # (B, K, L); unreachable vertices give 0
            s = torch.bmm(p, trans_exp)  # (B, K, L)
            alpha = safe_log(s) + m + col_max + token_logp[:, :, :, t]
            p_all[:, :, t - 1], s_all[:, :, t - 1] = p, s
            at_last.append(alpha.gather(2, last))
        result = torch.cat(at_last, dim=2).gather(2, (target_lens - 1).unsqueeze(2)).squeeze(2)
        ctx.save_for_backward(trans_exp, p_all, s_all, graph_lens, target_lens, result)
        ctx.token_shape = (B, K, L, N)
        return result

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        trans_exp, p_all, s_all, graph_lens, target_lens, result = ctx.saved_tensors
        B, K, L, N = ctx.token_shape
        last = (graph_lens - 1).view(B, 1, 1).expand(B, K, 1)
        # A -inf result passes no gradient (and must not: its paths all have probability 0).
        grad_out = torch.where(torch.isfinite(result), grad_out, torch.zeros_like(grad_out))
        grad_token = torch.zeros(B, K, L, N, dtype=trans_exp.dtype, device=trans_exp.device)
        grad_s_all = torch.zeros_like(s_all)  # dZ/ds_t
        d_alpha = torch.zeros(B, K, L, dtype=trans_exp.dtype, device=trans_exp.device)
        trans_exp_t = trans_exp.transpose(1, 2)
        for t in range(N - 1, -1, -1):
            ends_here = target_lens - 1 == t  # (B, K)
            d_alpha.scatter_add_(
                2, last, torch.where(ends_here, grad_out, torch.zeros_like(grad_out)).unsqueeze(2)
            )
            grad_token[:, :, :, t] = d_alpha
            if t == 0:
                break
            s = s_all[:, :, t - 1]
            ds = torch.where(s > 0, d_alpha / torch.where(s > 0, s, torch.ones_like(s)), 0.0)
            grad_s_all[:, :, t - 1] = ds
            d_alpha = torch.bmm(ds, trans_exp_t) * p_all[:, :, t - 1]  # (B, K, L)
        grad_token[:, :, 1:, 0] = 0  # alpha_0 only reads M[0, 0]
        # dZ/dE[k, j] = exp(E - colmax)[k, j] * sum_{targets, t} p_t[k] * ds_t[j]: one bmm.
        grad_trans = trans_exp * torch.bmm(
            p_all.reshape(B, -1, L).transpose(1, 2), grad_s_all.reshape(B, -1, L)
        )
        return grad_token, grad_trans, None, None


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
