"""DAT's length-predicted graph size, model.upsample predict (method.md §2.2): the length head's
loss against a loop over sentences (value and gradient); training graphs floor(lambda * n) of the
reference length, inference graphs floor(lambda * argmax) clipped to [2, max_graph_positions];
glancing, CoDAT and the validation loss on the reference-sized graph; the length accuracy rising
on a task whose target length is not the source length; decoding (batches, graph sizes, outputs,
`codat train` + `codat generate`) following the predicted length; configs and checkpoints without
the keys loading as `source`; bad values refused naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import random

import pytest
import torch
import yaml
from conftest import make_batch, make_model
from corpus import run_cli

from codat.checkpoint import load_model, save_checkpoint
from codat.config import DecodeConfig, ModelConfig, RunConfig, TrainConfig, config_from_dict
from codat.dat import DATransformer
from codat.dat_train import StepOptions, dat_sentence_loss, dat_step, glanced_dp_loss, length_loss
from codat.data import BOS_ID, EOS_ID, PAD_ID, Batch, ParallelData, read_lines
from codat.generate import Translator, batch_sources, source_tensor, translate_ids

NULL = contextlib.nullcontext()
WORDS = "ein mann eine frau hund spielt im park mit dem ball auf der straße".split()


def _predict(**overrides) -> DATransformer:
    return make_model("dat", upsample="predict", **overrides)


def _step(model, batch, *, ratio=0.0, objective="dp", options=None, seed=0):
    cfg = RunConfig(
        model=model.cfg,
        train=TrainConfig(objective=objective, glance_start=0, glance_end=0),
    )
    if objective == "codat":
        cfg = dataclasses.replace(cfg, codat=dataclasses.replace(cfg.codat, samples=4))
    generator = torch.Generator().manual_seed(seed)
    return dat_step(
        model,
        batch,
        cfg=cfg,
        ratio=ratio,
        generator=generator,
        autocast=NULL,
        options=options or StepOptions(),
    )


def _set_length(model: DATransformer, n: int) -> None:
    """Make the length head predict n for every source: zero weights, the bias peaked at n."""
    with torch.no_grad():
        model.length_head.weight.zero_()
        model.length_head.bias.fill_(-5.0)
        model.length_head.bias[n] = 5.0


# --- the loss ---------------------------------------------------------------------------------


def _loop_length_nll(model: DATransformer, batch: Batch) -> torch.Tensor:
    """The mean over sentences of -log softmax(head(mean of the valid encoder states))[n_b], one
    sentence at a time, n_b clamped to max_length."""
    S = batch.src_ids.shape[1]
    mask = torch.arange(S).unsqueeze(0) < batch.src_lens.unsqueeze(1)
    states = model.encoder(batch.src_ids, mask)
    total = torch.zeros(())
    for b in range(len(batch.src_lens)):
        m, n = int(batch.src_lens[b]), int(batch.tgt_lens[b])
        logits = model.length_head(states[b, :m].mean(0))
        total = total - torch.log_softmax(logits, dim=-1)[min(n, model.cfg.max_length)]
    return total / len(batch.src_lens)


def test_length_loss_equals_a_loop_over_sentences_and_adds_weight_times_it():
    model = _predict(max_length=8, length_loss_weight=0.3)  # n = 11 > 8: the last class
    batch = make_batch([5, 3, 7], [4, 9, 2], seed=1)
    loss, stats = _step(model, batch)
    want = _loop_length_nll(model, batch)
    assert stats["length_loss"] == pytest.approx(float(want.detach()), rel=1e-5)
    out = model(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
    argmax = model.encode(batch.src_ids, batch.src_lens).length_logits.argmax(-1)
    targets = batch.tgt_lens.clamp(max=8)
    assert stats["length_acc"] == pytest.approx(float((argmax == targets).float().mean()))
    dp, _ = glanced_dp_loss(out, batch, None)
    torch.testing.assert_close(loss, dp + 0.3 * want, rtol=1e-5, atol=1e-6)


def test_length_loss_value_and_gradient_equal_the_loop():
    logits = torch.randn(4, 6, requires_grad=True)
    lens = torch.tensor([2, 5, 9, 3])  # 9: clamped to class 5
    got, acc = length_loss(logits, lens)
    (grad,) = torch.autograd.grad(got, logits)
    want = sum(-torch.log_softmax(logits[b], -1)[min(int(lens[b]), 5)] for b in range(4)) / 4
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    hits = sum(int(logits[b].argmax()) == min(int(lens[b]), 5) for b in range(4))
    assert acc == hits / 4


def test_source_upsampling_has_no_length_head_and_reports_no_length_stats():
    source, predict = make_model("dat"), _predict()
    assert source.length_head is None and not any("length" in k for k in source.state_dict())
    # The head is created last: every other weight starts from the same values.
    for name, value in source.state_dict().items():
        assert torch.equal(predict.state_dict()[name], value), name
    _, stats = _step(source, make_batch([4, 2], [3, 5]))
    assert "length_loss" not in stats and "length_acc" not in stats


# --- graph sizes --------------------------------------------------------------------------------


def test_training_graphs_are_floor_lambda_n_of_the_reference_clipped():
    model = _predict(upsample_scale=2.5, max_graph_positions=14)
    batch = make_batch([9, 1, 4], [0, 2, 4])  # n = 2, 4, 6
    out = model(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
    assert out.graph_lens.tolist() == [5, 10, 14]  # floor(2.5 n), 15 clipped to 14
    assert out.token_logits.shape[1] == 14
    assert model.max_target_lens(batch.src_lens).tolist() == [14] * 3  # the target sizes it


@pytest.mark.parametrize("n, want", [(0, 2), (1, 2), (3, 7), (7, 17), (12, 20)])
def test_inference_graphs_are_floor_lambda_argmax_clipped(n, want):
    model = _predict(upsample_scale=2.5, max_graph_positions=20, max_length=16).eval()
    _set_length(model, n)
    batch = make_batch([2, 9, 5], [1, 1, 1])  # any source length: the same predicted graph
    enc = model.encode(batch.src_ids, batch.src_lens)
    assert enc.graph_lens.tolist() == [want] * 3
    assert model(batch.src_ids, batch.src_lens).token_logits.shape[1] == want


def test_inference_graph_of_a_random_head_is_its_argmax_times_lambda():
    model = _predict(upsample_scale=3.0, max_graph_positions=40, max_length=30).eval()
    with torch.no_grad():
        model.length_head.weight.normal_(0, 1.0)
    batch = make_batch([2, 9, 5, 7], [1, 1, 1, 1], seed=3)
    enc = model.encode(batch.src_ids, batch.src_lens)
    want = (3 * enc.length_logits.argmax(-1)).clamp(2, 40)
    assert torch.equal(enc.graph_lens, want) and len(set(want.tolist())) > 1


# --- training, glancing, CoDAT, validation --------------------------------------------------


def test_glancing_and_codat_train_on_the_reference_sized_graph():
    model = _predict(dropout=0.1)
    batch = make_batch([6, 2, 4], [3, 5, 1], seed=2)
    sizes = []
    hook = model.register_forward_hook(lambda m, args, out: sizes.append(out.graph_lens.tolist()))
    loss, stats = _step(model, batch, ratio=0.5, objective="codat")
    hook.remove()
    assert len(sizes) == 3  # glancing's two passes and CoDAT's un-glanced forward
    assert sizes == [model.graph_sizes(batch.tgt_lens).tolist()] * 3
    assert stats["glanced"] > 0 and "cl_loss" in stats and math.isfinite(stats["length_loss"])
    loss.backward()
    assert model.length_head.weight.grad.abs().sum() > 0


def test_step_options_keep_the_loss_of_a_predict_model():
    def run(options):
        model = _predict(dropout=0.3)
        torch.manual_seed(7)
        loss, stats = _step(model, make_batch([5, 3, 6], [4, 2, 7]), ratio=0.5, options=options)
        return loss.detach(), stats

    (ref, ref_stats), (got, got_stats) = run(StepOptions.plain()), run(StepOptions())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert got_stats == ref_stats


def test_validation_loss_sizes_the_graph_from_the_reference():
    model = _predict().eval()
    _set_length(model, 0)  # predicted graphs of 2 vertices: no target would fit
    batch = make_batch([3, 5], [4, 6])
    got = dat_sentence_loss(model, batch)
    assert torch.isfinite(got).all()
    out = model(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
    dp, invalid = glanced_dp_loss(out, batch, None)
    assert invalid == 0
    torch.testing.assert_close(got.mean(), dp.detach(), rtol=1e-5, atol=1e-6)


def _two_length_batch(B: int, seed: int) -> Batch:
    """Sources of 3..9 tokens; the target is 1 token (sources from ids 4..21) or 5 tokens (ids
    22..39): its length follows the tokens, not the source length."""
    g = torch.Generator().manual_seed(seed)
    src_lens = torch.randint(3, 10, (B,), generator=g)
    long = torch.rand(B, generator=g) < 0.5
    tgt_lens = torch.where(long, 5, 1)
    src = torch.full((B, int(src_lens.max()) + 1), PAD_ID)
    tgt = torch.full((B, 7), PAD_ID)
    for b in range(B):
        m, n = int(src_lens[b]), int(tgt_lens[b])
        low, high = (22, 40) if long[b] else (4, 22)
        tokens = torch.randint(low, high, (m,), generator=g)
        src[b, :m], src[b, m] = tokens, EOS_ID
        tgt[b, 0], tgt[b, 1 : n + 1], tgt[b, n + 1] = BOS_ID, tokens.repeat(n)[:n], EOS_ID
    return Batch(
        src, src_lens + 1, tgt[:, : int(tgt_lens.max()) + 2], tgt_lens + 2, torch.arange(B)
    )


def test_length_accuracy_rises_when_the_target_length_is_not_the_source_length():
    model = _predict(max_length=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out = _two_length_batch(64, seed=999)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            enc = model.encode(held_out.src_ids, held_out.src_lens)
        model.train()
        return float((enc.length_logits.argmax(-1) == held_out.tgt_lens).float().mean())

    before, seen = accuracy(), []
    for step in range(30):
        loss, stats = _step(model, _two_length_batch(16, seed=step), seed=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(stats["length_acc"])
    assert before < 0.6 and sum(seen[:3]) / 3 < 0.6
    assert accuracy() > 0.95 and sum(seen[-5:]) / 5 > 0.9


# --- decoding -----------------------------------------------------------------------------------


def test_decoding_batches_and_graphs_follow_the_predicted_length():
    model = _predict(upsample_scale=2.0).eval()
    _set_length(model, 3)  # graphs of 6 whatever the source
    sources = [torch.randint(4, 40, (n,)) for n in (9, 2, 12, 7)]  # source graphs 20, 6, 26, 16
    _, lens, batches = batch_sources(sources, model, 12)
    assert model.output_lengths(lens).tolist() == [20, 6, 26, 16]  # the pre-encoding estimate
    assert sorted(len(b) for b in batches) == [2, 2]  # 2 x 6 <= 12: sized by the prediction
    sizes = []
    hook = model.register_forward_hook(lambda m, args, out: sizes.extend(out.graph_lens.tolist()))
    hyps = translate_ids(model, sources, DecodeConfig(max_tokens=12))
    hook.remove()
    assert sizes == [6] * 4
    assert all(len(h) <= 4 for h in hyps)  # at most one token per inner vertex


def _summary_corpus(tmp: pathlib.Path) -> pathlib.Path:
    """Sources of 4-9 words from one of two word sets; the target, "ja" for the first set and
    "nein nein nein nein" for the second, has a length that follows the words, not the source
    length. Prepared with the length filter off."""
    rng = random.Random(0)
    raw = tmp / "raw"
    raw.mkdir()
    for split, n in (("train", 120), ("val", 8), ("test", 8)):
        src, tgt = [], []
        for i in range(n):
            words = WORDS[:7] if i % 2 else WORDS[7:]
            src.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))))
            tgt.append("ja" if i % 2 else "nein nein nein nein")
        (raw / f"{split}.de").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (raw / f"{split}.en").write_text("".join(t + "\n" for t in tgt))
    data = tmp / "data"
    splits = [
        "--train",
        str(raw / "train"),
        "--valid",
        str(raw / "val"),
        "--test",
        str(raw / "test"),
    ]
    options = ["--vocab-size", "60", "--max-ratio", "0"]
    run_cli(["prepare", "--src", "de", "--tgt", "en", *splits, "--out", str(data), *options])
    return data


def test_train_and_generate_through_the_cli_follow_the_predicted_length(tmp_path, capsys):
    data = _summary_corpus(tmp_path)
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\ndata: {{dir: {data}, max_ratio: 0}}\n"
        "model: {dim: 32, heads: 2, ffn_dim: 64, encoder_layers: 1, decoder_layers: 1,"
        " dropout: 0.0, max_length: 32, upsample: predict, upsample_scale: 2.0,"
        " length_loss_weight: 1.0}\n"
        "train: {lr: 3.0e-3, warmup_steps: 4, max_tokens: 400, max_steps: 40, log_every: 1,"
        " eval_every: 40, glance_start: 0.3, glance_end: 0.3, threads: 1, bf16: false}\n"
        "codat: {samples: 4, eval_sentences: 4}\n"
    )
    run_cli(["train", str(cfg)])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 40 and all("length_acc" in r for r in train_rows)
    assert train_rows[-1]["length_loss"] < 0.5 * train_rows[0]["length_loss"]
    (valid,) = [r for r in rows if "valid_loss" in r]
    assert math.isfinite(valid["valid_loss"]) and math.isfinite(valid["valid_cl_loss"])
    # The validation row's length accuracy and error, recomputed from the saved model on val.
    val = ParallelData.load(data, "val")
    b = val.collate(list(range(len(val))))
    with torch.no_grad():
        head = load_model(tmp_path / "run" / "best")[0].eval().encode(b.src_ids, b.src_lens)
    predicted = head.length_logits.argmax(-1)
    assert valid["valid_length_acc"] == pytest.approx(
        float((predicted == b.tgt_lens).double().mean())
    )
    assert valid["valid_length_mae"] == pytest.approx(
        float((predicted - b.tgt_lens).abs().double().mean())
    )
    assert valid["valid_length_acc"] == 1.0  # the two lengths are learnt

    src = data / "test.src.txt"
    capsys.readouterr()
    run_cli(["generate", str(tmp_path / "run"), "-i", str(src)])
    assert len(capsys.readouterr().out.splitlines()) == len(src.read_text().splitlines())
    translator = Translator.from_dir(tmp_path / "run")
    model = translator.model
    ids = [torch.tensor(x) for x in translator.sp.encode(src.read_text().splitlines())]
    _, lens, _ = batch_sources(ids, model, 1000)
    enc = model.encode(source_tensor(ids, lens, list(range(len(ids)))), lens)
    refs = [len(x) + 2 for x in translator.sp.encode(read_lines(data / "test.ref.txt"))]
    # The learnt head predicts the summaries' lengths, not the sources'.
    assert enc.length_logits.argmax(-1).tolist() == refs
    assert enc.graph_lens.tolist() == [2 * n for n in refs]
    assert (enc.graph_lens < model.output_lengths(lens)).all()


# --- configuration ------------------------------------------------------------------------------


def test_a_checkpoint_without_the_keys_loads_as_source(tmp_path):
    model = make_model("dat", vocab_size=40).eval()
    spm = tmp_path / "spm.model"
    spm.write_bytes(b"")
    save_checkpoint(tmp_path / "ckpt", model, RunConfig(model=model.cfg), spm)
    config = tmp_path / "ckpt" / "config.yaml"
    values = yaml.safe_load(config.read_text())
    del values["model"]["upsample"], values["model"]["length_loss_weight"]
    config.write_text(yaml.safe_dump(values))
    loaded, cfg = load_model(tmp_path / "ckpt")
    assert cfg.model.upsample == "source" and cfg.model.length_loss_weight == 0.1
    assert loaded.length_head is None
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert config_from_dict({"model": {"arch": "dat"}}).model.upsample == "source"


@pytest.mark.parametrize(
    "model, key",
    [
        ({"upsample": "target"}, "model.upsample"),
        ({"upsample": "predict", "arch": "ctc"}, "model.upsample"),
        ({"length_loss_weight": -0.1}, "model.length_loss_weight"),
        ({"length_loss_weight": math.nan}, "model.length_loss_weight"),
        ({"length_loss_weight": "heavy"}, "model.length_loss_weight"),
    ],
)
def test_bad_values_raise_naming_the_key(model, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_dict({"model": model})


def test_predict_keys_round_trip_through_the_config():
    cfg = config_from_dict({"model": {"upsample": "predict", "length_loss_weight": 0.5}})
    assert cfg.model == ModelConfig(upsample="predict", length_loss_weight=0.5)
