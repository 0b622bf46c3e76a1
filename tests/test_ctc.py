"""codat.ctc (CTC NAT and CTC+GLAT) against explicit enumerations and loops.

Compared: the model's output lengths, upsampled decoder inputs (with `loop_uniform_copy`) and
padding invariance; `ctc_log_likelihood` / `ctc_sentence_loss` / `ctc_output_scores` with the sum
over every label sequence that collapses to the target (tests/reference.py, float64), in value and
gradient w.r.t. the logits; `ctc_best_alignment` with the brute-force best path (ragged, repeated
tokens, empty and unalignable targets); `ctc_greedy_decode` with a Python collapse loop; glancing
(count floor(ratio * d + 1/2), positions, seeds, a rigged perfect prediction, the decoder inputs,
the restored RNG); `ctc_sample` (greedy at a tiny temperature, seeds, its output distribution
against the exact one); unalignable sentences in the loss; and a tiny copy task. The entry
points: `ctc_step` with `ctc_training_loss` (dp) and with it + codat.weight * the hand-built CoDAT
line (samples of the un-glanced output -> sentence BLEU -> dp_gate / duplicate_mask /
choose_samples -> `ctc_output_scores` -> `sample_loss`) for codat and reward; `ctc_greedy_decoder`;
and, end to end, CTC, CTC+GLAT and CoDAT on CTC samples through `codat train` / `codat generate`.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import pytest
import torch
from cli_runs import check_codat_objective, check_trains_and_decodes
from conftest import make_config
from conftest import make_model as make_tiny_model
from corpus import prepare_copy_task
from reference import (
    brute_force_ctc_best_path,
    brute_force_ctc_log_likelihood,
    brute_force_ctc_output_distribution,
    loop_ctc_collapse,
    loop_uniform_copy,
)

from codat.config import CodatConfig, DecodeConfig, ModelConfig, RunConfig, TrainConfig
from codat.ctc import (
    CTCModel,
    ctc_glat_inputs,
    ctc_greedy_decoder,
    ctc_sentence_loss,
    ctc_sequence_scores,
    ctc_step,
    ctc_training_loss,
)
from codat.ctc_maths import (
    ctc_best_alignment,
    ctc_glance,
    ctc_greedy_decode,
    ctc_log_likelihood,
    ctc_min_lengths,
    ctc_output_scores,
    ctc_sample,
)
from codat.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, Batch
from codat.nat_core import content_targets
from codat.objectives import sample_loss
from codat.rewards import sentence_bleu
from codat.selection import choose_samples, dp_gate, duplicate_mask


def tiny_ctc(
    vocab: int = 12,
    *,
    dim: int = 16,
    scale: float = 2.0,
    dropout: float = 0.0,
    max_graph_positions: int = 64,
    dtype: torch.dtype = torch.float32,
) -> CTCModel:
    cfg = ModelConfig(
        arch="ctc",
        vocab_size=vocab,
        dim=dim,
        heads=2,
        ffn_dim=2 * dim,
        encoder_layers=1,
        decoder_layers=1,
        dropout=dropout,
        upsample_scale=scale,
        max_source_positions=32,
        max_graph_positions=max_graph_positions,
    )
    return CTCModel(cfg).to(dtype)


def make_batch(sources: list[list[int]], targets: list[list[int]]) -> Batch:
    """Sources + </s>, targets <s> y </s>, PAD_ID padded."""
    B = len(sources)
    S = max(len(s) for s in sources) + 1
    N = max(len(t) for t in targets) + 2
    src = torch.full((B, S), PAD_ID)
    tgt = torch.full((B, N), PAD_ID)
    for b, (x, y) in enumerate(zip(sources, targets, strict=True)):
        src[b, : len(x) + 1] = torch.tensor([*x, EOS_ID])
        tgt[b, : len(y) + 2] = torch.tensor([BOS_ID, *y, EOS_ID])
    src_lens = torch.tensor([len(s) + 1 for s in sources])
    tgt_lens = torch.tensor([len(t) + 2 for t in targets])
    return Batch(src, src_lens, tgt, tgt_lens, torch.arange(B))


def padded(seqs: list[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(s) for s in seqs] + [1]) if width is None else width
    out = torch.full((len(seqs), width), PAD_ID)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out, torch.tensor([len(s) for s in seqs])


def random_logp(B: int, L: int, C: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(B, L, C, generator=g, dtype=torch.float64), -1)


# ---------------------------------------------------------------------------------------------
# Model


def test_lengths_shapes_upsampled_inputs_and_padding_invariance():
    model = tiny_ctc(scale=2.5, dtype=torch.float64).eval()
    sources = [[4], [5, 6, 7], [8, 9, 10, 11, 4, 5], []]
    batch = make_batch(sources, [[4]] * 4)
    out = model(batch.src_ids, batch.src_lens)
    expected = [math.floor(2.5 * (len(s) + 1)) for s in sources]  # m counts </s>
    assert out.out_lens.tolist() == expected
    assert out.token_logits.shape == (4, max(expected), 12 + 1)
    dec = model.upsampled_inputs(batch.src_ids, batch.src_lens)
    for b, s in enumerate(sources):
        ids = [([*s, EOS_ID])[i] for i in loop_uniform_copy(len(s) + 1, expected[b])]
        torch.testing.assert_close(dec[b, : expected[b]], model.embed(torch.tensor(ids)) * 4.0)
    with torch.no_grad():  # each sentence alone gives the same valid positions
        for b in range(4):
            S = int(batch.src_lens[b])
            alone = model(batch.src_ids[b : b + 1, :S], batch.src_lens[b : b + 1])
            L = expected[b]
            torch.testing.assert_close(alone.token_logits[0], out.token_logits[b, :L])
    capped = tiny_ctc(scale=2.5, max_graph_positions=6)
    assert capped.output_lengths(batch.src_lens).tolist() == [min(x, 6) for x in expected]


def test_blank_vector_is_tied_between_output_and_glanced_input():
    model = tiny_ctc(dtype=torch.float64).eval()
    labels = torch.tensor([[4, 12, 0]])  # a token, the blank (V = 12), <pad>
    emb = model.label_embeddings(labels)[0]
    torch.testing.assert_close(emb[1], model.blank * 4.0)
    torch.testing.assert_close(emb[0], model.embed.weight[4] * 4.0)
    assert emb[2].abs().max() == 0
    with torch.no_grad():
        model.blank.zero_()
    batch = make_batch([[4, 5]], [[4]])
    assert model(batch.src_ids, batch.src_lens).token_logits[..., 12].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Likelihood, alignment


def test_ctc_log_likelihood_matches_brute_force_in_value_and_gradient():
    """3 tokens + blank (class 3), up to 5 positions: every one of the 4^L paths enumerated."""
    B, L, C = 5, 5, 4
    logits = 1.5 * torch.randn(B, L, C, dtype=torch.float64)
    logits.requires_grad_(True)
    out_lens = torch.tensor([5, 4, 3, 5, 2])
    targets_list = [[0, 1], [2, 2], [], [1, 0, 1], [1, 1]]  # the last needs 3 positions
    targets, target_lens = padded(targets_list)
    assert ctc_min_lengths(targets, target_lens).tolist() == [2, 3, 0, 3, 3]
    logp = torch.log_softmax(logits, -1)
    ll = ctc_log_likelihood(logp, out_lens, targets, target_lens)
    ref = [
        brute_force_ctc_log_likelihood(logp[b, : out_lens[b]], targets_list[b]) for b in range(B)
    ]
    assert torch.isinf(ref[4]) and ll[4] == -math.inf
    torch.testing.assert_close(ll[:4], torch.stack(ref[:4]))
    (grad,) = torch.autograd.grad(ll[:4].sum(), logits, retain_graph=True)
    (ref_grad,) = torch.autograd.grad(torch.stack(ref[:4]).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)
    assert grad[1, 4:].abs().max() == 0  # padding positions


def test_ctc_sentence_loss_matches_brute_force_on_a_tiny_model():
    """Vocabulary 5 (+ blank = 6 classes), L_b = 2 * m_b <= 4: the model's own log-probs."""
    model = tiny_ctc(vocab=5, dtype=torch.float64).eval()
    targets_list = [[4], [4, 4], [1, 4, 4], []]
    batch = make_batch([[4], [4], [1], [4, 1]], targets_list)  # L_b = 4, 4, 4, 6
    losses = ctc_sentence_loss(model, batch)
    with torch.no_grad():
        out = model(batch.src_ids, batch.src_lens)
    assert out.out_lens.tolist() == [4, 4, 4, 6]
    logp = torch.log_softmax(out.token_logits, -1)
    for b, y in enumerate(targets_list):
        L = int(out.out_lens[b])
        ref = -float(brute_force_ctc_log_likelihood(logp[b, :L], y)) / max(len(y), 1)
        assert math.isclose(float(losses[b]), ref, rel_tol=1e-9), (b, float(losses[b]), ref)
    loss, stats = ctc_training_loss(model, batch, ratio=0.0, generator=None)
    assert stats == {"invalid": 0}
    torch.testing.assert_close(loss, losses.mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_alignment_matches_the_brute_force_best_path(seed):
    B, L, C = 6, 5, 4  # blank = 3
    logp = random_logp(B, L, C, seed)
    out_lens = torch.tensor([5, 5, 4, 3, 5, 4])
    targets_list = [[1, 1], [0, 1, 2], [], [2], [2, 2, 0], [0, 0, 0]]  # the last: no alignment
    targets, target_lens = padded(targets_list)
    aligned = ctc_best_alignment(logp, out_lens, targets, target_lens)
    assert aligned.shape == (B, L) and aligned.dtype == torch.long
    for b, y in enumerate(targets_list):
        Lb = int(out_lens[b])
        path, score = brute_force_ctc_best_path(logp[b, :Lb], y)
        if not path:
            assert (aligned[b] == -1).all()
            continue
        assert aligned[b, :Lb].tolist() == path, (b, aligned[b].tolist(), path)
        assert (aligned[b, Lb:] == -1).all()
        assert loop_ctc_collapse(path, C - 1) == y
    float32 = ctc_best_alignment(logp.float(), out_lens, targets, target_lens)
    assert torch.equal(float32, aligned)


def test_greedy_decode_matches_a_python_collapse():
    B, L, V = 8, 9, 7  # classes: specials 0, 2, 3, tokens 1, 4, 5, 6, blank 7
    logits = torch.randn(B, L, V + 1)
    out_lens = torch.tensor([9, 1, 5, 9, 3, 7, 2, 8])
    tokens = ctc_greedy_decode(logits, out_lens)
    best = logits.argmax(-1)
    refs = [loop_ctc_collapse(best[b, : out_lens[b]].tolist(), V, SPECIAL_IDS) for b in range(B)]
    assert tokens.shape == (B, max(max(len(r) for r in refs), 1))
    assert any(len(set(r)) < len(r) for r in refs)  # the loop keeps blank-separated repeats
    for b in range(B):
        assert tokens[b].tolist() == refs[b] + [PAD_ID] * (tokens.shape[1] - len(refs[b]))
    empty = ctc_greedy_decode(
        torch.zeros(2, 3, V + 1).index_fill(2, torch.tensor([V]), 1.0), torch.tensor([3, 2])
    )
    assert empty.tolist() == [[PAD_ID], [PAD_ID]]


# ---------------------------------------------------------------------------------------------
# Glancing


def test_glance_reveals_floor_ratio_d_plus_half_positions_among_the_valid_ones():
    B, L, C = 5, 10, 6  # blank = 5
    logp = random_logp(B, L, C, seed=3, scale=0.5)
    out_lens = torch.tensor([10, 8, 6, 9, 3])
    targets_list = [[1, 2, 2, 4], [0, 4], [], [3, 3, 3], [1, 1, 3]]  # the last: no alignment
    targets, target_lens = padded(targets_list)
    aligned_ref = ctc_best_alignment(logp, out_lens, targets, target_lens)
    valid = torch.arange(L) < out_lens.unsqueeze(1)
    d = ((logp.argmax(-1) != aligned_ref) & valid).sum(1)
    d[4] = 0  # a sentence with no alignment is not glanced
    for ratio in (0.3, 0.5, 1.0):
        reveal, aligned = ctc_glance(
            logp, out_lens, targets, target_lens, ratio=ratio,
            generator=torch.Generator().manual_seed(11),
        )  # fmt: skip
        assert torch.equal(aligned, aligned_ref)
        assert reveal.sum(1).tolist() == [math.floor(ratio * int(x) + 0.5) for x in d]
        assert not (reveal & ~valid).any()
        again, _ = ctc_glance(
            logp, out_lens, targets, target_lens, ratio=ratio,
            generator=torch.Generator().manual_seed(11),
        )  # fmt: skip
        assert torch.equal(reveal, again)
    assert int(d[:4].min()) > 0 and reveal[:4].sum(1).tolist() == d[:4].tolist()
    seen = torch.zeros(B, L)  # the reveal is uniform over the L_b positions, not only mistakes
    for s in range(200):
        seen += ctc_glance(
            logp, out_lens, targets, target_lens, ratio=0.5,
            generator=torch.Generator().manual_seed(s),
        )[0]  # fmt: skip
    assert (seen[0] > 0).all() and (seen[1, :8] > 0).all()


def test_glance_reveals_nothing_when_the_prediction_is_the_best_alignment():
    """Rigged: the argmax path [1, 1, blank, 2, blank, 2] is a valid alignment of [1, 2, 2]."""
    path = [1, 1, 4, 2, 4, 2]
    logits = torch.zeros(1, 6, 5, dtype=torch.float64)
    logits[0, torch.arange(6), torch.tensor(path)] = 8.0
    logp = torch.log_softmax(logits, -1)
    targets, target_lens = padded([[1, 2, 2]])
    reveal, aligned = ctc_glance(
        logp, torch.tensor([6]), targets, target_lens, ratio=1.0, generator=None
    )
    assert aligned[0].tolist() == path
    assert not reveal.any()
    wrong = logits.clone()
    wrong[0, :, 3] = 9.0  # token 3 everywhere: every position is a mistake
    wrong = torch.log_softmax(wrong, -1)
    reveal, _ = ctc_glance(
        wrong, torch.tensor([6]), targets, target_lens, ratio=1.0, generator=None
    )
    assert reveal.all()


def test_glat_inputs_reveal_aligned_label_embeddings_and_restore_the_rng():
    model = tiny_ctc(scale=3.0, dropout=0.3).train()
    batch = make_batch([[4, 5, 6], [7, 8], [9, 10, 11, 4]], [[5, 6], [7, 7, 8], [9, 11, 10]])
    targets, target_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    plain = model.upsampled_inputs(batch.src_ids, batch.src_lens)
    before = torch.get_rng_state()
    dec0, reveal0 = ctc_glat_inputs(
        model, batch.src_ids, batch.src_lens, targets, target_lens, ratio=0.0, generator=None
    )
    torch.testing.assert_close(dec0, plain)
    assert not reveal0.any()
    dec, reveal = ctc_glat_inputs(
        model, batch.src_ids, batch.src_lens, targets, target_lens, ratio=0.7,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)  # pass 2 draws pass 1's dropout masks
    assert dec.requires_grad
    with torch.no_grad():  # recompute pass 1 from the same RNG state
        logp = torch.log_softmax(model(batch.src_ids, batch.src_lens).token_logits, -1)
    torch.set_rng_state(before)
    expected, aligned = ctc_glance(
        logp, model.output_lengths(batch.src_lens), targets, target_lens, ratio=0.7,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert torch.equal(reveal, expected) and int(reveal.sum()) > 0
    assert (aligned[reveal] == 12).any() and (aligned[reveal] < 12).any()  # blanks and tokens
    want = torch.where(reveal.unsqueeze(-1), model.label_embeddings(aligned.clamp(min=0)), plain)
    torch.testing.assert_close(dec, want)
    is_blank = reveal & (aligned == 12)
    torch.testing.assert_close(dec[is_blank], (model.blank * 4.0).expand(int(is_blank.sum()), -1))


def test_glat_training_loss_stats_and_gradients():
    model = tiny_ctc(scale=3.0, dropout=0.1).train()
    batch = make_batch([[4, 5, 6], [7, 8]], [[5, 6], [7, 7, 8]])
    loss, stats = ctc_training_loss(
        model, batch, ratio=0.6, generator=torch.Generator().manual_seed(0)
    )
    assert set(stats) == {"invalid", "glanced"} and stats["invalid"] == 0
    assert 0 < stats["glanced"] <= 1
    loss.backward()
    assert torch.isfinite(loss) and model.blank.grad.abs().sum() > 0
    torch.manual_seed(4)  # ratio 0 = the plain forward, same dropout masks
    plain, stats0 = ctc_training_loss(model, batch, ratio=0.0, generator=None)
    torch.manual_seed(4)
    targets, target_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    out = model(batch.src_ids, batch.src_lens)
    ll = ctc_log_likelihood(
        torch.log_softmax(out.token_logits, -1), out.out_lens, targets, target_lens
    )
    torch.testing.assert_close(plain, (-ll / target_lens).mean())
    assert stats0 == {"invalid": 0}


def test_unalignable_sentence_adds_zero_loss_and_is_counted():
    model = tiny_ctc(scale=2.0).eval()
    # Source of 1 token: L_b = 4 positions; the target [4, 5, 6, 7, 8] needs 5.
    batch = make_batch([[4], [4, 5, 6]], [[4, 5, 6, 7, 8], [4, 5]])
    per = ctc_sentence_loss(model, batch)
    assert math.isinf(float(per[0])) and math.isfinite(float(per[1]))
    for ratio in (0.0, 0.5):
        loss, stats = ctc_training_loss(
            model, batch, ratio=ratio, generator=torch.Generator().manual_seed(0)
        )
        assert stats["invalid"] == 1
        torch.testing.assert_close(loss, per[1] / 2)
        model.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads) and len(grads) > 0


# ---------------------------------------------------------------------------------------------
# Sampling and sample scores (CoDAT)


def test_sample_at_tiny_temperature_is_greedy_and_seeds_reproduce():
    B, L, V = 3, 9, 7
    logits, out_lens = 2 * torch.randn(B, L, V + 1), torch.tensor([9, 4, 7])
    greedy = ctc_greedy_decode(logits, out_lens)
    tokens, lengths = ctc_sample(
        logits, out_lens, 5, temperature=1e-4, generator=torch.Generator().manual_seed(0)
    )
    assert tokens.shape == (B, 5, greedy.shape[1]) and lengths.shape == (B, 5)
    for k in range(5):
        assert torch.equal(tokens[:, k], greedy)
    assert torch.equal(lengths, (greedy != PAD_ID).sum(1, keepdim=True).expand(B, 5))
    a, b, c = (
        ctc_sample(
            logits, out_lens, 16, temperature=1.0, generator=torch.Generator().manual_seed(s)
        )
        for s in (1, 1, 2)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    pos = torch.arange(a[0].shape[2])
    inside = pos < a[1].unsqueeze(-1)
    assert (a[0][~inside] == PAD_ID).all()
    assert not torch.isin(a[0][inside], torch.tensor([*SPECIAL_IDS, V])).any()


def test_sample_distribution_matches_the_exact_collapsed_distribution():
    """3 positions of 5 classes (tokens 1, 4, 5 after dropping specials; blank 5... here V = 5:
    ids 0-4, blank 5): 20000 samples vs the exact probability of every collapsed output."""
    logp = random_logp(1, 3, 6, seed=7, scale=1.0)
    K = 20000
    tokens, lengths = ctc_sample(
        logp.float(), torch.tensor([3]), K, temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    counts = Counter(tuple(tokens[0, k, : lengths[0, k]].tolist()) for k in range(K))
    exact = brute_force_ctc_output_distribution(logp[0], drop=SPECIAL_IDS)
    assert set(counts) <= set(exact)
    worst = max(abs(counts.get(y, 0) / K - p) for y, p in exact.items())
    assert worst < 0.015, worst


def test_output_scores_match_brute_force_in_value_and_gradient():
    B, L, V = 2, 5, 5  # classes 0..4, blank 5
    logits = torch.randn(B, L, V + 1, dtype=torch.float64).requires_grad_(True)
    out_lens = torch.tensor([5, 4])
    cands = [
        [[4, 4], [1], [], [4, 1, 4]],
        [[1, 4, 1], [4, 4, 4], [0], [2, 2, 2]],  # [2, 2, 2] needs 5 > 4 positions
    ]
    K, T = 4, 3
    tokens = torch.full((B, K, T + 1), PAD_ID)  # one spare column of padding
    lengths = torch.zeros(B, K, dtype=torch.long)
    for b in range(B):
        for k, y in enumerate(cands[b]):
            tokens[b, k, : len(y)] = torch.tensor(y, dtype=torch.long)
            lengths[b, k] = len(y)
    tokens[0, 2, 1] = 4  # junk beyond the length must be ignored
    scores = ctc_output_scores(logits, out_lens, tokens, lengths)
    logp = torch.log_softmax(logits, -1)
    ref = torch.stack(
        [
            torch.stack(
                [
                    brute_force_ctc_log_likelihood(logp[b, : out_lens[b]], y) / max(len(y), 1)
                    for y in cands[b]
                ]
            )
            for b in range(B)
        ]
    )
    assert scores[1, 3] == -math.inf and torch.isinf(ref[1, 3])
    finite = torch.isfinite(ref)
    torch.testing.assert_close(scores[finite], ref[finite])
    weights = torch.randn(B, K, dtype=torch.float64)  # a generic downstream loss
    (grad,) = torch.autograd.grad(
        (scores[finite] * weights[finite]).sum(), logits, retain_graph=True
    )
    (ref_grad,) = torch.autograd.grad((ref[finite] * weights[finite]).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)


def test_sequence_scores_of_the_models_own_samples():
    model = tiny_ctc(vocab=6, scale=1.5, dtype=torch.float64).eval()
    batch = make_batch([[4, 5], [5]], [[4], [5]])  # L_b = 4, 3
    with torch.no_grad():
        out = model(batch.src_ids, batch.src_lens)
    tokens, lengths = ctc_sample(
        out.token_logits, out.out_lens, 6, temperature=2.0,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    tokens[0, 0] = PAD_ID  # an empty candidate
    lengths[0, 0] = 0
    scores = ctc_sequence_scores(model, batch.src_ids, batch.src_lens, tokens, lengths)
    assert torch.isfinite(scores).all()
    logp = torch.log_softmax(out.token_logits, -1)
    for b in range(2):
        for k in range(6):
            y = tokens[b, k, : lengths[b, k]].tolist()
            ref = brute_force_ctc_log_likelihood(logp[b, : out.out_lens[b]], y) / max(len(y), 1)
            assert math.isclose(float(scores[b, k].detach()), float(ref), rel_tol=1e-9), (b, k, y)
    scores.sum().backward()
    assert model.blank.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# End to end


def copy_batch(g: torch.Generator, B: int, vocab: int) -> Batch:
    lens = torch.randint(2, 7, (B,), generator=g).tolist()
    sources = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lens]
    return make_batch(sources, sources)


def test_ctc_learns_a_tiny_copy_task():
    """dim 32, 1 + 1 layers, upsample 3, 100 Adam steps (batch 32, lr 1e-2) of CTC+GLAT (ratio
    0.3) on copying 2-6 tokens of 16. Measured: 51/64 held-out sources copied exactly (data /
    glancing seeds 0-4: 51, 51, 50, 51, 51; 150 steps at lr 5e-3: 51, 54, 51, 51, 51); every miss
    merged an adjacent repeat (x x -> x): no blank learnt yet between identical copied inputs.
    About 1.5 s of CPU time."""
    vocab = 20
    model = tiny_ctc(vocab, dim=32, scale=3.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, glance = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    test = copy_batch(torch.Generator().manual_seed(123), 64, vocab)
    model.train()
    for _ in range(100):
        loss, _ = ctc_training_loss(model, copy_batch(data, 32, vocab), ratio=0.3, generator=glance)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = ctc_greedy_decoder(model, test.src_ids, test.src_lens, DecodeConfig(), None)
    ref, ref_lens = content_targets(test.tgt_ids, test.tgt_lens)
    exact = sum(
        [t for t in out[b].tolist() if t != PAD_ID] == ref[b, : ref_lens[b]].tolist()
        for b in range(64)
    )
    assert exact >= 40, exact


# ---------------------------------------------------------------------------------------------
# The training step and the decoder


def run_config(objective: str = "dp", **codat) -> RunConfig:
    return RunConfig(
        model=make_config("ctc"), train=TrainConfig(objective=objective), codat=CodatConfig(**codat)
    )


def test_ctc_step_is_the_training_loss_with_or_without_glancing():
    model = make_tiny_model("ctc", dropout=0.1).train()
    batch = make_batch([[4, 5, 6], [7, 8], [9, 10, 11, 4]], [[5, 6], [7, 7, 8], [9, 11, 10]])
    for ratio in (0.0, 0.6):
        torch.manual_seed(7)
        loss, stats = ctc_step(
            model, batch, cfg=run_config(), ratio=ratio,
            generator=torch.Generator().manual_seed(1), autocast=contextlib.nullcontext(),
        )  # fmt: skip
        torch.manual_seed(7)
        ref, ref_stats = ctc_training_loss(
            model, batch, ratio=ratio, generator=torch.Generator().manual_seed(1)
        )
        torch.testing.assert_close(loss, ref)
        assert stats == ref_stats and ("glanced" in stats) == (ratio > 0)


@pytest.mark.parametrize("objective", ["codat", "reward"])
def test_ctc_step_adds_the_sample_loss_of_the_chosen_samples_scored_directly(objective):
    """Two of the four sentences pass the gate (alpha between their reference losses)."""
    model = make_tiny_model("ctc", upsample_scale=3.0).train()
    batch = make_batch(
        [[4, 5, 6], [7, 8, 9], [9, 10, 11, 4], [5, 6]], [[5, 6], [7, 7, 8], [9, 11, 10], [6]]
    )
    losses = ctc_sentence_loss(model, batch).sort().values
    alpha = float(losses[1] + losses[2]) / 2
    cc = CodatConfig(
        samples=6, keep=0.5, temperature=1.5, weight=0.7, margin=0.05, reward_samples=4,
        alpha=alpha,
    )  # fmt: skip
    cfg = RunConfig(model=make_config("ctc"), train=TrainConfig(objective=objective), codat=cc)
    loss, stats = ctc_step(
        model, batch, cfg=cfg, ratio=0.0, generator=torch.Generator().manual_seed(4),
        autocast=contextlib.nullcontext(),
    )  # fmt: skip
    g = torch.Generator().manual_seed(4)
    base, _ = ctc_training_loss(model, batch, ratio=0.0, generator=g)
    out = model(batch.src_ids, batch.src_lens)
    tokens, lengths = ctc_sample(out.token_logits, out.out_lens, 6, temperature=1.5, generator=g)
    ref_ids, ref_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    rewards = sentence_bleu(tokens, lengths, ref_ids, ref_lens).float() / 100
    gate = dp_gate(ctc_sentence_loss(model, batch), alpha=cc.gate())
    duplicates = duplicate_mask(tokens, lengths, pad_id=PAD_ID)
    count = cc.kept if objective == "codat" else cc.reward_samples
    chosen = choose_samples(
        tokens, lengths, rewards, duplicates, gate, objective=objective, count=count
    )
    rows = chosen.rows
    scores = ctc_output_scores(
        out.token_logits[rows], out.out_lens[rows], chosen.tokens, chosen.lengths
    )
    term = sample_loss(
        scores, chosen.rewards, chosen.distinct, rewards[rows].mean(1), objective=objective,
        margin=cc.margin, tie=cc.tie,
    )  # fmt: skip
    assert len(rows) == 2 and stats["gate_pass"] == 0.5
    torch.testing.assert_close(loss, base + 0.7 * term * 0.5)
    key = "cl_loss" if objective == "codat" else "reward_loss"
    assert stats[key] == pytest.approx(float(term.detach())) and float(term.detach()) != 0
    assert stats["dp_loss"] == pytest.approx(float(base.detach()))
    assert stats["oracle_bleu"] == pytest.approx(float(rewards.amax(1).mean()) * 100)
    model.zero_grad()
    (loss - base.detach()).backward()
    assert model.blank.grad.abs().sum() > 0


def test_greedy_decoder_is_best_path_decoding_of_the_output():
    model = make_tiny_model("ctc").eval()
    batch = make_batch([[4, 5, 6], [7, 8]], [[5], [7]])
    got = ctc_greedy_decoder(model, batch.src_ids, batch.src_lens, DecodeConfig(), None)
    with torch.no_grad():
        out = model(batch.src_ids, batch.src_lens)
    assert torch.equal(got, ctc_greedy_decode(out.token_logits, out.out_lens))
    lens = batch.src_lens
    assert torch.equal(model.output_lengths(lens), out.out_lens)
    assert torch.equal(model.max_target_lens(lens), out.out_lens)


# ---------------------------------------------------------------------------------------------
# End to end through the CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_copy_task(tmp_path_factory.mktemp("ctc_cli"))


@pytest.mark.parametrize("glance", [0.0, 0.5], ids=["ctc", "ctc_glat"])
def test_ctc_trains_and_decodes_end_to_end(data, capsys, glance):
    check_trains_and_decodes(data, capsys, "ctc", glance, 0.0)


def test_codat_objective_on_ctc_samples(data):
    """CTC + position-wise samples."""
    check_codat_objective(data, "ctc")
