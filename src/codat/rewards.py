"""Batched sentence-level BLEU on token ids, for use as a sequence-level reward.

:func:`sentence_bleu` scores K hypotheses per source against that source's single
reference, all at once on the inputs' device. It reproduces, to floating-point
rounding, ::

    sacrebleu.sentence_bleu(" ".join(map(str, hyp)), [" ".join(map(str, ref))], tokenize="none")

with sacrebleu 2.x defaults: ``smooth_method="exp"`` and effective order switched on.
That is, with ``c_n`` the clipped n-gram matches and ``t_n = max(len(hyp) - n + 1, 0)``
the hypothesis n-gram count:

* if no order has a match (``c_n == 0`` for every n, which includes an empty hypothesis
  or an empty reference) the score is 0;
* only the orders with ``t_n > 0`` take part (effective order ``N' = min(len(hyp), N)``);
* an order with ``c_n > 0`` has precision ``100 c_n / t_n``; the k-th order (counting
  up from n = 1) with ``c_n == 0`` gets ``100 / (2**k t_n)`` ("exp" smoothing, NIST's
  mteval-v13a method);
* score = BP * exp(mean of the log precisions over the N' orders), with brevity penalty
  ``BP = exp(1 - len(ref) / len(hyp))`` when the hypothesis is shorter than the reference
  and 1 otherwise.

sacrebleu floors ``log(0)`` at -9999999999; with effective order and exp smoothing no
included precision is ever 0, but the floor is kept for fidelity. Like sacrebleu, an exact
match can come out a few ulps above 100 (``exp(log(100))``).

Clipping. A hypothesis n-gram is credited at most as many times as it occurs in the
reference: ``c_n = sum over distinct n-grams g of min(count_hyp(g), count_ref(g))``.
Non-autoregressive decoders are prone to repeating tokens ("the the the the"); without
clipping such repetition would be rewarded with full unigram precision, so a policy
trained on the reward would learn to stutter.

Implementation. For order n, two hypothesis positions i, j start the same n-gram iff the
n token equalities ``hyp[i + d] == hyp[j + d]`` (d < n) all hold, so one (B, K, T, T)
equality matrix, AND-ed with itself shifted along the diagonal, gives n-gram equality
for every order; the same with a (B, K, T, R) hypothesis-vs-reference matrix gives
reference counts. Each distinct hypothesis n-gram is counted once, at its first valid
occurrence, with ``min(count in hyp, count in ref)``. All counts are exact integers;
only the final precision / penalty arithmetic is float64, done in sacrebleu's order.
"""

from __future__ import annotations

import torch

__all__ = ["sentence_bleu"]

_LOG_ZERO = -9999999999.0  # sacrebleu.utils.my_log(0.0)


def _check_inputs(
    hyp_ids: torch.Tensor,
    hyp_lens: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_lens: torch.Tensor,
    max_order: int,
) -> None:
    if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be a positive int, got {max_order!r}")
    if hyp_ids.dim() != 3:
        raise ValueError(f"hyp_ids must be (B, K, T), got shape {tuple(hyp_ids.shape)}")
    B, K, T = hyp_ids.shape
    if tuple(hyp_lens.shape) != (B, K):
        raise ValueError(
            f"hyp_lens must be (B, K) = {(B, K)} to match hyp_ids {tuple(hyp_ids.shape)}, "
            f"got {tuple(hyp_lens.shape)}"
        )
    if ref_ids.dim() != 2 or ref_ids.shape[0] != B:
        raise ValueError(
            f"ref_ids must be (B, R) with B = {B} to match hyp_ids {tuple(hyp_ids.shape)}, "
            f"got {tuple(ref_ids.shape)}"
        )
    if tuple(ref_lens.shape) != (B,):
        raise ValueError(f"ref_lens must be (B,) = ({B},), got {tuple(ref_lens.shape)}")
    for name, t in (("hyp_ids", hyp_ids), ("hyp_lens", hyp_lens), ("ref_ids", ref_ids)):
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if ref_lens.dtype.is_floating_point or ref_lens.dtype.is_complex:
        raise ValueError(f"ref_lens must be an integer tensor, got {ref_lens.dtype}")
    devices = {t.device for t in (hyp_ids, hyp_lens, ref_ids, ref_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    # Lengths outside the padded width would silently miscount; one reduction catches them.
    R = ref_ids.shape[1]
    bad = (hyp_lens < 0) | (hyp_lens > T)
    bad_ref = (ref_lens < 0) | (ref_lens > R)
    if bool(bad.any()) or bool(bad_ref.any()):
        raise ValueError(
            f"lengths out of range: hyp_lens must lie in [0, {T}] and ref_lens in [0, {R}]"
        )


def _clipped_matches(
    hyp_ids: torch.Tensor,
    hyp_lens: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_lens: torch.Tensor,
    max_order: int,
) -> torch.Tensor:
    """(B, K, max_order) long: clipped n-gram matches for n = 1 .. max_order."""
    B, K, T = hyp_ids.shape
    R = ref_ids.shape[1]
    device = hyp_ids.device
    eq_hh = hyp_ids.unsqueeze(-1) == hyp_ids.unsqueeze(-2)  # (B, K, T, T)
    eq_hr = hyp_ids.unsqueeze(-1) == ref_ids[:, None, None, :]  # (B, K, T, R)
    pos_t = torch.arange(T, device=device)
    pos_r = torch.arange(R, device=device)
    hyp_lens = hyp_lens.unsqueeze(-1)  # (B, K, 1)
    ref_lens = ref_lens.reshape(B, 1, 1)

    same_hh, same_hr = eq_hh, eq_hr  # n-gram equality for the current order
    out = []
    for n in range(1, max_order + 1):
        if n > 1:
            th, tr = max(T - n + 1, 0), max(R - n + 1, 0)
            same_hh = same_hh[..., :th, :th] & eq_hh[..., n - 1 : n - 1 + th, n - 1 : n - 1 + th]
            same_hr = same_hr[..., :th, :tr] & eq_hr[..., n - 1 : n - 1 + th, n - 1 : n - 1 + tr]
        th, tr = same_hh.shape[-1], same_hr.shape[-1]
        valid_h = pos_t[:th] + n <= hyp_lens  # (B, K, th): an n-gram starts at i
        valid_r = (pos_r[:tr] + n <= ref_lens).unsqueeze(-2)  # (B, 1, 1, tr)
        same_valid = same_hh & valid_h.unsqueeze(-2)  # column j must be a valid n-gram
        count_hyp = same_valid.sum(-1)  # (B, K, th)
        # i is the first occurrence of its n-gram iff no valid j < i matches it.
        earlier = torch.ones(th, th, dtype=torch.bool, device=device).tril(-1)
        first = valid_h & ~(same_valid & earlier).any(-1)
        count_ref = (same_hr & valid_r).sum(-1)  # (B, K, th)
        clipped = torch.minimum(count_hyp, count_ref) * first
        out.append(clipped.sum(-1))
    return torch.stack(out, dim=-1)


def sentence_bleu(
    hyp_ids: torch.Tensor,
    hyp_lens: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_lens: torch.Tensor,
    *,
    max_order: int = 4,
) -> torch.Tensor:
    """Sentence BLEU of K hypotheses per source against that source's reference.

    Args:
        hyp_ids: (B, K, T) integer token ids; entries at positions >= ``hyp_lens`` are
            ignored (any value).
        hyp_lens: (B, K) integer hypothesis lengths in [0, T].
        ref_ids: (B, R) integer token ids of the single reference per source.
        ref_lens: (B,) integer reference lengths in [0, R].
        max_order: largest n-gram order (sacrebleu's default is 4).

    Returns:
        (B, K) float64 on the inputs' device: sacrebleu's ``sentence_bleu`` (exp
        smoothing, effective order, ``tokenize="none"`` on the space-joined ids), 0..100.

    Raises:
        ValueError: on inconsistent shapes, non-integer inputs, mixed devices or
            lengths outside the padded widths.
    """
    _check_inputs(hyp_ids, hyp_lens, ref_ids, ref_lens, max_order)
    correct = _clipped_matches(hyp_ids, hyp_lens, ref_ids, ref_lens, max_order)
    orders = torch.arange(1, max_order + 1, device=hyp_ids.device)
    hyp_len = hyp_lens.to(torch.long)
    total = (hyp_len.unsqueeze(-1) - orders + 1).clamp_min(0)  # (B, K, N)

    f64 = torch.float64
    sys_len = hyp_len.to(f64)
    ref_len = ref_lens.to(f64).unsqueeze(-1).expand_as(sys_len)
    # Brevity penalty: exp(1 - ref/sys) if sys < ref (0 if sys == 0), else 1.
    bp = torch.where(
        sys_len < ref_len,
        torch.where(
            sys_len > 0,
            torch.exp(1.0 - ref_len / sys_len.clamp_min(1.0)),
            torch.zeros_like(sys_len),
        ),
        torch.ones_like(sys_len),
    )

    # sacrebleu stops at the first order with no hypothesis n-grams; orders are counted
    # in the exp-smoothing doubling only up to there.
    used = total > 0
    zero = used & (correct == 0)
    smooth = torch.pow(2.0, zero.to(f64).cumsum(-1))  # smooth_mteval after order n
    correct_f, total_f = correct.to(f64), total.to(f64)
    safe_total = total_f.clamp_min(1.0)
    precisions = torch.where(
        zero,
        100.0 / (smooth * safe_total),
        100.0 * correct_f / safe_total,
    )
    precisions = torch.where(used, precisions, torch.zeros_like(precisions))
    logs = torch.where(
        precisions == 0,
        torch.full_like(precisions, _LOG_ZERO),
        torch.log(precisions.clamp_min(torch.finfo(f64).tiny)),
    )
    eff_order = used.sum(-1)  # effective order: min(len(hyp), max_order)
    log_sum = torch.zeros_like(sys_len)
    for n in range(max_order):  # left-to-right, like Python's sum()
        log_sum = log_sum + torch.where(used[..., n], logs[..., n], torch.zeros_like(sys_len))
    score = bp * torch.exp(log_sum / eff_order.clamp_min(1).to(f64))
    any_match = (correct > 0).any(-1)  # sacrebleu's early exit (#141)
    return torch.where(any_match, score, torch.zeros_like(score))
