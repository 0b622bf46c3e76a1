"""Every model family through the one training loop and `codat generate` (codat.families).

End to end through `codat.cli.main` on the synthetic copy task: each arch trains from the same
prepared data, logs a falling loss and a validation BLEU, writes checkpoints, and decodes the test
file with each of its decoders (CLI and Python API); GLAT (nat + glancing) logs its glancing
ratio; CoDAT's ranking objective fine-tunes a GLAT on noisy-parallel-decoding samples (paper
Table 2), with the gate and statistics of the DAT objective. Errors: a decoder or an objective that
does not apply to the arch, an unknown arch, each naming the key. Unit level: `ranking_terms` with
any scorer equals the contrastive loss of the chosen samples; the AT family's teacher forcing.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
import yaml
from corpus import prepare_copy_task, run_cli

from codat.config import ModelConfig, config_from_dict
from codat.contrastive import SampleSettings, ranking_terms
from codat.data import BOS_ID, EOS_ID, PAD_ID, Batch
from codat.families import FAMILIES, at_sentence_loss, family
from codat.generate import Translator
from codat.objectives import contrastive_loss
from codat.rewards import sentence_bleu

MODEL = (
    "model: {{arch: {arch}, dim: 32, heads: 2, ffn_dim: 64, encoder_layers: 1, "
    "decoder_layers: 1, upsample_scale: 3.0, dropout: 0.0, max_length: 32}}\n"
)
TRAIN = (
    "train: {{lr: 3.0e-3, warmup_steps: 4, max_tokens: 400, max_steps: {steps}, log_every: 1,"
    " eval_every: {steps}, glance_start: {glance}, glance_end: {glance}, clip_norm: 1.0,"
    " threads: 1, bf16: false, label_smoothing: {ls}}}\n"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    return prepare_copy_task(tmp_path_factory.mktemp("families"))


def _train(data: pathlib.Path, name: str, arch: str, *, steps=40, glance=0.0, ls=0.0, extra=()):
    tmp = data.parent
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(
        f"run_dir: {tmp / name}\ndata: {{dir: {data}}}\n"
        + MODEL.format(arch=arch)
        + TRAIN.format(steps=steps, glance=glance, ls=ls)
    )
    run_cli(["train", str(cfg), *extra])
    rows = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return tmp / name, [r for r in rows if "loss" in r], [r for r in rows if "valid_loss" in r]


ARCH_CASES = [
    ("at", 0.0, 0.1),
    ("nat", 0.0, 0.0),
    ("nat", 0.5, 0.0),
    ("ctc", 0.0, 0.0),
    ("ctc", 0.5, 0.0),
    ("cmlm", 0.0, 0.1),
]


@pytest.mark.parametrize(
    ("arch", "glance", "ls"), ARCH_CASES, ids=["at", "nat", "glat", "ctc", "ctc_glat", "cmlm"]
)
def test_family_trains_and_decodes_end_to_end(data, capsys, arch, glance, ls):
    run, train_rows, valid_rows = _train(data, f"{arch}{glance}", arch, glance=glance, ls=ls)
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    first = sum(r["loss"] for r in train_rows[:5])
    last = sum(r["loss"] for r in train_rows[-5:])
    # CMLM has no copied source to start from and learns slowest (measured: 4.45 -> 3.55).
    assert last < (0.9 if arch == "cmlm" else 0.8) * first, (first, last)
    assert [r["step"] for r in valid_rows] == [40]
    assert math.isfinite(valid_rows[0]["valid_loss"]) and 0 <= valid_rows[0]["valid_bleu"] <= 100
    if glance > 0:
        assert all(r["glance"] == glance for r in train_rows)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["arch"] == arch
    assert (run / "best" / "model.safetensors").is_file()

    src = data / "test.src.txt"
    n_src = len(src.read_text().splitlines())
    for decoder in FAMILIES[arch].decoders:
        capsys.readouterr()
        options = ["--samples", "4", "--noise", "0.3"] if decoder == "npd" else []
        run_cli(["generate", str(run), "-i", str(src), "--decoder", decoder, *options])
        assert len(capsys.readouterr().out.splitlines()) == n_src, decoder
    if arch != "dat":
        for command in ("analyze", "tune-beta"):
            with pytest.raises(SystemExit) as e:
                from codat.cli import main

                main([command, str(run), "--data-dir", str(data)])
            assert e.value.code == 1 and "samples DAGs" in capsys.readouterr().err
    translator = Translator.from_dir(run)
    assert type(translator.model) is type(FAMILIES[arch].build(translator.model.cfg))
    assert len(translator.generate(["ein mann spielt", "der hund"])) == 2


def test_distill_writes_one_output_per_source_line_and_feeds_prepare(data, capsys):
    teacher, _, _ = _train(data, "at_teacher", "at", steps=10)
    src = data.parent / "raw" / "train.de"
    out = data.parent / "distill" / "train.en"
    run_cli(["distill", str(teacher), str(src), str(out), "--beam", "2"])
    n = len(src.read_text().splitlines())
    assert len(out.read_text().splitlines()) == n
    assert not list(out.parent.glob(".*"))  # no temporary left
    expected = Translator.from_dir(teacher).generate(src.read_text().splitlines()[:3], beam=2)
    assert out.read_text().splitlines()[:3] == expected
    (out.parent / "train.de").symlink_to(src)
    raw = data.parent / "raw"
    run_cli(
        [
            "prepare",
            "--src",
            "de",
            "--tgt",
            "en",
            "--train",
            str(out.parent / "train"),
            "--valid",
            str(raw / "val"),
            "--out",
            str(data.parent / "distilled_data"),
            "--vocab-size",
            "60",
        ]
    )
    assert (data.parent / "distilled_data" / "meta.json").is_file()
    with pytest.raises(SystemExit) as e:
        from codat.cli import main

        main(["distill", str(teacher), str(data.parent / "missing.de"), str(out)])
    assert e.value.code == 1 and "missing.de" in capsys.readouterr().err


def test_benchmark_speed_times_every_decoder_of_every_run_against_at_beam(data, capsys):
    runs = {
        arch: _train(data, f"speed_{arch}", arch, steps=3)[0]
        for arch in ("at", "nat", "ctc", "cmlm", "dat")
    }
    out = data.parent / "speed.json"
    capsys.readouterr()
    run_cli(
        [
            "benchmark",
            "speed",
            *(f"{arch}={run}" for arch, run in runs.items()),
            "-i",
            str(data / "test.src.txt"),
            "--max-sentences",
            "2",
            "--repeats",
            "1",
            "--samples",
            "4",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    expected = [
        "at beam",
        "at greedy",
        "nat argmax",
        "nat npd-4",
        "ctc greedy",
        "cmlm iter-1",
        "cmlm iter-4",
        "cmlm iter-10",
        "dat greedy",
        "dat lookahead",
        "dat viterbi",
        "dat sample-4",
    ]
    assert list(result["ms_per_sentence"]) == expected
    assert result["relative_to"] == "at beam" and result["speedup"]["at beam"] == 1.0
    for name in expected:
        ms = result["ms_per_sentence"][name]
        assert ms > 0 and name in printed
        assert result["speedup"][name] == pytest.approx(result["ms_per_sentence"]["at beam"] / ms)
    assert "speed-up" in printed


@pytest.mark.parametrize("arch", ["nat", "ctc"])
def test_codat_objective_on_glat_npd_and_ctc_samples(data, arch):
    """GLAT + NPD samples (paper Table 2) and CTC + position-wise samples."""
    init, _, init_valid = _train(data, f"{arch}_init", arch, glance=0.3)
    run, rows, _ = _train(
        data,
        f"{arch}_codat",
        arch,
        steps=4,
        extra=[
            f"train.init_from={init}",
            "train.objective=codat",
            "train.cl_samples=8",
            "train.cl_noise=0.5",
            "train.cl_temperature=1.0",
        ],
    )
    alpha = yaml.safe_load((run / "config.yaml").read_text())["train"]["cl_alpha"]
    # alpha = the init model's mean validation loss (the family's own loss for a NAT).
    assert alpha == pytest.approx(init_valid[-1]["valid_loss"], abs=1e-3)
    for r in rows:
        for key in ("dp_loss", "gate_pass", "distinct", "sample_bleu", "oracle_bleu", "cl_loss"):
            assert math.isfinite(r[key]), key
        assert r["oracle_bleu"] >= r["sample_bleu"]
        assert r["loss"] == pytest.approx(r["dp_loss"] + r["cl_loss"] * r["gate_pass"], abs=2e-4)
    assert any(r["distinct"] > 1 / 8 for r in rows)  # noise / sampling makes candidates differ
    assert any(r["cl_loss"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.arch=at", "decode.decoder=lookahead"], "decoder 'lookahead'.*arch=at"),
        (["model.arch=at", "train.objective=codat"], "train.objective='codat'.*arch=at"),
        (["model.arch=transformer"], "model.arch='transformer'"),
    ],
)
def test_arch_mismatches_are_errors_naming_the_key(data, capsys, overrides, message):
    import re

    cfg = data.parent / "bad.yaml"
    cfg.write_text(f"run_dir: {data.parent / 'bad'}\ndata: {{dir: {data}}}\n")
    with pytest.raises(SystemExit) as e:
        from codat.cli import main

        main(["train", str(cfg), *overrides])
    assert e.value.code == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (data.parent / "bad").exists()  # nothing half-written


def test_nat_trains_and_validates_when_references_exceed_max_length(data):
    """Training pairs longer than model.max_length are dropped; validation scores the rest."""
    run, rows, valid = _train(data, "nat_short", "nat", steps=3, extra=["model.max_length=5"])
    assert len(rows) == 3 and math.isfinite(valid[-1]["valid_loss"])


def test_unknown_arch_in_config_dict():
    with pytest.raises(ValueError, match="model.arch='rnn'"):
        config_from_dict({"model": {"arch": "rnn"}})
    with pytest.raises(ValueError, match="decoder 'beam'.*arch=dat"):
        family("dat").decoder("beam")
    assert family("at").decoder("") is family("at").decoders["beam"]


def test_ranking_terms_with_any_scorer_equal_the_contrastive_loss_of_the_kept_samples():
    """Two sentences, 4 samples each, scored by a lookup table with grad. Sentence 1 fails the
    gate; sentence 0 keeps its 2 best samples by sentence BLEU (keep 0.5)."""
    tokens = torch.tensor(
        [
            [[5, 6, 7], [5, 6, 0], [9, 9, 9], [5, 8, 7]],
            [[5, 6, 7], [5, 6, 8], [5, 9, 7], [6, 6, 7]],
        ]
    )
    lengths = torch.tensor([[3, 2, 3, 3], [3, 3, 3, 3]])
    ref_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    ref_lens = torch.tensor([4, 4])
    ref_loss = torch.tensor([1.0, 3.0])
    settings = SampleSettings(objective="codat", samples=4, keep=0.5, alpha=2.0, margin=0.1)
    table = torch.tensor([[-2.0, -1.0, -0.5, -0.7], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    seen = []

    def score(rows, chosen, chosen_lens):
        seen.append((rows.tolist(), chosen.tolist(), chosen_lens.tolist()))
        picks = [
            [tokens[r].tolist().index(sample) for sample in row]
            for r, row in zip(rows.tolist(), chosen.tolist(), strict=True)
        ]
        return torch.stack([table[r, p] for r, p in zip(rows.tolist(), picks, strict=True)])

    loss, stats = ranking_terms(tokens, lengths, ref_ids, ref_lens, ref_loss, settings, score)
    assert stats["gate_pass"] == 0.5
    rewards = sentence_bleu(tokens, lengths, ref_ids, ref_lens)[0]
    best = rewards.topk(2).indices.tolist()
    assert rewards[best[1]] > rewards.topk(3).values[2] + 1  # a clear top 2
    rows, chosen, chosen_lens = seen[0]
    assert rows == [0]
    assert chosen == [[tokens[0, i].tolist() for i in best]]
    assert chosen_lens == [[int(lengths[0, i]) for i in best]]
    expected = contrastive_loss(
        table[0, best].unsqueeze(0), rewards[best].float().unsqueeze(0) / 100, margin=0.1, tie=0.0
    )
    assert expected.item() > 0  # control: the table ranks them against their rewards
    assert loss.item() == pytest.approx(expected.item() * 0.5)
    loss.backward()
    assert table.grad[0, best[0]] < 0 and table.grad[0, best[1]] > 0
    assert table.grad[1].abs().sum() == 0


def test_at_teacher_forcing_loss_is_the_mean_target_token_nll():
    cfg = ModelConfig(
        arch="at",
        vocab_size=12,
        dim=16,
        heads=2,
        ffn_dim=32,
        encoder_layers=1,
        decoder_layers=1,
        dropout=0.0,
        max_graph_positions=16,
    )
    model = family("at").build(cfg).eval()
    src = torch.tensor([[5, 6, EOS_ID], [7, EOS_ID, PAD_ID]])
    tgt = torch.tensor([[BOS_ID, 8, 9, 10, EOS_ID], [BOS_ID, 11, EOS_ID, PAD_ID, PAD_ID]])
    batch = Batch(src, torch.tensor([3, 2]), tgt, torch.tensor([5, 3]), torch.arange(2))
    got = at_sentence_loss(model, batch)
    for b, n in enumerate((5, 3)):
        prev = tgt[b : b + 1, : n - 1]
        logp = torch.log_softmax(model(src[b : b + 1], batch.src_lens[b : b + 1], prev)[0], -1)
        nll = -logp.gather(1, tgt[b, 1:n].unsqueeze(1)).mean()
        assert got[b].item() == pytest.approx(nll.item(), abs=1e-5)
