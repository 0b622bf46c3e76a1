"""DAG maths of DA-Transformer as pure tensor functions (method.md §3).

Conventions: `token_logp (B, L, N)` holds log P(y_i | v_j) at [b, j, i] (vertex axis before target
axis); `trans_logp (B, L, L)` holds log P(v_k -> v_j) at [b, k, j], -inf unless k < j < L_b.
A path is 0 = a_0 < a_1 < ... < a_{N_b-1} = L_b - 1. Everything runs in float32 (or float64 when
given float64) and is -inf safe: unreachable cells stay -inf and get zero, never NaN, gradients.
"""

from __future__ import annotations

import math

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


# Exactness of the scaled-space matmul (method.md §3). The vertex axis is cut into blocks of
# _BLOCK sources; block b of alpha is scaled by its own max m_b and block b of the transitions by
# its own column max c_bj, so s_bj = sum_{k in b} exp(alpha_k - m_b) exp(E_kj - c_bj) is the block's
# term of column j up to the factor exp(m_b + c_bj). A block sum s_bj >= _TINY is exact to fp32:
# every term that underflows (< 2^-126, at most _BLOCK of them) is below 2^-56 of it. A smaller
# s_bj whose bound exp(m_b + c_bj) * 2 * _TINY is not negligible (within _RELEVANT nats) against
# the column's exact blocks is recomputed in log space (`_exact_blocks`); the others cannot move
# the sum.
_BLOCK = 32
_TINY = 2.0**-64
_RELEVANT = 40.0


def _blocks(L: int) -> tuple[int, int]:
    """(block size, number of blocks) for L vertices."""
    size = min(_BLOCK, L)
    return size, -(-L // size)


def _exact_terms(alpha_blk, trans_blk, idx, shift_m, shift_c):
    """(alpha_k - shift_m) + (E_kj - shift_c) for k in the block of each flagged (b, block, kk, j).

    alpha_blk (B, nb, K, bs), trans_blk (B, nb, bs, L), idx (n, 4), shifts (n,) -> (n, bs). The
    two differences are exact, their sum small: no term passes through a rounded alpha + E."""
    b, blk, kk, j = idx.unbind(1)
    a = alpha_blk[b, blk, kk] - shift_m.unsqueeze(1)
    return a + (trans_blk[b, blk, :, j] - shift_c.unsqueeze(1))


def _block_step(alpha_blk, trans_blk, trans_exp, col_max):
    """ell_j = log sum_k exp(alpha_k + E_kj) of one target step, exact (see _BLOCK).

    alpha_blk (B, nb, K, bs); trans_blk, trans_exp (B, nb, bs, L); col_max (B, nb, 1, L).
    Returns ell (B, K, L) and, for the backward pass, the pivot parts and total (B, K, L) with
    ell = piv_m + piv_c + log(total), the ratio exp(m_b + c_bj - pivot) / total of the blocks
    summed in scaled space (0 elsewhere), (B, nb, K, L), and the (n, 4) index of the blocks summed
    exactly. The pivot is the largest block's m_b + c_bj (+ its log-sum if summed exactly), kept
    in two parts so that no weight passes through the rounding of a large alpha + E.
    """
    B, nb, K, bs = alpha_blk.shape
    L = trans_exp.shape[3]
    m = alpha_blk.amax(dim=3, keepdim=True)  # (B, nb, K, 1)
    p = (alpha_blk - _finite_or_zero(m)).exp()
    s = torch.bmm(p.reshape(B * nb, K, bs), trans_exp.view(B * nb, bs, L)).view(B, nb, K, L)
    scale = m + col_max  # the block's term is s * exp(scale)
    ok = s >= _TINY
    v = torch.where(ok, safe_log(s) + scale, NEG_INF)
    bound = scale + math.log(2 * _TINY)  # log of an upper bound of a block with s < _TINY
    known = v.amax(dim=1, keepdim=True)
    idx = ((~ok) & (bound > known - _RELEVANT) & (bound > NEG_INF)).nonzero()
    at = tuple(idx.unbind(1))
    piv_c = col_max.expand(-1, -1, K, -1)
    if len(idx):  # log sum of the block relative to its own m_b + c_bj
        own_m, own_c = m[at[0], at[1], at[2], 0], col_max[at[0], at[1], 0, at[3]]
        rel_sum = logsumexp_safe(_exact_terms(alpha_blk, trans_blk, idx, own_m, own_c), dim=1)
        v = v.index_put(at, scale[at] + rel_sum)
        piv_c = piv_c.index_put(at, piv_c[at] + _finite_or_zero(rel_sum))
    best = v.argmax(dim=1, keepdim=True)  # (B, 1, K, L)
    piv_m = _finite_or_zero(m.expand(-1, -1, -1, L).gather(1, best))
    piv_c = _finite_or_zero(piv_c.gather(1, best))
    rel = torch.where(ok, ((m - piv_m) + (col_max - piv_c)).exp(), 0.0)
    contrib = s * rel
    piv_m, piv_c = piv_m.squeeze(1), piv_c.squeeze(1)  # (B, K, L)
    if len(idx):
        at_piv = (at[0], at[2], at[3])
        terms = _exact_terms(alpha_blk, trans_blk, idx, piv_m[at_piv], piv_c[at_piv])
        contrib = contrib.index_put(at, terms.exp().sum(dim=1))
    total = contrib.sum(dim=1)  # (B, K, L)
    ell = torch.where(total > 0, piv_m + (piv_c + safe_log(total)), NEG_INF)
    has = (total > 0).unsqueeze(1)
    ratio = torch.where(has, rel / torch.where(has, total.unsqueeze(1), 1.0), 0.0)
    return ell, (piv_m, piv_c, total), ratio, idx


class _ForwardDP(torch.autograd.Function):
    """Forward algorithm with a hand-written backward (method.md §3 alpha, in scaled space).

    Works on K targets per sentence: alpha is (B, K, L) and every step is, per vertex block, a
    (K, bs) @ (bs, L) bmm against the shared exp(E - c); flagged blocks are redone in log space.
    """

    @staticmethod
    def forward(ctx, token_logp, trans_logp, graph_lens, target_lens):  # noqa: D102
        B, K, L, N = token_logp.shape
        bs, nb = _blocks(L)
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        trans_blk = trans_logp.new_full((B, nb * bs, L), NEG_INF)
        trans_blk[:, :L] = trans_logp
        trans_blk = trans_blk.view(B, nb, bs, L)
        col_max = trans_blk.amax(dim=2, keepdim=True)  # (B, nb, 1, L)
        trans_exp = (trans_blk - _finite_or_zero(col_max)).exp()  # (B, nb, bs, L) in [0, 1]
        alpha = token_logp.new_full((B, K, nb * bs), NEG_INF)
        alpha[:, :, 0] = token_logp[:, :, 0, 0]
        last = (graph_lens - 1).view(B, 1, 1).expand(B, K, 1)
        at_last = [alpha.gather(2, last)]
        T = max(N - 1, 0)
        saved = token_logp.new_empty(4, B, K, T, nb * bs) if grad else None  # alpha, parts
        ratios = token_logp.new_empty(B, nb, T, K, L) if grad else None
        flagged = []
        for t in range(1, N):
            a = alpha.view(B, K, nb, bs).transpose(1, 2)  # (B, nb, K, bs)
            ell, parts, ratio, idx = _block_step(a, trans_blk, trans_exp, col_max)
            flagged.append(idx)
            if grad:
                saved[0, :, :, t - 1] = alpha
                for i, part in enumerate(parts, start=1):
                    saved[i, :, :, t - 1, :L] = part
                ratios[:, :, t - 1] = ratio
            alpha = torch.cat([ell + token_logp[:, :, :, t], alpha[:, :, L:]], dim=2)
            at_last.append(alpha.gather(2, last))
        result = torch.cat(at_last, dim=2).gather(2, (target_lens - 1).unsqueeze(2)).squeeze(2)
        ctx.flagged = flagged
        ctx.save_for_backward(trans_blk, trans_exp, saved, ratios, graph_lens, target_lens, result)
        ctx.token_shape = (B, K, L, N)
        return result

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        trans_blk, trans_exp, saved, ratios, graph_lens, target_lens, result = ctx.saved_tensors
        B, K, L, N = ctx.token_shape
        bs, nb = _blocks(L)
        last = (graph_lens - 1).view(B, 1, 1).expand(B, K, 1)
        # A -inf result passes no gradient (and must not: its paths all have probability 0).
        grad_out = torch.where(torch.isfinite(result), grad_out, torch.zeros_like(grad_out))
        grad_token = grad_out.new_zeros(B, K, L, N)
        grad_blk = trans_exp.new_zeros(B, nb, L, bs)  # exactly summed blocks' part, transposed
        probs = trans_exp.new_empty(B, nb, bs, max(N - 1, 0), K)  # exp(alpha_{t-1} - m_b)
        d_alpha = grad_out.new_zeros(B, K, L)
        ds_all = torch.empty_like(ratios)  # dZ/ds_t
        trans_exp_t = trans_exp.view(B * nb, bs, L).transpose(1, 2)
        for t in range(N - 1, -1, -1):
            ends_here = target_lens - 1 == t  # (B, K)
            d_alpha.scatter_add_(
                2, last, torch.where(ends_here, grad_out, torch.zeros_like(grad_out)).unsqueeze(2)
            )
            grad_token[:, :, :, t] = d_alpha
            if t == 0:
                break
            ds = ds_all[:, :, t - 1]  # (B, nb, K, L)
            torch.mul(ratios[:, :, t - 1], d_alpha.unsqueeze(1), out=ds)
            a = saved[0, :, :, t - 1].view(B, K, nb, bs).transpose(1, 2)  # (B, nb, K, bs)
            p = (a - _finite_or_zero(a.amax(dim=3, keepdim=True))).exp()
            probs[:, :, :, t - 1] = p.transpose(2, 3)
            d_prev = torch.bmm(ds.reshape(B * nb, K, L), trans_exp_t).view(B, nb, K, bs) * p
            idx = ctx.flagged[t - 1]
            if len(idx):  # exactly summed blocks: weights exp(alpha_k + E_kj - ell_j)
                b, blk, kk, j = idx.unbind(1)
                piv_m, piv_c, total = saved[1:, b, kk, t - 1, j]
                w = _exact_terms(a, trans_blk, idx, piv_m, piv_c).exp()  # (n, bs)
                w = w * (d_alpha[b, kk, j] / torch.where(total > 0, total, 1.0)).unsqueeze(1)
                d_prev.index_put_((b, blk, kk), w, accumulate=True)
                grad_blk.index_put_((b, blk, j), w, accumulate=True)
            d_alpha = d_prev.transpose(1, 2).reshape(B, K, nb * bs)[:, :, :L]
        grad_token[:, :, 1:, 0] = 0  # alpha_0 only reads M[0, 0]
        grad_trans = trans_exp * torch.bmm(
            probs.view(B * nb, bs, -1), ds_all.view(B * nb, -1, L)
        ).view(B, nb, bs, L)
        grad_trans = grad_trans + grad_blk.transpose(2, 3)
        return grad_token, grad_trans.view(B, nb * bs, L)[:, :L], None, None


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
