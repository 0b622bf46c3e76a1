"""`codat.data`: padded batches, the safetensors round trip, the trainable-pair mask, token-bucketed
batching and sharding across ranks.

Checks that collate adds </s> to sources and <s> ... </s> to targets with the right lengths and
PAD_ID padding; that save/load gives back the same id sequences; which pairs trainable_mask keeps;
that token_batches covers every index once within the token budget, deterministically per seed;
and that shard hands every rank the same number of disjoint batches.
"""

from __future__ import annotations

import random

import pytest
import torch

from codat.dat import graph_lengths
from codat.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    ParallelData,
    read_lines,
    read_meta,
    shard,
    split_lines,
    token_batches,
)


def _ids(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32)


@pytest.fixture
def data() -> ParallelData:
    return ParallelData(
        [_ids(10, 11, 12), _ids(13), _ids(14, 15), _ids()],
        [_ids(20, 21), _ids(22, 23, 24, 25), _ids(26), _ids(27)],
    )


def test_lengths_count_the_specials(data):
    assert data.src_lens.tolist() == [4, 2, 3, 1]
    assert data.tgt_lens.tolist() == [4, 6, 3, 3]
    assert len(data) == 4


def test_mismatched_sides_raise():
    with pytest.raises(ValueError, match="2 source vs 1 target"):
        ParallelData([_ids(5), _ids(6)], [_ids(7)])


def test_collate_adds_specials_and_pads(data):
    b = data.collate([0, 1, 3])
    assert b.src_ids.dtype == b.tgt_ids.dtype == torch.long
    assert b.src_ids.tolist() == [
        [10, 11, 12, EOS_ID],
        [13, EOS_ID, PAD_ID, PAD_ID],
        [EOS_ID, PAD_ID, PAD_ID, PAD_ID],
    ]
    assert b.tgt_ids.tolist() == [
        [BOS_ID, 20, 21, EOS_ID, PAD_ID, PAD_ID],
        [BOS_ID, 22, 23, 24, 25, EOS_ID],
        [BOS_ID, 27, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
    ]
    assert b.src_lens.tolist() == [4, 2, 1]
    assert b.tgt_lens.tolist() == [4, 6, 3]
    assert b.indices.tolist() == [0, 1, 3]


def test_collate_lengths_match_the_non_pad_positions(data):
    b = data.collate([2, 0, 1, 3])
    assert ((b.src_ids != PAD_ID).sum(1) == b.src_lens).all()
    assert ((b.tgt_ids != PAD_ID).sum(1) == b.tgt_lens).all()
    rows = torch.arange(4)
    assert (b.src_ids[rows, b.src_lens - 1] == EOS_ID).all()
    assert (b.tgt_ids[rows, b.tgt_lens - 1] == EOS_ID).all()
    assert (b.tgt_ids[:, 0] == BOS_ID).all()


def test_batch_to_keeps_every_field(data):
    b = data.collate([1, 2])
    moved = b.to("cpu")
    for name in ("src_ids", "src_lens", "tgt_ids", "tgt_lens", "indices"):
        assert torch.equal(getattr(moved, name), getattr(b, name))


def test_save_load_round_trip(tmp_path, data):
    data.save(tmp_path / "x.safetensors")
    back = ParallelData.load(tmp_path, "x")
    assert len(back) == len(data)
    assert [s.tolist() for s in back.src] == [s.tolist() for s in data.src]
    assert [t.tolist() for t in back.tgt] == [t.tolist() for t in data.tgt]
    assert torch.equal(back.src_lens, data.src_lens)
    assert torch.equal(back.tgt_lens, data.tgt_lens)
    assert torch.equal(back.collate([0, 1, 2, 3]).tgt_ids, data.collate([0, 1, 2, 3]).tgt_ids)


def test_save_load_round_trip_of_an_empty_split(tmp_path):
    ParallelData([], []).save(tmp_path / "empty.safetensors")
    assert len(ParallelData.load(tmp_path, "empty")) == 0


def test_load_missing_split_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ParallelData.load(tmp_path, "nope")


def test_read_meta_missing_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_meta(tmp_path)


def _graph(d: ParallelData, scale: float) -> torch.Tensor:
    return graph_lengths(d.src_lens, upsample_scale=scale, max_positions=10**6)


def test_trainable_mask_checks_graph_size_ratio_and_emptiness():
    d = ParallelData(
        [_ids(5), _ids(5), _ids(5, 6), _ids(), _ids(5), _ids(5, 6, 7, 8, 9)],
        [_ids(6, 7), _ids(6, 7, 8), _ids(6, 7, 8, 9), _ids(6), _ids(), _ids(6, 7)],
    )
    # src_lens [2,2,3,1,2,6], tgt_lens [4,5,6,3,2,4]; graph at scale 2: [4,4,6,2,4,12]
    # ratios: 2, 3, 2, -, -, 2.5
    assert d.trainable_mask(max_target_lens=_graph(d, 2), max_ratio=2).tolist() == [
        True,
        False,
        True,
        False,
        False,
        False,
    ]
    assert d.trainable_mask(max_target_lens=_graph(d, 2), max_ratio=0).tolist() == [
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    assert d.trainable_mask(max_target_lens=_graph(d, 3), max_ratio=3).tolist() == [
        True,
        True,
        True,
        False,
        False,
        True,
    ]
    assert d.trainable_mask(max_target_lens=_graph(d, 1.5), max_ratio=0).tolist() == [
        False,
        False,
        False,
        False,
        False,
        True,
    ]


# ---------------------------------------------------------------- token_batches / shard


def _sizes(n: int = 57, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor([rng.randint(2, 30) for _ in range(n)] + [50, 64])  # two oversize


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize("shuffle", [False, True])
def test_token_batches_cover_every_index_once(shuffle):
    sizes = _sizes()
    batches = token_batches(sizes, max_tokens=40, shuffle=shuffle, seed=3)
    assert sorted(_flat(batches)) == list(range(len(sizes)))
    assert all(batches)


@pytest.mark.parametrize("shuffle", [False, True])
def test_token_batches_respect_max_tokens_except_oversize_singletons(shuffle):
    sizes = _sizes()
    max_tokens = 40
    batches = token_batches(sizes, max_tokens=max_tokens, shuffle=shuffle, seed=1)
    oversize = [b for b in batches if len(b) * max(int(sizes[i]) for i in b) > max_tokens]
    assert oversize, "the fixture has examples longer than max_tokens"
    for b in oversize:
        assert len(b) == 1 and int(sizes[b[0]]) > max_tokens
    assert len(oversize) == int((sizes > max_tokens).sum())
    assert max(len(b) for b in batches) > 1


def test_token_batches_without_shuffle_are_sorted_by_size():
    sizes = _sizes()
    batches = token_batches(sizes, max_tokens=40, shuffle=False)
    flat_sizes = [int(sizes[i]) for i in _flat(batches)]
    assert flat_sizes == sorted(flat_sizes)


def test_token_batches_are_deterministic_per_seed_and_differ_across_seeds():
    sizes = _sizes()
    a = token_batches(sizes, max_tokens=40, shuffle=True, seed=7)
    b = token_batches(sizes, max_tokens=40, shuffle=True, seed=7)
    c = token_batches(sizes, max_tokens=40, shuffle=True, seed=8)
    assert a == b
    assert a != c
    assert sorted(_flat(a)) == sorted(_flat(c))


def test_token_batches_restricted_to_given_indices():
    sizes = _sizes()
    keep = list(range(0, len(sizes), 3))
    batches = token_batches(sizes, max_tokens=40, shuffle=True, seed=0, indices=keep)
    assert sorted(_flat(batches)) == keep


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_gives_equal_counts_and_disjoint_batches(world):
    batches = token_batches(_sizes(), max_tokens=40, shuffle=True, seed=0)
    parts = [shard(batches, r, world) for r in range(world)]
    counts = {len(p) for p in parts}
    assert counts == {len(batches) // world}
    seen = _flat([b for p in parts for b in p])
    assert len(seen) == len(set(seen))
    assert all(b in batches for p in parts for b in p)


def test_shard_drops_the_tail_that_does_not_divide():
    batches = [[i] for i in range(7)]
    parts = [shard(batches, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]
    assert sorted(_flat([b for p in parts for b in p])) == list(range(6))


def test_shard_with_one_rank_keeps_everything():
    batches = [[0, 1], [2], [3, 4]]
    assert shard(batches, 0, 1) == batches


def test_shard_with_fewer_batches_than_ranks_raises():
    with pytest.raises(ValueError, match="max_tokens"):
        shard([[0], [1]], 0, 4)


# ---------------------------------------------------------------- what a line is


def test_split_lines_breaks_on_newline_only_and_tolerates_crlf():
    text = "a\u2028b\nc\x85d\r\ne\x1cf\rg\n\nlast"
    assert split_lines(text.encode()) == ["a\u2028b", "c\x85d", "e\x1cf\rg", "", "last"]
    assert len(text.splitlines()) == 9  # what str.splitlines would have made of it
    assert split_lines(b"") == [] and split_lines(b"\n") == [""]


def test_read_lines_of_plain_and_gzipped_files_and_errors(tmp_path):
    import gzip

    (tmp_path / "a.txt").write_bytes("x\u2028y\r\nz\n".encode())
    with gzip.open(tmp_path / "a.txt.gz", "wb") as f:
        f.write("x\u2028y\r\nz\n".encode())
    assert read_lines(tmp_path / "a.txt") == read_lines(tmp_path / "a.txt.gz") == ["x\u2028y", "z"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_lines(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    with pytest.raises(ValueError, match="bad.txt:2: invalid UTF-8"):
        read_lines(tmp_path / "bad.txt")
