"""codat.objectives against float64 references written from the definitions (method.md §2.4, §3).

Compared: `gather_token_logp` with log_softmax(logits.double()).gather(...) read at [b, j, i] =
log P(y_i | v_j) (float32 output, also from bfloat16 logits), the fused path (row chunks, its own
gradient) with the plain log_softmax path in values and gradients, across chunk boundaries, in
float64 / float32 / bfloat16 (bf16 gradients within one bf16 rounding); `dag_nll` with
-(mean_b ll_b / N_b), ll_b by explicit enumeration of all paths 0 = a_0 < ... < a_{N_b-1} = L_b - 1
(local brute force, float64, L <= 7), sentences with L_b < N_b contributing exactly 0 and counted
as invalid, and its autograd gradient with the gradient of the brute-force loss.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from codat import objectives
from codat.objectives import dag_nll, gather_token_logp

NEG_INF = float("-inf")


def _ragged_dag(graph_lens: list[int], L: int, N: int, seed: int):
    """float64 token_logp (B, L, N) and forward-only, row-normalised trans_logp (B, L, L)."""
    g = torch.Generator().manual_seed(seed)
    B = len(graph_lens)
    token = torch.log_softmax(2 * torch.randn(B, L, N, generator=g, dtype=torch.float64), dim=1)
    trans = torch.full((B, L, L), NEG_INF, dtype=torch.float64)
    for b, Lb in enumerate(graph_lens):
        for u in range(Lb - 1):
            trans[b, u, u + 1 : Lb] = torch.log_softmax(
                2 * torch.randn(Lb - u - 1, generator=g, dtype=torch.float64), dim=0
            )
    return token, trans


def _brute_ll(token: torch.Tensor, trans: torch.Tensor, Lb: int, Nb: int) -> torch.Tensor:
    """log sum over paths of exp(sum_i token[a_i, i] + sum_i trans[a_i, a_{i+1}]); -inf if none."""
    scores = []
    if Nb >= 2 and Lb >= Nb:
        for mid in itertools.combinations(range(1, Lb - 1), Nb - 2):
            a = (0, *mid, Lb - 1)
            s = sum(token[j, i] for i, j in enumerate(a))
            s = s + sum(trans[u, v] for u, v in itertools.pairwise(a))
            scores.append(s)
    if not scores:
        return torch.tensor(NEG_INF, dtype=torch.float64)
    return torch.logsumexp(torch.stack(scores), dim=0)


def test_gather_token_logp_equals_float64_log_softmax_gather():
    logits = 3 * torch.randn(2, 5, 11)
    tgt = torch.tensor([[2, 7, 7, 3], [2, 10, 3, 0]])
    got = gather_token_logp(logits, tgt)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert got.shape == (2, 5, 4) and got.dtype == torch.float32
    for b, j, i in itertools.product(range(2), range(5), range(4)):
        assert math.isclose(float(got[b, j, i]), float(ref[b, j, tgt[b, i]]), abs_tol=1e-5)


def test_gather_token_logp_float32_from_bfloat16_logits():
    logits = (3 * torch.randn(2, 4, 9)).to(torch.bfloat16)
    tgt = torch.tensor([[1, 8, 5], [0, 2, 2]])
    got = gather_token_logp(logits, tgt)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), dim=-1).gather(-1, tgt.unsqueeze(1).expand(2, 4, 3))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_gather_token_logp_gradient_matches_float64():
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    tgt = torch.tensor([[1, 4], [6, 6]])
    w = torch.randn(2, 3, 2, dtype=torch.float64)
    (gather_token_logp(logits, tgt).double() * w).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, tgt.unsqueeze(1).expand(2, 3, 2))
    (ref * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_gather_token_logp_equals_plain_path_across_chunks(dtype, monkeypatch):
    monkeypatch.setattr(objectives, "chunk_rows", lambda vocab: 4)  # 7 * 5 rows: 9 chunks
    g = torch.Generator().manual_seed(1)
    base = (3 * torch.randn(7, 5, 13, generator=g, dtype=torch.float64)).to(dtype)
    tgt = torch.randint(0, 13, (7, 6), generator=g)
    tgt[0, :3] = 4  # a token repeated in one target: its gradients add up
    w = torch.randn(7, 5, 6, generator=g, dtype=torch.float64)
    got, ref = [], []
    for fused, out in ((True, got), (False, ref)):
        logits = base.clone().requires_grad_(True)
        logp = gather_token_logp(logits, tgt, fused=fused)
        (logp.double() * w).sum().backward()
        out += [logp.detach(), logits.grad]
    assert got[0].dtype == ref[0].dtype == torch.promote_types(dtype, torch.float32)
    eps = torch.finfo(got[0].dtype).eps  # logits - lse against log_softmax: a few roundings
    torch.testing.assert_close(got[0], ref[0], rtol=8 * eps, atol=8 * eps)
    assert got[1].dtype == dtype
    if dtype == torch.bfloat16:  # one bf16 rounding of (almost) the same float32 value
        torch.testing.assert_close(got[1], ref[1], rtol=2**-7, atol=1e-6)
    else:  # softmax as exp(logits - lse): the rounding of lse, relative to |logits - lse|
        torch.testing.assert_close(got[1], ref[1], rtol=64 * eps, atol=8 * eps)


def test_dag_nll_equals_length_normalised_brute_force_with_invalid_zeroed():
    L, N = 7, 5
    graph_lens = [7, 4, 6, 3, 5, 2]
    target_lens = [5, 5, 3, 3, 2, 4]  # sentences 1 and 5 have L_b < N_b: invalid
    token, trans = _ragged_dag(graph_lens, L, N, seed=3)
    token.requires_grad_(True)
    trans.requires_grad_(True)
    loss, per, invalid = dag_nll(token, trans, torch.tensor(graph_lens), torch.tensor(target_lens))
    assert invalid == 2
    lls = [
        _brute_ll(token[b], trans[b], Lb, Nb)
        for b, (Lb, Nb) in enumerate(zip(graph_lens, target_lens, strict=True))
    ]
    terms = [
        torch.zeros((), dtype=torch.float64) if not math.isfinite(float(ll.detach())) else -ll / Nb
        for ll, Nb in zip(lls, target_lens, strict=True)
    ]
    ref = torch.stack(terms).mean()  # divided by B = 6, invalid ones included
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(per, torch.stack(terms).detach(), rtol=1e-10, atol=1e-10)
    assert per[1] == 0 and per[5] == 0
    assert not per.requires_grad

    g_token, g_trans = torch.autograd.grad(loss, (token, trans))
    r_token, r_trans = torch.autograd.grad(ref, (token, trans))
    torch.testing.assert_close(g_token, r_token, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_trans, r_trans, rtol=1e-9, atol=1e-10)
    for b in (1, 5):  # invalid sentences get exactly zero gradient
        assert torch.count_nonzero(g_token[b]) == 0 and torch.count_nonzero(g_trans[b]) == 0


def test_dag_nll_all_invalid_is_zero_and_finite():
    token, trans = _ragged_dag([2, 3], 3, 4, seed=4)
    token.requires_grad_(True)
    loss, per, invalid = dag_nll(token, trans, torch.tensor([2, 3]), torch.tensor([4, 4]))
    assert invalid == 2 and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.count_nonzero(token.grad) == 0


def test_dag_nll_float32_matches_float64():
    graph_lens, target_lens = [7, 5, 6], [4, 5, 2]
    token, trans = _ragged_dag(graph_lens, 7, 5, seed=5)
    args = (torch.tensor(graph_lens), torch.tensor(target_lens))
    loss64, _, _ = dag_nll(token, trans, *args)
    loss32, _, _ = dag_nll(token.float(), trans.float(), *args)
    assert loss32.dtype == torch.float32
    assert math.isclose(float(loss32), float(loss64), rel_tol=1e-5, abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Appendix A (+Reward as reverse KL) and Appendix C (per-sentence pair averaging)


def _sample_case(seed: int, B: int = 3, K: int = 6):
    g = torch.Generator().manual_seed(seed)
    log_q = (-5 * torch.rand(B, K, generator=g, dtype=torch.float64)).requires_grad_()
    rewards = torch.rand(B, K, generator=g, dtype=torch.float64).round(decimals=1)
    mask = torch.rand(B, K, generator=g) > 0.3
    mask[0] = True
    mask[2, 1:] = False  # one sentence with a single sample
    return log_q, rewards, mask


@pytest.mark.parametrize("temperature", [1.0, 0.25])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reverse_kl_reward_loss_matches_loop_in_value_and_gradient(temperature, seed):
    from reference import loop_reverse_kl_reward_loss

    log_q, rewards, mask = _sample_case(seed)
    with torch.no_grad():
        log_q[1, 0] = float("-inf")  # no path: takes no part
    got = objectives.reverse_kl_reward_loss(log_q, rewards, temperature=temperature, mask=mask)
    (g_got,) = torch.autograd.grad(got, log_q)
    want = loop_reverse_kl_reward_loss(log_q, rewards.tolist(), temperature, mask.tolist())
    (g_want,) = torch.autograd.grad(want, log_q)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    assert torch.isfinite(g_got).all()


def test_reverse_kl_reward_gradient_is_the_kl_gradient_on_a_two_sample_space():
    # q = softmax(theta) over two outcomes, each drawn once (K = 2, exact enumeration weights):
    # the estimator with weights q_k equals d/dtheta KL(q || exp(R / T) / Z).
    theta = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([[0.9, 0.2]], dtype=torch.float64)
    T = 0.5
    log_q = torch.log_softmax(theta, 0)
    q = log_q.exp().detach()
    kl = (log_q.exp() * (log_q - rewards[0] / T)).sum()
    (want,) = torch.autograd.grad(kl, theta)
    # E_q[(log q - R/T) grad log q] with exact expectation: weight each sample's loss by q_k * K.
    log_q2 = torch.log_softmax(theta, 0)
    adv = (rewards[0] / T - log_q2).detach()
    est = -((adv - (q * adv).sum()) * log_q2 * q).sum()
    (got,) = torch.autograd.grad(est, theta)
    torch.testing.assert_close(got, want)
    # and the library's loss on uniformly weighted samples has the same sign of the update
    loss = objectives.reverse_kl_reward_loss(
        torch.log_softmax(theta, 0).unsqueeze(0), rewards, temperature=T
    )
    (lib,) = torch.autograd.grad(loss, theta)
    assert torch.sign(lib[0]) == torch.sign(want[0])


def test_reverse_kl_reward_loss_rejects_bad_temperature_and_shapes():
    log_q, rewards, _ = _sample_case(0)
    with pytest.raises(ValueError, match="reward_temperature"):
        objectives.reverse_kl_reward_loss(log_q, rewards, temperature=0.0)
    with pytest.raises(ValueError, match="must match"):
        objectives.reverse_kl_reward_loss(log_q, rewards[:, :2], temperature=1.0)


@pytest.mark.parametrize("tie", [0.0, 0.05])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sentence_pair_average_matches_loop_in_value_and_gradient(tie, seed):
    from reference import loop_contrastive_loss, loop_sentence_contrastive_loss

    scores, rewards, mask = _sample_case(seed)
    for average, loop in (
        ("sentence", loop_sentence_contrastive_loss),
        ("pooled", loop_contrastive_loss),
    ):
        got = objectives.sentence_contrastive_loss(
            scores, rewards, margin=0.3, mask=mask, tie=tie, pair_average=average
        )
        want = loop(scores.tolist(), rewards.tolist(), 0.3, mask.tolist(), tie)
        assert got.dtype == torch.float32
        assert float(got.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6), average
        (g,) = torch.autograd.grad(got, scores)
        eps = 1e-6
        for b, k in itertools.product(range(3), range(6)):
            bumped = scores.detach().clone()
            bumped[b, k] += eps
            up = loop(bumped.tolist(), rewards.tolist(), 0.3, mask.tolist(), tie)
            assert float(g[b, k]) == pytest.approx((up - want) / eps, abs=1e-3), (average, b, k)


def test_sentence_pair_average_weighs_sentences_equally():
    # Sentence 0 has 3 samples (3 pairs), sentence 1 has 2 (1 pair); only sentence 1 violates.
    scores = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -1.0, float("-inf")]])
    rewards = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.2, 0.0]])
    pooled = objectives.sentence_contrastive_loss(scores, rewards, margin=0.0)
    sentence = objectives.sentence_contrastive_loss(
        scores, rewards, margin=0.0, pair_average="sentence"
    )
    assert float(pooled) == pytest.approx(1.0 / 4)  # one violation of 1.0 over 4 pairs
    assert float(sentence) == pytest.approx((0.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="pair_average"):
        objectives.sentence_contrastive_loss(scores, rewards, margin=0.0, pair_average="x")


def test_dag_nll_hides_only_sentences_without_a_path():
    """A graph shorter than its target counts as invalid and adds 0; a sentence with a path whose
    likelihood is not finite (here a token no vertex can emit) makes the loss non-finite."""
    from codat.objectives import dag_nll

    torch.manual_seed(0)
    B, L, N = 2, 5, 3
    trans = torch.randn(B, L, L).triu(1).masked_fill(torch.ones(L, L).tril().bool(), float("-inf"))
    trans = torch.log_softmax(trans, dim=-1).nan_to_num(neginf=float("-inf"))
    trans[:, -1] = float("-inf")
    token = torch.log_softmax(torch.randn(B, L, N), dim=1)
    graph_lens, target_lens = torch.tensor([5, 2]), torch.tensor([3, 3])  # sentence 1: no path
    loss, per, invalid = dag_nll(token, trans, graph_lens, target_lens)
    assert invalid == 1 and per[1] == 0 and torch.isfinite(loss)
    token[0, :, 1] = float("-inf")  # sentence 0 has a path, but token 1 cannot be emitted
    loss, per, invalid = dag_nll(token, trans, graph_lens, target_lens)
    assert invalid == 1 and not torch.isfinite(loss)
