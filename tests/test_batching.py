"""train.batch_by: the size that train.max_tokens bounds. `longest` = max(source, target) length;
`graph` = max(source length, the decoder positions the model trains on), which for DAT is the
graph size L that the (B, L, L) transitions and (B, L, V) logits scale with. Checked: every
family's `train_positions` equals what its training forward really builds; the sizes of both
settings; batches by graph bound batch size * largest graph; the config key; a CLI run."""

from __future__ import annotations

import types

import pytest
import torch
import yaml
from cli_runs import train_run
from conftest import make_batch, make_model
from corpus import prepare_copy_task

import codat.loop
from codat.config import TrainConfig
from codat.data import ParallelData, token_batches
from codat.loop import example_sizes


@pytest.mark.parametrize("upsample", ["source", "predict"])
def test_dat_train_positions_are_the_graphs_its_training_forward_builds(upsample):
    model = make_model("dat", upsample=upsample, upsample_scale=2.5, max_graph_positions=30)
    batch = make_batch([9, 1, 4, 12], [0, 2, 7, 3])
    out = model(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
    got = model.train_positions(batch.src_lens, batch.tgt_lens)
    assert got.tolist() == out.graph_lens.tolist()
    lens = batch.tgt_lens if upsample == "predict" else batch.src_lens
    want = [min(max(int(2.5 * n), 2), 30) for n in lens.tolist()]
    assert got.tolist() == want


def test_ctc_train_positions_are_its_upsampled_outputs_and_others_the_target():
    batch = make_batch([9, 1, 4], [0, 2, 7])
    ctc = make_model("ctc", upsample_scale=3.0)
    assert ctc.train_positions(batch.src_lens, batch.tgt_lens).tolist() == [
        3 * m for m in batch.src_lens.tolist()
    ]
    for arch in ("at", "nat", "cmlm"):
        model = make_model(arch)
        assert model.train_positions(batch.src_lens, batch.tgt_lens) is batch.tgt_lens


def test_example_sizes_longest_and_graph():
    data = types.SimpleNamespace(
        src_lens=torch.tensor([10, 4, 30]), tgt_lens=torch.tensor([12, 3, 8])
    )
    model = make_model("dat", upsample_scale=3.0, max_graph_positions=64)
    longest = example_sizes(TrainConfig(), model, data)
    graph = example_sizes(TrainConfig(batch_by="graph"), model, data)
    assert longest.tolist() == [12, 4, 30]
    assert graph.tolist() == [30, 12, 64]  # floor(3 m), 90 clipped to 64
    predict = make_model("dat", upsample="predict", upsample_scale=3.0, max_graph_positions=64)
    assert example_sizes(TrainConfig(batch_by="graph"), predict, data).tolist() == [36, 9, 30]


def test_batches_by_graph_bound_batch_size_times_largest_graph():
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 40, (300,), generator=g)
    tgt = (src.double() * (0.5 + torch.rand(300, generator=g))).long().clamp(min=2)
    data = types.SimpleNamespace(src_lens=src, tgt_lens=tgt)
    model = make_model("dat", upsample_scale=3.0, max_graph_positions=256)
    graph = model.train_positions(src, tgt)

    def worst(batch_by: str) -> int:
        sizes = example_sizes(TrainConfig(batch_by=batch_by), model, data)
        batches = token_batches(sizes, max_tokens=600, shuffle=True, seed=1)
        assert sorted(i for b in batches for i in b) == list(range(300))
        return max(len(b) * int(graph[b].max()) for b in batches)

    assert worst("graph") <= 600
    assert worst("longest") > 600  # by length, a batch holds lambda times more graph vertices


def test_bad_batch_by_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="train.batch_by='vertices'"):
        TrainConfig(batch_by="vertices")


def test_codat_train_batches_by_graph(tmp_path, monkeypatch):
    seen = []

    def recording(sizes, **kwargs):
        seen.append(sizes.clone())
        return token_batches(sizes, **kwargs)

    monkeypatch.setattr(codat.loop, "token_batches", recording)
    data = prepare_copy_task(tmp_path)
    run, rows, _ = train_run(data, "bygraph", "dat", steps=3, extra=["train.batch_by=graph"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_by"] == "graph"
    train = ParallelData.load(data, "train")
    want = torch.maximum(train.src_lens, (3 * train.src_lens).clamp(min=2))  # lambda = 3
    assert seen and all(torch.equal(s, want) for s in seen)
