"""codat.selection (which samples CoDAT trains on, method.md §9.7) against sentence-by-sentence
loops.

Compared: `dp_gate` with `loop_dp_gate` (tests/reference.py) on losses with inf, -inf and NaN and
alpha = inf; `duplicate_mask` with `loop_duplicate_mask` on random samples with junk beyond their
lengths, and a hand case; `choose_samples` with `loop_choose_samples` (codat: distinct samples
first by reward, then duplicates; reward: the first `count`) on random batches with unique rewards,
in the chosen rows, tokens (trimmed to the longest chosen sample), lengths, rewards and the
distinct flags; on crafted samples of one sentence (the best distinct ones; duplicates fill only
the slots left and come back flagged; `sample_targets` encodes the chosen ones as <s> y </s>);
`CodatConfig.kept`; the empty and invalid cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import loop_choose_samples, loop_dp_gate, loop_duplicate_mask

from codat.config import CodatConfig
from codat.data import BOS_ID, EOS_ID, PAD_ID
from codat.objectives import sample_targets
from codat.selection import (
    choose_samples,
    compact_distinct,
    dp_gate,
    duplicate_mask,
    sample_stats,
    sample_term,
    select_samples,
)

INF, NAN = math.inf, math.nan

# ---------------------------------------------------------------------------------------------
# dp_gate


@pytest.mark.parametrize("alpha", [2.0, 0.5, 0.0, -1.0, INF])
def test_dp_gate_matches_loop_with_inf_and_nan(alpha):
    losses = [0.3, 2.0, 2.0001, INF, -INF, NAN, 0.0, 1e9, 0.5]
    got = dp_gate(torch.tensor(losses), alpha=alpha)
    assert got.dtype == torch.bool and got.shape == (len(losses),)
    assert got.tolist() == loop_dp_gate(losses, alpha)


def test_dp_gate_hand_case_and_float64():
    losses = torch.tensor([1.0, 2.0, INF, NAN, 2.5], dtype=torch.float64)
    assert dp_gate(losses, alpha=2.0).tolist() == [True, True, False, False, False]
    # alpha = inf (no gate set yet) lets every sentence with a path through, never a NaN.
    assert dp_gate(losses, alpha=INF).tolist() == [True, True, False, False, True]


# ---------------------------------------------------------------------------------------------
# duplicate_mask


def _repeating_samples(seed: int, B: int = 3, K: int = 9, T: int = 4):
    """(B, K, T) samples and (B, K) lengths with many repeats: few symbols and short lengths,
    junk (pad included) after each length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B, K), generator=g)
    tokens = torch.randint(4, 6, (B, K, T), generator=g)
    junk = torch.randint(0, 10, (B, K, T), generator=g)
    return torch.where(torch.arange(T) < lengths.unsqueeze(-1), tokens, junk), lengths


@pytest.mark.parametrize("seed", range(4))
def test_duplicate_mask_matches_loop_with_junk_beyond_lengths(seed):
    tokens, lengths = _repeating_samples(seed)
    B, K, _ = tokens.shape
    got = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    expected = loop_duplicate_mask(tokens.tolist(), lengths.tolist())
    assert got.dtype == torch.bool
    assert got.tolist() == expected
    assert 0 < sum(map(sum, expected)) < B * K  # both kinds occur


@pytest.mark.parametrize("seed", range(4))
def test_compact_distinct_packs_each_distinct_sample_once_and_maps_every_sample_back(seed):
    tokens, lengths = _repeating_samples(seed)
    B, K, T = tokens.shape
    packed, packed_lens, slot = compact_distinct(tokens, lengths, pad_id=PAD_ID)
    dup = loop_duplicate_mask(tokens.tolist(), lengths.tolist())
    D = max(K - sum(row) for row in dup)
    assert packed.shape == (B, D, T) and packed_lens.shape == (B, D) and slot.shape == (B, K)

    def seq(t, n):
        return tuple(t[:n].tolist())

    for b in range(B):
        distinct = [k for k in range(K) if not dup[b][k]]  # first copies, in order
        for d, k in enumerate(distinct):
            assert seq(packed[b, d], packed_lens[b, d]) == seq(tokens[b, k], lengths[b, k])
        for d in range(len(distinct), D):  # unused slots repeat the first sample
            assert seq(packed[b, d], packed_lens[b, d]) == seq(tokens[b, 0], lengths[b, 0])
        for k in range(K):
            got = seq(packed[b, slot[b, k]], packed_lens[b, slot[b, k]])
            assert got == seq(tokens[b, k], lengths[b, k])
            assert int(slot[b, k]) < len(distinct)


def test_duplicate_mask_hand_case():
    tokens = torch.tensor([[[5, 6, 0], [5, 6, 7], [5, 6, 9], [8, 8, 8], [9, 9, 9], [5, 6, 1]]])
    lengths = torch.tensor([[2, 3, 2, 0, 0, 2]])
    # [5 6] / [5 6 7] / [5 6] again / empty / empty again / [5 6] again
    got = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    assert got.tolist() == [[False, False, True, False, True, True]]


# ---------------------------------------------------------------------------------------------
# choose_samples against the loop


def _random_case(seed: int):
    """B sentences of K samples over few symbols (many duplicates), unique random rewards (so the
    best `count` are unique), junk beyond each length, a random gate."""
    g = torch.Generator().manual_seed(seed)
    B, K, T = 4, 10, 5
    lengths = torch.randint(0, T + 1, (B, K), generator=g)
    tokens = torch.randint(4, 7, (B, K, T), generator=g)
    junk = torch.randint(0, 10, (B, K, T), generator=g)
    tokens = torch.where(torch.arange(T) < lengths.unsqueeze(-1), tokens, junk)
    rewards = torch.randperm(B * K, generator=g).view(B, K).double() / (B * K)  # in [0, 1)
    gate = torch.rand(B, generator=g) < 0.7
    gate[0] = True
    return tokens, lengths, rewards, gate


def _check_against_loop(tokens, lengths, rewards, gate, *, objective, count):
    duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    got = choose_samples(
        tokens, lengths, rewards, duplicates, gate, objective=objective, count=count
    )
    want = loop_choose_samples(
        rewards.tolist(), duplicates.tolist(), gate.tolist(), objective, count
    )
    assert got.rows.tolist() == [b for b, _ in want]
    k = min(count, tokens.shape[1])
    assert got.lengths.shape == got.rewards.shape == got.distinct.shape == (len(want), k)
    longest = max((int(lengths[b, i]) for b, idx in want for i in idx), default=0)
    assert got.tokens.shape == (len(want), k, max(longest, 1))  # trimmed, at least one column
    for r, (b, idx) in enumerate(want):
        # codat: the chosen set in any order (topk), here put in the loop's order (distinct ones
        # first, each group best first); reward: exactly the first `count`, in drawn order.
        order = list(range(k))
        if objective == "codat":
            order.sort(key=lambda i, r=r: (not bool(got.distinct[r, i]), -float(got.rewards[r, i])))
        for i, j in zip(order, idx, strict=True):
            n = int(lengths[b, j])
            assert int(got.lengths[r, i]) == n
            assert float(got.rewards[r, i]) == float(rewards[b, j])
            assert bool(got.distinct[r, i]) == (not bool(duplicates[b, j]))
            assert got.tokens[r, i, :n].tolist() == tokens[b, j, :n].tolist()
    return got, want


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("count", [1, 2, 5, 8, 10, 30])
def test_choose_samples_codat_matches_loop(seed, count):
    _check_against_loop(*_random_case(seed), objective="codat", count=count)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("count", [1, 4, 10, 30])
def test_choose_samples_reward_takes_the_first_samples_as_drawn(seed, count):
    tokens, lengths, rewards, gate = _random_case(seed)
    got, want = _check_against_loop(tokens, lengths, rewards, gate, objective="reward", count=count)
    k = min(count, tokens.shape[1])
    for r, (b, _) in enumerate(want):
        assert torch.equal(got.rewards[r], rewards[b, :k])  # in drawn order, duplicates included


def test_choose_samples_codat_prefers_every_distinct_sample_to_any_duplicate():
    """The loop's rule seen directly: with more slots than distinct samples, all distinct ones are
    chosen, and the remaining slots go to the best duplicates, even when a duplicate's reward
    beats a distinct sample's."""
    for seed in range(6):
        tokens, lengths, rewards, gate = _random_case(seed)
        duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
        got = choose_samples(tokens, lengths, rewards, duplicates, gate, objective="codat", count=8)
        for r, b in enumerate(got.rows.tolist()):
            n_distinct = int((~duplicates[b]).sum())
            assert int(got.distinct[r].sum()) == min(n_distinct, 8)
            if n_distinct < 8:  # the duplicates chosen are the best duplicates
                dup_rewards = sorted(rewards[b][duplicates[b]].tolist(), reverse=True)
                chosen = sorted(got.rewards[r][~got.distinct[r]].tolist(), reverse=True)
                assert chosen == dup_rewards[: 8 - n_distinct]


def test_choose_samples_with_no_sentence_through_the_gate_is_empty():
    tokens, lengths, rewards, _ = _random_case(0)
    duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    gate = dp_gate(torch.tensor([INF, NAN, 3.0, 5.0]), alpha=1.0)
    for objective in ("codat", "reward"):
        got = choose_samples(
            tokens, lengths, rewards, duplicates, gate, objective=objective, count=3
        )
        assert got.rows.numel() == 0
        assert got.tokens.shape == (0, 3, 1) and got.lengths.shape == (0, 3)


def test_choose_samples_rejects_bad_objective_and_count():
    tokens, lengths, rewards, gate = _random_case(0)
    duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    with pytest.raises(ValueError, match="objective"):
        choose_samples(tokens, lengths, rewards, duplicates, gate, objective="dp", count=2)
    with pytest.raises(ValueError, match="count"):
        choose_samples(tokens, lengths, rewards, duplicates, gate, objective="codat", count=0)


# ---------------------------------------------------------------------------------------------
# Crafted samples of one sentence (ids after each length are junk) and their rewards.

CRAFTED = [
    ([5, 6, 0, 0], 2, 0.9),
    ([5, 6, 9, 9], 2, 0.9),  # duplicate of 0 (junk after the length)
    ([7, 0, 0, 0], 1, 0.5),
    ([5, 6, 0, 0], 2, 0.9),  # duplicate of 0
    ([8, 9, 0, 0], 2, 0.1),
    ([10, 0, 0, 0], 1, 0.3),
    ([7, 0, 0, 0], 1, 0.5),  # duplicate of 2
    ([11, 12, 13, 0], 3, 0.2),
]


def _chosen(keep: float) -> list[tuple[tuple[int, ...], float, bool]]:
    """(sample, reward, distinct) of each sample codat trains on with codat.keep = `keep`, by
    reward, read back from their <s> y </s> encoding (`sample_targets`)."""
    K = len(CRAFTED)
    tokens = torch.tensor([[t for t, _, _ in CRAFTED]])
    lengths = torch.tensor([[n for _, n, _ in CRAFTED]])
    rewards = torch.tensor([[r for _, _, r in CRAFTED]], dtype=torch.float64)
    duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    chosen = choose_samples(
        tokens,
        lengths,
        rewards,
        duplicates,
        torch.tensor([True]),
        objective="codat",
        count=CodatConfig(samples=K, keep=keep).kept,
    )
    targets, target_lens = sample_targets(
        chosen.tokens, chosen.lengths, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
    )
    out = []
    for k in range(targets.shape[1]):
        n = int(target_lens[0, k])
        seq = targets[0, k, :n].tolist()
        assert seq[0] == BOS_ID and seq[-1] == EOS_ID
        assert (targets[0, k, n:] == PAD_ID).all()
        out.append(
            (tuple(seq[1:-1]), round(float(chosen.rewards[0, k]), 6), bool(chosen.distinct[0, k]))
        )
    return sorted(out, key=lambda x: (-x[1], not x[2]))


def test_kept_samples_are_the_best_distinct_ones():
    assert _chosen(0.25) == [((5, 6), 0.9, True), ((7,), 0.5, True)]
    assert _chosen(0.5) == [
        ((5, 6), 0.9, True),
        ((7,), 0.5, True),
        ((10,), 0.3, True),
        ((11, 12, 13), 0.2, True),
    ]


def test_duplicates_fill_only_slots_left_by_distinct_samples_and_are_flagged():
    # 5 distinct samples; the 6th slot goes to the best duplicate ([5 6], not distinct).
    assert _chosen(0.75) == [
        ((5, 6), 0.9, True),
        ((5, 6), 0.9, False),
        ((7,), 0.5, True),
        ((10,), 0.3, True),
        ((11, 12, 13), 0.2, True),
        ((8, 9), 0.1, True),
    ]
    everything = _chosen(1.0)
    assert len(everything) == 8
    assert [m for _, _, m in everything].count(False) == 3  # the three duplicates
    assert {s for s, _, m in everything if m} == {(5, 6), (7,), (10,), (11, 12, 13), (8, 9)}


def test_kept_count():
    assert CodatConfig(samples=8, keep=0.25).kept == 2
    assert CodatConfig(samples=8, keep=0.3).kept == 3  # ceil
    assert CodatConfig(samples=128, keep=0.25).kept == 32
    assert CodatConfig(samples=8, keep=1e-6).kept == 2  # at least a pair
    assert CodatConfig(samples=2, keep=1.0).kept == 2
    for bad, key in (({"samples": 1}, "codat.samples"), ({"keep": 0.0}, "codat.keep")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            CodatConfig(**bad)
    with pytest.raises(ValueError, match="codat.keep"):
        CodatConfig(keep=1.5)


# ---------------------------------------------------------------------------------------------
# select_samples and sample_term: the shared tail of every model's sample term


@pytest.mark.parametrize("objective", ["codat", "reward"])
def test_select_samples_then_sample_term_equal_the_pieces_composed(objective):
    from codat.objectives import contrastive_loss, reinforce_loss

    tokens, lengths, rewards, _ = _random_case(3)
    B, K, _ = tokens.shape
    ref_loss = torch.linspace(0.5, 3.0, B)
    ref_loss[1] = INF  # no path: never through the gate
    alpha, count = 2.0, 3
    selected = select_samples(
        tokens, lengths, rewards, ref_loss, objective=objective, count=count, alpha=alpha,
        pad_id=PAD_ID,
    )  # fmt: skip
    gate = dp_gate(ref_loss, alpha=alpha)
    duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    chosen = choose_samples(
        tokens, lengths, rewards, duplicates, gate, objective=objective, count=count
    )
    for got, want in zip(selected.chosen, chosen, strict=True):
        assert torch.equal(got, want)
    assert selected.gate_fraction == len(chosen.rows) / B
    torch.testing.assert_close(selected.baseline, rewards[chosen.rows].mean(1))
    assert selected.stats == sample_stats(rewards, duplicates, gate)

    # Worse samples scored higher: every ranking constraint is violated.
    scores = (-chosen.rewards).clone().requires_grad_()
    loss, stats = sample_term(scores, selected, objective=objective, margin=0.01, tie=0.001)
    if objective == "codat":
        want = contrastive_loss(
            scores, chosen.rewards, margin=0.01, mask=chosen.distinct, tie=0.001
        )
    else:
        want = reinforce_loss(scores, chosen.rewards, selected.baseline)
    torch.testing.assert_close(loss, want * len(chosen.rows) / B)
    key = "cl_loss" if objective == "codat" else "reward_loss"
    assert stats == {**selected.stats, key: pytest.approx(float(want.detach()))}
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_sample_term_is_zero_when_no_sentence_passes_the_gate():
    tokens, lengths, rewards, _ = _random_case(0)
    ref_loss = torch.full((tokens.shape[0],), 5.0)
    selected = select_samples(
        tokens, lengths, rewards, ref_loss, objective="codat", count=2, alpha=1.0, pad_id=PAD_ID
    )
    assert len(selected.chosen.rows) == 0 and selected.gate_fraction == 0.0
    loss, stats = sample_term(None, selected, objective="codat", margin=0.01, tie=0.0)
    assert loss.item() == 0.0 and stats["cl_loss"] == 0.0 and stats["gate_pass"] == 0.0


# ---------------------------------------------------------------------------------------------
# codat.filter score: the kept samples ranked by the model's length-normalised log q


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [1, 3, 10, 30])
def test_choose_samples_by_filter_key_matches_loop_in_order(seed, count):
    tokens, lengths, rewards, gate = _random_case(seed)
    g = torch.Generator().manual_seed(100 + seed)
    key = (-3 * torch.rand(rewards.shape, generator=g, dtype=torch.float64)).round(decimals=1)
    key[0, 0], key[0, 1] = float("-inf"), float("nan")  # no path; NaN counts as -inf
    duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    got = choose_samples(
        tokens, lengths, rewards, duplicates, gate, objective="codat", count=count, filter_key=key
    )
    loop_key = torch.nan_to_num(key, nan=float("-inf")).tolist()
    want = loop_choose_samples(loop_key, duplicates.tolist(), gate.tolist(), "codat", count)
    assert got.rows.tolist() == [b for b, _ in want]
    for r, (b, idx) in enumerate(want):  # the exact order: distinct first, ties by index
        assert got.rewards[r].tolist() == rewards[b, idx].tolist()
        assert got.lengths[r].tolist() == lengths[b, idx].tolist()
        assert got.distinct[r].tolist() == [not bool(duplicates[b, j]) for j in idx]


def test_filter_key_changes_which_samples_codat_keeps():
    tokens = torch.tensor([[[4], [5], [6], [7]]])
    lengths = torch.ones(1, 4, dtype=torch.long)
    rewards = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    key = torch.tensor([[-3.0, -0.5, -2.0, -1.0]])  # the model prefers samples 1 and 3
    none = torch.zeros(1, 4, dtype=torch.bool)
    gate = torch.tensor([True])
    by_reward = choose_samples(tokens, lengths, rewards, none, gate, objective="codat", count=2)
    by_score = choose_samples(
        tokens, lengths, rewards, none, gate, objective="codat", count=2, filter_key=key
    )
    assert sorted(by_reward.tokens[0, :, 0].tolist()) == [4, 6]
    assert by_score.tokens[0, :, 0].tolist() == [5, 7]


def test_sample_term_options_use_the_appendix_losses():
    from codat.objectives import reverse_kl_reward_loss, sentence_contrastive_loss

    tokens, lengths, rewards, _ = _random_case(3)
    ref_loss = torch.linspace(0.5, 3.0, tokens.shape[0])
    for objective in ("codat", "reward"):
        selected = select_samples(
            tokens, lengths, rewards, ref_loss, objective=objective, count=4, alpha=2.0,
            pad_id=PAD_ID,
        )  # fmt: skip
        chosen = selected.chosen
        frac = len(chosen.rows) / tokens.shape[0]
        scores = (-chosen.rewards).to(torch.bfloat16).requires_grad_()
        target_lens = chosen.lengths + 2
        loss, _ = sample_term(
            scores, selected, objective=objective, margin=0.01, tie=0.001,
            pair_average="sentence", reward_temperature=0.5, target_lens=target_lens,
        )  # fmt: skip
        s32 = scores.float()
        if objective == "codat":
            want = sentence_contrastive_loss(
                s32, chosen.rewards, margin=0.01, mask=chosen.distinct, tie=0.001,
                pair_average="sentence",
            )  # fmt: skip
        else:
            want = reverse_kl_reward_loss(s32 * target_lens, chosen.rewards, temperature=0.5)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, want * frac)
        if objective == "reward":
            with pytest.raises(ValueError, match="target_lens"):
                sample_term(
                    scores, selected, objective="reward", margin=0.01, tie=0.0,
                    reward_temperature=0.5,
                )  # fmt: skip
