"""codat.glancing and DAT's training step `dat_train.dat_step` (method.md §4) against the
definitions.

Compared: `glance_ratio` with start + (end - start) * step / (anneal + 1) and with `end` from
`anneal` on; `choose_glanced` on hand-built paths/predictions with K = floor((N_b - #correct) *
ratio + 0.5) revealed vertices per row, all aligned, with the gold token gather, with uniform
frequencies over many rows, and with itself for one seeded generator; `force_alignment` with the
hand-written column rule, and `dag_log_likelihood` on the force-aligned scores with a local
float64 brute force over only the paths that put each revealed target i at its vertex j* (revealed
tokens adding 0), values and gradients (zero on revealed columns). `dat_step` (objective dp) with
the plain DP loss (ratio 0), with a step-by-step recomputation from its building blocks (ratio 0.5,
no dropout), and, with dropout on, pass 1 with pass 2 (identical dropout masks: same outputs when
nothing is revealed, same encoder states when something is); every `StepOptions` speed setting
with the plain step (loss, gradients, statistics, random states); `argmax_hits` with
`argmax(-1) == ids` (bfloat16 ties included); `dat_sentence_loss` with -log P(Y|X) / N_b on the
un-glanced DAG (inf without a path).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import replace

import pytest
import torch
from conftest import make_batch, make_config, make_model

from codat.config import RunConfig
from codat.dag import dag_best_path, dag_log_likelihood
from codat.dat_train import StepOptions, dat_sentence_loss, dat_step
from codat.glancing import argmax_hits, choose_glanced, force_alignment, glance_ratio
from codat.objectives import dag_nll, gather_token_logp, token_logp_and_max

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------
# glance_ratio


def test_glance_ratio_starts_at_start():
    assert glance_ratio(0, start=0.5, end=0.1, anneal_steps=200_000) == 0.5


@pytest.mark.parametrize("step", [1, 1000, 100_000, 199_999])
def test_glance_ratio_linear_with_plus_one_denominator(step):
    got = glance_ratio(step, start=0.5, end=0.1, anneal_steps=200_000)
    assert math.isclose(got, 0.5 - 0.4 * step / 200_001, rel_tol=1e-13, abs_tol=0)
    assert not math.isclose(got, 0.5 - 0.4 * step / 200_000, rel_tol=1e-13, abs_tol=0)


@pytest.mark.parametrize("step", [200_000, 200_001, 10**7])
def test_glance_ratio_is_end_after_anneal(step):
    assert glance_ratio(step, start=0.5, end=0.1, anneal_steps=200_000) == 0.1


def test_glance_ratio_without_anneal_is_constant_end():
    assert glance_ratio(0, start=0.5, end=0.3, anneal_steps=0) == 0.3
    assert glance_ratio(7, start=0.5, end=0.3, anneal_steps=0) == 0.3


# ---------------------------------------------------------------------------------------------
# choose_glanced


def _hand_case():
    """Three rows, L = 8: a valid path with 1 correct prediction (N_b = 6), a valid path with 1
    correct prediction plus a 'correct' unaligned vertex that must not count (N_b = 4), and a
    sentence with no path (all -1, N_b = 5)."""
    tgt = torch.tensor(
        [
            [2, 10, 11, 12, 13, 3],
            [2, 20, 21, 3, 0, 0],
            [2, 30, 31, 32, 3, 0],
        ]
    )
    tgt_lens = torch.tensor([6, 4, 5])
    path = torch.tensor(
        [
            [0, 1, -1, 2, 3, -1, 4, 5],
            [0, -1, 1, -1, 2, 3, -1, -1],
            [-1, -1, -1, -1, -1, -1, -1, -1],
        ]
    )
    pred = torch.full((3, 8), 40)
    pred[0, 3] = 11  # vertex 3 is aligned to target 2 = 11: correct
    pred[1, 4] = 21  # correct
    pred[1, 1] = 2  # unaligned vertex predicting y_0 (the clamp(min=0) oracle): not counted
    pred[2, 0] = 2  # row without path: nothing counts
    return path, pred, tgt, tgt_lens


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (0.5, [3, 2, 0]),  # floor(5*.5+.5) = 3 (2.5 rounds up), floor(3*.5+.5) = 2
        (0.25, [1, 1, 0]),  # floor(1.75) = 1, floor(1.25) = 1
        (1.0, [5, 3, 0]),
        (0.0, [0, 0, 0]),
    ],
)
def test_choose_glanced_reveals_k_aligned_vertices(ratio, expected):
    path, pred, tgt, tgt_lens = _hand_case()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        keep, oracle = choose_glanced(path, pred, tgt, tgt_lens, ratio=ratio, generator=g)
        assert keep.dtype == torch.bool and keep.shape == path.shape
        assert keep.sum(dim=1).tolist() == expected
        assert not (keep & (path < 0)).any()  # never an unaligned vertex
        aligned = path >= 0
        assert torch.equal(oracle[aligned], tgt.gather(1, path.clamp(min=0))[aligned])


def test_choose_glanced_oracle_is_aligned_gold_token():
    path, pred, tgt, tgt_lens = _hand_case()
    _, oracle = choose_glanced(path, pred, tgt, tgt_lens, ratio=0.5)
    assert oracle[0].tolist()[:2] == [2, 10]
    assert [oracle[0, j].item() for j in (3, 4, 6, 7)] == [11, 12, 13, 3]
    assert [oracle[1, j].item() for j in (0, 2, 4, 5)] == [2, 20, 21, 3]


def test_choose_glanced_is_uniform_over_aligned_vertices_including_bos_eos():
    path, pred, tgt, tgt_lens = _hand_case()
    R = 4000
    g = torch.Generator().manual_seed(0)
    keep, _ = choose_glanced(
        path[:1].repeat(R, 1),
        pred[:1].repeat(R, 1),
        tgt[:1].repeat(R, 1),
        tgt_lens[:1].repeat(R),
        ratio=0.5,
        generator=g,
    )
    freq = keep.double().mean(dim=0)  # K = 3 of 6 aligned vertices: 0.5 each, std ~ 0.008
    aligned = path[0] >= 0
    assert torch.all((freq[aligned] - 0.5).abs() < 0.04), freq
    assert torch.all(freq[~aligned] == 0)


def test_choose_glanced_deterministic_for_seeded_generator():
    path, pred, tgt, tgt_lens = _hand_case()
    R = 50
    args = (path.repeat(R, 1), pred.repeat(R, 1), tgt.repeat(R, 1), tgt_lens.repeat(R))

    def draw(seed):
        return choose_glanced(*args, ratio=0.5, generator=torch.Generator().manual_seed(seed))[0]

    torch.manual_seed(123)  # the global RNG must not matter
    a = draw(7)
    torch.manual_seed(456)
    assert torch.equal(a, draw(7))
    assert not torch.equal(a, draw(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_hits_is_argmax_equality_with_ties(dtype):
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 4, (3, 50, 6), generator=g).to(dtype)  # many tied maxima
    ids = torch.randint(0, 6, (3, 50), generator=g)
    ids[0] = logits[0].argmax(-1)  # row 0: all hits
    got = argmax_hits(logits, ids)
    assert torch.equal(got, logits.argmax(-1) == ids)
    assert got[0].all() and not got.all()
    tied_later = (logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) == logits.amax(-1)) & ~got
    assert tied_later.any()  # a maximum that is not the first one is no hit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logp_and_max_give_the_same_hits(dtype):
    """Pass 1's one-pass values: the float32 log-probs of gather_token_logp, the row maxima of
    the float32 log-softmax, and (as argmax_hits' candidates) the same hits as the logits'."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 5, (2, 40, 7), generator=g).to(dtype) / 2  # many ties
    tgt = torch.randint(0, 7, (2, 6), generator=g)
    logp, top = token_logp_and_max(logits, tgt)
    full = torch.log_softmax(logits.float(), dim=-1)
    assert logp.dtype == top.dtype == torch.float32
    assert torch.equal(logp, gather_token_logp(logits, tgt).detach())  # the same chunked pass
    torch.testing.assert_close(top, full.amax(-1), rtol=1e-6, atol=1e-6)
    path = torch.randint(-1, 6, (2, 40), generator=g)
    oracle = tgt.gather(1, path.clamp(min=0))
    candidates = logp.gather(-1, path.clamp(min=0).unsqueeze(-1)).squeeze(-1) == top
    got = argmax_hits(logits, oracle, candidates)
    assert torch.equal(got, logits.argmax(-1) == oracle) and got.any() and not got.all()


# ---------------------------------------------------------------------------------------------
# force_alignment and the constrained DAG likelihood


def test_force_alignment_hand_case():
    token = torch.randn(2, 5, 3, dtype=torch.float64)
    path = torch.tensor([[0, -1, 1, -1, 2], [0, 1, 2, -1, -1]])
    keep = torch.tensor([[False, False, True, False, False], [True, False, True, False, False]])
    got = force_alignment(token, path, keep)
    inf = NEG_INF
    assert got[0, :, 1].tolist() == [inf, inf, 0.0, inf, inf]
    assert torch.equal(got[0, :, [0, 2]], token[0, :, [0, 2]])
    assert got[1, :, 0].tolist() == [0.0, inf, inf, inf, inf]
    assert got[1, :, 2].tolist() == [inf, inf, 0.0, inf, inf]
    assert torch.equal(got[1, :, 1], token[1, :, 1])
    nothing = torch.zeros_like(keep)
    assert torch.equal(force_alignment(token, path, nothing), token)


def _random_path(Lb: int, Nb: int, g: torch.Generator) -> list[int]:
    """A random valid path 0 = a_0 < ... < a_{Nb-1} = Lb - 1, as a (Lb,) vertex -> target map."""
    mid = sorted(torch.randperm(Lb - 2, generator=g)[: Nb - 2].add(1).tolist())
    a = [0, *mid, Lb - 1]
    row = [-1] * Lb
    for i, j in enumerate(a):
        row[j] = i
    return row


def _constrained_brute_ll(token, trans, Lb: int, Nb: int, forced: dict[int, int]) -> torch.Tensor:
    """log sum over paths with a_i = forced[i] of exp(sum_{i not forced} token[a_i, i] + edges)."""
    scores = []
    for mid in itertools.combinations(range(1, Lb - 1), Nb - 2):
        a = (0, *mid, Lb - 1)
        if any(a[i] != j for i, j in forced.items()):
            continue
        s = sum(
            (token[j, i] for i, j in enumerate(a) if i not in forced),
            torch.zeros((), dtype=torch.float64),
        )
        s = s + sum(trans[u, v] for u, v in itertools.pairwise(a))
        scores.append(s)
    return torch.logsumexp(torch.stack(scores), dim=0)


def _random_case(seed: int):
    L, N = 7, 5
    graph_lens = [7, 7, 6, 5, 7, 4, 3, 2]
    target_lens = [5, 4, 4, 5, 2, 3, 3, 2]
    B = len(graph_lens)
    g = torch.Generator().manual_seed(seed)
    token = torch.log_softmax(2 * torch.randn(B, L, N, generator=g, dtype=torch.float64), dim=-1)
    trans = torch.full((B, L, L), NEG_INF, dtype=torch.float64)
    path = torch.full((B, L), -1, dtype=torch.long)
    for b, (Lb, Nb) in enumerate(zip(graph_lens, target_lens, strict=True)):
        for u in range(Lb - 1):
            trans[b, u, u + 1 : Lb] = torch.log_softmax(
                2 * torch.randn(Lb - u - 1, generator=g, dtype=torch.float64), dim=0
            )
        path[b, :Lb] = torch.tensor(_random_path(Lb, Nb, g))
    keep = (path >= 0) & (torch.rand(B, L, generator=g) < 0.5)
    keep[0] = path[0] >= 0  # everything revealed
    keep[1] = False  # nothing revealed
    return token, trans, path, keep, torch.tensor(graph_lens), torch.tensor(target_lens)


@pytest.mark.parametrize("seed", [0, 1])
def test_forced_likelihood_equals_constrained_brute_force(seed):
    token, trans, path, keep, graph_lens, target_lens = _random_case(seed)
    token.requires_grad_(True)
    trans.requires_grad_(True)
    got = dag_log_likelihood(force_alignment(token, path, keep), trans, graph_lens, target_lens)
    ref = []
    for b in range(len(graph_lens)):
        forced = {int(path[b, j]): j for j in range(path.shape[1]) if keep[b, j]}
        ref.append(
            _constrained_brute_ll(
                token[b], trans[b], int(graph_lens[b]), int(target_lens[b]), forced
            )
        )
    ref = torch.stack(ref)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # all revealed: only transitions along the given path remain
    on_path = [j for j in range(7) if path[0, j] >= 0]
    along = sum(trans[0, u, v] for u, v in itertools.pairwise(on_path))
    assert math.isclose(float(got[0].detach()), float(along.detach()), abs_tol=1e-10)

    w = torch.randn(len(graph_lens), dtype=torch.float64)
    g_tok, g_trans = torch.autograd.grad((got * w).sum(), (token, trans))
    r_tok, r_trans = torch.autograd.grad((ref * w).sum(), (token, trans))
    torch.testing.assert_close(g_tok, r_tok, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_trans, r_trans, rtol=1e-9, atol=1e-10)
    for b in range(len(graph_lens)):
        for j in keep[b].nonzero().squeeze(1).tolist():
            i = int(path[b, j])
            assert torch.count_nonzero(g_tok[b, :, i]) == 0, (b, i)  # the whole column
    assert torch.count_nonzero(g_tok[1]) > 0  # control: unrevealed sentence has gradient


# ---------------------------------------------------------------------------------------------
# dat_train.dat_step (objective dp) and dat_sentence_loss

NULL = contextlib.nullcontext()
CFG = RunConfig(model=make_config("dat", upsample_scale=2.5))  # train.objective dp


def _model(dropout: float) -> torch.nn.Module:
    return make_model("dat", seed=0, upsample_scale=2.5, dropout=dropout).train()


def _batch(src_lens: list[int], tgt_lens: list[int]):
    return make_batch(src_lens, tgt_lens, seed=2)


BATCH = ([3, 2, 1], [4, 2, 3])  # content lengths; graph sizes 10, 7, 5 for targets of 6, 4, 5


def _step(model, batch, *, ratio: float, seed: int = 0, autocast=NULL):
    generator = torch.Generator().manual_seed(seed)
    return dat_step(model, batch, cfg=CFG, ratio=ratio, generator=generator, autocast=autocast)


@pytest.mark.parametrize("bf16", [False, True])
def test_dat_step_with_glancing_is_finite_with_finite_grads(bf16):
    model = _model(dropout=0.1)
    batch = _batch([3, 2, 1, 0], [4, 2, 3, 1])  # last: graph size 2 < 3, invalid
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else NULL
    loss, stats = _step(model, batch, ratio=0.5, autocast=autocast)
    assert loss.dim() == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    assert stats["invalid"] == 1
    assert 0 < stats["glanced"] <= 1
    assert all(isinstance(v, float | int) for v in stats.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_dat_step_without_glancing_equals_plain_dp_loss():
    model = _model(dropout=0.0)
    batch = _batch(*BATCH)
    gen = torch.Generator().manual_seed(0)
    gen_state = gen.get_state()
    loss, stats = dat_step(model, batch, cfg=CFG, ratio=0.0, generator=gen, autocast=NULL)
    assert torch.equal(gen.get_state(), gen_state)  # no glancing draw
    assert set(stats) == {"invalid"} and stats["invalid"] == 0
    model.eval()
    with torch.no_grad():
        out = model(batch.src_ids, batch.src_lens)
        ref, _, _ = dag_nll(
            gather_token_logp(out.token_logits, batch.tgt_ids),
            out.trans_logp,
            out.graph_lens,
            batch.tgt_lens,
        )
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)


def test_dat_step_with_glancing_equals_stepwise_recomputation():
    """Without dropout: pass 1 alignment -> K revealed gold tokens fed to the decoder -> forced
    DP loss divided by the full N_b."""
    model = _model(dropout=0.0)
    batch = _batch(*BATCH)
    loss, stats = _step(model, batch, ratio=0.5, seed=5)
    with torch.no_grad():
        out1 = model(batch.src_ids, batch.src_lens)
        tok1 = gather_token_logp(out1.token_logits, batch.tgt_ids)
        path, _ = dag_best_path(tok1, out1.trans_logp, out1.graph_lens, batch.tgt_lens)
        keep, oracle = choose_glanced(
            path,
            out1.token_logits.argmax(-1),
            batch.tgt_ids,
            batch.tgt_lens,
            ratio=0.5,
            generator=torch.Generator().manual_seed(5),
        )
        assert int(keep.sum()) > 0
        inputs = model.graph_inputs(out1.graph_lens)
        glanced = torch.where(keep, oracle, inputs)
        assert not torch.equal(glanced, inputs)
        out2 = model(batch.src_ids, batch.src_lens, glanced)
        tok2 = force_alignment(gather_token_logp(out2.token_logits, batch.tgt_ids), path, keep)
        ref, _, _ = dag_nll(tok2, out2.trans_logp, out2.graph_lens, batch.tgt_lens)
    assert math.isclose(stats["glanced"], float(keep.sum()) / float(batch.tgt_lens.sum()))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)


class _Recorder:
    """Forward hooks that record the outputs of a module on every call."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.outputs = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.outputs.append(o))


def test_dat_step_pass_two_reuses_pass_one_dropout_masks_when_nothing_revealed():
    """ratio 1e-9 gives K = 0: pass 2 sees the same placeholder input as pass 1, so with identical
    dropout masks both passes give identical outputs, and pass 2 equals a plain forward run from
    the RNG state dat_step started with."""
    model = _model(dropout=0.3)
    batch = _batch(*BATCH)
    rec = _Recorder(model)
    torch.manual_seed(11)
    loss, stats = _step(model, batch, ratio=1e-9)
    rec.handle.remove()
    assert stats["glanced"] == 0 and len(rec.outputs) == 2
    pass1, pass2 = rec.outputs
    assert torch.equal(pass1.token_logits, pass2.token_logits)
    assert torch.equal(pass1.trans_logp, pass2.trans_logp)

    torch.manual_seed(11)
    out = model(batch.src_ids, batch.src_lens)
    ref, _, _ = dag_nll(
        gather_token_logp(out.token_logits, batch.tgt_ids),
        out.trans_logp,
        out.graph_lens,
        batch.tgt_lens,
    )
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    # control: dropout is really on, so a second forward from a new RNG state differs
    out_b = model(batch.src_ids, batch.src_lens)
    assert not torch.equal(out.token_logits, out_b.token_logits)


@pytest.mark.parametrize("share_encoder", [False, True])
def test_dat_step_pass_two_reuses_pass_one_dropout_masks_when_glancing(share_encoder):
    """With revealed tokens the decoder inputs differ, but the encoder (drawn first) must see the
    same dropout masks in both passes: run twice with equal outputs, or once, shared."""
    model = _model(dropout=0.3)
    batch = _batch(*BATCH)
    rec = _Recorder(model.encoder)
    options = replace(StepOptions.plain(), share_encoder=share_encoder)
    generator = torch.Generator().manual_seed(0)
    loss, stats = dat_step(
        model, batch, cfg=CFG, ratio=0.5, generator=generator, autocast=NULL, options=options
    )
    rec.handle.remove()
    assert stats["glanced"] > 0 and len(rec.outputs) == (1 if share_encoder else 2)
    assert torch.equal(rec.outputs[0], rec.outputs[-1])
    assert torch.isfinite(loss)


OPTION_SETS = [
    StepOptions(),
    StepOptions(share_encoder=False),
    StepOptions(replay_dropout=False),
    StepOptions(fused_token_logp=False, argmax_hits=False),
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_step_options_change_neither_loss_nor_gradients_nor_rng(options):
    """Every speed setting (and the plain step) gives the same glanced loss, gradients, glancing
    statistics and random states after the step, in float32 with dropout on."""

    def run(opts):
        model = _model(dropout=0.3)
        torch.manual_seed(7)
        generator = torch.Generator().manual_seed(3)
        loss, stats = dat_step(
            model,
            _batch(*BATCH),
            cfg=CFG,
            ratio=0.5,
            generator=generator,
            autocast=NULL,
            options=opts,
        )
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return loss.detach(), stats, grads, torch.get_rng_state(), generator.get_state()

    ref = run(StepOptions.plain())
    got = run(options)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert got[1] == ref[1] and got[1]["glanced"] > 0
    assert len(got[2]) == len(ref[2])
    for g, r in zip(got[2], ref[2], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[3], ref[3]) and torch.equal(got[4], ref[4])


def test_dat_sentence_loss_is_the_length_normalised_nll_and_inf_without_path():
    model = _model(dropout=0.3).eval()
    batch = _batch([3, 2, 1, 0], [4, 2, 3, 1])  # last: graph size 2 < 3, no path
    got = dat_sentence_loss(model, batch)
    assert got.shape == (4,) and not got.requires_grad
    assert torch.isfinite(got[:3]).all() and got[3] == math.inf
    out = model(batch.src_ids, batch.src_lens)
    tok = gather_token_logp(out.token_logits, batch.tgt_ids)
    ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, batch.tgt_lens)
    torch.testing.assert_close(got[:3], (-ll / batch.tgt_lens)[:3].detach(), rtol=0, atol=1e-6)
    assert not model.training  # the model's mode is left as it was
