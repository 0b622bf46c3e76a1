"""CoDAT fine-tuning (method.md §9): the sample term `dat_train.codat_term`, its alpha gate and
sample choice, `dat_step` with objective codat / reward, the LR schedule and config checks, and
the fine-tuning CLI end to end.

Compared: `codat_term` on a tiny random DATransformer whose references are its own longest samples
(so sentence BLEU spreads from 0 to 100): a finite loss whose gradient reaches the parameters and
its statistics; the alpha gate (no sentence passes: exactly 0; one passes: the loss and gradient
of that sentence's own contrastive loss times 1/B, recomputed step by step from the pure functions
sample_dag -> sentence_bleu -> duplicate_mask -> choose_samples -> samples_log_q ->
contrastive_loss); `reference_loss` with -log P(Y|X) / N_b; the REINFORCE term with
`reinforce_loss` of the first R samples against the mean reward of all K; `dat_step` with
objective codat / reward with its DP loss plus codat.weight times `codat_term` on the un-glanced
DAG (pass 2's output reused when nothing is glanced, one more forward without glanced inputs
otherwise); the constant LR schedule by hand and the inverse-sqrt one by its formula; config errors
naming the key. End to end through `codat.cli.main` on a synthetic copy task: train a DAT,
fine-tune it with `codat`, `reward` and `dp` (init_from), then generate with the sample decoder,
tune-beta, analyze (NCM recomputed directly), plot and benchmark decode;
`Validation.sample_stats` at temperature 0 with the per-sentence mean of the argmax walk's
sentence BLEU; --resume of a fine-tuning run keeps its automatic codat.alpha; `codat_term`'s fused
scores (a speed setting) with its plain path (term, statistics, gradients).
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib

import pytest
import torch
import yaml
from conftest import make_config, make_model
from corpus import prepare_copy_task, run_cli
from safetensors.torch import load_file

from codat.checkpoint import load_model
from codat.config import CodatConfig, RunConfig, TrainConfig, config_from_dict
from codat.dag import dag_log_likelihood
from codat.dat_train import (
    codat_term,
    dat_step,
    glance_inputs,
    reference_loss,
    score_filter_key,
)
from codat.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, ParallelData
from codat.decode import sample_dag
from codat.objectives import (
    contrastive_loss,
    dag_nll,
    gather_token_logp,
    log_softmax_fp32,
    reinforce_loss,
    sample_targets,
    samples_log_q,
)
from codat.rewards import sentence_bleu
from codat.selection import choose_samples, duplicate_mask

# ---------------------------------------------------------------------------------------------
# codat_term on a tiny random model

ARCH = {"vocab_size": 20, "heads": 2, "upsample_scale": 3.0}
SRC_LENS = (4, 6, 3)
# A random model shows <unk> at almost every vertex: sample 3 tokens per vertex, untempered.
LOOSE = {"samples": 8, "temperature": 1.0, "top_p": 1.0, "top_tokens": 3}
SEED = 2  # the sampling seed of the references and of `codat_term`
NULL = contextlib.nullcontext()
SAMPLE_STATS = ("gate_pass", "distinct", "sample_bleu", "oracle_bleu")


def _model() -> torch.nn.Module:
    return make_model("dat", seed=11, **ARCH)


def _draw(model, batch, *, codat: CodatConfig, seed: int):
    """What codat_term draws: K samples of the un-glanced DAG with generator `seed`."""
    out = model(batch.src_ids, batch.src_lens)
    token_logp_vocab = log_softmax_fp32(out.token_logits)
    samples = sample_dag(
        token_logp_vocab.detach(),
        out.trans_logp.detach(),
        out.graph_lens,
        num_samples=codat.samples,
        temperature=codat.temperature,
        top_p=codat.top_p,
        top_tokens=codat.top_tokens,
        generator=torch.Generator().manual_seed(seed),
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )
    return out, token_logp_vocab, samples


def _batch(seed: int = SEED):
    """The 3 sources, with as references each sentence's longest sample under generator `seed`
    (the model's output does not depend on the targets, so `codat_term` with that seed draws
    the same samples: one of them matches exactly, the others partially or not at all)."""
    g = torch.Generator().manual_seed(3)
    src = [torch.randint(4, ARCH["vocab_size"], (n,), generator=g) for n in SRC_LENS]
    dummy = ParallelData(src, [torch.tensor([4])] * len(src)).collate(list(range(len(src))))
    with torch.no_grad():
        _, _, s = _draw(_model(), dummy, codat=CodatConfig(**LOOSE), seed=seed)
    longest = s.lengths.argmax(1)
    tgt = [s.tokens[b, k, : s.lengths[b, k]] for b, k in enumerate(longest.tolist())]
    assert all(len(t) >= 2 for t in tgt)
    return ParallelData(src, tgt).collate(list(range(len(src))))


def _terms(model, batch, *, seed=SEED, objective="codat", alpha=math.inf, **settings):
    out = model(batch.src_ids, batch.src_lens)
    return codat_term(
        out,
        batch,
        objective=objective,
        codat=CodatConfig(**{**LOOSE, **settings}),
        alpha=alpha,
        generator=torch.Generator().manual_seed(seed),
    )


def _stepwise(model, batch, *, objective: str, count: int, seed: int = SEED, **settings):
    """codat_term's steps, every sentence through the gate, from the pure functions: sample ->
    reward -> select -> score. Returns the scores (with grad) and the ChosenSamples, and the
    (B, K) rewards of all samples."""
    out, token_logp_vocab, s = _draw(
        model, batch, codat=CodatConfig(**{**LOOSE, **settings}), seed=seed
    )
    ref_ids, ref_lens = batch.tgt_ids[:, 1:], batch.tgt_lens - 2
    rewards = sentence_bleu(s.tokens, s.lengths, ref_ids, ref_lens).float() / 100
    duplicates = duplicate_mask(s.tokens, s.lengths, pad_id=PAD_ID)
    every = torch.ones(len(rewards), dtype=torch.bool)
    chosen = choose_samples(
        s.tokens, s.lengths, rewards, duplicates, every, objective=objective, count=count
    )
    targets, target_lens = sample_targets(
        chosen.tokens, chosen.lengths, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
    )
    scores = samples_log_q(token_logp_vocab, out.trans_logp, out.graph_lens, targets, target_lens)
    return scores, chosen, rewards


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_codat_term_is_finite_with_gradient_and_statistics():
    model, batch = _model(), _batch()
    loss, stats = _terms(model, batch)
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    assert loss.item() > 0  # some constraint is violated by the random model
    assert set(stats) == {*SAMPLE_STATS, "cl_loss"}
    assert all(type(v) is float for v in stats.values())
    assert stats["gate_pass"] == 1.0  # alpha = inf
    assert stats["cl_loss"] == pytest.approx(loss.item(), abs=1e-7)  # all pass: scale 1
    assert stats["oracle_bleu"] == pytest.approx(100.0, abs=1e-6)  # the reference is a sample
    assert 0 <= stats["sample_bleu"] < stats["oracle_bleu"]
    assert 0 < stats["distinct"] <= 1
    loss.backward()
    grads = _grads(model)
    # Both the token and the transition parameters receive a gradient.
    assert grads["embed.weight"].abs().sum() > 0
    assert grads["link_query.weight"].abs().sum() > 0


def test_score_filter_key_scores_each_distinct_sample_once_equal_to_all_k():
    model, batch = _model(), _batch()
    codat = CodatConfig(**{**LOOSE, "samples": 24, "top_tokens": 1, "filter": "score"})
    with torch.no_grad():
        out, token_logp_vocab, s = _draw(model, batch, codat=codat, seed=SEED)
        duplicates = duplicate_mask(s.tokens, s.lengths, pad_id=PAD_ID)
        assert duplicates.any()  # repeats occur, so the packing is exercised
        got = score_filter_key(token_logp_vocab, out, s, codat=codat)
        targets, target_lens = sample_targets(
            s.tokens, s.lengths, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
        )
        want = samples_log_q(token_logp_vocab, out.trans_logp, out.graph_lens, targets, target_lens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert score_filter_key(token_logp_vocab, out, s, codat=CodatConfig(**LOOSE)) is None


def test_no_sentence_below_alpha_gives_exactly_zero():
    model, batch = _model(), _batch()
    loss, stats = _terms(model, batch, alpha=-1.0)
    assert loss.shape == () and loss.item() == 0.0
    assert stats["gate_pass"] == 0.0
    assert stats["cl_loss"] == 0.0 and stats["oracle_bleu"] == pytest.approx(100.0, abs=1e-6)
    # Added to a DP loss, it changes nothing and does not break the backward.
    out = model(batch.src_ids, batch.src_lens)
    dp = -gather_token_logp(out.token_logits, batch.tgt_ids).mean()
    (dp + loss).backward()


def test_alpha_gate_keeps_only_the_sentences_at_or_below_it():
    model, batch = _model(), _batch()
    with torch.no_grad():
        out = model(batch.src_ids, batch.src_lens)
        per = reference_loss(log_softmax_fp32(out.token_logits), out, batch)
    # The reference definition: -log P(Y|X) / N_b on the un-glanced DAG.
    tok = gather_token_logp(out.token_logits, batch.tgt_ids)
    ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, batch.tgt_lens)
    torch.testing.assert_close(per, -ll / batch.tgt_lens, rtol=0, atol=1e-6)
    low, second = per.sort().values[:2].tolist()
    assert second - low > 1e-3
    row = int(per.argmin())
    alpha = (low + second) / 2

    codat = CodatConfig(**LOOSE)
    scores, chosen, _ = _stepwise(model, batch, objective="codat", count=codat.kept)
    assert scores.shape == (len(per), codat.kept)
    own = contrastive_loss(  # that sentence's own ranking loss, with grad
        scores[row : row + 1],
        chosen.rewards[row : row + 1],
        margin=codat.margin,
        mask=chosen.distinct[row : row + 1],
        tie=codat.tie,
    )
    assert own.item() > 0
    (own / len(per)).backward()
    reference = _grads(model)

    model.zero_grad()
    loss, stats = _terms(model, batch, alpha=alpha)
    assert stats["gate_pass"] == pytest.approx(1 / len(per))
    assert stats["cl_loss"] == pytest.approx(own.item(), rel=1e-6)
    assert loss.item() == pytest.approx(own.item() / len(per), rel=1e-6)
    loss.backward()
    gated = _grads(model)
    assert gated.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(gated[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_codat_term_equals_the_stepwise_ranking_loss_of_all_sentences():
    model, batch = _model(), _batch()
    codat = CodatConfig(**LOOSE, keep=0.5)
    scores, chosen, _ = _stepwise(model, batch, objective="codat", count=codat.kept)
    want = contrastive_loss(
        scores, chosen.rewards, margin=codat.margin, mask=chosen.distinct, tie=codat.tie
    )
    loss, _ = _terms(model, batch, keep=0.5)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_reward_term_uses_the_first_r_samples_against_the_mean_of_all():
    model, batch = _model(), _batch()
    loss, stats = _terms(model, batch, objective="reward", reward_samples=4)
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    assert "reward_loss" in stats and "cl_loss" not in stats
    assert stats["reward_loss"] == pytest.approx(loss.item(), abs=1e-7)
    loss.backward()
    got = _grads(model)
    assert got["link_query.weight"].abs().sum() > 0

    # The first R = 4 of the K samples, as drawn, against the mean reward of all K.
    model.zero_grad()
    out, token_logp_vocab, s = _draw(model, batch, codat=CodatConfig(**LOOSE), seed=SEED)
    rewards = sentence_bleu(s.tokens, s.lengths, batch.tgt_ids[:, 1:], batch.tgt_lens - 2)
    rewards = rewards.float() / 100
    targets, target_lens = sample_targets(
        s.tokens[:, :4], s.lengths[:, :4], bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
    )
    log_q = samples_log_q(token_logp_vocab, out.trans_logp, out.graph_lens, targets, target_lens)
    assert log_q.shape == (len(SRC_LENS), 4) and torch.isfinite(log_q).all()
    want = reinforce_loss(log_q, rewards[:, :4], rewards.mean(1))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    want.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_codat_term_rejects_an_objective_without_sample_term():
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match="train.objective"):
        _terms(model, batch, objective="dp")


@pytest.mark.parametrize("objective", ["codat", "reward"])
def test_codat_term_fused_scores_equal_the_plain_path(objective):
    """fused=True (scores gathered from the logits, no grad through the (B, L, V) log-probs) and
    fused=False give the same term, statistics and parameter gradients."""
    batch = _batch()
    results = []
    for fused in (True, False):
        model = _model()
        out = model(batch.src_ids, batch.src_lens)
        term, stats = codat_term(
            out,
            batch,
            objective=objective,
            codat=CodatConfig(**LOOSE, reward_samples=4),
            alpha=math.inf,
            generator=torch.Generator().manual_seed(SEED),
            fused=fused,
        )
        term.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        results.append((term.detach(), stats, grads))
    (term, stats, grads), (ref, ref_stats, ref_grads) = results
    assert float(term) != 0 and stats == pytest.approx(ref_stats, rel=1e-6)
    torch.testing.assert_close(term, ref, rtol=1e-6, atol=1e-7)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# dat_step with objective codat / reward


class _Inputs:
    """Forward hooks that record the positional inputs of every call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.calls.append(i))


@pytest.mark.parametrize("objective", ["codat", "reward"])
def test_dat_step_adds_the_weighted_term_reusing_the_unglanced_pass(objective):
    """Nothing glanced (ratio 0): one forward, whose output both the DP loss and the term use."""
    model, batch = _model(), _batch()
    cfg = RunConfig(
        model=make_config("dat", **ARCH),
        train=TrainConfig(objective=objective),
        codat=CodatConfig(**LOOSE, weight=0.5, reward_samples=4),
    )
    rec = _Inputs(model)
    loss, stats = dat_step(
        model,
        batch,
        cfg=cfg,
        ratio=0.0,
        generator=torch.Generator().manual_seed(SEED),
        autocast=NULL,
    )
    rec.handle.remove()
    assert len(rec.calls) == 1
    key = "cl_loss" if objective == "codat" else "reward_loss"
    assert set(stats) == {
        "invalid",
        "dp_loss",
        "gate_pass",
        "distinct",
        "sample_bleu",
        "oracle_bleu",
        key,
    }
    out = model(batch.src_ids, batch.src_lens)
    dp, _, _ = dag_nll(
        gather_token_logp(out.token_logits, batch.tgt_ids),
        out.trans_logp,
        out.graph_lens,
        batch.tgt_lens,
    )
    term, term_stats = _terms(model, batch, objective=objective, reward_samples=4)
    assert stats["dp_loss"] == pytest.approx(dp.item(), rel=1e-6)
    assert stats[key] == pytest.approx(term_stats[key], rel=1e-6)
    assert loss.item() == pytest.approx(dp.item() + 0.5 * term.item(), rel=1e-6)
    assert stats["gate_pass"] == 1.0  # codat.alpha 0: no gate yet (alpha = inf)


def test_dat_step_with_glancing_scores_samples_of_one_more_unglanced_forward():
    model, batch = _model(), _batch()
    cfg = RunConfig(
        model=make_config("dat", **ARCH),
        train=TrainConfig(objective="codat"),
        codat=CodatConfig(**LOOSE, weight=2.0),
    )
    rec = _Inputs(model)
    generator = torch.Generator().manual_seed(SEED)
    loss, stats = dat_step(model, batch, cfg=cfg, ratio=0.5, generator=generator, autocast=NULL)
    rec.handle.remove()
    # pass 1 (placeholders), pass 2 (glanced inputs), and the un-glanced pass of the term.
    assert len(rec.calls) == 3 and stats["glanced"] > 0
    assert rec.calls[1][2] is not None and (len(rec.calls[2]) < 3 or rec.calls[2][2] is None)
    # The same draws step by step: glancing takes its noise from the generator first.
    generator = torch.Generator().manual_seed(SEED)
    glance = glance_inputs(model, batch, ratio=0.5, generator=generator, autocast=NULL)
    term, term_stats = codat_term(
        model(batch.src_ids, batch.src_lens),
        batch,
        objective="codat",
        codat=cfg.codat,
        alpha=math.inf,
        generator=generator,
    )
    assert stats["cl_loss"] == pytest.approx(term_stats["cl_loss"], rel=1e-6)
    assert loss.item() == pytest.approx(stats["dp_loss"] + 2.0 * term.item(), rel=1e-6)
    assert int(glance.keep.sum()) > 0


# ---------------------------------------------------------------------------------------------
# learning rate and config


def test_constant_schedule_is_linear_warm_up_then_flat():
    from codat.loop import learning_rate

    tc = TrainConfig(lr_schedule="constant", lr=1e-3, warmup_steps=10, warmup_init_lr=1e-7)
    assert learning_rate(0, tc) == pytest.approx(1e-7, rel=1e-12)
    assert learning_rate(5, tc) == pytest.approx(1e-7 + (1e-3 - 1e-7) * 0.5, rel=1e-12)
    for step in (10, 11, 1000, 10**6):
        assert learning_rate(step, tc) == 1e-3
    no_warmup = TrainConfig(lr_schedule="constant", lr=2e-4, warmup_steps=0)
    assert learning_rate(0, no_warmup) == learning_rate(50, no_warmup) == 2e-4


def test_linear_schedule_warms_up_then_decays_to_zero_at_max_steps():
    from codat.loop import learning_rate

    tc = TrainConfig(lr_schedule="linear", lr=1e-3, warmup_steps=10, max_steps=110)
    assert learning_rate(5, tc) == pytest.approx(tc.warmup_init_lr + (1e-3 - tc.warmup_init_lr) / 2)
    assert learning_rate(10, tc) == pytest.approx(1e-3, rel=1e-12)
    assert learning_rate(60, tc) == pytest.approx(5e-4, rel=1e-12)
    assert learning_rate(110, tc) == learning_rate(200, tc) == 0.0
    with pytest.raises(ValueError, match="train.lr_schedule='cosine'"):
        TrainConfig(lr_schedule="cosine")


def test_inverse_sqrt_schedule_is_unchanged():
    """fairseq's inverse_sqrt: linear warm-up from init_lr, then lr * sqrt(warmup / step)."""
    from codat.loop import learning_rate

    tc = TrainConfig(lr=5e-4, warmup_steps=100, warmup_init_lr=1e-7)
    assert tc.lr_schedule == "inverse_sqrt"
    for step in (0, 1, 50, 99):
        expected = 1e-7 + (5e-4 - 1e-7) * step / 100
        assert learning_rate(step, tc) == pytest.approx(expected, rel=1e-12)
    for step in (100, 101, 400, 10**5):
        assert learning_rate(step, tc) == pytest.approx(5e-4 * math.sqrt(100 / step), rel=1e-12)
    assert learning_rate(400, tc) == pytest.approx(5e-4 * 0.5, rel=1e-12)
    assert learning_rate(50, tc) == pytest.approx(1e-7 + (5e-4 - 1e-7) / 2, rel=1e-12)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"train": {"objective": "contrastive"}}, "train.objective"),
        ({"train": {"lr_schedule": "cosine"}}, "train.lr_schedule"),
        ({"codat": {"samples": 1}}, "codat.samples"),
        ({"codat": {"keep": 0.0}}, "codat.keep"),
        ({"codat": {"temperature": -1.0}}, "codat.temperature"),
        ({"codat": {"reward_samples": 0}}, "codat.reward_samples"),
        # the keys before the codat section name their new place
        ({"train": {"cl_samples": 8}}, "codat.samples"),
        ({"train": {"cl_alpha": 2.0}}, "codat.alpha"),
        ({"train": {"reward_samples": 8}}, "codat.reward_samples"),
        ({"train": {"eval_cl_sentences": 8}}, "codat.eval_sentences"),
        ({"model": {"arch": "at"}, "train": {"objective": "codat"}}, "train.objective"),
    ],
)
def test_bad_fine_tuning_config_raises_naming_the_key(values, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_dict(values)


def test_fine_tuning_config_fields_load():
    cfg = config_from_dict(
        {
            "train": {"objective": "reward", "init_from": "runs/x", "lr_schedule": "constant"},
            "decode": {
                "decoder": "sample",
                "samples": 16,
                "rerank_token_weight": 0.3,
                "top_tokens": 2,
            },
            "codat": {"samples": 16, "keep": 0.5, "weight": 0.5, "alpha": 2.1},
        }
    )
    assert (cfg.train.objective, cfg.train.init_from, cfg.train.lr_schedule) == (
        "reward",
        "runs/x",
        "constant",
    )
    assert (cfg.decode.samples, cfg.decode.rerank_token_weight, cfg.decode.top_tokens) == (
        16,
        0.3,
        2,
    )
    assert (cfg.codat.kept, cfg.codat.weight, cfg.codat.gate()) == (8, 0.5, 2.1)
    unset = config_from_dict({"train": {"objective": "codat"}}).codat
    assert unset.alpha == 0.0 and unset.gate() == math.inf


# ---------------------------------------------------------------------------------------------
# End to end through the CLI


_run = run_cli


def _rows(run: pathlib.Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "valid_loss" in r]


def _weights(ckpt: pathlib.Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A prepared copy task and a DAT trained on it for a few steps (glancing off)."""
    tmp = tmp_path_factory.mktemp("finetune")
    data = prepare_copy_task(tmp)
    cfg = tmp / "cfg.yaml"
    cfg.write_text(
        f"run_dir: {tmp / 'dat'}\ndata: {{dir: {data}}}\n"
        "model: {dim: 32, heads: 2, ffn_dim: 64, encoder_layers: 1, decoder_layers: 1,"
        " upsample_scale: 3.0, dropout: 0.0}\n"
        "train: {lr: 3.0e-3, warmup_steps: 4, max_tokens: 400, max_steps: 30, log_every: 1,"
        " eval_every: 30, glance_start: 0.0, glance_end: 0.0, clip_norm: 1.0, threads: 1,"
        " bf16: false}\n"
    )
    _run(["train", str(cfg)])
    return {"tmp": tmp, "data": data, "cfg": cfg, "dat": tmp / "dat"}


def _fine_tune(trained: dict, name: str, *overrides: str) -> pathlib.Path:
    run = trained["tmp"] / name
    _run(
        [
            "train",
            str(trained["cfg"]),
            f"run_dir={run}",
            f"train.init_from={trained['dat']}",
            *overrides,
        ]
    )
    return run


FT = ("train.max_steps=4", "codat.samples=8", "codat.eval_sentences=10")


def test_codat_fine_tuning_end_to_end(trained, capsys):
    dat, data = trained["dat"], trained["data"]
    _, dat_valid = _rows(dat)
    assert [r["step"] for r in dat_valid] == [30]
    # A different model section on the command line: the init run's model config wins.
    run = _fine_tune(
        trained, "codat", "train.objective=codat", "train.eval_every=2", "model.dim=48", *FT
    )

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    alpha = cfg["codat"]["alpha"]
    assert math.isfinite(alpha) and alpha > 0
    # alpha = the initial model's validation DP loss = the init run's last validation loss.
    assert alpha == pytest.approx(dat_valid[-1]["valid_loss"], abs=1e-3)
    assert cfg["model"] == yaml.safe_load((dat / "config.yaml").read_text())["model"]

    train_rows, valid_rows = _rows(run)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        for key in ("dp_loss", "gate_pass", "distinct", "sample_bleu", "oracle_bleu"):
            assert math.isfinite(r[key]), key
        assert 0 <= r["gate_pass"] <= 1 and r["oracle_bleu"] >= r["sample_bleu"]
        # cl_loss is always logged (0 when no sentence passed the gate); the term is scaled by
        # the fraction that passed.
        assert "cl_loss" in r and (r["gate_pass"] > 0 or r["cl_loss"] == 0)
        extra = r["cl_loss"] * r["gate_pass"]
        assert r["loss"] == pytest.approx(r["dp_loss"] + extra, abs=2e-4)
    assert any(r.get("cl_loss", 0) > 0 for r in train_rows)
    assert [r["step"] for r in valid_rows] == [2, 4]
    for r in valid_rows:
        assert math.isfinite(r["valid_cl_loss"]) and r["valid_cl_loss"] >= 0
        assert r["valid_oracle_bleu"] >= r["valid_sample_bleu"] >= 0

    init = _weights(dat / "best")
    assert _max_diff(_weights(run / "last"), init) > 1e-4  # it trained

    # The sample decoder and the sampling tools on the fine-tuned run.
    src = data / "test.src.txt"
    n_src = len(src.read_text().splitlines())
    capsys.readouterr()
    _run(
        [
            "generate",
            str(run),
            "-i",
            str(src),
            "--decoder",
            "sample",
            "--samples",
            "8",
            "--temperature",
            "0.5",
            "--top-tokens",
            "2",
            "--rerank-token-weight",
            "0.5",
        ]
    )
    assert len(capsys.readouterr().out.splitlines()) == n_src

    tuned = trained["tmp"] / "beta.json"
    _run(["tune-beta", str(run), "--data-dir", str(data), "--samples", "8", "-o", str(tuned)])
    result = json.loads(tuned.read_text())
    assert result["best_beta"] in (0.3, 0.5, 0.7)
    assert set(result["bleu"]) == {"0.3", "0.5", "0.7"}
    top = max(result["bleu"].values())
    best = [b for b in (0.3, 0.5, 0.7) if result["bleu"][str(b)] == top]
    assert result["best_beta"] == min(best, key=lambda b: abs(b - 0.5))  # ties: nearest 0.5

    analyzed = trained["tmp"] / "analyze.json"
    _run(
        [
            "analyze",
            str(run),
            "--data-dir",
            str(data),
            "--split",
            "val",
            "--samples",
            "8",
            "-o",
            str(analyzed),
        ]
    )
    result = json.loads(analyzed.read_text())
    assert result["sentences"] == 12 and result["samples"] == 8 and result["no_path"] == 0
    assert result["dp_loss_per_token"] > 0
    assert 1 <= result["distinct_per_sentence"] <= 8
    assert 0 <= result["mean_sample_sentence_bleu"] <= 100
    assert 0 <= result["rerank_bleu"] <= 100 and 0 <= result["oracle_bleu"] <= 100
    # NCM = sum of -log P(Y|X) over the sum of target lengths (<s>, </s> included).
    _ncm_check(run, data, result["dp_loss_per_token"])

    png = trained["tmp"] / "curves.png"
    _run(["plot", str(dat), str(run), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    _run(
        [
            "benchmark",
            "decode",
            str(run),
            "-i",
            str(src),
            "--max-sentences",
            "3",
            "--repeats",
            "1",
            "--samples",
            "8",
        ]
    )
    printed = capsys.readouterr().out
    assert "sample-8" in printed and "lookahead" in printed


def _ncm_check(run: pathlib.Path, data: pathlib.Path, ncm: float) -> None:
    """Recompute the NCM of the run's best/ checkpoint on val in one batch."""
    model, _ = load_model(run / "best")
    val = ParallelData.load(data, "val")
    b = val.collate(list(range(len(val))))
    with torch.no_grad():
        out = model(b.src_ids, b.src_lens)
        tok = gather_token_logp(out.token_logits, b.tgt_ids)
        ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, b.tgt_lens)
    assert ncm == pytest.approx(float(-ll.sum() / b.tgt_lens.sum()), rel=1e-5)


def test_reward_fine_tuning_end_to_end(trained):
    run = _fine_tune(trained, "reward", "train.objective=reward", "train.eval_every=4", *FT)
    train_rows, valid_rows = _rows(run)
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert math.isfinite(r["dp_loss"]) and "cl_loss" not in r
        assert "reward_loss" in r and (r["gate_pass"] > 0 or r["reward_loss"] == 0)
        extra = r["reward_loss"] * r["gate_pass"]
        assert r["loss"] == pytest.approx(r["dp_loss"] + extra, abs=2e-4)
    assert any(r["reward_loss"] != 0 for r in train_rows)
    assert [r["step"] for r in valid_rows] == [4] and "valid_cl_loss" in valid_rows[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["codat"]["alpha"] > 0
    assert _max_diff(_weights(run / "last"), _weights(trained["dat"] / "best")) > 1e-4


def test_dp_objective_with_init_from_starts_from_the_init_weights(trained):
    tiny = ("train.max_steps=1", "train.eval_every=1", "train.lr=1.0e-9", "train.warmup_steps=0")
    run = _fine_tune(trained, "dp_init", *tiny)
    init = _weights(trained["dat"] / "best")
    assert _max_diff(_weights(run / "last"), init) < 1e-6
    _, valid = _rows(run)
    assert valid[0]["valid_loss"] == pytest.approx(_rows(trained["dat"])[1][-1]["valid_loss"], 1e-3)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["codat"]["alpha"] == 0.0  # no gate is computed for dp
    # Without init_from the same run starts from a fresh initialisation, far from the init run.
    fresh = trained["tmp"] / "dp_fresh"
    _run(["train", str(trained["cfg"]), f"run_dir={fresh}", *tiny])
    assert _max_diff(_weights(fresh / "last"), init) > 1e-3


def test_validation_sample_stats_are_means_over_sentences(trained):
    """With temperature 0 every sample is the argmax walk, whatever the batching: the valid_*
    sample statistics are then the mean over sentences of that walk's sentence BLEU, computed
    here one sentence at a time, while Validation batches them (several batches)."""
    from dataclasses import replace

    from codat.data import token_batches
    from codat.evaluate import Validation

    core, cfg = load_model(trained["dat"] / "best")
    cfg = replace(
        cfg,
        train=replace(cfg.train, max_tokens=64),
        codat=replace(cfg.codat, eval_sentences=12, temperature=0.0, samples=4),
    )
    valid = Validation.load(cfg, torch.device("cpu"), contextlib.nullcontext())
    sizes = torch.maximum(valid.data.src_lens, valid.data.tgt_lens)
    assert len(token_batches(sizes, max_tokens=64, shuffle=False)) > 1
    stats = valid.sample_stats(core, cfg)
    assert set(stats) == {"valid_cl_loss", "valid_sample_bleu", "valid_oracle_bleu"}

    bleu = []
    with torch.no_grad():
        for i in range(len(valid.data)):
            b = valid.data.collate([i])
            out = core(b.src_ids, b.src_lens)
            s = sample_dag(
                torch.log_softmax(out.token_logits.float(), -1),
                out.trans_logp,
                out.graph_lens,
                num_samples=1,
                temperature=0.0,
                top_p=cfg.codat.top_p,
                top_tokens=cfg.codat.top_tokens,
                generator=None,
                special_ids=SPECIAL_IDS,
                pad_id=PAD_ID,
            )
            bleu.append(float(sentence_bleu(s.tokens, s.lengths, b.tgt_ids[:, 1:], b.tgt_lens - 2)))
    assert len(set(bleu)) > 2  # the sentences differ, so a wrong average shows
    mean = sum(bleu) / len(bleu)
    assert stats["valid_sample_bleu"] == pytest.approx(mean, abs=1e-4)
    assert stats["valid_oracle_bleu"] == pytest.approx(mean, abs=1e-4)
    assert stats["valid_cl_loss"] == 0.0  # identical samples: all but one masked, no pairs


def test_resumed_fine_tuning_keeps_its_alpha_gate(trained):
    ft = ("train.objective=codat", "codat.samples=8", "train.eval_every=2")
    run = _fine_tune(trained, "codat_resume", *ft, "train.max_steps=2")
    alpha = yaml.safe_load((run / "config.yaml").read_text())["codat"]["alpha"]
    assert alpha > 0
    _fine_tune(
        trained,
        "codat_resume",
        *ft,
        "train.max_steps=3",
        "--resume",
        "--allow-change",
        "train.max_steps",
    )
    assert [r["step"] for r in _rows(run)[0]] == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["codat"]["alpha"] == alpha
