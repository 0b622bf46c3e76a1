"""The command line (`codat.cli`). End to end: prepare -> train -> generate -> score, on a few
hundred real Multi30k lines (read from ../shared/data at test time, never stored in the repo) or,
when that directory is absent, on a synthetic copy task; checks the loss falls, outputs line up,
BLEU prints, and --resume continues the step counter. Parser: --help / --version / unknown verbs
exit as documented; one decoding flag per `DecodeConfig` field, each with help, mapped onto the
run's settings with only the flags given; the renamed --beta exits naming its replacements.
The first hour: `generate --interactive` answers each line before the next is sent (a subprocess
on a pipe), the training bar's total is the real bound and TQDM_* settings apply, and each
validation prints one line."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import pathlib
import random
import re
import select
import subprocess
import sys

import pytest
from conftest import make_model
from corpus import prepare_copy_task

from codat import __version__
from codat.checkpoint import save_checkpoint
from codat.cli import DECODE_HELP, build_parser, flag_name, main, run
from codat.commands import decode_config
from codat.config import DecodeConfig, RunConfig
from codat.data import read_meta
from codat.generate import Translator
from codat.runs import bar_options, expected_stop

MULTI30K = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def _write(path: pathlib.Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _corpus(tmp: pathlib.Path, n_train: int, n_eval: int) -> str:
    """Write train/val/test prefixes with .de/.en files; return the raw directory."""
    raw = tmp / "raw"
    raw.mkdir()
    if (MULTI30K / "train.de.gz").is_file():
        for split, n in (("train", n_train), ("val", n_eval), ("test_2016_flickr", n_eval)):
            for lang in ("de", "en"):
                with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
                    lines = [next(f).rstrip("\n") for _ in range(n)]
                _write(raw / f"{split}.{lang}", lines)
    else:
        rng = random.Random(0)
        words = "ein mann eine frau hund spielt im park mit dem ball auf der straße".split()
        for split, n in (("train", n_train), ("val", n_eval), ("test_2016_flickr", n_eval)):
            src = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(n)]
            _write(raw / f"{split}.de", src)
            _write(raw / f"{split}.en", src)  # copy task
    return str(raw)


def _run(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, f"codat {' '.join(argv)} exited with {e.value.code}"


def _losses(run_dir: pathlib.Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _pipeline(tmp_path: pathlib.Path, capsys, *, n_train: int, steps: int, dim: int) -> float:
    raw = _corpus(tmp_path, n_train, 40)
    data = tmp_path / "data"
    _run(
        [
            "prepare",
            "--src",
            "de",
            "--tgt",
            "en",
            "--train",
            f"{raw}/train",
            "--valid",
            f"{raw}/val",
            "--test",
            f"{raw}/test_2016_flickr",
            "--out",
            str(data),
            "--vocab-size",
            "300",
        ]
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\ndata: {{dir: {data}}}\n"
        f"model: {{dim: {dim}, heads: 4, ffn_dim: {2 * dim}, encoder_layers: 1, decoder_layers: 1,"
        " upsample_scale: 3.0, dropout: 0.0}\n"
        f"train: {{lr: 3.0e-3, warmup_steps: 8, max_tokens: 600, max_steps: {steps}, log_every: 1,"
        f" eval_every: {steps}, glance_start: 0.0, glance_end: 0.0, clip_norm: 1.0, threads: 1}}\n"
    )
    _run(["train", str(cfg)])
    run = tmp_path / "run"
    losses = _losses(run)
    assert len(losses) == steps
    # Glancing is off here: with it, the training loss is not monotone by design (fewer tokens
    # are revealed as predictions improve); its maths is covered by tests/test_glancing.py.
    k = max(3, steps // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.9 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"
    assert (run / "best" / "model.safetensors").is_file()

    hyp = tmp_path / "hyp.txt"
    _run(
        [
            "generate",
            str(run),
            "--input",
            str(data / "test_2016_flickr.src.txt"),
            "--output",
            str(hyp),
            "--decoder",
            "lookahead",
        ]
    )
    n_src = len((data / "test_2016_flickr.src.txt").read_text().splitlines())
    assert len(hyp.read_text().splitlines()) == n_src
    for decoder in ("greedy", "viterbi"):
        out = tmp_path / f"hyp_{decoder}.txt"
        _run(
            [
                "generate",
                str(run),
                "--input",
                str(data / "test_2016_flickr.src.txt"),
                "--output",
                str(out),
                "--decoder",
                decoder,
            ]
        )
        assert len(out.read_text().splitlines()) == n_src
    capsys.readouterr()
    _run(["score", str(hyp), str(data / "test_2016_flickr.ref.txt")])
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "signature" in printed
    bleu = float(printed.split("=")[1].split()[0])

    # --resume continues from last/: the step counter goes on from where it stopped (a changed
    # max_steps is accepted only when named by --allow-change).
    argv = ["train", str(cfg), f"train.max_steps={steps + 3}", "--resume"]
    _run([*argv, "--allow-change", "train.max_steps"])
    assert len(_losses(run)) == steps + 3
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["step"] == steps + 3
    return bleu


def test_prepare_train_generate_score_end_to_end(tmp_path, capsys):
    bleu = _pipeline(tmp_path, capsys, n_train=300, steps=40, dim=48)
    assert 0.0 <= bleu <= 100.0


@pytest.mark.slow
def test_longer_run_learns_to_translate(tmp_path, capsys):
    bleu = _pipeline(tmp_path, capsys, n_train=3000, steps=400, dim=96)
    assert bleu > 1.0


def test_train_rejects_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {dimm: 3}\n")
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg)])
    assert e.value.code == 1
    assert "model.dimm" in capsys.readouterr().err


def _exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_help_prints_every_verb_to_stdout_and_exits_zero(capsys):
    for flag in ("--help", "-h"):
        assert _exit([flag]) == 0
        out = capsys.readouterr().out
        for verb in ("prepare", "train", "generate", "distill", "average", "score"):
            assert verb in out
        for verb in ("tune-beta", "analyze", "plot", "benchmark"):
            assert verb in out


def test_version_prints_the_package_version(capsys):
    assert _exit(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"codat {__version__}"


def test_unknown_or_missing_verb_exits_two_with_an_error_line(capsys):
    assert _exit(["translate"]) == 2
    captured = capsys.readouterr()
    assert "invalid choice: 'translate'" in captured.err and captured.out == ""
    assert _exit([]) == 2
    assert "error" in capsys.readouterr().err


def test_benchmark_help_and_its_kinds(capsys):
    assert _exit(["benchmark", "--help"]) == 0
    out = capsys.readouterr().out
    assert "dag" in out and "decode" in out and "speed" in out
    assert _exit(["benchmark"]) == 2
    for kind in ("dag", "decode", "speed"):
        assert _exit(["benchmark", kind, "--help"]) == 0
    assert "--rerank-token-weight" in capsys.readouterr().out  # benchmark decode's sample flags


def test_every_decode_config_field_has_a_flag_with_help(capsys):
    names = [f.name for f in dataclasses.fields(DecodeConfig)]
    assert sorted(DECODE_HELP) == sorted(names)
    assert flag_name("top_p") == "--top-p"
    for verb in ("generate", "distill", "analyze", "tune-beta"):
        assert _exit([verb, "--help"]) == 0
        out = capsys.readouterr().out
        for name in names:
            assert flag_name(name) in out, (verb, name)


def test_decode_flags_replace_only_the_given_fields():
    parser = build_parser()
    a = parser.parse_args(
        ["generate", "RUN", "--decoder", "sample", "--rerank-token-weight", "0.3", "--samples", "8"]
    )
    base = DecodeConfig(temperature=0.2, samples=64, lookahead_token_weight=0.9)
    dc = decode_config(base, a)
    assert dc == dataclasses.replace(base, decoder="sample", rerank_token_weight=0.3, samples=8)
    a = parser.parse_args(["generate", "RUN", "--lookahead-token-weight", "0.5", "--top-p", "0.9"])
    dc = decode_config(base, a)
    assert dc == dataclasses.replace(base, lookahead_token_weight=0.5, top_p=0.9)
    assert decode_config(base, parser.parse_args(["generate", "RUN"])) == base
    a = parser.parse_args(["analyze", "RUN", "--data-dir", "D", "--viterbi-length-exponent", "2"])
    assert decode_config(base, a).viterbi_length_exponent == 2.0


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "RUN", "--beta", "0.5"],
        ["analyze", "RUN", "--data-dir", "D", "--beta", "0.5"],
        ["benchmark", "decode", "RUN", "-i", "x", "--beta", "0.5"],
        ["tune-beta", "RUN", "--data-dir", "D", "--beta"],
    ],
)
def test_the_renamed_beta_flag_names_the_new_flags(argv, capsys):
    assert _exit(argv) == 2
    err = capsys.readouterr().err
    assert "--beta was renamed" in err
    assert "--lookahead-token-weight" in err and "--rerank-token-weight" in err


def test_tune_beta_keeps_its_candidates_flag():
    a = build_parser().parse_args(["tune-beta", "RUN", "--data-dir", "D", "--betas", "0.1,0.9"])
    assert a.betas == "0.1,0.9"
    a = build_parser().parse_args(["tune-beta", "RUN", "--data-dir", "D"])
    assert a.betas == "0.3,0.5,0.7" and a.split == "val"
    a = build_parser().parse_args(
        ["tune-beta", "RUN", "--data-dir", "D", "--rerank-token-weights", "0.2"]
    )
    assert a.betas == "0.2"


def test_train_keeps_config_overrides_and_resume():
    a = build_parser().parse_args(["train", "c.yaml", "train.lr=1e-3", "model.dim=8", "--resume"])
    assert (a.config, a.overrides, a.resume) == ("c.yaml", ["train.lr=1e-3", "model.dim=8"], "yes")
    assert isinstance(a, argparse.Namespace)
    assert build_parser().parse_args(["train", "c.yaml", "--resume", "auto"]).resume == "auto"
    assert build_parser().parse_args(["train", "c.yaml"]).resume is None
    a = build_parser().parse_args(
        ["train", "c.yaml", "--resume", "--allow-change", "train.lr,train.max_steps"]
    )
    assert a.allow_change == ["train.lr,train.max_steps"]


def test_resume_followed_by_an_override_is_a_usage_error_saying_where_it_goes(capsys):
    assert _exit(["train", "c.yaml", "--resume", "train.lr=1"]) == 2
    assert "put config overrides before --resume" in capsys.readouterr().err


def test_errors_of_a_verb_exit_one_naming_the_verb(tmp_path, capsys):
    assert _exit(["score", str(tmp_path / "missing.txt"), str(tmp_path / "ref.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("codat score: error:") and "missing.txt" in err
    with pytest.raises(FileNotFoundError):
        run(["score", str(tmp_path / "missing.txt"), str(tmp_path / "ref.txt")])
    assert _exit(["benchmark", "speed", "nolabel", "-i", "x"]) == 1
    assert capsys.readouterr().err.startswith("codat benchmark speed: error:")


def test_score_prints_bleu_and_signature(tmp_path, capsys):
    (tmp_path / "h.txt").write_text("a man rides a bike .\nthe dog runs\n")
    (tmp_path / "r.txt").write_text("a man rides a bike .\nthe dog runs\n")
    assert _exit(["score", str(tmp_path / "h.txt"), str(tmp_path / "r.txt")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BLEU = 100.00") and "signature: nrefs:1" in out
    (tmp_path / "short.txt").write_text("one line\n")
    assert _exit(["score", str(tmp_path / "short.txt"), str(tmp_path / "r.txt")]) == 1
    assert "has 1 lines" in capsys.readouterr().err


def test_score_of_an_empty_file_or_an_unknown_tokenizer_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "r.txt").write_text("the dog runs\n")
    assert _exit(["score", str(tmp_path / "empty.txt"), str(tmp_path / "r.txt")]) == 1
    assert "empty.txt is empty" in capsys.readouterr().err
    assert _exit(["score", str(tmp_path / "r.txt"), str(tmp_path / "r.txt"), "--tokenize", "nope"])
    assert "--tokenize 'nope': choose one of" in capsys.readouterr().err


def test_score_counts_lines_split_on_newlines_only(tmp_path, capsys):
    (tmp_path / "h.txt").write_text("a\u2028b c\nd e\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("a\u2028b c\nd e\n", encoding="utf-8")
    assert _exit(["score", str(tmp_path / "h.txt"), str(tmp_path / "r.txt")]) == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--samples", "0"], "--samples=0 must be"),
        (["--top-p", "1.5"], "--top-p=1.5 must be"),
        (["--beam", "0"], "--beam=0 must be"),
        (["--temperature", "nan"], "--temperature=nan must be a finite number"),
        (["--top-p", "0.9"], "--top-p does not apply to the lookahead decoder"),
        (["--decoder", "greedy", "--samples", "4"], "--samples does not apply to the greedy"),
    ],
)
def test_decoding_flags_are_checked_under_their_own_names(flags, message):
    a = build_parser().parse_args(["generate", "RUN", *flags])
    with pytest.raises(ValueError, match=re.escape(message)):
        decode_config(DecodeConfig(), a, "dat")


def test_generate_checks_its_output_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "missing" / "hyp.txt"
    assert _exit(["generate", str(tmp_path / "no_run"), "-o", str(out)]) == 1
    assert "--output" in capsys.readouterr().err


# ---------------------------------------------------------------- the first hour: streaming,
# the training bar and its validation lines, export


def _tiny_checkpoint(tmp: pathlib.Path) -> pathlib.Path:
    """An untrained tiny DAT saved with the copy task's sentencepiece model (greedy decoding)."""
    data = prepare_copy_task(tmp)
    model = make_model("dat", vocab_size=read_meta(data)["vocab_size"])
    cfg = RunConfig(model=model.cfg, decode=DecodeConfig(decoder="greedy"))
    save_checkpoint(tmp / "ckpt", model, cfg, data / "spm.model")
    return tmp / "ckpt"


def _read_line(proc: subprocess.Popen) -> str:
    """The next line `proc` writes; fails (instead of hanging) if none comes while its input
    is still open, i.e. when the output is held back until the input ends."""
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    assert ready, "no output line came back before the next input line was sent"
    return proc.stdout.readline()


def test_generate_interactive_answers_each_line_before_the_next_is_sent(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    want = Translator.from_dir(ckpt).generate(["der hund", "ein mann spielt im park"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "codat", "generate", str(ckpt), "--interactive", "--threads", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line, hyp in (("der hund", want[0]), ("", ""), ("ein mann spielt im park", want[1])):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            assert _read_line(proc) == hyp + "\n"
        _, err = proc.communicate(timeout=300)  # closes stdin: the end of the input
    finally:
        proc.kill()
    assert proc.returncode == 0, err


def test_generate_interactive_checks_its_flags_like_batch_mode(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path)
    src = tmp_path / "src.txt"
    src.write_text("der hund\n\nein mann\n")
    code = _exit(["generate", str(ckpt), "-i", str(src), "--interactive", "--top-p", "0.3"])
    assert code == 1 and "--top-p does not apply to the greedy decoder" in capsys.readouterr().err
    out = tmp_path / "hyp.txt"
    run(["generate", str(ckpt), "-i", str(src), "--interactive", "-o", str(out)])
    streamed = out.read_text().splitlines()
    run(["generate", str(ckpt), "-i", str(src), "-o", str(out)])  # batched by --max-tokens
    assert out.read_text().splitlines() == streamed and streamed[1] == ""


def test_the_bar_takes_tqdm_settings_from_the_environment(monkeypatch):
    monkeypatch.delenv("TQDM_DYNAMIC_NCOLS", raising=False)
    assert bar_options(True) == {"unit": "step", "dynamic_ncols": True}  # no disable=: env wins
    assert bar_options(False)["disable"] is True  # ranks > 0
    monkeypatch.setenv("TQDM_DYNAMIC_NCOLS", "0")
    assert "dynamic_ncols" not in bar_options(True)


def test_the_bar_total_is_the_step_where_steps_or_minutes_end_first():
    # 10 minutes, 2 of them spent, 5 steps/s: 480 s left = 2400 more steps (+1: the loop stops
    # after the first step past the budget).
    assert expected_stop(600, max_steps=100_000, max_s=600, elapsed_s=120, pace=5) == 3001
    assert expected_stop(600, max_steps=2000, max_s=600, elapsed_s=120, pace=5) == 2000
    assert expected_stop(600, max_steps=2000, max_s=0, elapsed_s=120, pace=5) == 2000
    assert expected_stop(0, max_steps=2000, max_s=600, elapsed_s=0, pace=0) == 2000
    assert expected_stop(700, max_steps=2000, max_s=600, elapsed_s=650, pace=5) == 701


def test_each_validation_prints_one_line_when_it_happens(tmp_path, capsys):
    data = prepare_copy_task(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\ndata: {{dir: {data}}}\n"
        "model: {dim: 32, heads: 2, ffn_dim: 64, encoder_layers: 1, decoder_layers: 1, "
        "upsample_scale: 3.0, dropout: 0.0}\n"
        "train: {max_tokens: 400, max_steps: 4, eval_every: 2, threads: 1, bf16: false}\n"
    )
    capsys.readouterr()
    _run(["train", str(cfg)])
    printed = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert [x.split(":")[0] for x in printed] == ["step 2", "step 4"]
    assert all(re.match(r"step \d: valid loss [\d.]+, BLEU [\d.]+ \| ", x) for x in printed)


def test_output_piped_into_a_reader_that_leaves_early_gives_no_traceback(tmp_path):
    """`codat score H R | head -0`: the reader is gone before codat writes; codat exits 141 (as
    a shell reports SIGPIPE) without a traceback."""
    (tmp_path / "h.txt").write_text("a cat sat\n")
    (tmp_path / "r.txt").write_text("a cat sat\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "codat", "score", str(tmp_path / "h.txt"), str(tmp_path / "r.txt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before codat (still importing torch) writes its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
