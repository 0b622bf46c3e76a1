"""codat.layers against naive re-computations from the same weights.

Compared: `MultiHeadAttention` (self and cross) with an explicit float64
softmax(Q K^T / sqrt(d_h) + key mask) V per head, the q/k/v/out weights sliced from the module's own
Linear layers; `EncoderLayer` / `DecoderLayer` with the post-norm formulas of method.md §2.1 written
out from their sub-modules; `Encoder` outputs on the valid positions of a ragged batch with the
outputs of each sentence encoded alone and with extra padding columns appended (padding
invariance); layers in eval mode with themselves (deterministic) and, as a control, in train mode
with dropout (not deterministic); `bert_init` statistics with N(0, 0.02), zero biases and a zero
padding row; attention's CPU modes under bf16 autocast with float64 SDPA of the same bf16 inputs
(fp32: closer than bf16 SDPA; matmul: within bf16 rounding, values and gradients), all unchanged
in float32; `Dropout` with `F.dropout`
from the same RNG state (bit for bit, float32 and bf16), and `DropoutTape` replay with the
recorded pass (same outputs, no random draws), refusing a replay of another shape or length.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codat.layers import (
    DecoderLayer,
    Dropout,
    DropoutTape,
    Encoder,
    EncoderLayer,
    FeedForward,
    MultiHeadAttention,
    attention,
    bert_init,
    float32_logits,
    set_cpu_half_attention,
    tied_logits,
)

D, H, FFN = 16, 4, 32


def _naive_attention(
    q: torch.Tensor,  # (B, T, D) projected queries
    k: torch.Tensor,  # (B, S, D) projected keys
    v: torch.Tensor,  # (B, S, D) projected values
    key_mask: torch.Tensor,  # (B, S) bool
    heads: int,
) -> torch.Tensor:  # (B, T, D), heads concatenated
    """Loop over batch and heads: softmax(q_h k_h^T / sqrt(d_h)) v_h, masked keys excluded."""
    B, T, Dm = q.shape
    dh = Dm // heads
    out = torch.zeros(B, T, Dm, dtype=q.dtype)
    for b in range(B):
        valid = key_mask[b].nonzero().squeeze(1)
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            qh, kh, vh = q[b, :, sl], k[b, valid, sl], v[b, valid, sl]
            w = torch.softmax(qh @ kh.t() / math.sqrt(dh), dim=-1)
            out[b, :, sl] = w @ vh
    return out


def _key_mask(lens: list[int], S: int) -> torch.Tensor:
    return torch.arange(S).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)


def test_self_attention_equals_naive_masked_softmax():
    attn = MultiHeadAttention(D, H, self_attention=True).double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    mask = _key_mask([5, 3, 1], 5)
    W, bias = attn.qkv.weight, attn.qkv.bias
    q = x @ W[:D].t() + bias[:D]
    k = x @ W[D : 2 * D].t() + bias[D : 2 * D]
    v = x @ W[2 * D :].t() + bias[2 * D :]
    expected = attn.out(_naive_attention(q, k, v, mask, H))
    with torch.no_grad():
        got = attn(x, None, mask)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)


def test_cross_attention_equals_naive_masked_softmax():
    attn = MultiHeadAttention(D, H, self_attention=False).double()
    x = torch.randn(3, 4, D, dtype=torch.float64)  # T = 4 queries
    memory = torch.randn(3, 6, D, dtype=torch.float64)  # S = 6 keys
    mask = _key_mask([6, 2, 4], 6)
    q = attn.q(x)
    Wkv, bkv = attn.kv.weight, attn.kv.bias
    k = memory @ Wkv[:D].t() + bkv[:D]
    v = memory @ Wkv[D:].t() + bkv[D:]
    expected = attn.out(_naive_attention(q, k, v, mask, H))
    with torch.no_grad():
        got = attn(x, memory, mask)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)


def test_masked_keys_do_not_influence_attention():
    attn = MultiHeadAttention(D, H, self_attention=False).eval()
    x = torch.randn(2, 3, D)
    memory = torch.randn(2, 5, D)
    mask = _key_mask([3, 5], 5)
    changed = memory.clone()
    changed[0, 3:] = 100.0 * torch.randn(2, D)  # only masked keys of sentence 0 change
    with torch.no_grad():
        a, b = attn(x, memory, mask), attn(x, changed, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    mask_all = torch.ones(2, 5, dtype=torch.bool)  # control: unmasked, the change must show
    with torch.no_grad():
        assert not torch.allclose(attn(x, memory, mask_all)[0], attn(x, changed, mask_all)[0])


def test_encoder_layer_is_post_norm_formula():
    layer = EncoderLayer(D, H, FFN, dropout=0.3).eval().double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    mask = _key_mask([5, 2], 5)
    with torch.no_grad():
        y = layer.norm1(x + layer.attn(x, None, mask))
        expected = layer.norm2(y + layer.ffn.fc2(F.gelu(layer.ffn.fc1(y))))
        got = layer(x, mask)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_decoder_layer_is_post_norm_formula():
    layer = DecoderLayer(D, H, FFN, dropout=0.3).eval().double()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    memory = torch.randn(2, 4, D, dtype=torch.float64)
    mask, memory_mask = _key_mask([6, 3], 6), _key_mask([4, 2], 4)
    with torch.no_grad():
        y = layer.norm1(x + layer.self_attn(x, None, mask))
        y = layer.norm2(y + layer.cross_attn(y, memory, memory_mask))
        expected = layer.norm3(y + layer.ffn.fc2(F.gelu(layer.ffn.fc1(y))))
        got = layer(x, mask, memory, memory_mask)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_feed_forward_uses_gelu():
    ffn = FeedForward(D, FFN).double()
    x = torch.randn(3, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), ffn.fc2(F.gelu(ffn.fc1(x))), rtol=0, atol=0)
        assert not torch.allclose(ffn(x), ffn.fc2(F.relu(ffn.fc1(x))))


def test_layers_in_eval_mode_are_deterministic_and_train_mode_is_not():
    enc = EncoderLayer(D, H, FFN, dropout=0.5)
    dec = DecoderLayer(D, H, FFN, dropout=0.5)
    x, memory = torch.randn(2, 5, D), torch.randn(2, 4, D)
    mask, memory_mask = _key_mask([5, 3], 5), _key_mask([4, 1], 4)
    runs = {
        "enc": lambda: enc(x, mask),
        "dec": lambda: dec(x, mask, memory, memory_mask),
    }
    with torch.no_grad():
        for module in (enc, dec):
            module.eval()
        for run in runs.values():
            torch.testing.assert_close(run(), run(), rtol=0, atol=0)
        for module in (enc, dec):
            module.train()
        for run in runs.values():  # control: dropout 0.5 must change the output in train mode
            assert not torch.equal(run(), run())


def _make_encoder(layers: int = 2) -> Encoder:
    embed = nn.Embedding(30, D, padding_idx=0)
    enc = Encoder(embed, layers=layers, heads=H, ffn_dim=FFN, dropout=0.1, max_positions=16)
    enc.apply(bert_init)
    return enc.eval()


def test_encoder_input_is_scaled_embedding_plus_positions():
    enc = _make_encoder(layers=0)
    ids = torch.tensor([[5, 7, 3]])
    with torch.no_grad():
        got = enc(ids, torch.ones(1, 3, dtype=torch.bool))
        expected = enc.embed(ids) * math.sqrt(D) + enc.positions.weight[:3]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_encoder_is_padding_invariant():
    enc = _make_encoder()
    lens = [6, 4, 1]
    ids = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, :n] = torch.randint(4, 30, (n,))
    with torch.no_grad():
        batched = enc(ids, _key_mask(lens, 6))
        padded_ids = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
        padded = enc(padded_ids, _key_mask(lens, 10))
        for b, n in enumerate(lens):
            alone = enc(ids[b : b + 1, :n], torch.ones(1, n, dtype=torch.bool))[0]
            torch.testing.assert_close(batched[b, :n], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(padded[b, :n], alone, rtol=1e-5, atol=1e-5)


def test_encoder_rejects_too_long_source():
    enc = _make_encoder(layers=1)
    with pytest.raises(ValueError, match="max_source_positions"):
        enc(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.bool))


def test_bert_init_statistics():
    torch.manual_seed(1)
    lin = nn.Linear(256, 256)
    emb = nn.Embedding(1000, 64, padding_idx=0)
    plain_emb = nn.Embedding(100, 8)
    with torch.no_grad():
        lin.bias.fill_(1.0)
        emb.weight.fill_(1.0)
    for m in (lin, emb, plain_emb):
        bert_init(m)
    for w in (lin.weight, emb.weight[1:]):  # 65536 and 63936 samples: std error ~ 6e-5
        assert abs(float(w.detach().std()) - 0.02) < 5e-4
        assert abs(float(w.detach().mean())) < 5e-4
    assert torch.count_nonzero(lin.bias) == 0
    assert torch.count_nonzero(emb.weight[0]) == 0
    assert torch.count_nonzero(plain_emb.weight[0]) == plain_emb.weight.shape[1]  # no padding row


def test_bert_init_leaves_layer_norm_alone_and_zeroes_all_linear_biases():
    layer = DecoderLayer(D, H, FFN, dropout=0.1)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(0.5)
    layer.apply(bert_init)
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0, name
            assert abs(float(module.weight.detach().std()) - 0.02) < 0.01, name
        elif isinstance(module, nn.LayerNorm):  # untouched by bert_init
            assert torch.all(module.weight == 0.5), name


def test_attention_cpu_half_modes_against_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = _key_mask([9, 5, 1], 9)[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = attention(q, k, v, mask, cpu_half="fp32")
        plain = attention(q, k, v, mask, cpu_half="sdpa")
        matmul = attention(q, k, v, mask, cpu_half="matmul")
        fp32_of_fp32 = attention(q.float(), k.float(), v.float(), mask, cpu_half="fp32")
        matmul_of_fp32 = attention(q.float(), k.float(), v.float(), mask, cpu_half="matmul")
    assert fp32.dtype == fp32_of_fp32.dtype == torch.float32
    assert plain.dtype == matmul.dtype == matmul_of_fp32.dtype == torch.bfloat16
    assert torch.equal(fp32, fp32_of_fp32)  # float32 inputs stay float32 under autocast
    assert torch.equal(matmul, matmul_of_fp32)  # ... and are cast to bf16 for the matmuls
    err_fp32 = (fp32.double() - ref).abs().max()
    assert err_fp32 <= (plain.double() - ref).abs().max() and err_fp32 < 1e-5
    # bf16 scores, weights and output: a few bf16 roundings of values of size ~1
    err_matmul = (matmul.double() - ref).abs().max()
    assert 0 < err_matmul < 4 * 2**-8 * ref.abs().max()
    q32, k32, v32 = q.float(), k.float(), v.float()  # float32 without autocast: no change
    plain32 = attention(q32, k32, v32, mask, cpu_half="sdpa")
    for mode in ("fp32", "matmul"):
        assert torch.equal(attention(q32, k32, v32, mask, cpu_half=mode), plain32)
    with pytest.raises(ValueError, match="cpu_half must be one of"):
        attention(q32, k32, v32, mask, cpu_half="flash")


@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
@pytest.mark.parametrize("mode", ["sdpa", "fp32", "matmul"])
def test_attention_module_cpu_half_under_autocast_is_bf16_noise_only(kind, mode):
    torch.manual_seed(0)
    self_attention, causal = kind != "cross", kind == "causal"
    attn = MultiHeadAttention(D, H, self_attention=self_attention)
    x, memory = torch.randn(2, 5, D), torch.randn(2, 7, D)
    mask = _key_mask([5, 3], 5) if self_attention else _key_mask([7, 2], 7)
    ref = attn(x, None if self_attention else memory, mask, causal=causal)  # float32
    ref_grads = torch.autograd.grad(ref.square().sum(), list(attn.parameters()))
    set_cpu_half_attention(attn, mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, None if self_attention else memory, mask, causal=causal)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.02)
    grads = torch.autograd.grad(y.float().square().sum(), list(attn.parameters()))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02 * float(want.abs().max()))


def test_tied_logits_fast_gradient_layout_under_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, D, generator=g, requires_grad=True)
    w = torch.randn(50, D, generator=g, requires_grad=True)
    upstream = torch.randn(3, 7, 50, generator=g)
    results = []
    for fast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = tied_logits(x, w, fast=fast)
        results.append((y, *torch.autograd.grad((y.float() * upstream).sum(), (x, w))))
    (y_f, gx_f, gw_f), (y_p, gx_p, gw_p) = results
    assert y_f.dtype == y_p.dtype == torch.bfloat16 and torch.equal(y_f, y_p)
    assert gx_f.dtype == gw_f.dtype == torch.float32 and gw_f.shape == w.shape
    # float64 from the same bf16 inputs: both within bf16 rounding of it
    xb, wb, ub = x.detach().bfloat16().double(), w.detach().bfloat16().double(), upstream.double()
    want_x, want_w = ub @ wb, ub.reshape(-1, 50).t() @ xb.reshape(-1, D)
    for got, want in ((gx_f, want_x), (gw_f, want_w), (gx_p, want_x), (gw_p, want_w)):
        torch.testing.assert_close(
            got.double(), want, rtol=0.02, atol=0.02 * float(want.abs().max())
        )
    with torch.no_grad():  # without autocast, or not fast: the plain product
        assert torch.equal(tied_logits(x, w, fast=True), x @ w.t())


def test_float32_logits_keeps_the_tied_head_in_float32_under_autocast():
    x, w = torch.randn(2, 3, D), torch.randn(50, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tied_logits(x, w).dtype == torch.bfloat16
        with float32_logits():
            inside = tied_logits(x, w)
        with float32_logits(False):
            assert tied_logits(x, w).dtype == torch.bfloat16
        assert tied_logits(x, w).dtype == torch.bfloat16  # reset on exit
    assert inside.dtype == torch.float32 and torch.equal(inside, x @ w.t())


def test_set_cpu_half_attention_switches_every_attention_module():
    layer = DecoderLayer(D, H, FFN, dropout=0.0)
    assert layer.self_attn.cpu_half == layer.cross_attn.cpu_half == "matmul"  # the default
    set_cpu_half_attention(layer, "fp32")
    assert layer.self_attn.cpu_half == layer.cross_attn.cpu_half == "fp32"
    with pytest.raises(ValueError, match="cpu_half must be one of"):
        set_cpu_half_attention(layer, "bf16")
    with pytest.raises(ValueError, match="cpu_half must be one of"):
        MultiHeadAttention(D, H, self_attention=True, cpu_half="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_tape_records_exactly_f_dropout_and_replays_it(dtype):
    drop = Dropout(0.3)
    x = torch.randn(4, 5, 16).to(dtype)
    torch.manual_seed(3)
    ref = [F.dropout(x, 0.3, training=True), F.dropout(x + 1, 0.3, training=True)]
    after = torch.get_rng_state()
    torch.manual_seed(3)
    tape = DropoutTape()
    with tape.record():
        rec = [drop(x), drop(x + 1)]
    assert all(torch.equal(a, b) for a, b in zip(rec, ref, strict=True))
    assert torch.equal(torch.get_rng_state(), after) and len(tape.masks) == 2
    with tape.replay():
        again = [drop(x), drop(x + 1)]
    assert all(torch.equal(a, b) for a, b in zip(again, ref, strict=True))
    assert torch.equal(torch.get_rng_state(), after)  # replay draws nothing
    torch.manual_seed(3)
    assert torch.equal(drop(x), ref[0])  # outside a tape: nn.Dropout
    assert torch.equal(drop.eval()(x), x)


def test_dropout_tape_refuses_a_different_replay():
    drop = Dropout(0.5)
    tape = DropoutTape()
    with tape.record():
        drop(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="does not match"), tape.replay():
        drop(torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="replayed 0 of 1"), tape.replay():
        pass
