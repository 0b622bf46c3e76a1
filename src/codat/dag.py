"""DAG maths of DA-Transformer as pure tensor functions (method.md §3).

Conventions: `token_logp (B, L, N)` holds log P(y_i | v_j) at [b, j, i] (vertex axis before target
axis); `trans_logp (B, L, L)` holds log P(v_k -> v_j) at [b, k, j], -inf unless k < j < L_b
(the likelihood ignores the entries with k >= j, which no forward path uses).
A path is 0 = a_0 < a_1 < ... < a_{N_b-1} = L_b - 1. Everything runs in float32 (or float64 when
given float64) and is -inf safe: unreachable cells stay -inf and get zero, never NaN, gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
# term of column j up to the factor exp(m_b + c_bj). Both factors are lifted by e^_LIFT and cut
# below e^_CUT of their own scale, so every product in the bmm lies in [e^-87, e^83], a normal
# float32 (subnormal products make a CPU bmm up to 10x slower). A term is cut only if one of its
# factors is, so it is below e^_CUT and a block misses less than _BLOCK e^_CUT: a block sum
# s_bj >= e^_LOG_TINY is exact to fp32 (the missed part is below 2^-25 of it). A smaller s_bj whose
# bound exp(m_b + c_bj) * 2 e^_LOG_TINY is not negligible (within _RELEVANT nats, which covers
# 2^-24 / nb) against the column's largest exact block is recomputed in log space; the others
# cannot move the sum. The columns j up to the first vertex k0 with a finite alpha have no finite
# term at all (transitions run forward, k < j): they are -inf and never recomputed.
# alpha is kept relative to a running shift (its max is 0 after every step, the shift is summed in
# float64), so the weights exp(m_b + c_bj - ell_j) of the backward pass are computed from numbers
# of the size of alpha's spread within one step, not of the whole log-likelihood.
_BLOCK = 32
_LIFT = 41.5
_CUT = -85.0
_LOG_TINY = _CUT + math.log(_BLOCK) + 25 * math.log(2.0)
_RELEVANT = 30.0
_EXP_FLOOR = -87.0  # exp below this is subnormal or 0 in float32
_FLT_MIN = torch.finfo(torch.float32).tiny  # the smallest normal float32, e^-87.3


def _blocks(L: int) -> tuple[int, int]:
    """(block size, number of blocks) for L vertices: as few blocks of at most _BLOCK as cover
    L, as even as can be (240 = 8 x 30: no padding vertex to fill and skip)."""
    nb = -(-L // _BLOCK)
    return -(-L // nb), nb


def _log_space_cells(a_blk, trans_blk, flat):
    """The cells recomputed in log space, by their flat indices `flat` (n,) into (B, nb, K, L):
    terms (n, bs) = alpha_k + E_kj over the block's sources k (alpha relative to the step's
    shift), the cells' (b, block, kk) rows of (B * nb * K, bs), their (b, block) indices of
    (B * nb, ...) and their columns j."""
    B, nb, K, bs = a_blk.shape
    L = trans_blk.shape[3]
    row, j = flat // L, flat % L
    bb = row // K
    terms = a_blk.reshape(B * nb * K, bs).index_select(0, row)
    return terms.add_(trans_blk.view(B * nb, bs, L)[bb, :, j]), row, bb, j


def _exp_floor(x: torch.Tensor, floor: float = _EXP_FLOOR) -> torch.Tensor:
    """exp(x), with 0 where x < floor + 1e-5 (floor >= _EXP_FLOOR); in place on x.

    Vectorised exp is ~100x slower on inputs whose result underflows (and on -inf) than on normal
    ones, so the small ones are clamped first and zeroed after, by value (a float threshold is
    ~4x faster than a boolean mask on a CPU): they are below e^floor, which every caller treats
    as negligible, as it does anything within 1e-5 relative of it."""
    return F.threshold_(x.clamp_min_(floor).exp_(), math.exp(floor) * (1.0 + 1e-5), 0.0)


def _block_step(a_blk, m, trans_blk, trans_exp, col_max, p, ell):
    """ell_j = log sum_k exp(alpha_k + E_kj) of one target step, exact (see _BLOCK).

    a_blk (B, nb, K, bs) holds alpha by vertex block, m (B, nb, K, 1) its block maxima;
    trans_blk (B, nb, bs, L); trans_exp the lifted e^_LIFT exp(E - c_bj), cut at e^_CUT;
    col_max (B, nb, 1, L). Writes the lifted block exponentials e^_LIFT exp(alpha_k - m_b) into
    p (B, nb, K, bs) and ell into ell (B, K, L); returns the blocks summed in log space (or ()
    when there are none) for the backward pass: their rows of (B * nb * K, bs), their (b, block)
    indices of (B * nb, ...), their b, kk and j, kk * L + j, and their terms alpha_k + E_kj (n, bs).
    """
    B, nb, K, bs = a_blk.shape
    L = trans_exp.shape[3]
    _exp_floor(torch.sub(a_blk, m.nan_to_num(neginf=0.0) - _LIFT, out=p), _LIFT + _CUT)
    # s = e^(2 _LIFT) * sum_k exp(alpha_k - m_b) exp(E_kj - c_bj), both factors cut at e^_CUT
    s = torch.bmm(p.view(B * nb, K, bs), trans_exp.view(B * nb, bs, L)).view(B, nb, K, L)
    scale = torch.add(col_max, m - 2 * _LIFT)  # the block's term is s * exp(scale)
    tiny = math.exp(_LOG_TINY + 2 * _LIFT)
    inexact = s < tiny
    # In place on s: exact block values, and for an inexact block its bound log(tiny) + scale
    # (log(0) is slow, so nothing below tiny is logged). An inexact block is redone in log space
    # if its bound is within the relevance margin of the column's top (the rule of _BLOCK); the
    # others are negligible and keep their bound (their sum moves ell by < nb e^-30 relative).
    # The top may itself be a bound that, redone, drops: hence the loop, which ends when every
    # bound left is negligible against a top that is exact. Columns j up to the first vertex
    # with a finite alpha have no term at all: they are -inf and never redone.
    v = s.clamp_min_(tiny).log_().add_(scale)
    finite = a_blk > NEG_INF  # alpha is finite or -inf
    first = finite.transpose(1, 2).reshape(B, K, nb * bs).byte().argmax(dim=2)
    dead = (torch.arange(L, device=v.device) <= first.unsqueeze(2)).unsqueeze(1)  # (B, 1, K, L)
    margin = _RELEVANT + math.log(2.0)
    top = v.amax(dim=1, keepdim=True)
    redo = (v > (top - margin).masked_fill_(dead, math.inf)).logical_and_(inexact)
    flat = redo.view(-1).nonzero().squeeze(1)
    parts = []
    while flat.numel():
        terms, row, bb, j = _log_space_cells(a_blk, trans_blk, flat)
        v.view(-1)[flat] = torch.logsumexp(terms, dim=1)  # -inf if all terms are
        inexact.view(-1)[flat] = False
        b, kk = bb // nb, row % K
        kl = kk * L + j
        parts.append((row, bb, b, kk, j, kl, terms))
        # Only the columns just redone can have a new top: they are checked again, gathered
        # ((n, nb) each; dead columns are never redone).
        v_cols = v.view(B, nb, K * L)[b, :, kl]
        top_cols = v_cols.amax(dim=1)
        top.view(B, K * L)[b, kl] = top_cols
        more = v_cols > (top_cols - margin).unsqueeze(1)
        cell, blk = more.logical_and_(inexact.view(B, nb, K * L)[b, :, kl]).nonzero(as_tuple=True)
        flat = torch.unique((b[cell] * nb + blk) * (K * L) + kl[cell])  # into (B, nb, K, L)
    top = top.squeeze(1)
    total = v.sub_(top.nan_to_num(neginf=0.0).unsqueeze(1)).clamp_min_(_EXP_FLOOR).exp_()
    torch.sum(total, dim=1, out=ell).log_().add_(top)  # -inf where top is (total >= e^-87 > 0)
    ell.masked_fill_(dead.squeeze(1), NEG_INF)
    if len(parts) > 1:
        return tuple(torch.cat(field) for field in zip(*parts, strict=True))
    return parts[0] if parts else ()


class _ForwardDP(torch.autograd.Function):
    """Forward algorithm with a hand-written backward (method.md §3 alpha, in scaled space).

    Works on K targets per sentence: alpha is (B, K, L) and every step is, per vertex block, a
    (K, bs) @ (bs, L) bmm against the shared exp(E - c); flagged blocks are redone in log space.
    """

    @staticmethod
    def forward(ctx, token_logp, trans_logp, graph_lens, target_lens):  # noqa: D102
        with torch.autocast(token_logp.device.type, enabled=False):  # bmm in float32, always
            return _ForwardDP._forward(ctx, token_logp, trans_logp, graph_lens, target_lens)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        with torch.autocast(grad_out.device.type, enabled=False):
            return _ForwardDP._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, token_logp, trans_logp, graph_lens, target_lens):
        B, K, L, N = token_logp.shape
        bs, nb = _blocks(L)
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        backward = torch.ones(L, L, dtype=torch.bool, device=trans_logp.device).tril_()
        if nb * bs == L:
            trans_blk = trans_logp.masked_fill(backward, NEG_INF)  # k < j only
        else:
            trans_blk = trans_logp.new_full((B, nb * bs, L), NEG_INF)
            trans_blk[:, :L] = trans_logp.masked_fill(backward, NEG_INF)
        trans_blk = trans_blk.view(B, nb, bs, L)
        col_max = trans_blk.amax(dim=2, keepdim=True)  # (B, nb, 1, L)
        lifted = trans_blk - (col_max.nan_to_num(neginf=0.0) - _LIFT)
        trans_exp = _exp_floor(lifted, _LIFT + _CUT)  # e^_LIFT exp(E - c), (B, nb, bs, L)
        # a_t = alpha_t - shift_t, vertices padded to nb * bs with -inf: the last two steps' (the
        # backward pass reads p, m, ell and the log-space cells). The per-step buffers: every
        # step's for the backward pass, else one.
        steps = min(N, 2)
        a_all = token_logp.new_full((B, steps, K, nb * bs), NEG_INF)
        tops = token_logp.new_empty((B, K, N))  # shift_t - shift_(t-1): the max of alpha_t
        at_last = token_logp.new_empty((B, K, N))  # a_t at vertex L_b - 1
        last = (graph_lens - 1).view(B, 1, 1).expand(B, K, 1)
        start = token_logp[:, :, 0, 0]
        tops[:, :, 0] = start.nan_to_num(neginf=0.0)
        a_all[:, 0, :, 0] = start - tops[:, :, 0]
        torch.gather(a_all[:, 0], 2, last, out=at_last[:, :, :1])
        by_step = token_logp.permute(3, 0, 1, 2).contiguous()  # (N, B, K, L): a read per step
        T = max(N - 1, 0)
        kept = T if grad else min(T, 1)
        ell_all = token_logp.new_empty(B, kept, K, L)
        m_all = token_logp.new_empty(B, nb, kept, K, 1)
        probs = token_logp.new_empty(B, nb, kept, K, bs)  # e^_LIFT exp(alpha - m_b)
        log_cells = []  # each step's blocks summed in log space (_block_step), for the backward
        for t in range(1, N):
            i = t - 1 if grad else 0  # this step's slot in the per-step buffers
            a_blk = a_all[:, (t - 1) % steps].view(B, K, nb, bs).transpose(1, 2)  # (B, nb, K, bs)
            m = torch.amax(a_blk, dim=3, keepdim=True, out=m_all[:, :, i])
            ell, p = ell_all[:, i], probs[:, :, i]
            cells = _block_step(a_blk, m, trans_blk, trans_exp, col_max, p, ell)
            if grad:  # the backward pass reuses the log-space cells
                log_cells.append(cells)
            alpha = ell + by_step[t]
            top = torch.amax(alpha, dim=2, out=tops[:, :, t]).nan_to_num_(neginf=0.0)
            a_t = a_all[:, t % steps]
            torch.sub(alpha, top.unsqueeze(2), out=a_t[:, :, :L])
            torch.gather(a_t, 2, last, out=at_last[:, :, t : t + 1])
        # alpha_t at vertex L_b - 1: a_t there plus the shift, summed in float64
        ends = at_last.double().add_(tops.double().cumsum_(dim=2))
        result = ends.gather(2, (target_lens - 1).unsqueeze(2)).squeeze(2).to(token_logp.dtype)
        ctx.log_cells = log_cells
        dp_state = (trans_exp, col_max, ell_all, m_all, probs)
        ctx.save_for_backward(*dp_state, graph_lens, target_lens, result)
        ctx.token_shape = (B, K, L, N)
        return result

    @staticmethod
    def _backward(ctx, grad_out):
        trans_exp, col_max, ell_all, m_all, probs = ctx.saved_tensors[:5]
        graph_lens, target_lens, result = ctx.saved_tensors[5:]
        B, K, L, N = ctx.token_shape
        bs, nb = _blocks(L)
        T = max(N - 1, 0)
        last = (graph_lens - 1).view(B, 1, 1).expand(B, K, 1)
        # A -inf result passes no gradient (and must not: its paths all have probability 0).
        grad_out = torch.where(torch.isfinite(result), grad_out, torch.zeros_like(grad_out))
        grad_steps = grad_out.new_empty(N, B, K, L)  # dZ/dalpha_t, as grad_token[..., t]
        ell_inf = ell_all.nan_to_num(neginf=float("inf"))  # weight 0 in -inf columns
        logged = []  # the log-space blocks' weights: (b * nb + block, j, w (n, bs)) of each step
        ds_all = trans_exp.new_empty(B, nb, T, K, L)  # dZ/ds_bj of every step
        d_alpha = grad_out.new_zeros(B, K, L)
        trans_exp_t = trans_exp.view(B * nb, bs, L).transpose(1, 2)
        for t in range(N - 1, -1, -1):
            ends_here = target_lens - 1 == t  # (B, K)
            d_alpha.scatter_add_(
                2, last, torch.where(ends_here, grad_out, torch.zeros_like(grad_out)).unsqueeze(2)
            )
            grad_steps[t] = d_alpha
            if t == 0:
                break
            m = m_all[:, :, t - 1]  # (B, nb, K, 1)
            ell = ell_inf[:, t - 1].unsqueeze(1)
            ds = ds_all[:, :, t - 1]  # (B, nb, K, L): exp(m_b + c_bj - ell_j) * dZ/dell_j
            # e^-_LIFT exp(m_b + c_bj - ell_j) dZ/dell_j, times the lifted exp(E - c) in the bmm;
            # a weight below e^(_EXP_FLOOR + _LIFT) moves less than e^-42 of column j: cut
            _exp_floor(torch.sub(col_max, ell, out=ds).add_(m - _LIFT)).mul_(d_alpha.unsqueeze(1))
            if ds.dtype == torch.float32:  # no subnormal inputs: they make a CPU bmm ~100x slower
                torch.ops.aten.hardshrink.out(ds, _FLT_MIN, out=ds)  # 0 where |ds| <= _FLT_MIN
            cells = ctx.log_cells[t - 1]
            if cells:  # these blocks' weights come from log space below
                row, bb, b, kk, j, kl, terms = cells
                ds.view(B * nb, K * L).index_put_((bb, kl), ds.new_zeros(()))
            p = probs[:, :, t - 1]  # (B, nb, K, bs)
            d_prev = torch.bmm(ds.reshape(B * nb, K, L), trans_exp_t).view(B, nb, K, bs)
            d_prev.mul_(p).mul_(math.exp(-_LIFT))  # p is lifted too
            if cells:  # log-space blocks: weights exp(alpha_k + E_kj - ell_j)
                # (ell is +inf, weight 0, where it was -inf)
                w = (terms - ell[:, 0][b, kk, j].unsqueeze(1)).exp_()
                w.mul_(d_alpha[b, kk, j].unsqueeze(1))
                d_prev.view(-1, bs).index_add_(0, row, w)
                logged.append((bb, j, w))
            d_alpha = d_prev.transpose(1, 2).reshape(B, K, nb * bs)[:, :, :L]
        grad_steps[0, :, :, 1:] = 0  # alpha_0 only reads M[0, 0]
        grad_token = grad_steps.permute(1, 2, 3, 0).contiguous()  # (B, K, L, N)
        grad_trans = torch.bmm(
            probs.view(B * nb, -1, bs).transpose(1, 2), ds_all.view(B * nb, -1, L)
        ).view(B, nb, bs, L)
        grad_trans.mul_(trans_exp).mul_(math.exp(-_LIFT))  # p, exp(E - c) lifted; ds has e^-_LIFT
        if logged:
            bb, j, w = (torch.cat(x) for x in zip(*logged, strict=True))
            # (the transpose makes each (bb, :, j) a row in the indexing; a view of grad_trans)
            grad_trans.view(B * nb, bs, L).transpose(1, 2).index_put_((bb, j), w, accumulate=True)
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
