"""Generation (`codat.generate`): the `DECODERS[arch][name]` dict covers every arch and names the
choices on a bad name; the DAT decoders equal the `codat.decode` functions they wrap; decoding
batches are sized by the model's `output_lengths` (the graph for DAT, the source for AT);
`translate_ids` returns input order and equals one-sentence-at-a-time decoding; a `Translator`
saved and loaded from a checkpoint directory (tiny untrained model + the copy task's
sentencepiece model) decodes text like `translate_ids` on the ids, and `translate_file` /
`distill` write one line per input. The API refuses a single string and options the chosen
decoder does not read, gives "" for an empty line, and streams line by line (`translate_stream`).
"""

from __future__ import annotations

import dataclasses
import io
import pathlib

import pytest
import torch
from conftest import make_model
from corpus import prepare_copy_task

from codat.checkpoint import resolve_checkpoint, save_checkpoint
from codat.config import ARCHS, DecodeConfig, RunConfig
from codat.dat_decode import (
    dat_lookahead_decoder,
    dat_sample_decoder,
    dat_viterbi_decoder,
    draw_samples,
)
from codat.data import PAD_ID, SPECIAL_IDS, read_lines, read_meta
from codat.decode import joint_viterbi_decode, lookahead_decode, sample_decode
from codat.generate import (
    DECODER_OPTIONS,
    DECODERS,
    Translator,
    batch_sources,
    check_options,
    decoder_for,
    distill,
    source_tensor,
    translate_file,
    translate_ids,
    translate_stream,
)
from codat.objectives import log_softmax_fp32

DEFAULTS = {
    "dat": "lookahead",
    "at": "beam",
    "nat": "argmax",
    "glat": "argmax",
    "ctc": "greedy",
    "cmlm": "mask-predict",
}


def _sources(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 40, (n,), generator=g) for n in lengths]


def test_decoders_cover_every_arch_with_the_documented_default():
    assert set(DECODERS) == set(ARCHS)
    for arch, choices in DECODERS.items():
        assert next(iter(choices)) == DEFAULTS[arch]
        assert decoder_for(arch, "") is choices[DEFAULTS[arch]]
        for name, fn in choices.items():
            assert decoder_for(arch, name) is fn
    assert DECODERS["glat"] == DECODERS["nat"]
    assert list(DECODERS["dat"]) == ["lookahead", "greedy", "viterbi", "sample"]


def test_unknown_decoder_names_the_choices_of_the_arch():
    with pytest.raises(ValueError, match=r"decoder 'lookahead'.*model.arch=at.*beam, greedy"):
        decoder_for("at", "lookahead")
    with pytest.raises(ValueError, match="mask-predict"):
        decoder_for("cmlm", "beam")
    with pytest.raises(ValueError, match="model.arch='rnn'"):
        decoder_for("rnn", "")


def test_translate_ids_rejects_a_decoder_of_another_arch():
    model = make_model("at")
    with pytest.raises(ValueError, match="beam, greedy"):
        translate_ids(model, _sources([3]), DecodeConfig(decoder="sample"))


@torch.no_grad()
def test_dat_decoders_equal_the_decode_functions_they_wrap():
    model = make_model("dat").eval()
    src = source_tensor(_sources([5, 3]), torch.tensor([6, 4]), [0, 1])
    lens = torch.tensor([6, 4])
    out = model(src, lens)
    logp = log_softmax_fp32(out.token_logits)
    dc = DecodeConfig(
        lookahead_token_weight=0.7, viterbi_length_exponent=0.5, samples=6, temperature=0.5
    )
    want = lookahead_decode(
        logp, out.trans_logp, out.graph_lens, beta=0.7, special_ids=SPECIAL_IDS, pad_id=PAD_ID
    )
    assert torch.equal(dat_lookahead_decoder(model, src, lens, dc, None), want)
    want = joint_viterbi_decode(
        logp, out.trans_logp, out.graph_lens, length_beta=0.5, special_ids=SPECIAL_IDS, pad_id=0
    )
    assert torch.equal(dat_viterbi_decoder(model, src, lens, dc, None), want)
    dc = dataclasses.replace(dc, rerank_token_weight=0.3)
    got = dat_sample_decoder(model, src, lens, dc, torch.Generator().manual_seed(3))
    want = sample_decode(
        logp,
        out.trans_logp,
        out.graph_lens,
        num_samples=6,
        temperature=0.5,
        top_p=dc.top_p,
        beta=0.3,
        generator=torch.Generator().manual_seed(3),
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
        top_tokens=dc.top_tokens,
    )
    assert torch.equal(got, want)
    samples = draw_samples(out, dc, torch.Generator().manual_seed(3))
    assert samples.tokens.shape[:2] == (2, 6)


def test_decoding_batches_are_sized_by_output_lengths():
    sources = _sources([4] * 8)  # lengths 5 with </s>
    at, dat = make_model("at"), make_model("dat")  # dat: upsample_scale 2 -> graphs of 10
    _, lens, at_batches = batch_sources(sources, at, 20)
    _, _, dat_batches = batch_sources(sources, dat, 20)
    assert lens.tolist() == [5] * 8
    assert [len(b) for b in at_batches] == [4, 4]
    assert [len(b) for b in dat_batches] == [2] * 4
    for model, batches in ((at, at_batches), (dat, dat_batches)):
        sizes = model.output_lengths(lens)
        assert all(len(b) * int(sizes[b].max()) <= 20 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(8))


def test_batch_sources_truncates_to_the_source_limit():
    model = make_model("at", max_source_positions=6)
    sources, lens, _ = batch_sources(_sources([9, 3]), model, 100)
    assert [len(s) for s in sources] == [5, 3] and lens.tolist() == [6, 4]


@pytest.mark.parametrize("arch", ARCHS)
def test_translate_ids_keeps_input_order_and_equals_one_by_one_decoding(arch):
    model = make_model(arch).train()
    sources = _sources([6, 2, 9, 4, 4, 7], seed=1)
    dc = DecodeConfig(max_tokens=48)
    batched = translate_ids(model, sources, dc)
    assert model.training  # the mode is restored
    assert len(batched) == len(sources)
    assert all(PAD_ID not in ids for ids in batched)
    # Every default decoder is deterministic (seeded) and padding-invariant.
    assert batched == [translate_ids(model, [s], dc)[0] for s in sources]


# --- a tiny saved run: checkpoint directory + sentencepiece model ---------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    return prepare_copy_task(tmp_path_factory.mktemp("generate"))


def _checkpoint(data: pathlib.Path, arch: str, path: pathlib.Path) -> torch.nn.Module:
    model = make_model(arch, vocab_size=read_meta(data)["vocab_size"]).eval()
    decode = DecodeConfig(max_tokens=64, samples=4)
    save_checkpoint(path, model, RunConfig(model=model.cfg, decode=decode), data / "spm.model")
    return model


@pytest.mark.parametrize("arch", ["dat", "at"])
def test_translator_round_trip_through_a_checkpoint(data, tmp_path, arch):
    model = _checkpoint(data, arch, tmp_path / "run" / "best")
    translator = Translator.from_dir(tmp_path / "run")  # a run directory: its best/
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "best"
    assert not translator.model.training
    assert translator.decode_cfg == DecodeConfig(max_tokens=64, samples=4)
    for name, value in model.state_dict().items():
        assert torch.equal(translator.model.state_dict()[name], value)
    lines = (data / "test.src.txt").read_text().splitlines()
    hyps = translator.generate(lines)
    assert len(hyps) == len(lines) and all(isinstance(h, str) for h in hyps)
    ids = [torch.tensor(x) for x in translator.sp.encode(lines)]
    want = translate_ids(model, ids, translator.decode_cfg)
    assert hyps == [translator.sp.decode(x) for x in want]
    other = translator.settings("greedy")
    assert other.decoder == "greedy" and other.samples == 4
    assert translator.generate(lines[:2], other) == [
        translator.sp.decode(x) for x in translate_ids(model, ids[:2], other)
    ]


def test_translate_file_and_distill_write_one_line_per_input(data, tmp_path):
    _checkpoint(data, "dat", tmp_path / "ckpt")
    translator = Translator.from_dir(tmp_path / "ckpt")
    src = data / "test.src.txt"
    n = len(src.read_text().splitlines())
    assert translate_file(translator, src, tmp_path / "hyp.txt") == n
    assert len((tmp_path / "hyp.txt").read_text().splitlines()) == n
    out = tmp_path / "kd" / "train.en"
    assert distill(translator, src, out, translator.settings("greedy")) == n
    assert len(out.read_text().splitlines()) == n
    assert not list(out.parent.glob(".*.tmp"))


def test_resolve_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)


# ---------------------------------------------------------------- lines, lengths, outputs


def test_generate_keeps_one_output_line_per_input_line_with_unicode_breaks(data, tmp_path):
    _checkpoint(data, "dat", tmp_path / "ckpt")
    translator = Translator.from_dir(tmp_path / "ckpt")
    src = tmp_path / "src.txt"
    src.write_text("ein mann\u2028spielt\nder hund\x85im park\r\nball\x1cmit\n", encoding="utf-8")
    out = tmp_path / "hyp.txt"
    assert translate_file(translator, src, out, translator.settings("greedy")) == 3
    assert len(read_lines(out)) == 3


def test_too_long_inputs_are_counted_or_refused(data, tmp_path, caplog):
    _checkpoint(data, "dat", tmp_path / "ckpt")
    translator = Translator.from_dir(tmp_path / "ckpt")
    limit = translator.model.cfg.max_source_positions
    long = " ".join(["ein mann"] * limit)
    lines = ["der hund", long, long]
    with caplog.at_level("WARNING", logger="codat.generate"):
        assert len(translator.generate(lines, translator.settings("greedy"))) == 3
    assert f"truncated 2 of 3 inputs to the model's max_source_positions={limit}" in caplog.text
    with pytest.raises(ValueError, match=r"2 inputs are longer .*\(lines 2, 3\)"):
        translator.generate(lines, translator.settings("greedy"), truncate=False)


def test_unwritable_output_is_refused_before_decoding(data, tmp_path):
    _checkpoint(data, "dat", tmp_path / "ckpt")
    translator = Translator.from_dir(tmp_path / "ckpt")
    src = data / "test.src.txt"
    for out, why in (
        (tmp_path / "no" / "such" / "dir.txt", "does not exist"),
        (tmp_path, "is a directory"),
    ):
        with pytest.raises(ValueError, match=f"--output .*{why}"):
            translate_file(translator, src, out)


def test_options_of_another_decoder_are_refused_naming_them():
    check_options("dat", "sample", ["samples", "top_p", "seed"])
    check_options("at", "", ["beam", "max_len_a"])  # '' = the default (beam)
    with pytest.raises(ValueError, match="top_p does not apply to the lookahead decoder"):
        check_options("dat", "lookahead", ["top_p"])
    with pytest.raises(
        ValueError, match="beam does not apply to the greedy decoder of model.arch=at"
    ):
        check_options("at", "greedy", ["beam"])
    for arch, decoders in DECODERS.items():
        assert set(DECODER_OPTIONS[arch]) == set(decoders)
        for name, fields in DECODER_OPTIONS[arch].items():
            assert set(fields) <= {f.name for f in dataclasses.fields(DecodeConfig)}, name


# ---------------------------------------------------------------- the API's inputs, streaming


def test_a_single_string_is_refused_not_translated_character_by_character(data, tmp_path):
    _checkpoint(data, "dat", tmp_path / "ckpt")
    translator = Translator.from_dir(tmp_path / "ckpt")
    with pytest.raises(TypeError, match=r"got a single string: use generate\(\[text\]\)"):
        translator.generate("ein mann spielt")


def test_an_empty_input_line_gives_an_empty_output_line(data, tmp_path):
    _checkpoint(data, "dat", tmp_path / "ckpt")
    translator = Translator.from_dir(tmp_path / "ckpt")
    greedy = translator.settings("greedy")
    alone = translator.generate(["der hund", "ein mann spielt"], greedy)
    assert all(alone)  # an untrained model still emits tokens for a real sentence
    hyps = translator.generate(["", "der hund", "  ", "ein mann spielt", ""], greedy)
    assert hyps == ["", alone[0], "", alone[1], ""]
    assert translator.generate([]) == []


def test_options_the_chosen_decoder_does_not_read_are_refused_by_the_api(data, tmp_path):
    _checkpoint(data, "dat", tmp_path / "ckpt")  # the run's decoder: lookahead (the default)
    translator = Translator.from_dir(tmp_path / "ckpt")
    lines = ["der hund"]
    with pytest.raises(ValueError, match="top_p does not apply to the lookahead decoder"):
        translator.generate(lines, dataclasses.replace(translator.decode_cfg, top_p=0.3))
    with pytest.raises(ValueError, match="samples does not apply to the greedy decoder"):
        translator.generate(lines, dataclasses.replace(translator.settings("greedy"), samples=2))
    sample = dataclasses.replace(translator.settings("sample"), top_p=0.3, samples=2)
    assert len(translator.generate(lines, sample)) == 1
    # The run's own settings (samples=4 here) are never refused, whatever the decoder.
    assert len(translator.generate(lines, translator.settings("viterbi"))) == 1
    with pytest.raises(ValueError, match="decode.top_p"):
        translator.generate(lines, dataclasses.replace(sample, top_p=2.0))


def test_streaming_writes_one_line_per_input_line_like_batch_decoding(data, tmp_path):
    _checkpoint(data, "dat", tmp_path / "ckpt")
    translator = Translator.from_dir(tmp_path / "ckpt")
    lines = ["der hund", "", "ein mann\u2028spielt", "im park\r"]
    src = io.BytesIO("".join(x + "\n" for x in lines).encode())
    out = io.StringIO()
    greedy = translator.settings("greedy")
    assert translate_stream(translator, src, out, greedy) == 4
    want = translator.generate(["der hund", "", "ein mann\u2028spielt", "im park"], greedy)
    assert out.getvalue() == "".join(h + "\n" for h in want)
    assert want[1] == ""
    with pytest.raises(ValueError, match=r"<stdin>:2: invalid UTF-8"):
        translate_stream(translator, io.BytesIO(b"der hund\n\xff\n"), io.StringIO(), greedy)


@torch.no_grad()
def test_precision_bf16_decodes_every_decoder_under_bf16_autocast():
    """decode.precision bf16 runs the model's matmuls in bfloat16 (the decoder layers' outputs
    come out bf16) but the token logits in float32, equal to a float32 head on the same bf16
    states, for every decoder; fp32 is exactly today's decoding; a bad value names the key."""
    seen, states = [], []
    model = make_model("dat")
    model.register_forward_hook(lambda m, i, out: seen.append(out.token_logits))
    model.decoder_layers[-1].register_forward_hook(lambda m, i, out: states.append(out))
    sources = _sources([5, 3, 7])
    fp32 = translate_ids(model, sources, DecodeConfig())
    assert [x.dtype for x in seen] == [torch.float32]
    bf16 = translate_ids(model, sources, DecodeConfig(precision="bf16"))
    assert [x.dtype for x in seen[1:]] == [torch.float32] and len(bf16) == len(fp32) == 3
    assert states[1].dtype == torch.float32  # the last layer ends in a float32 LayerNorm
    want = states[1] @ model.embed.weight.t()  # a float32 head on the same states
    torch.testing.assert_close(seen[1], want, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # control: a bf16 head rounds them
        rounded = states[1] @ model.embed.weight.t()
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.float(), want)
    assert translate_ids(model, sources, DecodeConfig(precision="fp32")) == fp32
    at = translate_ids(make_model("at"), sources, DecodeConfig(precision="bf16"))
    assert len(at) == 3
    # CTC: the blank class too (it was a bf16 product next to float32 token logits)
    seen.clear(), states.clear()
    ctc = make_model("ctc")
    ctc.register_forward_hook(lambda m, i, out: seen.append(out.token_logits))
    ctc.decoder_layers[-1].register_forward_hook(lambda m, i, out: states.append(out))
    assert len(translate_ids(ctc, sources, DecodeConfig(precision="bf16"))) == 3
    table = torch.cat([ctc.embed.weight, ctc.blank.unsqueeze(0)])
    assert seen[0].dtype == torch.float32 and states[0].dtype == torch.float32
    torch.testing.assert_close(seen[0][..., -1], states[0] @ ctc.blank, rtol=0, atol=0)
    torch.testing.assert_close(seen[0], states[0] @ table.t(), rtol=0, atol=1e-6)
    check_options("at", "beam", ["precision", "beam"])  # every decoder reads it
    with pytest.raises(ValueError, match="decode.precision='fp16'.*fp32, bf16"):
        RunConfig(decode=DecodeConfig(precision="fp16"))
