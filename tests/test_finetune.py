"""CoDAT fine-tuning (method.md §9): the sample term, its α gate and sample choice, the LR
schedule and config checks, and the fine-tuning CLI end to end.

Compared: `duplicate_mask` with `loop_duplicate_mask` (tests/reference.py) on random samples with
junk beyond their lengths; `sample_terms` on a tiny random DATransformer whose references are its
own longest samples (so sentence BLEU spreads from 0 to 100): a finite loss whose gradient reaches
the parameters and its statistics, the α gate (no sentence passes: exactly 0; one passes: the
loss and gradient of that sentence's own contrastive loss times 1/B), the REINFORCE term on the
first R samples against the mean reward of all K; the kept samples on crafted samples and rewards
(best distinct first, duplicates only when no distinct one is left, and then masked);
`SampleSettings.kept`; the constant LR schedule by hand; config errors naming the key. End to
end through `codat.cli.main` on a synthetic copy task: train a DAT, fine-tune it with `codat`,
`reward` and `dp` (init_from), then generate with the sample decoder, tune-beta, analyze (NCM
recomputed directly), plot and benchmark decode; `Validation.sample_stats` at temperature 0 with
the per-sentence mean of the argmax walk's sentence BLEU; --resume of a fine-tuning run keeps its
automatic cl_alpha.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
import yaml
from corpus import prepare_copy_task, run_cli
from reference import loop_duplicate_mask
from safetensors.torch import load_file

import codat.contrastive as contrastive
from codat.config import ModelConfig, TrainConfig, config_from_dict
from codat.contrastive import SampleSettings, duplicate_mask, reference_dp_loss, sample_terms
from codat.dag import dag_log_likelihood
from codat.dat import DATransformer
from codat.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, ParallelData
from codat.decode import DagSamples, sample_dag
from codat.objectives import contrastive_loss, gather_token_logp
from codat.train import inverse_sqrt_lr, learning_rate

# ---------------------------------------------------------------------------------------------
# duplicate_mask


@pytest.mark.parametrize("seed", range(4))
def test_duplicate_mask_matches_loop_with_junk_beyond_lengths(seed):
    g = torch.Generator().manual_seed(seed)
    B, K, T = 3, 9, 4
    lengths = torch.randint(0, T + 1, (B, K), generator=g)
    # Few symbols and short lengths: many duplicates. Junk (pad included) after each length.
    tokens = torch.randint(4, 6, (B, K, T), generator=g)
    junk = torch.randint(0, 10, (B, K, T), generator=g)
    tokens = torch.where(torch.arange(T) < lengths.unsqueeze(-1), tokens, junk)
    got = duplicate_mask(tokens, lengths)
    expected = loop_duplicate_mask(tokens.tolist(), lengths.tolist())
    assert got.dtype == torch.bool
    assert got.tolist() == expected
    assert 0 < sum(map(sum, expected)) < B * K  # both kinds occur


def test_duplicate_mask_hand_case():
    tokens = torch.tensor([[[5, 6, 0], [5, 6, 7], [5, 6, 9], [8, 8, 8], [9, 9, 9], [5, 6, 1]]])
    lengths = torch.tensor([[2, 3, 2, 0, 0, 2]])
    # [5 6] / [5 6 7] / [5 6] again / empty / empty again / [5 6] again
    assert duplicate_mask(tokens, lengths).tolist() == [[False, False, True, False, True, True]]


# ---------------------------------------------------------------------------------------------
# sample_terms on a tiny random model

CFG = ModelConfig(
    vocab_size=20,
    dim=32,
    heads=2,
    ffn_dim=64,
    encoder_layers=1,
    decoder_layers=1,
    upsample_scale=3.0,
    dropout=0.0,
)
SRC_LENS = (4, 6, 3)
# A random model shows <unk> at almost every vertex: sample 3 tokens per vertex, untempered.
LOOSE = {"samples": 8, "temperature": 1.0, "top_p": 1.0, "top_tokens": 3}
SEED = 2  # the sampling seed of the references and of `sample_terms`


def _model() -> DATransformer:
    torch.manual_seed(11)
    return DATransformer(CFG)


def _batch(seed: int = SEED):
    """The 3 sources, with as references each sentence's longest sample under generator `seed`
    (the model's output does not depend on the targets, so `sample_terms` with that seed draws
    the same samples: one of them matches exactly, the others partially or not at all)."""
    g = torch.Generator().manual_seed(3)
    src = [torch.randint(4, CFG.vocab_size, (n,), generator=g) for n in SRC_LENS]
    dummy = ParallelData(src, [torch.tensor([4])] * len(src)).collate(list(range(len(src))))
    with torch.no_grad():
        out = _model()(dummy.src_ids, dummy.src_lens)
        s = sample_dag(
            torch.log_softmax(out.token_logits.float(), -1),
            out.trans_logp,
            out.graph_lens,
            num_samples=LOOSE["samples"],
            temperature=LOOSE["temperature"],
            top_p=LOOSE["top_p"],
            top_tokens=LOOSE["top_tokens"],
            generator=torch.Generator().manual_seed(seed),
            special_ids=SPECIAL_IDS,
            pad_id=PAD_ID,
        )
    longest = s.lengths.argmax(1)
    tgt = [s.tokens[b, k, : s.lengths[b, k]] for b, k in enumerate(longest.tolist())]
    assert all(len(t) >= 2 for t in tgt)
    return ParallelData(src, tgt).collate(list(range(len(src))))


def _terms(model, batch, *, seed: int = SEED, **settings):
    out = model(batch.src_ids, batch.src_lens)
    s = SampleSettings(**{"objective": "codat", **LOOSE, **settings})
    return sample_terms(out, batch, s, torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _capture(monkeypatch, name: str) -> list:
    """Wrap codat.contrastive.<name>, recording (args, kwargs, result) of every call."""
    calls, original = [], getattr(contrastive, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(contrastive, name, wrapper)
    return calls


def test_codat_term_is_finite_with_gradient_and_statistics():
    model, batch = _model(), _batch()
    loss, stats = _terms(model, batch)
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    assert loss.item() > 0  # some constraint is violated by the random model
    assert set(stats) == {"gate_pass", "distinct", "sample_bleu", "oracle_bleu", "cl_loss"}
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


def test_alpha_gate_keeps_only_the_sentences_at_or_below_it(monkeypatch):
    model, batch = _model(), _batch()
    with torch.no_grad():
        out = model(batch.src_ids, batch.src_lens)
        per = reference_dp_loss(torch.log_softmax(out.token_logits.float(), -1), out, batch)
    # The reference definition: -log P(Y|X) / N_b on the un-glanced DAG.
    tok = gather_token_logp(out.token_logits, batch.tgt_ids)
    ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, batch.tgt_lens)
    torch.testing.assert_close(per, -ll / batch.tgt_lens, rtol=0, atol=1e-6)
    low, second = per.sort().values[:2].tolist()
    assert second - low > 1e-3
    row = int(per.argmin())
    alpha = (low + second) / 2

    calls = _capture(monkeypatch, "contrastive_loss")
    _terms(model, batch)  # alpha = inf: every sentence, for reference
    (scores, rewards), kw, _ = calls.pop()
    assert scores.shape[0] == len(per)
    own = contrastive_loss(  # that sentence's own ranking loss, with grad
        scores[row : row + 1],
        rewards[row : row + 1],
        margin=kw["margin"],
        mask=kw["mask"][row : row + 1],
        tie=kw["tie"],
    )
    assert own.item() > 0
    (own / len(per)).backward()
    reference = _grads(model)

    model.zero_grad()
    loss, stats = _terms(model, batch, alpha=alpha)
    assert stats["gate_pass"] == pytest.approx(1 / len(per))
    (g_scores, g_rewards), g_kw, g_loss = calls.pop()
    assert g_scores.shape[0] == 1  # only the passing sentence reached the ranking loss
    torch.testing.assert_close(g_scores.detach(), scores[row : row + 1].detach())
    assert torch.equal(g_rewards, rewards[row : row + 1])
    assert torch.equal(g_kw["mask"], kw["mask"][row : row + 1])
    assert g_loss.item() == pytest.approx(own.item(), rel=1e-6)
    assert loss.item() == pytest.approx(own.item() / len(per), rel=1e-6)
    loss.backward()
    gated = _grads(model)
    assert gated.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(gated[name], reference[name], rtol=1e-5, atol=1e-8, msg=name)


def test_reward_term_uses_the_first_r_samples_against_the_mean_of_all(monkeypatch):
    model, batch = _model(), _batch()
    bleu = _capture(monkeypatch, "sentence_bleu")
    reinforce = _capture(monkeypatch, "reinforce_loss")
    loss, stats = _terms(model, batch, objective="reward", reward_samples=4)
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    assert "reward_loss" in stats and "cl_loss" not in stats
    assert stats["reward_loss"] == pytest.approx(loss.item(), abs=1e-7)
    rewards = bleu[0][2].float() / 100  # (B, K) of all samples
    (log_q, picked, baseline), _, _ = reinforce[0]
    assert log_q.shape == (len(SRC_LENS), 4) and torch.isfinite(log_q).all()
    assert torch.equal(picked, rewards[:, :4])
    torch.testing.assert_close(baseline, rewards.mean(1))
    loss.backward()
    assert _grads(model)["link_query.weight"].abs().sum() > 0


def test_kept_count():
    assert SampleSettings("codat", samples=8, keep=0.25).kept == 2
    assert SampleSettings("codat", samples=8, keep=0.3).kept == 3  # ceil
    assert SampleSettings("codat", samples=128, keep=0.25).kept == 32
    assert SampleSettings("codat", samples=8, keep=1e-6).kept == 2  # at least a pair
    assert SampleSettings("codat", samples=2, keep=1.0).kept == 2
    for bad in ({"samples": 1}, {"keep": 0.0}, {"keep": 1.5}, {"objective": "dp"}):
        with pytest.raises(ValueError):
            SampleSettings(**{"objective": "codat", **bad})


# Crafted samples of one sentence (ids after each length are junk) and their rewards.
CRAFTED = [
    ([5, 6, 0, 0], 2, 0.9),
    ([5, 6, 9, 9], 2, 0.9),  # duplicate of 0 (junk after the length)
    ([7, 0, 0, 0], 1, 0.5),
    ([5, 6, 0, 0], 2, 0.9),  # duplicate of 0
    ([8, 9, 0, 0], 2, 0.1),
    ([10, 0, 0, 0], 1, 0.3),
    ([7, 0, 0, 0], 1, 0.5),  # duplicate of 2
    ([11, 12, 13, 0], 3, 0.2),
]


def _chosen(monkeypatch, keep: float) -> list[tuple[tuple[int, ...], float, bool]]:
    """(sample, reward, mask) of each sample that reached the ranking loss, by reward."""
    K = len(CRAFTED)
    tokens = torch.tensor([[t for t, _, _ in CRAFTED]])
    lengths = torch.tensor([[n for _, n, _ in CRAFTED]])
    rewards = torch.tensor([[r for _, _, r in CRAFTED]], dtype=torch.float64)

    def fake_sample_dag(*args, num_samples, **kwargs):
        assert num_samples == K
        zeros = torch.zeros(1, K)
        return DagSamples(tokens, lengths, zeros.long(), zeros.long(), zeros, zeros)

    monkeypatch.setattr(contrastive, "sample_dag", fake_sample_dag)
    monkeypatch.setattr(contrastive, "sentence_bleu", lambda *a: rewards * 100)
    log_q = _capture(monkeypatch, "samples_log_q")
    ranked = _capture(monkeypatch, "contrastive_loss")
    g = torch.Generator().manual_seed(3)
    src = [torch.randint(4, CFG.vocab_size, (4,), generator=g)]
    batch = ParallelData(src, [torch.tensor([5, 6])]).collate([0])
    loss, _ = _terms(_model(), batch, keep=keep, samples=K)
    assert torch.isfinite(loss)
    targets, target_lens = log_q[0][0][3], log_q[0][0][4]
    (_, picked), kw, _ = ranked[0]
    out = []
    for k in range(targets.shape[1]):
        n = int(target_lens[0, k])
        seq = targets[0, k, :n].tolist()
        assert seq[0] == BOS_ID and seq[-1] == EOS_ID
        assert (targets[0, k, n:] == PAD_ID).all()
        out.append((tuple(seq[1:-1]), round(float(picked[0, k]), 6), bool(kw["mask"][0, k])))
    return sorted(out, key=lambda x: (-x[1], not x[2]))


def test_kept_samples_are_the_best_distinct_ones(monkeypatch):
    assert _chosen(monkeypatch, 0.25) == [((5, 6), 0.9, True), ((7,), 0.5, True)]
    assert _chosen(monkeypatch, 0.5) == [
        ((5, 6), 0.9, True),
        ((7,), 0.5, True),
        ((10,), 0.3, True),
        ((11, 12, 13), 0.2, True),
    ]


def test_duplicates_fill_only_slots_left_by_distinct_samples_and_are_masked(monkeypatch):
    # 5 distinct samples; the 6th slot goes to the best duplicate ([5 6], masked out).
    assert _chosen(monkeypatch, 0.75) == [
        ((5, 6), 0.9, True),
        ((5, 6), 0.9, False),
        ((7,), 0.5, True),
        ((10,), 0.3, True),
        ((11, 12, 13), 0.2, True),
        ((8, 9), 0.1, True),
    ]
    everything = _chosen(monkeypatch, 1.0)
    assert len(everything) == 8
    assert [m for _, _, m in everything].count(False) == 3  # the three duplicates
    assert {s for s, _, m in everything if m} == {(5, 6), (7,), (10,), (11, 12, 13), (8, 9)}


# ---------------------------------------------------------------------------------------------
# learning rate and config


def test_constant_schedule_is_linear_warm_up_then_flat():
    tc = TrainConfig(lr_schedule="constant", lr=1e-3, warmup_steps=10, warmup_init_lr=1e-7)
    assert learning_rate(0, tc) == pytest.approx(1e-7, rel=1e-12)
    assert learning_rate(5, tc) == pytest.approx(1e-7 + (1e-3 - 1e-7) * 0.5, rel=1e-12)
    for step in (10, 11, 1000, 10**6):
        assert learning_rate(step, tc) == 1e-3
    no_warmup = TrainConfig(lr_schedule="constant", lr=2e-4, warmup_steps=0)
    assert learning_rate(0, no_warmup) == learning_rate(50, no_warmup) == 2e-4


def test_inverse_sqrt_schedule_is_unchanged():
    tc = TrainConfig(lr=5e-4, warmup_steps=100, warmup_init_lr=1e-7)
    assert tc.lr_schedule == "inverse_sqrt"
    for step in (0, 1, 50, 100, 400, 10**5):
        expected = inverse_sqrt_lr(step, lr=5e-4, warmup=100, init_lr=1e-7)
        assert learning_rate(step, tc) == expected
    assert learning_rate(400, tc) == pytest.approx(5e-4 * 0.5, rel=1e-12)
    assert learning_rate(50, tc) == pytest.approx(1e-7 + (5e-4 - 1e-7) / 2, rel=1e-12)


@pytest.mark.parametrize(
    "train, key",
    [
        ({"objective": "contrastive"}, "train.objective"),
        ({"lr_schedule": "cosine"}, "train.lr_schedule"),
        ({"cl_samples": 1}, "cl_samples"),
        ({"cl_keep": 0.0}, "cl_keep"),
    ],
)
def test_bad_fine_tuning_config_raises_naming_the_key(train, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_from_dict({"train": train})


def test_fine_tuning_config_fields_load():
    cfg = config_from_dict(
        {
            "train": {"objective": "reward", "init_from": "runs/x", "lr_schedule": "constant"},
            "decode": {"decoder": "sample", "samples": 16, "sample_beta": 0.3, "top_tokens": 2},
        }
    )
    assert (cfg.train.objective, cfg.train.init_from, cfg.train.lr_schedule) == (
        "reward",
        "runs/x",
        "constant",
    )
    assert (cfg.decode.samples, cfg.decode.sample_beta, cfg.decode.top_tokens) == (16, 0.3, 2)
    assert config_from_dict({"train": {"objective": "codat"}}).train.cl_alpha == 0.0


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


FT = ("train.max_steps=4", "train.cl_samples=8", "train.eval_cl_sentences=10")


def test_codat_fine_tuning_end_to_end(trained, capsys):
    dat, data = trained["dat"], trained["data"]
    _, dat_valid = _rows(dat)
    assert [r["step"] for r in dat_valid] == [30]
    # A different model section on the command line: the init run's model config wins.
    run = _fine_tune(
        trained, "codat", "train.objective=codat", "train.eval_every=2", "model.dim=48", *FT
    )

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    alpha = cfg["train"]["cl_alpha"]
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
            "--beta",
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
    assert result["ncm"] > 0
    assert 1 <= result["distinct_per_sentence"] <= 8
    assert 0 <= result["mean_sample_sentence_bleu"] <= 100
    assert 0 <= result["rerank_bleu"] <= 100 and 0 <= result["oracle_bleu"] <= 100
    # NCM = sum of -log P(Y|X) over the sum of target lengths (<s>, </s> included).
    _ncm_check(run, data, result["ncm"])

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
    from codat.generate import Translator

    model = Translator.from_dir(run).model
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
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["cl_alpha"] > 0
    assert _max_diff(_weights(run / "last"), _weights(trained["dat"] / "best")) > 1e-4


def test_dp_objective_with_init_from_starts_from_the_init_weights(trained):
    tiny = ("train.max_steps=1", "train.eval_every=1", "train.lr=1.0e-9", "train.warmup_steps=0")
    run = _fine_tune(trained, "dp_init", *tiny)
    init = _weights(trained["dat"] / "best")
    assert _max_diff(_weights(run / "last"), init) < 1e-6
    _, valid = _rows(run)
    assert valid[0]["valid_loss"] == pytest.approx(_rows(trained["dat"])[1][-1]["valid_loss"], 1e-3)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["cl_alpha"] == 0.0  # no gate is computed for dp
    # Without init_from the same run starts from a fresh initialisation, far from the init run.
    fresh = trained["tmp"] / "dp_fresh"
    _run(["train", str(trained["cfg"]), f"run_dir={fresh}", *tiny])
    assert _max_diff(_weights(fresh / "last"), init) > 1e-3


def test_validation_sample_stats_are_means_over_sentences(trained):
    """With temperature 0 every sample is the argmax walk, whatever the batching: the valid_*
    sample statistics are then the mean over sentences of that walk's sentence BLEU, computed
    here one sentence at a time, while Validation batches them (several batches)."""
    import contextlib
    from dataclasses import replace

    from codat.checkpoint import load_checkpoint_config, load_weights
    from codat.data import token_batches
    from codat.rewards import sentence_bleu
    from codat.train import Validation

    cfg = load_checkpoint_config(trained["dat"] / "best")
    cfg = replace(
        cfg,
        train=replace(
            cfg.train, eval_cl_sentences=12, max_tokens=64, cl_temperature=0.0, cl_samples=4
        ),
    )
    core = DATransformer(cfg.model)
    load_weights(trained["dat"] / "best", core)
    core.eval()
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
                top_p=cfg.train.cl_top_p,
                top_tokens=cfg.train.cl_top_tokens,
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
    ft = ("train.objective=codat", "train.cl_samples=8", "train.eval_every=2")
    run = _fine_tune(trained, "codat_resume", *ft, "train.max_steps=2")
    alpha = yaml.safe_load((run / "config.yaml").read_text())["train"]["cl_alpha"]
    assert alpha > 0
    _fine_tune(trained, "codat_resume", *ft, "train.max_steps=3", "--resume")
    assert [r["step"] for r in _rows(run)[0]] == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["cl_alpha"] == alpha
