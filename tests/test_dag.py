"""codat.dag against the brute-force enumerations of tests/reference.py.

Compared: `dag_log_likelihood` with the logsumexp over all enumerated paths (values and autograd
gradients w.r.t. token_logp and trans_logp, float64, ragged batches, L <= 7), float32 with float64,
the single-path case N_b = L_b with the explicit diagonal sum, and the no-path case L_b < N_b
(-inf, zero gradients); `dag_best_path` with the argmax over enumerated paths (same alignment,
same score); `logsumexp_safe` / `log_softmax_safe` with torch's own functions on finite slices and
with the -inf / zero-gradient convention on all -inf slices. Invalid shapes must raise ValueError.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    brute_force_best_path,
    brute_force_log_likelihood,
    dense_dag_log_likelihood,
    random_dag,
)

import codat.dag as dagmod
from codat.benchmark import make_dag_inputs
from codat.dag import (
    dag_best_path,
    dag_log_likelihood,
    dag_log_likelihood_shared,
    log_softmax_safe,
    logsumexp_safe,
    safe_log,
)

INF = float("inf")

# (L, N, graph_lens, target_lens): hand-picked ragged batch covering many paths, one path
# (N_b = L_b and N_b = 2), no path (L_b < N_b, and N_b = 1 < L_b) and the 1-vertex graph.
RAGGED = (7, 5, [7, 6, 5, 4, 3, 2, 7, 1], [5, 3, 5, 2, 4, 2, 1, 1])


def _lens(*xs: list[int]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(x, dtype=torch.long) for x in xs)


def _random_case(seed: int) -> tuple[int, int, list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    L, N, B = 7, 5, 6
    graph_lens = torch.randint(2, L + 1, (B,), generator=g).tolist()
    target_lens = torch.randint(2, N + 1, (B,), generator=g).tolist()
    return L, N, graph_lens, target_lens


CASES = [RAGGED, _random_case(1), _random_case(2), _random_case(3)]


def _grads(out: torch.Tensor, weights: torch.Tensor, inputs: list[torch.Tensor]):
    """Gradients of sum_b w_b * out_b; inputs that do not influence it get zeros."""
    return torch.autograd.grad(
        (weights * out).sum(), inputs, allow_unused=True, materialize_grads=True
    )


def _leaves(token_logp: torch.Tensor, trans_logp: torch.Tensor):
    return token_logp.clone().requires_grad_(), trans_logp.clone().requires_grad_()


@pytest.mark.parametrize("case", CASES)
def test_log_likelihood_matches_brute_force_on_ragged_batch(case):
    L, N, graph_lens, target_lens = case
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N)
    got = dag_log_likelihood(token_logp, trans_logp, gl, tl)
    want = brute_force_log_likelihood(token_logp, trans_logp, gl, tl)
    assert got.dtype == torch.float64
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got == -INF, want == -INF)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_log_likelihood_gradients_match_brute_force_on_ragged_batch(case):
    L, N, graph_lens, target_lens = case
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N)
    weights = torch.rand(len(gl), dtype=torch.float64) + 0.5
    tok, tr = _leaves(token_logp, trans_logp)
    got = _grads(dag_log_likelihood(tok, tr, gl, tl), weights, [tok, tr])
    tok_ref, tr_ref = _leaves(token_logp, trans_logp)
    want = _grads(brute_force_log_likelihood(tok_ref, tr_ref, gl, tl), weights, [tok_ref, tr_ref])
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    # The test must be able to fail: the gradients are not trivially zero.
    assert got[0].abs().sum() > 0.1 and got[1].abs().sum() > 0.1


def test_log_likelihood_float32_is_close_to_float64():
    L, N, graph_lens, target_lens = RAGGED
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N)
    weights = torch.rand(len(gl), dtype=torch.float64) + 0.5
    tok64, tr64 = _leaves(token_logp, trans_logp)
    ll64 = dag_log_likelihood(tok64, tr64, gl, tl)
    g64 = _grads(ll64, weights, [tok64, tr64])
    tok32, tr32 = _leaves(token_logp.float(), trans_logp.float())
    ll32 = dag_log_likelihood(tok32, tr32, gl, tl)
    g32 = _grads(ll32, weights.float(), [tok32, tr32])
    assert ll32.dtype == torch.float32
    torch.testing.assert_close(ll32.double(), ll64, rtol=1e-5, atol=1e-5)
    for a, b in zip(g32, g64, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_log_likelihood_with_target_filling_graph_is_the_diagonal_path():
    graph_lens = [6, 4, 2, 1]
    gl, tl = _lens(graph_lens, graph_lens)
    token_logp, trans_logp = random_dag(4, 6, gl, 6)
    tok, tr = _leaves(token_logp, trans_logp)
    ll = dag_log_likelihood(tok, tr, gl, tl)
    g_tok, g_tr = torch.autograd.grad(ll.sum(), [tok, tr])
    want_g_tok = torch.zeros_like(token_logp)
    want_g_tr = torch.zeros_like(trans_logp)
    for b, n in enumerate(graph_lens):
        want = sum(float(token_logp[b, i, i]) for i in range(n))
        want += sum(float(trans_logp[b, i, i + 1]) for i in range(n - 1))
        assert math.isclose(ll[b].item(), want, rel_tol=1e-12, abs_tol=1e-12)
        for i in range(n):
            want_g_tok[b, i, i] = 1.0
        for i in range(n - 1):
            want_g_tr[b, i, i + 1] = 1.0
    torch.testing.assert_close(g_tok, want_g_tok)
    torch.testing.assert_close(g_tr, want_g_tr)


def test_log_likelihood_with_zero_token_scores_sums_to_one_over_target_lengths():
    # With log P(y | v) = 0, exp(ll) for N_b vertices is the probability that the random walk from
    # vertex 0 visits exactly N_b vertices before it stops at L_b - 1; these sum to 1 over N_b.
    L = 6
    gl = torch.tensor([6, 5, 3, 2])
    _, trans_logp = random_dag(4, L, gl, 1)
    token_logp = torch.zeros(4, L, L, dtype=torch.float64)
    total = torch.zeros(4, dtype=torch.float64)
    for n in range(1, L + 1):
        tl = torch.full((4,), n)
        total += dag_log_likelihood(token_logp, trans_logp, gl, tl).exp()
    torch.testing.assert_close(total, torch.ones(4, dtype=torch.float64))


def test_log_likelihood_is_minus_inf_with_zero_gradients_when_graph_is_too_small():
    gl, tl = _lens([3, 2, 5, 6], [4, 5, 3, 1])  # sentence 2 is possible, the others are not
    token_logp, trans_logp = random_dag(4, 6, gl, 5)
    tok, tr = _leaves(token_logp, trans_logp)
    ll = dag_log_likelihood(tok, tr, gl, tl)
    assert torch.equal(torch.isinf(ll), torch.tensor([True, True, False, True]))
    assert (ll[[0, 1, 3]] == -INF).all()
    g_tok, g_tr = torch.autograd.grad(ll[[0, 1, 3]].sum(), [tok, tr], retain_graph=True)
    assert not torch.isnan(g_tok).any() and not torch.isnan(g_tr).any()
    assert (g_tok == 0).all() and (g_tr == 0).all()
    # The possible sentence in the same batch still gets its gradient, and no NaN leaks into it.
    g_tok, g_tr = torch.autograd.grad(ll.sum(), [tok, tr])
    assert torch.isfinite(g_tok).all() and torch.isfinite(g_tr).all()
    assert g_tok[2].abs().sum() > 0 and (g_tok[[0, 1, 3]] == 0).all()


def test_log_likelihood_with_unreachable_vertices_matches_brute_force_without_nan():
    L, N = 7, 4
    gl, tl = _lens([7, 7, 6, 5, 7], [4, 3, 4, 3, 2])
    token_logp, trans_logp = random_dag(5, L, gl, N, drop_edges=0.6)
    assert torch.isinf(trans_logp[0, 0, 1:7]).any(), "the DAG must be sparse to test anything"
    weights = torch.rand(5, dtype=torch.float64) + 0.5
    tok, tr = _leaves(token_logp, trans_logp)
    ll = dag_log_likelihood(tok, tr, gl, tl)
    got = _grads(ll, weights, [tok, tr])
    tok_ref, tr_ref = _leaves(token_logp, trans_logp)
    ref = brute_force_log_likelihood(tok_ref, tr_ref, gl, tl)
    assert torch.isfinite(ref).all(), "precondition: every sentence keeps at least one path"
    want = _grads(ref, weights, [tok_ref, tr_ref])
    torch.testing.assert_close(ll, ref.detach(), rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_log_likelihood_with_minus_inf_token_scores_matches_brute_force_without_nan():
    # Forced alignment (method.md §4) sets some log P(y_i | v_j) to -inf.
    L, N, graph_lens, target_lens = RAGGED
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N)
    original = token_logp.clone()
    token_logp[torch.rand_like(token_logp) < 0.3] = -INF
    for b, (n_vertices, n_tokens) in enumerate(zip(graph_lens, target_lens, strict=True)):
        # Keep one path finite so that the comparison exercises finite gradients.
        for i, a in enumerate([*range(n_tokens - 1), n_vertices - 1]):
            token_logp[b, a, i] = original[b, a, i]
    weights = torch.rand(len(gl), dtype=torch.float64) + 0.5
    tok, tr = _leaves(token_logp, trans_logp)
    ll = dag_log_likelihood(tok, tr, gl, tl)
    got = _grads(ll, weights, [tok, tr])
    tok_ref, tr_ref = _leaves(token_logp, trans_logp)
    ref = brute_force_log_likelihood(tok_ref, tr_ref, gl, tl)
    want = _grads(ref, weights, [tok_ref, tr_ref])
    assert torch.equal(ll == -INF, ref == -INF)
    torch.testing.assert_close(ll, ref.detach(), rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["first_token", "last_token", "edge_to_last_vertex"])
def test_log_likelihood_without_finite_path_has_zero_gradients(kind):
    gl, tl = _lens([4], [2] if kind == "edge_to_last_vertex" else [3])
    token_logp, trans_logp = random_dag(1, 4, gl, 3)
    if kind == "first_token":
        token_logp[0, 0, 0] = -INF
    elif kind == "last_token":
        token_logp[0, 3, 2] = -INF
    else:
        trans_logp[0, 0, 3] = -INF  # the only 2-vertex path is 0 -> 3
    tok, tr = _leaves(token_logp, trans_logp)
    ll = dag_log_likelihood(tok, tr, gl, tl)
    assert ll.item() == -INF
    g_tok, g_tr = torch.autograd.grad(ll.sum(), [tok, tr])
    assert (g_tok == 0).all() and (g_tr == 0).all()


def _bad_args():
    tok = torch.zeros(2, 4, 3)
    tr = torch.zeros(2, 4, 4)
    gl = torch.tensor([4, 3])
    tl = torch.tensor([3, 2])
    return {
        "token_logp_2d": (tok[0], tr, gl, tl),
        "trans_logp_4d": (tok, tr.unsqueeze(0), gl, tl),
        "trans_logp_not_square": (tok, torch.zeros(2, 4, 5), gl, tl),
        "trans_logp_wrong_batch": (tok, torch.zeros(3, 4, 4), gl, tl),
        "graph_lens_wrong_batch": (tok, tr, torch.tensor([4, 3, 2]), tl),
        "target_lens_2d": (tok, tr, gl, tl.unsqueeze(0)),
        "graph_len_zero": (tok, tr, torch.tensor([0, 3]), tl),
        "graph_len_above_L": (tok, tr, torch.tensor([5, 3]), tl),
        "target_len_zero": (tok, tr, gl, torch.tensor([0, 2])),
        "target_len_above_N": (tok, tr, gl, torch.tensor([4, 2])),
    }


@pytest.mark.parametrize("fn", [dag_log_likelihood, dag_best_path])
@pytest.mark.parametrize("name", list(_bad_args()))
def test_dag_functions_reject_invalid_shapes_and_lengths(fn, name):
    with pytest.raises(ValueError):
        fn(*_bad_args()[name])


def test_logsumexp_safe_matches_torch_and_is_minus_inf_with_zero_gradient_on_empty_slices():
    x = torch.randn(4, 5, dtype=torch.float64)
    x[1] = -INF  # all -inf slice
    x[2, :3] = -INF  # partly -inf slice
    x.requires_grad_()
    out = logsumexp_safe(x, dim=1)
    assert out[1].item() == -INF
    torch.testing.assert_close(out[[0, 2, 3]], torch.logsumexp(x.detach()[[0, 2, 3]], dim=1))
    torch.testing.assert_close(logsumexp_safe(x, dim=1, keepdim=True), out.unsqueeze(1))
    (grad,) = torch.autograd.grad(out[torch.isfinite(out)].sum() + out[1], x)
    assert not torch.isnan(grad).any()
    assert (grad[1] == 0).all()
    torch.testing.assert_close(grad[[0, 2, 3]], torch.softmax(x.detach()[[0, 2, 3]], dim=1))


def test_log_softmax_safe_matches_torch_and_is_minus_inf_with_zero_gradient_on_empty_slices():
    x = torch.randn(3, 4, dtype=torch.float64)
    x[0] = -INF
    x[2, 1] = -INF
    x.requires_grad_()
    out = log_softmax_safe(x, dim=-1)
    assert (out[0] == -INF).all()
    torch.testing.assert_close(out[1:], torch.log_softmax(x.detach()[1:], dim=-1))
    w = torch.randn(3, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((torch.where(torch.isfinite(out), out, 0) * w).sum(), x)
    assert not torch.isnan(grad).any()
    assert (grad[0] == 0).all()
    x_ref = x.detach()[1:].clone().requires_grad_()
    ref = torch.log_softmax(x_ref, dim=-1)
    masked_ref = torch.where(torch.isfinite(ref), ref, 0)
    (grad_ref,) = torch.autograd.grad((masked_ref * w[1:]).sum(), x_ref)
    torch.testing.assert_close(grad[1:], grad_ref)


def test_safe_log_of_zero_is_minus_inf_with_zero_gradient():
    x = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    out = safe_log(x)
    assert out[0].item() == -INF
    torch.testing.assert_close(out[1:], torch.log(x.detach()[1:]))
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([0.0, 2.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("case", CASES)
def test_best_path_matches_brute_force_on_ragged_batch(case):
    L, N, graph_lens, target_lens = case
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N)
    path, score = dag_best_path(token_logp, trans_logp, gl, tl)
    want_path, want_score = brute_force_best_path(token_logp, trans_logp, gl, tl)
    assert path.dtype == torch.long and path.shape == (len(gl), L)
    assert torch.equal(path, want_path)
    assert torch.equal(score == -INF, want_score == -INF)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-5, atol=1e-5)


def test_best_path_matches_brute_force_on_sparse_dag():
    gl, tl = _lens([7, 7, 6, 5, 7], [4, 3, 4, 3, 2])
    token_logp, trans_logp = random_dag(5, 7, gl, 4, drop_edges=0.6)
    path, score = dag_best_path(token_logp, trans_logp, gl, tl)
    want_path, want_score = brute_force_best_path(token_logp, trans_logp, gl, tl)
    assert torch.equal(path, want_path)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-5, atol=1e-5)


def test_best_path_is_all_minus_one_with_minus_inf_score_when_impossible():
    gl, tl = _lens([3, 6, 2, 5], [4, 3, 5, 1])  # only sentence 1 has a path
    token_logp, trans_logp = random_dag(4, 6, gl, 5)
    path, score = dag_best_path(token_logp, trans_logp, gl, tl)
    assert (score[[0, 2, 3]] == -INF).all()
    assert (path[[0, 2, 3]] == -1).all()
    assert torch.isfinite(score[1])
    assert sorted(path[1][path[1] >= 0].tolist()) == [0, 1, 2]


# --- float32 exactness on sharp and long inputs (against the float64 dense twin) ----------------
# Logits x10 / x30 give the peaky distributions of a trained model; there a column's largest term
# can underflow in a scaled-space matmul unless the scales follow the vertex blocks.


def _fp32_and_fp64(fn, twin, inputs, weights):
    """(value, grads) of fn in float32 and of the float64 twin, for sum_b w_b * out_b."""
    token_logp, trans_logp, gl, tl = inputs
    tok, tr = _leaves(token_logp.float(), trans_logp.float())
    got = fn(tok, tr, gl, tl)
    got_grads = _grads(got, weights.float(), [tok, tr])
    tok64, tr64 = _leaves(token_logp.double(), trans_logp.double())
    want = twin(tok64, tr64, gl, tl)
    return got.detach(), got_grads, want.detach(), _grads(want, weights, [tok64, tr64])


@pytest.mark.parametrize(
    ("shape", "scale"),
    [((4, 30, 240), 10.0), ((4, 30, 240), 30.0), ((2, 100, 800), 1.0), ((2, 60, 480), 10.0)],
)
def test_log_likelihood_float32_is_exact_on_sharp_and_long_inputs(shape, scale):
    B, N, L = shape
    inputs = make_dag_inputs(B, N, L, seed=1, scale=scale)
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    got, got_grads, want, want_grads = _fp32_and_fp64(
        dag_log_likelihood, dense_dag_log_likelihood, inputs, weights
    )
    assert got.dtype == torch.float32 and torch.isfinite(want).all()
    assert torch.isfinite(got).all(), "a finite float64 likelihood must stay finite in float32"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=0, atol=5e-4)
    assert want_grads[0].abs().sum() > 1  # the gradients are not trivially zero


def test_shared_log_likelihood_float32_is_exact_on_sharp_inputs():
    B, N, L, K = 3, 20, 160, 3
    token_logp, trans_logp, gl, _ = make_dag_inputs(B, N, L, seed=2, scale=30.0)
    g = torch.Generator().manual_seed(0)
    # K targets per sentence: the token columns in K different orders, of K different lengths.
    tok = torch.stack([token_logp[:, :, torch.randperm(N, generator=g)] for _ in range(K)], 1)
    tl = torch.randint(N // 2, N + 1, (B, K), generator=g)
    weights = torch.rand(B, K, dtype=torch.float64) + 0.5
    tok32, tr32 = _leaves(tok, trans_logp)
    got = dag_log_likelihood_shared(tok32, tr32, gl, tl)
    got_grads = _grads(got, weights.float(), [tok32, tr32])
    tok64, tr64 = _leaves(tok.double(), trans_logp.double())
    want = torch.stack(
        [dense_dag_log_likelihood(tok64[:, k], tr64, gl, tl[:, k]) for k in range(K)], dim=1
    )
    want_grads = _grads(want, weights, [tok64, tr64])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=0, atol=5e-4)


def test_dense_twin_matches_brute_force():
    L, N, graph_lens, target_lens = RAGGED
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N, drop_edges=0.3)
    weights = torch.rand(len(gl), dtype=torch.float64) + 0.5
    tok, tr = _leaves(token_logp, trans_logp)
    dense = dense_dag_log_likelihood(tok, tr, gl, tl)
    tok_ref, tr_ref = _leaves(token_logp, trans_logp)
    brute = brute_force_log_likelihood(tok_ref, tr_ref, gl, tl)
    torch.testing.assert_close(dense, brute, rtol=1e-10, atol=1e-10)
    for a, b in zip(
        _grads(dense, weights, [tok, tr]), _grads(brute, weights, [tok_ref, tr_ref]), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("scale", [10.0, 30.0])
def test_best_path_matches_brute_force_on_sharp_inputs(scale):
    L, N, graph_lens, target_lens = RAGGED
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N)
    token_logp, trans_logp = scale * token_logp, scale * trans_logp  # max-plus: no underflow
    path, score = dag_best_path(token_logp.float(), trans_logp.float(), gl, tl)
    want_path, want_score = brute_force_best_path(token_logp, trans_logp, gl, tl)
    assert torch.equal(path, want_path)
    torch.testing.assert_close(score.double(), want_score, rtol=1e-6, atol=1e-4)


def test_log_likelihood_under_bf16_autocast_is_the_float32_result():
    # Validation, analyze and CoDAT's scoring call the DP inside the model's autocast: its
    # matmuls must stay float32 there (a bf16 bmm would round every block sum to 8 bits).
    inputs = make_dag_inputs(3, 12, 40, seed=3, scale=3.0)
    weights = torch.rand(3, dtype=torch.float64) + 0.5
    tok, tr = _leaves(inputs[0], inputs[1])
    plain = dag_log_likelihood(tok, tr, inputs[2], inputs[3])
    plain_grads = _grads(plain, weights.float(), [tok, tr])
    tok_a, tr_a = _leaves(inputs[0], inputs[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = dag_log_likelihood(tok_a, tr_a, inputs[2], inputs[3])
        auto_grads = _grads(auto, weights.float(), [tok_a, tr_a])
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)
    for a, b in zip(auto_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_log_likelihood_ignores_backward_transition_entries():
    # Paths only move forward (k < j): finite scores at k >= j, which a careless caller might leave
    # unmasked, change nothing and get zero gradients, as in the brute-force enumeration.
    L, N, graph_lens, target_lens = RAGGED
    gl, tl = _lens(graph_lens, target_lens)
    token_logp, trans_logp = random_dag(len(gl), L, gl, N)
    backward = torch.ones(L, L, dtype=torch.bool).tril()
    noisy = torch.where(backward, torch.randn(len(gl), L, L, dtype=torch.float64), trans_logp)
    weights = torch.rand(len(gl), dtype=torch.float64) + 0.5
    tok, tr = _leaves(token_logp, noisy)
    got = dag_log_likelihood(tok, tr, gl, tl)
    grad_tok, grad_tr = _grads(got, weights, [tok, tr])
    tok_ref, tr_ref = _leaves(token_logp, trans_logp)
    want = brute_force_log_likelihood(tok_ref, tr_ref, gl, tl)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    want_tok, want_tr = _grads(want, weights, [tok_ref, tr_ref])
    torch.testing.assert_close(grad_tok, want_tok, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad_tr, want_tr, rtol=1e-9, atol=1e-10)
    assert (grad_tr[:, backward] == 0).all()


def test_block_step_does_not_redo_columns_without_a_finite_term():
    # Block 1 (vertices 4..7) has alpha = -inf at vertex 4 and finite alpha from vertex 5 on, so
    # columns j <= 5 get no finite term (k < j is needed) and are exactly -inf. Their bound
    # m_b + c_bj is finite, yet nothing is left to recompute in log space for them.
    B, nb, K, bs = 1, 2, 1, 4
    L = nb * bs
    g = torch.Generator().manual_seed(0)
    trans = torch.full((B, L, L), -INF)
    forward = torch.ones(L, L, dtype=torch.bool).triu(1)
    trans[:, forward] = 20.0 * torch.randn(int(forward.sum()), generator=g)
    alpha = torch.full((B, K, L), -INF)
    alpha[..., 5:] = torch.tensor([0.0, -60.0, -3.0])
    trans_blk = trans.view(B, nb, bs, L)
    col_max = trans_blk.amax(dim=2, keepdim=True)
    trans_exp = dagmod._exp_floor(
        trans_blk - (col_max.nan_to_num(neginf=0.0) - dagmod._LIFT), dagmod._LIFT + dagmod._CUT
    )
    a_blk = alpha.view(B, K, nb, bs).transpose(1, 2)
    m = a_blk.amax(dim=3, keepdim=True)
    p, ell = torch.empty(B, nb, K, bs), torch.empty(B, K, L)
    at = dagmod._block_step(a_blk, m, trans_blk, trans_exp, col_max, p, ell)
    want = torch.logsumexp(alpha.double().transpose(1, 2) + trans.double(), dim=1)  # (B, L)
    assert at == () or not (at[4] <= 5).any()  # the redone cells' columns j
    assert (ell[0, 0, :6] == -INF).all()
    torch.testing.assert_close(ell[0, 0, 6:].double(), want[0, 6:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_log_likelihood_feeds_no_subnormal_float_to_its_matmuls(monkeypatch, scale):
    # A subnormal input makes a CPU bmm up to ~100x slower; the DP's factors are built to be 0
    # or normal floats, in the forward and in the backward pass.
    token_logp, trans_logp, gl, tl = make_dag_inputs(4, 20, 96, seed=4, scale=scale)
    tiny = torch.finfo(torch.float32).tiny
    seen = []
    bmm = torch.bmm

    def spy(a, b, *args, **kwargs):
        for x in (a, b):
            seen.append(int(((x != 0) & (x.abs() < tiny)).sum()))
        return bmm(a, b, *args, **kwargs)

    weights = torch.tensor([1.0, -0.5, 2.0, -1e-3], dtype=torch.float64)  # signs mixed
    tok, tr = _leaves(token_logp, trans_logp)
    monkeypatch.setattr(torch, "bmm", spy)
    got = _grads(dag_log_likelihood(tok, tr, gl, tl), weights.float(), [tok, tr])
    monkeypatch.undo()
    assert len(seen) == 2 * (2 * 19 + 1)  # 19 steps each way and the transition gradient
    assert sum(seen) == 0
    tok64, tr64 = _leaves(token_logp.double(), trans_logp.double())
    want = _grads(dense_dag_log_likelihood(tok64, tr64, gl, tl), weights, [tok64, tr64])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=5e-4)
