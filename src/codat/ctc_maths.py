"""CTC maths as pure functions of tensors (Graves et al. 2006; used by `codat.ctc`): the
marginal over alignments, the best alignment, CTC+GLAT's reveal, collapsing, best-path decoding,
sampling and the sample scores CoDAT trains on.

Conventions: log-probs / logits (B, L, V + 1) over the V vocabulary ids and a blank, class V;
`out_lens` (B,) valid positions; targets are content ids (no <s>/</s>), PAD_ID padded. Collapse =
merge consecutive repeats, then drop blanks; <pad>/<s>/</s> are ordinary classes for the CTC
maths and are dropped from decoded output afterwards (as DAT's decoders drop them). A target
with no alignment (L_b < |y| + #adjacent repeats) has log-likelihood -inf, and no inf/NaN reaches
the backward: its target is replaced by the empty one before `F.ctc_loss`.

Sample scores (`ctc_output_scores`) use `F.ctc_loss` on a compact class set per sample, [its
distinct tokens, blank, rest], where rest = log(1 - sum of the others) keeps every row a
distribution: the (B*K, L, V + 1) log-probs of a full-vocabulary call do not fit in memory for
K ~ 32 and V ~ 40k. `F.ctc_loss`'s backward returns exp(log_probs) - posterior (the gradient
w.r.t. the logits of a softmax), not the gradient w.r.t. its log_probs input; because the
compact row is a coarse-graining of the softmax, the exp(log_probs) part cancels in the chain
rule and the gradient w.r.t. the model's logits is exact (checked against brute force in the
tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codat.data import PAD_ID, SPECIAL_IDS
from codat.decode import collapse_tokens
from codat.nat_core import glancing_reveal
from codat.objectives import log_softmax_fp32

NEG_INF = float("-inf")
_UNUSED_LOGP = -1e4  # log-prob of a compact class no target uses: exp() is exactly 0


def ctc_min_lengths(
    targets: torch.Tensor,  # (B, N) label ids, padded
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,)
    """The fewest positions an alignment of each target needs: |y| + #(y_j == y_{j-1})."""
    N = targets.shape[1]
    pos = torch.arange(1, N, device=targets.device).unsqueeze(0)
    repeats = (targets[:, 1:] == targets[:, :-1]) & (pos < target_lens.unsqueeze(1))
    return target_lens + repeats.sum(1)


def _ctc_ll(
    log_probs: torch.Tensor,  # (R, L, C) float
    in_lens: torch.Tensor,  # (R,)
    targets: torch.Tensor,  # (R, N) in [0, C), != blank
    target_lens: torch.Tensor,  # (R,)
    blank: int,
) -> torch.Tensor:  # (R,) -inf where no alignment exists, never NaN in the backward
    feasible = ctc_min_lengths(targets, target_lens) <= in_lens
    safe_lens = torch.where(feasible, target_lens, torch.zeros_like(target_lens))
    nll = F.ctc_loss(
        log_probs.transpose(0, 1),  # (L, R, C)
        targets,
        in_lens,
        safe_lens,
        blank=blank,
        reduction="none",
        zero_infinity=False,
    )
    return torch.where(feasible, -nll, torch.full_like(nll, NEG_INF))


def ctc_log_likelihood(
    logp: torch.Tensor,  # (B, L, V + 1) log-softmax, blank = V
    out_lens: torch.Tensor,  # (B,)
    targets: torch.Tensor,  # (B, N) content ids, PAD_ID padded
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,) log p_CTC(y | x), -inf where no alignment
    """The CTC marginal over all alignments (`F.ctc_loss`, full vocabulary)."""
    return _ctc_ll(logp, out_lens, targets, target_lens, blank=logp.shape[-1] - 1)


def ctc_best_alignment(
    logp: torch.Tensor,  # (B, L, V + 1) log-probs, blank = V
    out_lens: torch.Tensor,  # (B,) L_b
    targets: torch.Tensor,  # (B, N) content ids, padded
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B, L) long
    """The label (blank = V) every position takes on the most probable CTC path of the target
    (Viterbi over the 2N + 1 blank-interleaved states, vectorised over sentences and states, a loop
    over positions). Positions t >= L_b, and every position of a sentence with no alignment,
    are -1."""
    B, L, C = logp.shape
    N = targets.shape[1]
    blank = C - 1
    S = 2 * N + 1
    dev = logp.device
    z = torch.full((B, S), blank, dtype=torch.long, device=dev)  # blank-interleaved labels
    z[:, 1::2] = targets
    s_idx = torch.arange(S, device=dev).unsqueeze(0)  # (1, S)
    state_ok = s_idx <= 2 * target_lens.unsqueeze(1)  # (B, S)
    skip_ok = torch.zeros(B, S, dtype=torch.bool, device=dev)
    skip_ok[:, 2:] = (z[:, 2:] != blank) & (z[:, 2:] != z[:, :-2])  # s-2 -> s allowed
    em = logp.gather(-1, z.unsqueeze(1).expand(B, L, S))  # (B, L, S)
    em = em.masked_fill(~state_ok.unsqueeze(1), NEG_INF)
    delta = em[:, 0].masked_fill(s_idx >= 2, NEG_INF)  # (B, S): start in state 0 or 1
    ninf = delta.new_full((B, 1), NEG_INF)
    back = []  # back[t - 1]: (B, S) how many states the best path moved at step t (0, 1, 2)
    for t in range(1, L):
        one = torch.cat([ninf, delta[:, :-1]], dim=1)
        two = torch.cat([ninf, ninf, delta[:, :-2]], dim=1)[:, :S].masked_fill(~skip_ok, NEG_INF)
        best, arg = torch.stack([delta, one, two], dim=-1).max(dim=-1)  # (B, S)
        active = (t < out_lens).unsqueeze(1)  # padding positions keep the final scores
        delta = torch.where(active, best + em[:, t], delta)
        back.append(torch.where(active, arg, torch.zeros_like(arg)))
    end_blank = 2 * target_lens  # (B,) last state: the final blank or the last token
    end_token = (end_blank - 1).clamp(min=0)
    score_blank = delta.gather(1, end_blank.unsqueeze(1)).squeeze(1)
    score_token = delta.gather(1, end_token.unsqueeze(1)).squeeze(1)
    score_token = score_token.masked_fill(target_lens == 0, NEG_INF)
    state = torch.where(score_token > score_blank, end_token, end_blank)  # (B,)
    feasible = torch.maximum(score_blank, score_token) > NEG_INF
    labels = torch.empty(B, L, dtype=torch.long, device=dev)
    for t in range(L - 1, -1, -1):
        labels[:, t] = z.gather(1, state.unsqueeze(1)).squeeze(1)
        if t > 0:
            state = state - back[t - 1].gather(1, state.unsqueeze(1)).squeeze(1)
    valid = (torch.arange(L, device=dev).unsqueeze(0) < out_lens.unsqueeze(1)) & feasible[:, None]
    return labels.masked_fill(~valid, -1)


def ctc_glance(
    logp: torch.Tensor,  # (B, L, V + 1) pass-1 log-probs
    out_lens: torch.Tensor,  # (B,)
    targets: torch.Tensor,  # (B, N) content ids
    target_lens: torch.Tensor,  # (B,)
    *,
    ratio: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L) bool reveal, (B, L) long aligned labels
    """CTC+GLAT's choice: the Viterbi alignment of the reference, d_b = #positions t < L_b whose
    argmax differs from the aligned label (blank included), and N_b = floor(ratio * d_b + 1/2)
    positions revealed uniformly among the L_b. Sentences with no alignment reveal nothing."""
    aligned = ctc_best_alignment(logp, out_lens, targets, target_lens)  # (B, L)
    feasible = aligned[:, 0] >= 0  # L_b >= 1, so position 0 is aligned iff the sentence is
    span = torch.where(feasible, out_lens, torch.zeros_like(out_lens))
    reveal = glancing_reveal(logp.argmax(-1), aligned, span, ratio=ratio, generator=generator)
    return reveal, aligned


def _collapse(
    labels: torch.Tensor,  # (R, L) classes in [0, V]
    in_lens: torch.Tensor,  # (R,)
    blank: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (R, T) PAD_ID padded, T >= 1; (R,)
    valid = torch.arange(labels.shape[1], device=labels.device).unsqueeze(0) < in_lens.unsqueeze(1)
    tokens = collapse_tokens(labels, valid, special_ids=(*SPECIAL_IDS, blank), pad_id=PAD_ID)
    return tokens, (tokens != PAD_ID).sum(1)


def ctc_greedy_decode(
    token_logits: torch.Tensor,  # (B, L, V + 1), blank = V
    out_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B, T) PAD_ID padded, T >= 1
    """Best-path decoding: argmax per position, merge repeats, drop blanks and specials."""
    blank = token_logits.shape[-1] - 1
    return _collapse(token_logits.argmax(-1), out_lens, blank)[0]


def ctc_sample(
    token_logits: torch.Tensor,  # (B, L, V + 1), blank = V
    out_lens: torch.Tensor,  # (B,)
    k: int,
    *,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, K, T) PAD_ID padded, T >= 1; (B, K)
    """K samples per sentence: every position t < L_b draws a class from
    softmax(logits / temperature) independently (one batched `torch.multinomial`), then each
    label sequence is collapsed like `ctc_greedy_decode`. No grad."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    B, L, C = token_logits.shape
    with torch.no_grad():
        probs = torch.softmax(token_logits.detach().float() / temperature, dim=-1)
        draws = torch.multinomial(probs.view(B * L, C), k, replacement=True, generator=generator)
        labels = draws.view(B, L, k).permute(0, 2, 1).reshape(B * k, L)
        tokens, lengths = _collapse(labels, out_lens.repeat_interleave(k), C - 1)
    return tokens.view(B, k, -1), lengths.view(B, k)


def ctc_output_scores(
    token_logits: torch.Tensor,  # (B, L, V + 1) with grad, e.g. the un-glanced training output
    out_lens: torch.Tensor,  # (B,)
    tokens: torch.Tensor,  # (B, K, T) content ids, PAD_ID beyond each length
    lengths: torch.Tensor,  # (B, K) >= 0
) -> torch.Tensor:  # (B, K) with grad
    """log p_CTC(y_k | x) / max(|y_k|, 1) of each candidate, -inf where it has no alignment.

    `F.ctc_loss` on a compact class set per candidate (see the module docstring): columns 0..T-1
    are the log-probs of the candidate's tokens (a token's first occurrence carries it, later
    occurrences point there; unused columns ~ -inf), column T the blank, T + 1 the rest."""
    logp = log_softmax_fp32(token_logits)  # (B, L, C)
    B, L, C = logp.shape
    _, K, T = tokens.shape
    if lengths.shape != (B, K):
        raise ValueError(f"lengths {tuple(lengths.shape)} != ({B}, {K})")
    pos = torch.arange(T, device=tokens.device)
    valid = pos < lengths.unsqueeze(-1)  # (B, K, T)
    ids = tokens.masked_fill(~valid, PAD_ID)
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & valid.unsqueeze(-2)  # [b, k, i, j]
    first = same.to(torch.int8).argmax(-1)  # (B, K, T): first j with y_j == y_i
    used = valid & (first == pos)  # (B, K, T) columns that carry a distinct token
    tok = logp.gather(-1, ids.reshape(B, 1, K * T).expand(B, L, K * T))  # (B, L, K*T)
    tok = tok.view(B, L, K, T).permute(0, 2, 1, 3)  # (B, K, L, T)
    tok = tok.masked_fill(~used.unsqueeze(2), _UNUSED_LOGP)
    blank = logp[..., C - 1].unsqueeze(1).unsqueeze(-1).expand(B, K, L, 1)
    known = torch.logsumexp(torch.cat([tok, blank], dim=-1), dim=-1, keepdim=True)
    tiny = torch.finfo(logp.dtype).tiny
    rest = torch.log(torch.clamp(-torch.expm1(known), min=tiny))  # log(1 - sum of the others)
    compact = torch.cat([tok, blank, rest], dim=-1).reshape(B * K, L, T + 2)
    ll = _ctc_ll(
        compact,
        out_lens.repeat_interleave(K),
        first.reshape(B * K, T),
        lengths.reshape(B * K),
        blank=T,
    )
    return (ll / lengths.reshape(B * K).clamp(min=1).to(ll.dtype)).view(B, K)
