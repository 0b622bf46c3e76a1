"""codat.dat.DATransformer (method.md §2) on a tiny model, against the definitions.

Compared: output shapes with (B, L, V) / (B, L, L) / (B,); `graph_lens` with
floor(lambda * m_b) clipped to [2, max_graph_positions] computed in Python; every row u < L_b - 1
of `trans_logp` with a log-normalised distribution over u < v < L_b (logsumexp == 0) and every
other entry with -inf, in float32 and under bfloat16 autocast (where it must stay float32);
`trans_logp` with the gated mixture of per-head softmaxes of §2.3 recomputed in float64 from the
final decoder states; `token_logits` with h @ embed.weight^T (tied head, no other (V, D)
parameter); `graph_inputs` with hand-written rows; outputs on valid vertices of a ragged batch with
each sentence run alone and with extra source padding (eval mode); gradients of the DP loss
(`objectives.dag_nll` of `objectives.gather_token_logp`) with finite values for every parameter;
forward from given encoder states (`encoded=`) with the plain forward.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from codat.config import ModelConfig
from codat.dat import DATransformer, graph_lengths
from codat.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from codat.objectives import dag_nll, gather_token_logp

CFG = ModelConfig(
    vocab_size=50,
    dim=32,
    heads=4,
    ffn_dim=64,
    encoder_layers=1,
    decoder_layers=1,
    upsample_scale=2.5,
)
SRC_LENS = [5, 3, 1, 2]  # graph sizes floor(2.5 m) = 12, 7, 2, 5
NEG_INF = float("-inf")


def _model(**overrides) -> DATransformer:
    torch.manual_seed(0)
    return DATransformer(replace(CFG, **overrides))


def _src(lens: list[int], extra_pad: int = 0, low: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged </s>-terminated sources with ids in [low, V), PAD_ID padded."""
    g = torch.Generator().manual_seed(1)
    S = max(lens) + extra_pad
    ids = torch.full((len(lens), S), PAD_ID, dtype=torch.long)
    for b, m in enumerate(lens):
        ids[b, : m - 1] = torch.randint(low, CFG.vocab_size, (m - 1,), generator=g)
        ids[b, m - 1] = EOS_ID
    return ids, torch.tensor(lens)


def _final_states(model: DATransformer, *args) -> tuple[object, torch.Tensor]:
    """Run the model and capture the last decoder layer's output h (B, L, D)."""
    seen = []
    handle = model.decoder_layers[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = model(*args)
    finally:
        handle.remove()
    return out, seen[-1]


def _check_transition_structure(trans: torch.Tensor, graph_lens: torch.Tensor, tol: float):
    B, L, _ = trans.shape
    for b in range(B):
        Lb = int(graph_lens[b])
        for u in range(L):
            row = trans[b, u]
            allowed = torch.zeros(L, dtype=torch.bool)
            if u < Lb - 1:
                allowed[u + 1 : Lb] = True
                lse = float(torch.logsumexp(row[allowed].double(), dim=0))
                assert abs(lse) < tol, (b, u, lse)
                assert torch.isfinite(row[allowed]).all(), (b, u)
            assert torch.all(row[~allowed] == NEG_INF), (b, u, row)


def test_output_shapes():
    model = _model().eval()
    src, lens = _src(SRC_LENS)
    with torch.no_grad():
        out = model(src, lens)
    assert out.token_logits.shape == (4, 12, CFG.vocab_size)
    assert out.trans_logp.shape == (4, 12, 12)
    assert out.graph_lens.shape == (4,)
    assert out.trans_logp.dtype == torch.float32


@pytest.mark.parametrize("scale", [1.0, 1.5, 2.5, 3.3, 8.0])
def test_graph_lens_are_floor_lambda_m_clipped_at_two(scale):
    model = _model(upsample_scale=scale)
    m = list(range(1, 30))
    expected = [max(2, math.floor(scale * x)) for x in m]
    assert model.output_lengths(torch.tensor(m)).tolist() == expected
    assert model.max_target_lens(torch.tensor(m)).tolist() == expected  # one vertex per token
    lens = graph_lengths(torch.tensor(m), upsample_scale=scale, max_positions=10**6, min_length=1)
    assert lens.tolist() == [math.floor(scale * x) for x in m]  # CTC's clip: at least 1


def test_graph_lens_clipped_to_max_graph_positions_and_used_by_forward():
    model = _model(max_graph_positions=8).eval()
    src, lens = _src(SRC_LENS)
    with torch.no_grad():
        out = model(src, lens)
    assert out.graph_lens.tolist() == [8, 7, 2, 5]
    assert out.token_logits.shape[1] == 8


def test_trans_logp_rows_log_normalised_and_forward_only():
    model = _model().eval()
    src, lens = _src(SRC_LENS)
    with torch.no_grad():
        out = model(src, lens)
    assert out.graph_lens.tolist() == [12, 7, 2, 5]
    _check_transition_structure(out.trans_logp, out.graph_lens, tol=1e-5)


def test_trans_logp_float32_and_normalised_under_bf16_autocast():
    model = _model().eval()
    src, lens = _src(SRC_LENS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(src, lens)
    assert out.token_logits.dtype == torch.bfloat16  # control: autocast was really on
    assert out.trans_logp.dtype == torch.float32
    _check_transition_structure(out.trans_logp, out.graph_lens, tol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_trans_logp_equals_gated_mixture_of_head_softmaxes(fused):
    """log P(v|u) = log sum_h softmax_h(gate(u)) softmax_{u<v<L_b}(q_h(u).k_h(v)/sqrt(d_h))."""
    model = _model().double().eval()
    model.fused_heads = fused
    src, lens = _src([4, 2])
    with torch.no_grad():
        out, h = _final_states(model, src, lens)
    B, L, Dm = h.shape
    Hh, dh = CFG.heads, Dm // CFG.heads
    feats = torch.cat([h, model.link_positions.weight[:L].expand(B, L, Dm)], dim=-1)
    with torch.no_grad():
        q, k = model.link_query(feats), model.link_key(feats)
        gate = torch.softmax(model.link_gate(feats), dim=-1)  # (B, L, H)
    for b in range(B):
        Lb = int(out.graph_lens[b])
        for u in range(Lb - 1):
            succ = list(range(u + 1, Lb))
            prob = torch.zeros(len(succ), dtype=torch.float64)
            for hh in range(Hh):
                sl = slice(hh * dh, (hh + 1) * dh)
                scores = torch.stack([q[b, u, sl] @ k[b, v, sl] for v in succ]) / math.sqrt(dh)
                prob += gate[b, u, hh] * torch.softmax(scores, dim=0)
            torch.testing.assert_close(
                out.trans_logp[b, u, succ],
                prob.log().to(out.trans_logp.dtype),
                rtol=1e-5,
                atol=1e-5,
            )


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_heads_equal_the_first_version_in_value_and_gradient(bf16):
    """`fused_heads` is a speed setting: the same (B, L, L) values, -inf pattern and
    parameter gradients (of a loss on the transitions and the token logits) as the concatenation +
    -inf-safe composites and autograd's tied head, on a ragged padded batch
    (rows without successors, padded rows and columns); float32 to rounding, bf16 autocast within
    bf16 noise of it."""
    src, lens = _src(SRC_LENS, extra_pad=2)
    results = []
    for fused in (True, False):
        model = _model().train()
        model.fused_heads = fused
        torch.manual_seed(5)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(src, lens)
        finite = torch.isfinite(out.trans_logp)
        g = torch.Generator().manual_seed(2)
        w = torch.randn(out.trans_logp.shape, generator=g)
        loss = torch.where(finite, out.trans_logp * w, 0.0).sum()
        loss = (
            loss
            + (out.token_logits.float() * torch.randn(out.token_logits.shape, generator=g)).sum()
        )
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        results.append((out.trans_logp.detach(), finite, grads))
    (fused, fin_f, g_f), (plain, fin_p, g_p) = results
    assert fused.dtype == plain.dtype == torch.float32
    assert torch.equal(fin_f, fin_p) and (fused[~fin_f] == NEG_INF).all()
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[fin_f], plain[fin_p], **tol)
    for a, b in zip(g_f, g_p, strict=True):
        if b is None:
            assert a is None or not a.any()
            continue
        assert torch.isfinite(a).all()
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))


def test_no_nan_for_ragged_batch():
    model = _model().eval()
    src, lens = _src(SRC_LENS, extra_pad=2)
    with torch.no_grad():
        out = model(src, lens)
    assert torch.isfinite(out.token_logits).all()
    assert not torch.isnan(out.trans_logp).any()
    assert not (out.trans_logp == float("inf")).any()


def test_forward_from_given_encoder_states_equals_plain_forward():
    model = _model().eval()
    src, lens = _src(SRC_LENS)
    with torch.no_grad():
        out = model(src, lens)
        again = model(src, lens, encoded=model.encode(src, lens))
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a, b)


def test_token_head_is_tied_to_embedding():
    model = _model().eval()
    src, lens = _src(SRC_LENS, low=8)  # ids >= 8: token 7 is never an input
    V, Dm = CFG.vocab_size, CFG.dim
    with torch.no_grad():
        out, h = _final_states(model, src, lens)
        torch.testing.assert_close(
            out.token_logits, h @ model.embed.weight.t(), rtol=1e-5, atol=1e-5
        )
        model.embed.weight[7] += 1.0  # changes the output row of token 7 only
        out2 = model(src, lens)
    changed = (out2.token_logits != out.token_logits).any(dim=(0, 1))
    assert changed.tolist() == [v == 7 for v in range(V)]
    vd = [name for name, p in model.named_parameters() if p.shape in ((V, Dm), (Dm, V))]
    assert vd == ["embed.weight"]  # no separate output projection
    assert model.encoder.embed is model.embed


def test_graph_inputs_are_bos_unk_eos_pad():
    model = _model()
    got = model.graph_inputs(torch.tensor([5, 2, 3]))
    B, U, E, P = BOS_ID, UNK_ID, EOS_ID, PAD_ID
    assert got.tolist() == [
        [B, U, U, U, E],
        [B, E, P, P, P],
        [B, U, E, P, P],
    ]


def test_outputs_on_valid_vertices_are_padding_invariant():
    model = _model().eval()
    src, lens = _src(SRC_LENS)
    src_padded, _ = _src(SRC_LENS, extra_pad=3)
    with torch.no_grad():
        batched = model(src, lens)
        padded = model(src_padded, lens)
        for b, m in enumerate(SRC_LENS):
            alone = model(src[b : b + 1, :m], lens[b : b + 1])
            Lb = int(alone.graph_lens[0])
            assert Lb == int(batched.graph_lens[b])
            for out in (batched, padded):
                torch.testing.assert_close(
                    out.token_logits[b, :Lb], alone.token_logits[0], rtol=1e-5, atol=1e-5
                )
                torch.testing.assert_close(
                    out.trans_logp[b, :Lb, :Lb], alone.trans_logp[0], rtol=1e-5, atol=1e-5
                )


def test_dp_loss_gradients_finite_for_all_parameters():
    model = _model().train()  # dropout 0.1 on
    src, lens = _src(SRC_LENS)  # graph sizes 12, 7, 2, 5
    tgt_lens = torch.tensor([6, 7, 3, 4])  # sentence 2 has no path (L_b = 2 < 3)
    tgt = torch.full((4, 7), PAD_ID, dtype=torch.long)
    for b, n in enumerate(tgt_lens.tolist()):
        tgt[b, 0], tgt[b, n - 1] = BOS_ID, EOS_ID
        tgt[b, 1 : n - 1] = torch.randint(4, CFG.vocab_size, (n - 2,))
    out = model(src, lens)
    loss, per_sentence, invalid = dag_nll(
        gather_token_logp(out.token_logits, tgt), out.trans_logp, out.graph_lens, tgt_lens
    )
    assert invalid == 1 and per_sentence[2] == 0
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for name in (
        "link_query.weight",
        "link_gate.weight",
        "embed.weight",
        "encoder.positions.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("vocab_size", [0, 4])
def test_unset_vocab_size_raises(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        DATransformer(replace(CFG, vocab_size=vocab_size))


def test_decode_rejects_graph_longer_than_max_graph_positions():
    model = _model(max_graph_positions=8).eval()
    src, lens = _src([2])
    enc = model.encode(src, lens)
    with pytest.raises(ValueError, match="max_graph_positions"):
        model.decode(enc, torch.full((1, 9), UNK_ID, dtype=torch.long))
