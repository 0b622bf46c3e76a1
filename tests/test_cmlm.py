"""codat.cmlm (CMLM with mask-predict decoding) against definitions and loops.

Compared: the forward with `repeats` against each repeated row alone (unpadded, float64), masked
inputs ignoring the ids they hide and `masked=None` = all masked; `random_masks`' counts
(every value of 1..T_b reached, positions valid only) and its determinism under one seed;
`cmlm_training_loss` with `loop_cmlm_loss` (tests/reference.py) in value and gradient, the masks
it passes to the model, its stats, and zero gradient on the logits of unmasked positions;
`cmlm_sentence_loss` with a per-sentence loop; `mask_predict` with `loop_mask_predict` on a ragged
batch (random N(0, 0.3) weights so that re-masking changes the outputs), iterations = 1 with the
all-masked argmax at the top length, argument checks and bf16 autocast; and a tiny copy task
learnt in 200 Adam steps. The entry points: `cmlm_step` with `cmlm_training_loss`,
`mask_predict_decoder` with `mask_predict`; the model by composition (not a VanillaNAT, the same
state-dict keys plus mask_embed); and, end to end, `codat train` / `codat generate`.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from cli_runs import check_trains_and_decodes
from conftest import make_batch, make_config, make_model
from corpus import prepare_copy_task
from reference import loop_cmlm_loss, loop_mask_predict

from codat.cmlm import (
    CMLM,
    cmlm_sentence_loss,
    cmlm_step,
    cmlm_training_loss,
    mask_predict,
    mask_predict_decoder,
    random_masks,
)
from codat.config import DecodeConfig, ModelConfig, RunConfig, TrainConfig
from codat.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, Batch
from codat.nat import VanillaNAT
from codat.nat_core import content_targets

V = 20
MAX_LEN = 12


def tiny_cmlm(
    dim: int = 16, layers: int = 1, dtype: torch.dtype = torch.float32, dropout: float = 0.0
) -> CMLM:
    cfg = ModelConfig(
        arch="cmlm",
        vocab_size=V,
        dim=dim,
        heads=2,
        ffn_dim=2 * dim,
        encoder_layers=layers,
        decoder_layers=layers,
        dropout=dropout,
        max_source_positions=32,
        max_length=MAX_LEN,
    )
    return CMLM(cfg).to(dtype)


def redraw(model: CMLM, seed: int, std: float = 0.3) -> CMLM:
    """Every parameter but the LayerNorms' ~ N(0, std^2): spread-out scores, so argmax / re-mask
    ties are improbable and the iterations change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return model


def copy_batch(g: torch.Generator, B: int, *, lo: int = 1, hi: int = 6) -> Batch:
    """Random sources x (ids 4..V-1) + </s> and targets <s> x </s> (the copy task)."""
    lens = torch.randint(lo, hi + 1, (B,), generator=g)
    S = int(lens.max()) + 1
    src = torch.full((B, S), PAD_ID)
    tgt = torch.full((B, S + 1), PAD_ID)
    for b in range(B):
        n = int(lens[b])
        x = torch.randint(4, V, (n,), generator=g)
        src[b, :n], src[b, n] = x, EOS_ID
        tgt[b, 0], tgt[b, 1 : n + 1], tgt[b, n + 1] = BOS_ID, x, EOS_ID
    return Batch(src, lens + 1, tgt, lens + 2, torch.arange(B))


def strip(ids: list[int]) -> list[int]:
    return [t for t in ids if t not in SPECIAL_IDS]


class Recorder(torch.nn.Module):
    """Stands in for a DDP wrapper: forwards to the model, keeping the masks it was given and the
    token logits (with their gradient retained)."""

    def __init__(self, model: CMLM) -> None:
        super().__init__()
        self.model = model
        self.max_length = model.max_length
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out.token_logits.retain_grad()
        self.calls.append((args[4], out.token_logits))
        return out


# ---------------------------------------------------------------------------------------------


def test_forward_with_repeats_equals_each_row_alone():
    model = redraw(tiny_cmlm(dtype=torch.float64), 1).eval()
    g = torch.Generator().manual_seed(2)
    batch = copy_batch(g, 3)
    r, T = 3, 7
    tgt_lens = torch.randint(0, T + 1, (3 * r,), generator=g)
    tgt_lens[1] = T
    tgt = torch.randint(4, V, (3 * r, T), generator=g)
    masked = torch.rand((3 * r, T), generator=g) < 0.5
    out = model(batch.src_ids, batch.src_lens, tgt, tgt_lens, masked, repeats=r)
    assert out.token_logits.shape == (3 * r, T, V)
    assert out.length_logits.shape == (3, MAX_LEN + 1)
    assert out.out_mask.tolist() == [[t < int(n) for t in range(T)] for n in tgt_lens]
    for row in range(3 * r):
        b, n = row // r, int(tgt_lens[row])
        S = int(batch.src_lens[b])
        alone = model(
            batch.src_ids[b : b + 1, :S], batch.src_lens[b : b + 1], tgt[row : row + 1, :n],
            tgt_lens[row : row + 1], masked[row : row + 1, :n],
        )  # fmt: skip
        torch.testing.assert_close(alone.token_logits[0], out.token_logits[row, :n])
        torch.testing.assert_close(alone.length_logits[0], out.length_logits[b])


def test_masked_positions_ignore_their_ids_and_none_masks_everything():
    model = redraw(tiny_cmlm(dtype=torch.float64), 3).eval()
    batch = copy_batch(torch.Generator().manual_seed(4), 2, lo=4)
    tgt, lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    masked = torch.zeros_like(tgt, dtype=torch.bool)
    masked[:, 1] = True
    base = model(batch.src_ids, batch.src_lens, tgt, lens, masked).token_logits
    other = tgt.clone()
    other[:, 1] = 5 + tgt[:, 1] % 7  # a different id at the masked position
    same = model(batch.src_ids, batch.src_lens, other, lens, masked).token_logits
    torch.testing.assert_close(same, base)
    other[:, 0] = 4 + (tgt[:, 0] - 3) % (V - 4)  # an unmasked position changes the output
    assert not torch.allclose(model(batch.src_ids, batch.src_lens, other, lens, masked)[0], base)
    all_masked = model(batch.src_ids, batch.src_lens, tgt, lens, tgt >= 0).token_logits
    none = model(batch.src_ids, batch.src_lens, torch.zeros_like(tgt), lens).token_logits
    torch.testing.assert_close(none, all_masked)
    assert isinstance(model.mask_embed, torch.nn.Parameter)
    assert model.embed.num_embeddings == V  # [MASK] is not a vocabulary id
    with pytest.raises(ValueError, match="masked"):
        model(batch.src_ids, batch.src_lens, tgt, lens, masked[:, :1])


def test_random_masks_count_uniform_in_1_to_T_and_valid_positions_only():
    lens = torch.tensor([1, 3, 5, 0, 5])
    seen = [set() for _ in lens]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        m = random_masks(lens, 6, generator=g)
        assert m.shape == (5, 6) and m.dtype == torch.bool
        assert not (m & (torch.arange(6) >= lens.unsqueeze(1))).any()
        for b, c in enumerate(m.sum(1).tolist()):
            seen[b].add(c)
    assert seen == [{1}, {1, 2, 3}, {1, 2, 3, 4, 5}, {0}, {1, 2, 3, 4, 5}]
    # positions: uniform over the valid ones (each of the 5 hit often when 1 of 5 is masked)
    hits = torch.zeros(5)
    g = torch.Generator().manual_seed(1)
    for _ in range(500):
        hits += random_masks(torch.tensor([5]), 5, generator=g)[0].float()
    assert hits.min() > 0.4 * hits.mean()
    a = random_masks(lens, 6, generator=torch.Generator().manual_seed(7))
    b = random_masks(lens, 6, generator=torch.Generator().manual_seed(7))
    c = random_masks(lens, 6, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_training_loss_matches_the_loop_in_value_and_gradient(smoothing):
    batch = copy_batch(torch.Generator().manual_seed(5), 4, lo=1, hi=8)
    model = redraw(tiny_cmlm(dim=16, dtype=torch.float64), 6, std=0.1).train()
    rec = Recorder(model)
    loss, stats = cmlm_training_loss(
        rec, batch, generator=torch.Generator().manual_seed(9), length_weight=0.5,
        label_smoothing=smoothing,
    )  # fmt: skip
    ((masked, _),) = rec.calls
    tgt, lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    expected = random_masks(lens, tgt.shape[1], generator=torch.Generator().manual_seed(9))
    assert torch.equal(masked, expected)
    counts = masked.sum(1)
    assert ((counts >= 1) & (counts <= lens)).all()
    assert stats["masked"] == pytest.approx(float(counts.sum() / lens.sum()))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = loop_cmlm_loss(
        model, batch.src_ids, batch.src_lens, tgt, lens, masked, length_weight=0.5,
        epsilon=smoothing, max_length=MAX_LEN,
    )  # fmt: skip
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for p, grad in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(grad, p.grad)
    assert model.mask_embed.grad.abs().sum() > 0


def test_training_loss_clamps_long_lengths_and_reports_length_nll():
    batch = copy_batch(torch.Generator().manual_seed(11), 3, lo=MAX_LEN - 1, hi=MAX_LEN)
    model = tiny_cmlm(dtype=torch.float64)
    loss, stats = cmlm_training_loss(
        model, batch, generator=torch.Generator().manual_seed(0), length_weight=1.0
    )
    _, lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    logits = model.length_logits(model.encode(batch.src_ids, batch.src_lens))
    ce = torch.nn.functional.cross_entropy(logits, lens.clamp(max=MAX_LEN)).item()
    assert stats["length_nll"] == pytest.approx(ce)
    assert loss.item() == pytest.approx(stats["token_nll"] + stats["length_nll"])


def test_unmasked_positions_get_no_gradient_from_the_token_term_and_same_seed_same_masks():
    model = redraw(tiny_cmlm(), 12, std=0.1).train()
    batch = copy_batch(torch.Generator().manual_seed(13), 6, lo=3, hi=8)
    rec = Recorder(model)
    losses = []
    for seed in (21, 21, 22):
        loss, _ = cmlm_training_loss(
            rec, batch, generator=torch.Generator().manual_seed(seed), length_weight=0.0
        )
        loss.backward()
        losses.append(loss.item())
    (m1, logits1), (m2, _), (m3, _) = rec.calls
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert losses[0] == losses[1] != losses[2]
    row_grad = logits1.grad.abs().sum(-1)  # (B, T)
    assert (row_grad[~m1] == 0).all()
    assert (row_grad[m1] > 0).all()
    _, lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    valid = torch.arange(m1.shape[1]) < lens.unsqueeze(1)
    assert (valid & ~m1).any()  # some positions stay unmasked, so the check above has teeth


def test_sentence_loss_is_the_all_masked_mean_nll_per_sentence():
    model = redraw(tiny_cmlm(dtype=torch.float64), 14, std=0.1).eval()
    batch = copy_batch(torch.Generator().manual_seed(15), 4)
    got = cmlm_sentence_loss(model, batch)
    assert got.shape == (4,) and not got.requires_grad
    tgt, lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    for b in range(4):
        S, T = int(batch.src_lens[b]), int(lens[b])
        out = model(
            batch.src_ids[b : b + 1, :S], batch.src_lens[b : b + 1], tgt[b : b + 1, :T],
            lens[b : b + 1], torch.ones(1, T, dtype=torch.bool),
        )  # fmt: skip
        logp = torch.log_softmax(out.token_logits[0], -1)
        nll = -sum(logp[t, int(tgt[b, t])] for t in range(T)) / T
        assert float(got[b]) == pytest.approx(nll.item(), rel=1e-9)
    torch.testing.assert_close(cmlm_sentence_loss(model, batch), got)


@pytest.mark.parametrize("length_beam", [1, 3])
def test_mask_predict_matches_the_loop(length_beam):
    model = redraw(tiny_cmlm(dim=16, dtype=torch.float64), 16).eval()
    batch = copy_batch(torch.Generator().manual_seed(17), 5, lo=1, hi=6)
    outputs = {}
    for iterations in (1, 2, 4):
        out = mask_predict(
            model, batch.src_ids, batch.src_lens, iterations=iterations, length_beam=length_beam
        )
        with torch.no_grad():
            ref = loop_mask_predict(
                model, batch.src_ids, batch.src_lens, iterations=iterations,
                length_beam=length_beam, pad_id=PAD_ID, special_ids=SPECIAL_IDS,
            )  # fmt: skip
        assert out.shape[0] == 5 and out.shape[1] == max(max(len(r) for r in ref), 1)
        for b in range(5):
            row = out[b].tolist()
            n = len(ref[b])
            assert row[:n] == ref[b] and all(t == PAD_ID for t in row[n:]), (iterations, b)
        outputs[iterations] = out.tolist()
    # the iterations are not vacuous: re-masking changes some outputs
    assert outputs[1] != outputs[4] or outputs[1] != outputs[2]


def test_one_iteration_is_the_all_masked_argmax_at_the_top_length():
    model = redraw(tiny_cmlm(), 18).eval()
    batch = copy_batch(torch.Generator().manual_seed(19), 6)
    out = mask_predict(model, batch.src_ids, batch.src_lens, iterations=1, length_beam=1)
    with torch.no_grad():
        length_logits = model.length_logits(model.encode(batch.src_ids, batch.src_lens))
        top = length_logits[:, 1:].argmax(-1) + 1  # (B,) length 0 excluded
        T = int(top.max())
        logits = model(batch.src_ids, batch.src_lens, torch.zeros(6, T).long(), top).token_logits
    pred = logits.argmax(-1)
    for b in range(6):
        ref = strip(pred[b, : int(top[b])].tolist())
        row = out[b].tolist()
        assert row[: len(ref)] == ref and all(t == PAD_ID for t in row[len(ref) :])


def test_mask_predict_validates_arguments_and_runs_under_bf16_autocast():
    model = tiny_cmlm().eval()
    batch = copy_batch(torch.Generator().manual_seed(20), 3)
    for kwargs in ({"iterations": 0}, {"length_beam": 0}, {"length_beam": MAX_LEN + 1}):
        with pytest.raises(ValueError, match="iterations"):
            mask_predict(model, batch.src_ids, batch.src_lens, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mask_predict(model, batch.src_ids, batch.src_lens, iterations=3, length_beam=MAX_LEN)
        loss, _ = cmlm_training_loss(model, batch, generator=None)
        nll = cmlm_sentence_loss(model, batch)
    assert out.shape[0] == 3 and out.shape[1] >= 1
    assert loss.dtype == torch.float32 and nll.dtype == torch.float32


def test_cmlm_learns_a_tiny_copy_task():
    """Copy task (target = source content, 2..6 tokens), dim 32, 1 + 1 layers, 300 Adam steps,
    then mask-predict with 4 iterations. Measured (torch CPU): 62/64 exact at this seed; seeds 0-4
    for init, data and masks give 51-64 at 300 steps but 6-64 at 200 (the decoder must learn the
    position alignment from scratch: no copied source as in VanillaNAT), hence 300 steps. With
    length_weight 1.0 the length loss swamps the encoder early and nothing is learnt by 300 steps.
    length_beam 3 gives only ~28/64 here: a copy model scores a correct prefix (a shorter length)
    about as confidently as the full copy, so the mean log-prob often picks a wrong length; we
    therefore test length_beam 1 (the length head alone is 64/64 right)."""
    torch.manual_seed(0)
    model = tiny_cmlm(dim=32, layers=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data, masks = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    test = copy_batch(torch.Generator().manual_seed(123), 64, lo=2, hi=6)
    ref, ref_lens = content_targets(test.tgt_ids, test.tgt_lens)
    model.train()
    for _ in range(300):
        batch = copy_batch(data, 32, lo=2, hi=6)
        loss, _ = cmlm_training_loss(model, batch, generator=masks, length_weight=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = mask_predict(model, test.src_ids, test.src_lens, iterations=4, length_beam=1)
    exact = sum(
        [t for t in out[b].tolist() if t != PAD_ID] == ref[b, : ref_lens[b]].tolist()
        for b in range(64)
    )
    assert exact >= 40, exact


# ---------------------------------------------------------------------------------------------
# Entry points, composition, end to end


def test_cmlm_step_is_the_training_loss_with_the_configs_label_smoothing():
    model = make_model("cmlm").train()
    batch = make_batch([5, 3, 6], [4, 6, 2], seed=1)
    cfg = RunConfig(model=make_config("cmlm"), train=TrainConfig(label_smoothing=0.1))
    loss, stats = cmlm_step(
        model, batch, cfg=cfg, ratio=0.5, generator=torch.Generator().manual_seed(3),
        autocast=contextlib.nullcontext(),
    )  # fmt: skip
    ref, ref_stats = cmlm_training_loss(
        model, batch, generator=torch.Generator().manual_seed(3), label_smoothing=0.1
    )
    torch.testing.assert_close(loss, ref)
    assert stats == ref_stats and set(stats) == {"masked", "token_nll", "length_nll"}


def test_mask_predict_decoder_runs_mask_predict_with_the_decode_settings():
    model = redraw(tiny_cmlm(), 21).eval()
    batch = copy_batch(torch.Generator().manual_seed(22), 4)
    dc = DecodeConfig(iterations=3, length_beam=2)
    got = mask_predict_decoder(model, batch.src_ids, batch.src_lens, dc, None)
    want = mask_predict(model, batch.src_ids, batch.src_lens, iterations=3, length_beam=2)
    assert torch.equal(got, want)
    assert torch.equal(model.output_lengths(batch.src_lens), batch.src_lens)
    assert model.max_target_lens(batch.src_lens).tolist() == [MAX_LEN + 2] * 4


def test_cmlm_is_composed_not_a_vanilla_nat_and_keeps_its_state_dict_keys():
    cfg = make_config("cmlm")
    model = CMLM(cfg)
    assert not isinstance(model, VanillaNAT)
    nat_keys = list(VanillaNAT(make_config("nat")).state_dict())
    assert list(model.state_dict()) == ["mask_embed", *nat_keys]  # as when it subclassed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_copy_task(tmp_path_factory.mktemp("cmlm_cli"))


def test_cmlm_trains_and_decodes_end_to_end(data, capsys):
    check_trains_and_decodes(data, capsys, "cmlm", 0.0, 0.1)
