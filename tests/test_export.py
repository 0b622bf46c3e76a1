"""`codat export RUN_DIR OUT` (`codat.export`): on a tiny DAT trained 4 steps on the copy task,
OUT holds exactly the weights (with safetensors {"format": "pt"} and codat version metadata),
config, tokenizer, a model card with the data, config and the scores of metrics.jsonl, and
the marker; `codat.load(OUT)` translates like the run; OUT is never written over unless it
is an earlier export and --force is given."""

from __future__ import annotations

import json
import pathlib

import pytest
import safetensors
import torch
import yaml
from cli_runs import train_run
from corpus import prepare_copy_task, run_cli

import codat
from codat.checkpoint import checkpoint_version, load_checkpoint_config
from codat.cli import main
from codat.export import export_run, read_metrics


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    data = prepare_copy_task(tmp_path_factory.mktemp("export"))
    run_dir, _, _ = train_run(data, "dat", "dat", steps=4)
    return run_dir


def test_export_writes_a_self_contained_directory_that_codat_load_reads(run, capsys):
    out = run.parent / "published"
    run_cli(["export", str(run), str(out)])
    assert f"-> {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        ".codat",
        "README.md",
        "config.yaml",
        "model.safetensors",
        "spm.model",
    ]
    with safetensors.safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    assert checkpoint_version(out) == codat.__version__
    assert load_checkpoint_config(out) == load_checkpoint_config(run / "best")
    assert (out / "spm.model").read_bytes() == (run / "best" / "spm.model").read_bytes()
    exported, original = codat.load(str(out)), codat.load(str(run))
    for name, value in original.model.state_dict().items():
        assert torch.equal(exported.model.state_dict()[name], value), name
    lines = ["ein mann spielt", "der hund"]
    assert exported.generate(lines) == original.generate(lines)


def test_the_model_card_reports_data_config_and_measured_scores(run):
    out = export_run(run, run.parent / "card")
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["language"] == ["de", "en"] and header["library_name"] == "codat"
    _, valid = read_metrics(run)
    assert [r["step"] for r in valid] == [4]
    assert f"| best | 4 | {valid[0]['valid_bleu']:.2f} | {valid[0]['valid_loss']:.3f} |" in card
    meta = json.loads((pathlib.Path(run.parent / "data") / "meta.json").read_text())
    kept = meta["splits"]["train"]["kept"]
    assert f"| train | {kept} | {meta['splits']['train']['lines']} |" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config == yaml.safe_load((out / "config.yaml").read_text())
    assert "best checkpoint (step 4" in card and 'codat.load("THIS_DIRECTORY")' in card


def test_export_never_writes_over_a_directory_it_did_not_write(run, capsys):
    mine = run.parent / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for argv in (["export", str(run), str(mine)], ["export", str(run), str(mine), "--force"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 1
        assert "codat export: error:" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "precious"
    again = run.parent / "again"
    export_run(run, again)
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_run(run, again)
    export_run(run, again, force=True, checkpoint=run / "last")  # an earlier export: replaced
    assert "the checkpoint `" in (again / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        export_run(run.parent / "data", run.parent / "nothing")
