"""Training objectives as pure functions of tensors."""

from __future__ import annotations

import torch

from codat.dag import dag_log_likelihood, dag_log_likelihood_shared


def log_softmax_fp32(logits: torch.Tensor) -> torch.Tensor:  # (..., V)
    """log_softmax over the last axis in at least float32 (float32 under bf16 autocast; float64
    stays float64)."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def chunk_rows(vocab: int) -> int:
    """Rows of (R, V) logits that `_TokenLogp` converts to float32 at once: about 1 MB of float32
    per thread (32 rows of an 8k vocabulary), so that the chunk stays in cache."""
    return max(1, (1 << 18) * torch.get_num_threads() // vocab)


def _chunked_token_logp(
    logits: torch.Tensor,  # (R, V)
    index: torch.Tensor,  # (R, M) long
    *,
    row_max: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # (R, M), (R, 1), (R,) or None
    """log_softmax(logits)[r, index[r, m]] = logits[r, index] - lse_r, `chunk_rows` rows at a
    time, in at least float32; also the log-normalisers lse_r = log sum_v exp(logits[r, v]) (for
    the backward pass) and with `row_max` the largest log-prob of each row, max_v logits - lse_r.
    Per chunk: one copy into a reused float32 buffer, its row maxima, and exp / sum / log in
    place (torch's log_softmax would also write the (rows, V) log-probs; the gather reads the
    logits instead). A row's largest log-prob and the log-prob of a token that attains it are
    the same float: `top == logp` finds the argmax tokens exactly."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    R, V = logits.shape
    out = torch.empty(index.shape, dtype=dtype, device=logits.device)
    lse = torch.empty(R, 1, dtype=dtype, device=logits.device)
    top = torch.empty(R, dtype=dtype, device=logits.device) if row_max else None
    step = chunk_rows(V)
    buf = torch.empty(min(step, R), V, dtype=dtype, device=logits.device)
    for s in range(0, R, step):
        e = min(s + step, R)
        chunk = buf[: e - s].copy_(logits[s:e])
        m = chunk.amax(dim=-1, keepdim=True)
        picked = chunk.gather(-1, index[s:e])
        norm = chunk.sub_(m).exp_().sum(dim=-1, keepdim=True).log_().add_(m)
        lse[s:e] = norm
        torch.sub(picked, norm, out=out[s:e])
        if top is not None:
            torch.sub(m.squeeze(1), norm.squeeze(1), out=top[s:e])
    return out, lse, top


class _TokenLogp(torch.autograd.Function):
    """log_softmax(logits)[r, index[r, m]] of (R, V) logits in at least float32, and its exact
    gradient d logits[r] = scatter_add(g[r]) - softmax(logits[r]) * sum_m g[r, m], both computed
    `chunk_rows` rows at a time (softmax = exp(logits - lse) from the forward's log-normalisers),
    the gradient rounded once to the logits' dtype: no (B, L, V) float32 tensor is ever made."""

    @staticmethod
    def forward(ctx, logits, index):  # (R, V), (R, M) long -> (R, M)
        out, lse, _ = _chunked_token_logp(logits, index, row_max=False)
        ctx.save_for_backward(logits, index, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # (R, M)
        logits, index, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        total = grad.sum(-1, keepdim=True).neg_()  # (R, 1)
        R, V = logits.shape
        step = chunk_rows(V)
        buf = torch.empty(min(step, R), V, dtype=grad.dtype, device=grad.device)
        for s in range(0, R, step):
            e = min(s + step, R)
            p = torch.sub(logits[s:e], lse[s:e], out=buf[: e - s]).exp_()
            out[s:e] = p.mul_(total[s:e]).scatter_add_(-1, index[s:e], grad[s:e])
        return out, None


@torch.no_grad()
def token_logp_and_max(
    token_logits: torch.Tensor,  # (B, L, V)
    tgt_ids: torch.Tensor,  # (B, N)
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L, N), (B, L) float32
    """Without grad: `gather_token_logp`'s values (float32 log-softmax, in cache-sized row
    chunks) and each vertex's largest log-prob (a token whose log-prob is below it is not the
    argmax: `glancing.argmax_hits`'s candidates), in one pass over the logits: no (B, L, V)
    log-probs, in the logits' dtype or float32, are made."""
    B, L, V = token_logits.shape
    N = tgt_ids.shape[1]
    index = tgt_ids.unsqueeze(1).expand(B, L, N).reshape(B * L, N)
    out, _, top = _chunked_token_logp(token_logits.reshape(B * L, V), index, row_max=True)
    return out.view(B, L, N), top.view(B, L)


def gather_token_logp(
    token_logits: torch.Tensor,  # (B, L, V)
    tgt_ids: torch.Tensor,  # (B, N)
    *,
    fused: bool = True,
) -> torch.Tensor:  # (B, L, N) at least float32
    """log P(y_i | v_j) at [b, j, i], in at least float32 (float64 stays float64).

    fused (the default): `_TokenLogp`, which computes the log-softmax and its gradient in
    cache-sized row chunks and keeps only the gathered (B, L, N) values: on CPU the float32
    (B, L, V) log-probs and their backward were a fifth of a bf16 DAT training step.
    fused=False: the plain way, log_softmax of a float32 copy, then the gather. Same values; the
    gradients agree up to float32 rounding.
    """
    B, L, V = token_logits.shape
    N = tgt_ids.shape[1]
    index = tgt_ids.unsqueeze(1).expand(B, L, N)
    if not fused:
        return log_softmax_fp32(token_logits).gather(-1, index)
    out = _TokenLogp.apply(token_logits.reshape(B * L, V), index.reshape(B * L, N))
    return out.view(B, L, N)


def dag_nll(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> tuple[torch.Tensor, torch.Tensor, int]:  # scalar, (B,), int
    """DAT's DP loss (CoDAT eq. (3)): mean over sentences of -log P(Y|X) / N_b.

    Sentences with no path (L_b < N_b) contribute 0 and are counted as invalid, as in DAT. Any
    other non-finite sentence is a numerical failure and is never hidden: it makes the loss
    non-finite, so the training loop skips and counts the step. Returns the loss, the
    per-sentence length-normalised loss and the number of invalid (no-path) sentences.
    """
    ll = dag_log_likelihood(token_logp, trans_logp, graph_lens, target_lens)
    invalid = (graph_lens < target_lens) & ~torch.isfinite(ll)
    per_sentence = -torch.where(invalid, torch.zeros_like(ll), ll) / target_lens.to(ll.dtype)
    return per_sentence.mean(), per_sentence.detach(), int(invalid.sum())


def sample_targets(
    tokens: torch.Tensor,  # (B, K, T) output ids, pad_id-padded
    lengths: torch.Tensor,  # (B, K)
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, K, T + 2), (B, K)
    """Encode hypotheses exactly as references are encoded for the DP: <s> y </s>."""
    B, K, T = tokens.shape
    pos = torch.arange(T + 2, device=tokens.device)
    n = lengths.unsqueeze(-1)
    body = torch.cat(
        [tokens.new_full((B, K, 1), bos_id), tokens, tokens.new_full((B, K, 1), pad_id)], -1
    )
    out = body.masked_fill(pos == n + 1, eos_id).masked_fill(pos > n + 1, pad_id)
    return out, lengths + 2


def samples_log_q(
    token_logp_vocab: torch.Tensor,  # (B, L, V) float32 log-probs of the un-glanced DAG
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    targets: torch.Tensor,  # (B, K, N) <s> y </s> ids
    target_lens: torch.Tensor,  # (B, K)
) -> torch.Tensor:  # (B, K)
    """log q(y'_k | x) / |y'_k|: the DAG marginal of each sample (the DP over all paths, not only
    the sampled one), normalised by target length exactly as the DP loss is (method.md §9.6).
    The K samples of a sentence share its transitions (`dag_log_likelihood_shared`)."""
    B, L, _ = token_logp_vocab.shape
    _, K, N = targets.shape
    tok = token_logp_vocab.gather(-1, targets.reshape(B, 1, K * N).expand(B, L, K * N))
    return gathered_samples_log_q(tok, trans_logp, graph_lens, target_lens)


def gathered_samples_log_q(
    token_logp: torch.Tensor,  # (B, L, K * N) log P(targets[b, k, i] | v_j) at [b, j, k * N + i]
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B, K)
) -> torch.Tensor:  # (B, K)
    """`samples_log_q` from the samples' token log-probs already gathered (e.g. by
    `gather_token_logp` of the flattened targets)."""
    B, L, KN = token_logp.shape
    K = target_lens.shape[1]
    tok = token_logp.view(B, L, K, KN // K).permute(0, 2, 1, 3)  # (B, K, L, N)
    ll = dag_log_likelihood_shared(tok, trans_logp, graph_lens, target_lens)
    return ll / target_lens.to(ll.dtype)


def _finite_only(
    scores: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop samples whose score is not finite (no path of their length): they pass no gradient."""
    finite = torch.isfinite(scores)
    mask = finite if mask is None else mask & finite
    return mask, torch.where(mask, scores, torch.zeros_like(scores))


def contrastive_loss(
    scores: torch.Tensor,  # (B, K) length-normalised log q of each kept sample
    rewards: torch.Tensor,  # (B, K)
    *,
    margin: float,
    mask: torch.Tensor | None = None,  # (B, K) bool: samples that take part
    tie: float = 0.0,
) -> torch.Tensor:  # scalar
    """CoDAT's ranking constraints (eq. 10), all pairs at once.

    Rank the samples of a sentence by reward, best first (rank 0). For every pair (i, j) where i
    is better (R_i - R_j > `tie`) the constraint is s_i >= s_j + (rank_j - rank_i) * margin, and
    its loss max(0, s_j - s_i + (rank_j - rank_i) * margin). This is the paper's
    L_ij = max(0, -log q(y_i) + log q(y_j) + (i - j) eps) with the paper's worst-first indices
    turned into best-first ranks. Pairs within `tie` (e.g. duplicate samples) and masked samples
    take no part. Returns the mean over all constrained pairs (0 when there are none).
    """
    if scores.shape != rewards.shape or scores.dim() != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and rewards {tuple(rewards.shape)} must match (B, K)"
        )
    mask, scores = _finite_only(scores, mask)
    # Best-first ranks among the sentence's participating samples (stable for equal rewards).
    key = torch.where(mask, rewards.double(), float("-inf"))
    order = key.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    gap = (rank.unsqueeze(1) - rank.unsqueeze(2)).to(scores.dtype)  # [b, i, j] = rank_j - rank_i
    better = (rewards.unsqueeze(2) - rewards.unsqueeze(1)) > tie  # [b, i, j]: i beats j
    pair = better & mask.unsqueeze(2) & mask.unsqueeze(1)
    violation = scores.unsqueeze(1) - scores.unsqueeze(2) + gap * margin  # s_j - s_i + gap * eps
    loss = torch.relu(violation) * pair
    return loss.sum() / pair.sum().clamp(min=1)


def reinforce_loss(
    log_q: torch.Tensor,  # (B, K) log q of samples (with grad)
    rewards: torch.Tensor,  # (B, K)
    baseline: torch.Tensor,  # (B,) e.g. the mean reward of all K samples
    *,
    mask: torch.Tensor | None = None,  # (B, K) bool
) -> torch.Tensor:  # scalar
    """The "+Reward" objective (paper §3.1, Appendix A): minimise -E_q[R], by REINFORCE with a
    baseline: -mean over samples of (R_k - baseline) * log q(y_k)."""
    mask, log_q = _finite_only(log_q, mask)
    advantage = (rewards - baseline.unsqueeze(1)).to(log_q.dtype).detach()
    terms = -(advantage * log_q) * mask
    return terms.sum() / mask.sum().clamp(min=1)


def sample_loss(
    scores: torch.Tensor,  # (b, k) length-normalised log q of the chosen samples, with grad
    rewards: torch.Tensor,  # (b, k) their rewards
    distinct: torch.Tensor,  # (b, k) bool: False for duplicates
    baseline: torch.Tensor,  # (b,) mean reward of all K samples of each sentence
    *,
    objective: str,  # "codat" or "reward"
    margin: float,
    tie: float,
) -> torch.Tensor:  # scalar
    """CoDAT's extra term on the chosen samples: the ranking constraints of eq. (10) over the
    distinct samples (`codat`), or REINFORCE with the mean-reward baseline (`reward`)."""
    if objective == "codat":
        return contrastive_loss(scores, rewards, margin=margin, mask=distinct, tie=tie)
    if objective == "reward":
        return reinforce_loss(scores, rewards, baseline)
    raise ValueError(f"objective must be 'codat' or 'reward', got '{objective}'")


def reverse_kl_reward_loss(
    log_q: torch.Tensor,  # (B, K) log q(y_k | x) of the samples, with grad
    rewards: torch.Tensor,  # (B, K) R(y, y_k) on the 0-1 scale (sentence BLEU / 100)
    *,
    temperature: float,
    mask: torch.Tensor | None = None,  # (B, K) bool: samples that take part
) -> torch.Tensor:  # scalar
    """The "+Reward" term as the paper's Appendix A, the reverse KL(q || p_R) with
    p_R(y') ∝ exp(R(y, y') / T), T = `temperature`: minimise E_q[log q(y') - R / T] (+ log Z).

    Its gradient is E_q[(log q - R/T) grad log q] (the score function's mean is 0), estimated by
    REINFORCE with the advantage A_k = R_k / T - log q_k (detached) minus its mean over the
    sentence's participating samples: loss = -mean_k (A_k - mean A) * log q_k. Samples with a
    non-finite log q (no path) or masked take no part; sentences with none add nothing. Returns
    the mean over the participating samples.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (codat.reward_temperature)")
    if log_q.shape != rewards.shape or log_q.dim() != 2:
        raise ValueError(
            f"log_q {tuple(log_q.shape)} and rewards {tuple(rewards.shape)} must match (B, K)"
        )
    mask, log_q = _finite_only(log_q, mask)
    weight = mask.to(log_q.dtype)
    advantage = (rewards.to(log_q.dtype) / temperature - log_q).detach() * weight
    mean = advantage.sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp(min=1)
    terms = -((advantage - mean).detach() * log_q) * weight
    return terms.sum() / weight.sum().clamp(min=1)


def sentence_contrastive_loss(
    scores: torch.Tensor,  # (B, K) length-normalised log q of each kept sample
    rewards: torch.Tensor,  # (B, K)
    *,
    margin: float,
    mask: torch.Tensor | None = None,  # (B, K) bool: samples that take part
    tie: float = 0.0,
    pair_average: str = "pooled",  # "pooled" or "sentence" (codat.pair_average)
) -> torch.Tensor:  # scalar
    """`contrastive_loss` in float32 with a choice of average (codat.pair_average).

    pooled: `contrastive_loss` itself (the mean over all constrained pairs of the batch).
    sentence: Appendix C, E_x[2 / (n (n - 1)) sum_{i > j} L_ij], i.e. per sentence the sum of its
    pair losses over all n (n - 1) / 2 pairs of its n participating samples (pairs within `tie`
    count with loss 0), then the mean over the sentences with n >= 2 (0 when there are none).
    """
    if pair_average not in ("pooled", "sentence"):
        raise ValueError(f"pair_average='{pair_average}': choose pooled or sentence")
    scores = scores.float()
    if pair_average == "pooled":
        return contrastive_loss(scores, rewards, margin=margin, mask=mask, tie=tie)
    if scores.shape != rewards.shape or scores.dim() != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and rewards {tuple(rewards.shape)} must match (B, K)"
        )
    loss, pair, mask = _pair_losses(scores, rewards, margin=margin, mask=mask, tie=tie)
    n = mask.sum(1).to(scores.dtype)  # (B,) participating samples
    has_pairs = n >= 2
    per_sentence = loss.sum((1, 2)) / (n * (n - 1) / 2).clamp(min=1)
    return (per_sentence * has_pairs).sum() / has_pairs.sum().clamp(min=1)


def _pair_losses(
    scores: torch.Tensor, rewards: torch.Tensor, *, margin: float, mask, tie: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, K, K), (B, K, K) bool, (B, K) bool
    """The pair losses [b, i, j] of `contrastive_loss` (0 where (i, j) is no constrained pair),
    the constrained pairs, and the participating samples."""
    mask, scores = _finite_only(scores, mask)
    key = torch.where(mask, rewards.double(), float("-inf"))
    order = key.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    gap = (rank.unsqueeze(1) - rank.unsqueeze(2)).to(scores.dtype)  # [b, i, j] = rank_j - rank_i
    better = (rewards.unsqueeze(2) - rewards.unsqueeze(1)) > tie  # [b, i, j]: i beats j
    pair = better & mask.unsqueeze(2) & mask.unsqueeze(1)
    violation = scores.unsqueeze(1) - scores.unsqueeze(2) + gap * margin
    return torch.relu(violation) * pair, pair, mask
