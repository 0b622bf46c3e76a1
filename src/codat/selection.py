"""Which samples CoDAT trains on (paper §3.3, method.md §9.7): pure functions of tensors.

The sample term of every model runs the same line: draw K samples, reward them by sentence BLEU,
then `dp_gate` (skip sentences the model cannot yet explain), `duplicate_mask`, and
`choose_samples` (codat: the best `kept` by reward, distinct samples first; reward: the first R),
before the model scores the chosen samples with grad and `objectives.sample_loss` compares them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from codat.objectives import reverse_kl_reward_loss, sample_loss, sentence_contrastive_loss


def dp_gate(
    ref_loss: torch.Tensor,  # (B,) the model's length-normalised loss of each reference
    *,
    alpha: float,
) -> torch.Tensor:  # (B,) bool
    """True for sentences whose reference loss is finite and at most alpha (paper §3.3: examples
    whose DP loss exceeds alpha get no contrastive term)."""
    return torch.isfinite(ref_loss) & (ref_loss <= alpha)


def _first_copies(
    tokens: torch.Tensor,  # (B, K, T) sample ids
    lengths: torch.Tensor,  # (B, K)
    *,
    pad_id: int,
) -> torch.Tensor:  # (B, K) long
    """For each sample, the index of the first sample of its sentence identical to it (up to
    its length): itself for a distinct sample, an earlier one for a duplicate."""
    B, K, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)
    clean = tokens.masked_fill(pos >= lengths.unsqueeze(-1), pad_id)
    same = (clean.unsqueeze(2) == clean.unsqueeze(1)).all(-1)  # (B, K, K)
    same = same & torch.ones(K, K, dtype=torch.bool, device=tokens.device).tril()
    return same.int().argmax(-1)


def duplicate_mask(
    tokens: torch.Tensor,  # (B, K, T) sample ids
    lengths: torch.Tensor,  # (B, K)
    *,
    pad_id: int,
) -> torch.Tensor:  # (B, K) bool
    """True for a sample identical (up to its length) to an earlier sample of the same sentence."""
    first = _first_copies(tokens, lengths, pad_id=pad_id)
    return first != torch.arange(tokens.shape[1], device=tokens.device)


def compact_distinct(
    tokens: torch.Tensor,  # (B, K, T) sample ids
    lengths: torch.Tensor,  # (B, K)
    *,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct samples of each sentence packed first: tokens (B, D, T) and lengths (B, D),
    D the largest number of distinct samples of a sentence (unused slots repeat the sentence's
    first sample), and slot (B, K): where each sample's first copy landed, so that a per-sample
    quantity computed on the packed samples is `packed.gather(1, slot)` for all K."""
    B, K, T = tokens.shape
    first = _first_copies(tokens, lengths, pad_id=pad_id)
    distinct = first == torch.arange(K, device=tokens.device)
    rank = distinct.long().cumsum(1) - 1  # slot of each distinct sample
    slot = rank.gather(1, first)
    D = int(distinct.sum(1).max())
    source = torch.zeros(B, D, dtype=torch.long, device=tokens.device)  # default: sample 0
    b, k = distinct.nonzero(as_tuple=True)
    source[b, rank[b, k]] = k
    packed = tokens.gather(1, source.unsqueeze(-1).expand(B, D, T))
    return packed, lengths.gather(1, source), slot


class ChosenSamples(NamedTuple):
    rows: torch.Tensor  # (b,) long: the sentences that passed the gate
    tokens: torch.Tensor  # (b, k, T') ids, trimmed to the longest chosen sample (T' >= 1)
    lengths: torch.Tensor  # (b, k)
    rewards: torch.Tensor  # (b, k)
    distinct: torch.Tensor  # (b, k) bool: False for a duplicate of an earlier sample


def choose_samples(
    tokens: torch.Tensor,  # (B, K, T)
    lengths: torch.Tensor,  # (B, K)
    rewards: torch.Tensor,  # (B, K)
    duplicates: torch.Tensor,  # (B, K) bool
    gate: torch.Tensor,  # (B,) bool
    *,
    objective: str,  # "codat" or "reward"
    count: int,  # codat: samples kept per sentence; reward: the first `count` samples
    filter_key: torch.Tensor | None = None,  # (B, K) codat's ranking key; None = the rewards
) -> ChosenSamples:
    """The samples that carry gradient, for the sentences that pass the gate.

    codat keeps the `count` best by reward (or by `filter_key`, e.g. the model's length-normalised
    log q: codat.filter score), distinct samples first (a duplicate only fills a slot no distinct
    sample can; equal keys keep the sampling order); reward takes the first `count` (i.i.d.)
    samples."""
    if objective not in ("codat", "reward"):
        raise ValueError(f"objective must be 'codat' or 'reward', got '{objective}'")
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    rows = gate.nonzero().squeeze(1)
    K = tokens.shape[1]
    k = min(count, K)
    if objective == "codat" and filter_key is not None:
        idx = _best_distinct_first(filter_key[rows], duplicates[rows], k)
    elif objective == "codat":
        key = torch.where(duplicates, rewards - 2.0, rewards)[rows]  # rewards lie in [0, 1]
        idx = key.topk(k, dim=1).indices  # (b, k)
    else:
        idx = torch.arange(k, device=tokens.device).unsqueeze(0).expand(len(rows), k)
    chosen_lens = lengths[rows].gather(1, idx)
    width = max(int(chosen_lens.max()) if chosen_lens.numel() else 0, 1)
    chosen = tokens[rows].gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return ChosenSamples(
        rows,
        chosen[..., :width],
        chosen_lens,
        rewards[rows].gather(1, idx),
        ~duplicates[rows].gather(1, idx),
    )


def _best_distinct_first(
    key: torch.Tensor,  # (b, K) larger is better; NaN counts as -inf
    duplicates: torch.Tensor,  # (b, K) bool
    k: int,
) -> torch.Tensor:  # (b, k)
    """The indices of the k best samples by `key`, distinct ones before duplicates, ties in
    index order (two stable sorts: by key, then by duplicate flag)."""
    key = torch.nan_to_num(key.float(), nan=float("-inf"))
    order = key.argsort(dim=1, descending=True, stable=True)
    dup_sorted = duplicates.gather(1, order).to(torch.int8)
    order = order.gather(1, dup_sorted.argsort(dim=1, stable=True))
    return order[:, :k]


def sample_stats(
    rewards: torch.Tensor,  # (B, K) sentence BLEU / 100 of every sample
    duplicates: torch.Tensor,  # (B, K) bool
    gate: torch.Tensor,  # (B,) bool
) -> dict[str, float]:
    """The logged statistics of the sample term: the fraction of sentences through the gate and
    of distinct samples, the mean and the best-of-K (oracle) sentence BLEU."""
    return {
        "gate_pass": float(gate.float().mean()),
        "distinct": float((~duplicates).float().mean()),
        "sample_bleu": float(rewards.mean()) * 100,
        "oracle_bleu": float(rewards.amax(1).mean()) * 100,
    }


class Selected(NamedTuple):
    chosen: ChosenSamples  # the samples that carry gradient
    baseline: torch.Tensor  # (b,) mean reward of all K samples of each chosen sentence
    gate_fraction: float  # sentences through the gate / B
    stats: dict[str, float]  # `sample_stats`


def select_samples(
    tokens: torch.Tensor,  # (B, K, T) sample ids
    lengths: torch.Tensor,  # (B, K)
    rewards: torch.Tensor,  # (B, K) sentence BLEU / 100
    ref_loss: torch.Tensor,  # (B,) the model's length-normalised loss of each reference
    *,
    objective: str,  # "codat" or "reward"
    count: int,  # codat: samples kept per sentence; reward: the first `count`
    alpha: float,  # the DP-loss gate
    pad_id: int,
    filter_key: torch.Tensor | None = None,  # (B, K) codat.filter score: log q / |y| of all K
) -> Selected:
    """CoDAT's selection, without grad: `dp_gate`, `duplicate_mask`, `choose_samples` (ranked by
    reward, or by `filter_key` when given), and the statistics that the training log shows."""
    with torch.no_grad():
        gate = dp_gate(ref_loss, alpha=alpha)
        duplicates = duplicate_mask(tokens, lengths, pad_id=pad_id)
        chosen = choose_samples(
            tokens,
            lengths,
            rewards,
            duplicates,
            gate,
            objective=objective,
            count=count,
            filter_key=filter_key,
        )
        baseline = rewards[chosen.rows].mean(1)
    return Selected(
        chosen, baseline, len(chosen.rows) / len(gate), sample_stats(rewards, duplicates, gate)
    )


def sample_term(
    scores: torch.Tensor | None,  # (b, k) length-normalised log q of the chosen samples, with grad
    selected: Selected,
    *,
    objective: str,  # "codat" or "reward"
    margin: float,
    tie: float,
    pair_average: str = "pooled",  # codat.pair_average
    reward_temperature: float | None = None,  # reward: Appendix A's T; None = plain REINFORCE
    target_lens: torch.Tensor | None = None,  # (b, k) what `scores` were normalised by
) -> tuple[torch.Tensor, dict[str, float]]:  # scalar, stats
    """`objectives.sample_loss` of the chosen samples, scaled by the fraction of sentences through
    the gate (the others add 0, as in the DP loss's mean); exactly 0 when none passed (then
    `scores` is None). Adds "cl_loss" (codat) or "reward_loss" (reward) to the statistics.

    Options: codat with `pair_average` sentence averages the pairs per sentence first
    (`objectives.sentence_contrastive_loss`); reward with a `reward_temperature` is the reverse KL
    of Appendix A (`objectives.reverse_kl_reward_loss`) on log q = scores * target_lens. Scores
    are taken in at least float32."""
    stats = dict(selected.stats)
    key = "cl_loss" if objective == "codat" else "reward_loss"
    chosen = selected.chosen
    if scores is None or len(chosen.rows) == 0:
        stats[key] = 0.0
        return chosen.rewards.new_zeros(()), stats
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # at least float32
    if objective == "codat" and pair_average != "pooled":
        loss = sentence_contrastive_loss(
            scores,
            chosen.rewards,
            margin=margin,
            mask=chosen.distinct,
            tie=tie,
            pair_average=pair_average,
        )
    elif objective == "reward" and reward_temperature:  # None or 0: plain REINFORCE
        if target_lens is None:
            raise ValueError("reward_temperature needs target_lens (to undo the normalisation)")
        log_q = scores * target_lens.to(scores.dtype)
        loss = reverse_kl_reward_loss(log_q, chosen.rewards, temperature=reward_temperature)
    else:
        loss = sample_loss(
            scores,
            chosen.rewards,
            chosen.distinct,
            selected.baseline,
            objective=objective,
            margin=margin,
            tie=tie,
        )
    stats[key] = float(loss.detach())
    return loss * selected.gate_fraction, stats
