"""CoDAT's contrastive ranking loss and the REINFORCE loss against loops and hand formulas.

Compared: `contrastive_loss` with `loop_contrastive_loss` (tests/reference.py: a double loop over
the samples of each sentence, ranks best-first by reward, stable on ties) on random batches with
masks, duplicate rewards, a tie tolerance and -inf scores, in value and in gradient (central finite
differences of the loop; the loss is piecewise linear, so they are exact away from kinks); the
sign convention on hand-computed two-sample cases; `reinforce_loss` with
-mean((R - b) * log q) over the participating samples, its gradient sign and -inf handling;
`sample_loss` (the objective's switch) with the loop over the distinct samples (codat) and with
`reinforce_loss` over all chosen samples (reward).
"""

from __future__ import annotations

import random

import pytest
import torch
from reference import loop_contrastive_loss

from codat.objectives import contrastive_loss, reinforce_loss, sample_loss

NEG_INF = float("-inf")


def _random_case(rng: random.Random):
    B, K = rng.randint(1, 4), rng.randint(1, 8)
    scores = [[rng.gauss(0.0, 1.0) for _ in range(K)] for _ in range(B)]
    if rng.random() < 0.5:  # many duplicate rewards (identical samples, ties)
        rewards = [[rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(K)] for _ in range(B)]
    else:
        rewards = [[rng.random() for _ in range(K)] for _ in range(B)]
    mask = None
    if rng.random() < 0.6:
        mask = [[rng.random() < 0.75 for _ in range(K)] for _ in range(B)]
    if rng.random() < 0.4:  # a sample without a path of its length: must act as masked
        b, k = rng.randrange(B), rng.randrange(K)
        scores[b][k] = NEG_INF
    margin = rng.choice([0.0, 0.05, 0.3])
    tie = rng.choice([0.0, 0.0, 0.2])
    return scores, rewards, mask, margin, tie


def _torch_loss(scores, rewards, mask, margin, tie, requires_grad=False):
    s = torch.tensor(scores, dtype=torch.float64, requires_grad=requires_grad)
    r = torch.tensor(rewards, dtype=torch.float64)
    m = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    return s, contrastive_loss(s, r, margin=margin, mask=m, tie=tie)


CASES = [_random_case(random.Random(seed)) for seed in range(60)]


def test_contrastive_loss_matches_double_loop_on_random_batches():
    positive = 0
    for scores, rewards, mask, margin, tie in CASES:
        _, got = _torch_loss(scores, rewards, mask, margin, tie)
        want = loop_contrastive_loss(scores, rewards, margin, mask, tie)
        assert got.dim() == 0 and torch.isfinite(got)
        assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-12), (scores, rewards, mask)
        positive += want > 0
    assert positive >= 20  # the cases are not all trivially zero


def test_contrastive_loss_gradient_matches_finite_differences_of_the_loop():
    eps = 1e-6
    nonzero = 0
    for scores, rewards, mask, margin, tie in CASES:
        s, loss = _torch_loss(scores, rewards, mask, margin, tie, requires_grad=True)
        (grad,) = torch.autograd.grad(loss, s)
        assert not torch.isnan(grad).any()
        for b, row in enumerate(scores):
            for k, value in enumerate(row):
                if value == NEG_INF:
                    assert grad[b, k] == 0  # an -inf score takes no part and gets no gradient
                    continue
                up = [list(r) for r in scores]
                down = [list(r) for r in scores]
                up[b][k] += eps
                down[b][k] -= eps
                fd = (
                    loop_contrastive_loss(up, rewards, margin, mask, tie)
                    - loop_contrastive_loss(down, rewards, margin, mask, tie)
                ) / (2 * eps)
                assert float(grad[b, k]) == pytest.approx(fd, abs=1e-6), (b, k)
        nonzero += bool(grad.abs().sum() > 0)
    assert nonzero >= 20


def test_loop_reference_ranks_ties_stably_and_skips_masked_samples():
    # Rewards [1, 1, 0]: ranks 0, 1, 2; pairs (0, 2) and (1, 2) with gaps 2 and 1.
    scores, rewards = [[0.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]]
    assert loop_contrastive_loss(scores, rewards, 0.1) == pytest.approx((0.2 + 0.1) / 2)
    # Masking sample 1 leaves the single pair (0, 2) with gap 1.
    mask = [[True, False, True]]
    assert loop_contrastive_loss(scores, rewards, 0.1, mask) == pytest.approx(0.1)
    got = contrastive_loss(
        torch.zeros(1, 3), torch.tensor(rewards), margin=0.1, mask=torch.tensor(mask)
    )
    assert float(got) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Sign convention


def _two(scores, rewards, margin=0.3, tie=0.0, mask=None):
    s = torch.tensor([scores], dtype=torch.float64, requires_grad=True)
    m = None if mask is None else torch.tensor([mask])
    loss = contrastive_loss(
        s, torch.tensor([rewards], dtype=torch.float64), margin=margin, mask=m, tie=tie
    )
    (grad,) = torch.autograd.grad(loss, s)
    return loss.item(), grad[0].tolist()


def test_better_sample_scoring_higher_by_more_than_the_margin_costs_nothing():
    loss, grad = _two([-1.0, -1.5], [0.9, 0.2])  # the better one is 0.5 > 0.3 higher
    assert loss == 0.0 and grad == [0.0, 0.0]
    loss, grad = _two([-1.5, -1.0], [0.2, 0.9])  # same, better sample second
    assert loss == 0.0 and grad == [0.0, 0.0]


def test_better_sample_scoring_lower_is_penalised_by_the_hand_value():
    # Better sample 0 (reward 0.9) scores -1.5, worse sample 1 scores -1.0; ranks 0 and 1:
    # max(0, s_1 - s_0 + (1 - 0) * 0.3) = 0.5 + 0.3 = 0.8 over one pair.
    loss, grad = _two([-1.5, -1.0], [0.9, 0.2])
    assert loss == pytest.approx(0.8, abs=1e-12)
    assert grad == pytest.approx([-1.0, 1.0])  # descent raises the better score, lowers the worse
    # Inside the margin: higher but by less than 0.3 still costs 0.3 - 0.1.
    loss, _ = _two([-1.0, -1.1], [0.9, 0.2])
    assert loss == pytest.approx(0.2, abs=1e-12)


def test_ties_and_fully_masked_sentences_give_zero_not_nan():
    loss, grad = _two([-5.0, 5.0], [0.5, 0.5])  # equal rewards: no pair
    assert loss == 0.0 and grad == [0.0, 0.0]
    loss, grad = _two([-5.0, 5.0], [0.55, 0.5], tie=0.1)  # within the tie tolerance
    assert loss == 0.0 and grad == [0.0, 0.0]
    loss, grad = _two([-5.0, 5.0], [0.9, 0.2], mask=[False, False])
    assert loss == 0.0 and grad == [0.0, 0.0]
    loss, grad = _two([-5.0, 5.0], [0.9, 0.2], mask=[True, False])  # one sample: no pair
    assert loss == 0.0 and grad == [0.0, 0.0]
    loss, grad = _two([NEG_INF, 5.0], [0.9, 0.2])  # -inf acts as masked
    assert loss == 0.0 and grad == [0.0, 0.0]
    assert loop_contrastive_loss([[NEG_INF, 5.0]], [[0.9, 0.2]], 0.3) == 0.0
    # An empty batch too.
    empty = contrastive_loss(torch.zeros(0, 3), torch.zeros(0, 3), margin=0.1)
    assert float(empty) == 0.0


def test_contrastive_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 4), margin=0.1)
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(6), torch.zeros(6), margin=0.1)


# ---------------------------------------------------------------------------------------------
# REINFORCE


def test_reinforce_loss_is_minus_mean_advantage_times_log_q_over_participants():
    g = torch.Generator().manual_seed(0)
    B, K = 3, 5
    log_q = -torch.rand(B, K, generator=g, dtype=torch.float64) * 3
    log_q[2, 1] = NEG_INF
    rewards = torch.rand(B, K, generator=g, dtype=torch.float64)
    baseline = rewards.mean(1)
    mask = torch.rand(B, K, generator=g) < 0.7
    mask[0, 0] = True
    for m in (None, mask):
        x = log_q.clone().requires_grad_()
        loss = reinforce_loss(x, rewards, baseline, mask=m)
        total, count = 0.0, 0
        want_grad = torch.zeros(B, K, dtype=torch.float64)
        for b in range(B):
            for k in range(K):
                if (m is not None and not m[b, k]) or log_q[b, k] == NEG_INF:
                    continue
                adv = float(rewards[b, k] - baseline[b])
                total += -adv * float(log_q[b, k])
                want_grad[b, k] = -adv
                count += 1
        assert loss.item() == pytest.approx(total / count, rel=1e-12)
        (grad,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(grad, want_grad / count)
        assert grad[2, 1] == 0  # -inf log q: ignored, no NaN
        # Above-baseline samples get a negative gradient: descent pushes their log q up.
        above = (rewards > baseline.unsqueeze(1)) & torch.isfinite(log_q)
        if m is not None:
            above &= m
        assert above.any() and (grad[above] < 0).all()
        below = (rewards < baseline.unsqueeze(1)) & torch.isfinite(log_q)
        if m is not None:
            below &= m
        assert below.any() and (grad[below] > 0).all()


def test_reinforce_loss_passes_no_gradient_to_rewards_and_is_zero_when_all_masked():
    log_q = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0]], requires_grad=True)
    loss = reinforce_loss(log_q, rewards, rewards.mean(1))
    # -((1 - 0.5) * -1 + (0 - 0.5) * -2) / 2 = -(-0.5 + 1) / 2 = -0.25
    assert loss.item() == pytest.approx(-0.25)
    g_q, g_r = torch.autograd.grad(loss, [log_q, rewards], allow_unused=True)
    assert g_q[0].tolist() == pytest.approx([-0.25, 0.25])
    assert g_r is None or (g_r == 0).all()
    none = reinforce_loss(log_q, rewards, rewards.mean(1), mask=torch.zeros(1, 2, dtype=torch.bool))
    assert none.item() == 0.0 and not torch.isnan(none)


# ---------------------------------------------------------------------------------------------
# sample_loss: the objective's loss on the chosen samples


def test_sample_loss_is_the_ranking_loss_over_distinct_samples_or_reinforce():
    g = torch.Generator().manual_seed(1)
    scores = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    rewards = torch.rand(3, 5, generator=g, dtype=torch.float64)
    distinct = torch.rand(3, 5, generator=g) < 0.7
    baseline = torch.rand(3, generator=g, dtype=torch.float64)
    codat = sample_loss(
        scores, rewards, distinct, baseline, objective="codat", margin=0.2, tie=0.01
    )
    want = loop_contrastive_loss(scores.tolist(), rewards.tolist(), 0.2, distinct.tolist(), 0.01)
    assert float(codat) == pytest.approx(want, rel=1e-12)
    # REINFORCE takes every chosen sample: the first R of i.i.d. draws, duplicates included.
    reward = sample_loss(
        scores, rewards, distinct, baseline, objective="reward", margin=0.2, tie=0.01
    )
    assert float(reward) == pytest.approx(float(reinforce_loss(scores, rewards, baseline)))
    with pytest.raises(ValueError, match="objective"):
        sample_loss(scores, rewards, distinct, baseline, objective="dp", margin=0.2, tie=0.01)
