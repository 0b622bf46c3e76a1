"""codat.decode against the per-sentence loops and enumerations of tests/reference.py.

Compared: `lookahead_decode` with `loop_lookahead` (a Python walk of the definition) for several
beta; `greedy_decode` with lookahead at beta = 0; `joint_viterbi_decode` / `joint_viterbi_path`
with the brute-force argmax over every path 0 -> L_b - 1 (same tokens, same vertex path, same
normalised score, also under `max_edges`); `walk_successors` with a pointer-chasing loop;
`collapse_tokens` with hand-checked cases (consecutive repeats are collapsed BEFORE specials are
removed). The batched (B, T) outputs are turned into lists by dropping the trailing `pad_id`.
"""

from __future__ import annotations

import pytest
import torch
from reference import brute_force_joint_viterbi, loop_lookahead, loop_walk, random_dag

from codat.decode import (
    collapse_tokens,
    greedy_decode,
    joint_viterbi_decode,
    joint_viterbi_path,
    lookahead_decode,
    walk_successors,
)

PAD = 0
SPECIALS = (0, 2, 3)  # pad, <s>, </s> as in codat.data; with V = 6 only 1, 4, 5 are real words
V = 6
L = 8
GRAPH_LENS = [8, 2, 5, 7, 3, 8, 6, 4]


def _to_lists(out: torch.Tensor, pad_id: int = PAD) -> list[list[int]]:
    """Drop the padding of a (B, T) decoder output, checking that it is only at the end."""
    assert out.dtype == torch.long and out.dim() == 2
    rows = []
    for row in out.tolist():
        n = len(row)
        while n and row[n - 1] == pad_id:
            n -= 1
        assert pad_id not in row[:n], f"pad inside the output row {row}"
        rows.append(row[:n])
    return rows


def _batch(seed: int, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    gl = torch.tensor(GRAPH_LENS)
    token_logp, trans_logp = random_dag(len(GRAPH_LENS), L, gl, V, dtype)
    return token_logp, trans_logp, gl


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lookahead_matches_loop_reference_on_ragged_batch(beta, seed):
    token_logp, trans_logp, gl = _batch(seed)
    out = lookahead_decode(token_logp, trans_logp, gl, beta=beta, special_ids=SPECIALS, pad_id=PAD)
    want = loop_lookahead(token_logp, trans_logp, gl, beta, SPECIALS, PAD)
    assert _to_lists(out) == want
    assert out.shape[1] == max(1, max(len(w) for w in want))


def test_lookahead_beta_changes_the_output():
    # Guards the previous test against a beta that is silently ignored.
    token_logp, trans_logp, gl = _batch(0)
    outs = {
        beta: loop_lookahead(token_logp, trans_logp, gl, beta, SPECIALS, PAD) for beta in (0, 2)
    }
    assert outs[0] != outs[2]
    got = lookahead_decode(token_logp, trans_logp, gl, beta=2.0, special_ids=SPECIALS, pad_id=PAD)
    assert _to_lists(got) == outs[2]


def test_lookahead_float32_matches_float64_reference():
    token_logp, trans_logp, gl = _batch(3)
    out = lookahead_decode(
        token_logp.float(), trans_logp.float(), gl, beta=1.0, special_ids=SPECIALS, pad_id=PAD
    )
    assert _to_lists(out) == loop_lookahead(token_logp, trans_logp, gl, 1.0, SPECIALS, PAD)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_lookahead_with_beta_zero(seed):
    token_logp, trans_logp, gl = _batch(seed)
    greedy = greedy_decode(token_logp, trans_logp, gl, special_ids=SPECIALS, pad_id=PAD)
    look = lookahead_decode(token_logp, trans_logp, gl, beta=0.0, special_ids=SPECIALS, pad_id=PAD)
    assert torch.equal(greedy, look)
    assert _to_lists(greedy) == loop_lookahead(token_logp, trans_logp, gl, 0.0, SPECIALS, PAD)


@pytest.mark.parametrize("length_beta", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_joint_viterbi_decode_matches_brute_force(length_beta, seed):
    token_logp, trans_logp, gl = _batch(seed)
    out = joint_viterbi_decode(
        token_logp, trans_logp, gl, length_beta=length_beta, special_ids=SPECIALS, pad_id=PAD
    )
    want, _, _ = brute_force_joint_viterbi(token_logp, trans_logp, gl, length_beta, SPECIALS, PAD)
    assert _to_lists(out) == want


@pytest.mark.parametrize("length_beta", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("max_edges", [None, 1, 2, 4])
def test_joint_viterbi_path_and_score_match_brute_force(length_beta, max_edges):
    token_logp, trans_logp, gl = _batch(4)
    vertex_logp = token_logp.max(dim=-1).values
    path, valid, score = joint_viterbi_path(
        vertex_logp, trans_logp, gl, length_beta=length_beta, max_edges=max_edges
    )
    _, want_score, want_paths = brute_force_joint_viterbi(
        token_logp, trans_logp, gl, length_beta, SPECIALS, PAD, max_edges=max_edges
    )
    assert valid.shape == path.shape and valid.dtype == torch.bool
    got_paths = [tuple(p[m].tolist()) for p, m in zip(path, valid, strict=True)]
    assert got_paths == want_paths
    torch.testing.assert_close(score, want_score, rtol=1e-10, atol=1e-10)


def test_joint_viterbi_decode_respects_max_edges():
    token_logp, trans_logp, gl = _batch(5)
    for max_edges in (1, 3):
        out = joint_viterbi_decode(
            token_logp,
            trans_logp,
            gl,
            length_beta=0.0,
            special_ids=SPECIALS,
            pad_id=PAD,
            max_edges=max_edges,
        )
        want, _, paths = brute_force_joint_viterbi(
            token_logp, trans_logp, gl, 0.0, SPECIALS, PAD, max_edges=max_edges
        )
        assert all(len(p) - 1 <= max_edges for p in paths)
        assert _to_lists(out) == want


@pytest.mark.parametrize(
    ("tokens", "specials", "expected"),
    [
        ([5, 5, 6, 2, 6, 6], (2,), [5, 6, 6]),  # 5 5 6 2 6 6 -> 5 6 2 6 -> 5 6 6
        ([5, 2, 5], (2,), [5, 5]),  # a removed special still separates repeats
        ([2, 5, 5, 3], (2, 3), [5]),
        ([7, 7, 7, 7], (2, 3), [7]),
        ([4, 1, 4, 1], (2, 3), [4, 1, 4, 1]),
        ([2, 3, 2, 2], (2, 3), []),
    ],
)
def test_collapse_tokens_collapses_repeats_before_removing_specials(tokens, specials, expected):
    t = torch.tensor([tokens])
    out = collapse_tokens(t, torch.ones_like(t, dtype=torch.bool), special_ids=specials, pad_id=0)
    width = max(len(expected), 1)
    assert out.tolist() == [expected + [0] * (width - len(expected))]


def test_collapse_tokens_left_aligns_pads_and_drops_invalid_slots():
    tokens = torch.tensor([[4, 4, 9, 9, 9], [1, 1, 1, 1, 1], [2, 6, 6, 3, 8]])
    valid = torch.tensor(
        [
            [True, True, True, False, False],
            [True, True, False, False, False],
            [True, True, True, True, False],
        ]
    )
    out = collapse_tokens(tokens, valid, special_ids=(2, 3), pad_id=-7)
    assert out.tolist() == [[4, 9], [1, -7], [6, -7]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_walk_successors_follows_pointers_and_stops_at_last_vertex(seed):
    g = torch.Generator().manual_seed(seed)
    gl = torch.tensor(GRAPH_LENS)
    successor = torch.randint(0, L, (len(GRAPH_LENS), L), generator=g)  # garbage beyond the walk
    for b, n in enumerate(GRAPH_LENS):
        for k in range(n - 1):
            successor[b, k] = int(torch.randint(k + 1, n, (1,), generator=g))
    vertices, valid = walk_successors(successor, gl)
    want = loop_walk(successor, gl)
    for b, n in enumerate(GRAPH_LENS):
        length = int(valid[b].sum())
        assert valid[b, :length].all() and not valid[b, length:].any()
        assert vertices[b, :length].tolist() == want[b]
        assert vertices[b, length - 1].item() == n - 1


def test_walk_successors_walks_the_longest_chain_to_the_end():
    gl = torch.tensor([L, 2, L - 1])
    successor = torch.arange(1, L + 1).clamp(max=L - 1).expand(3, L).clone()  # k -> k + 1
    vertices, valid = walk_successors(successor, gl)
    assert vertices[0].tolist() == list(range(L)) and valid[0].all()
    assert vertices[1][valid[1]].tolist() == [0, 1]
    assert vertices[2][valid[2]].tolist() == list(range(L - 1))


@pytest.mark.parametrize(
    "decode",
    [
        lambda *a: greedy_decode(*a, special_ids=SPECIALS, pad_id=PAD),
        lambda *a: lookahead_decode(*a, beta=1.0, special_ids=SPECIALS, pad_id=PAD),
        lambda *a: joint_viterbi_decode(*a, length_beta=1.0, special_ids=SPECIALS, pad_id=PAD),
    ],
    ids=["greedy", "lookahead", "joint_viterbi"],
)
@pytest.mark.parametrize("bad", ["graph_len_one", "graph_len_above_L", "trans_shape", "lens_shape"])
def test_decoders_reject_invalid_graph_lens_and_shapes(decode, bad):
    token_logp, trans_logp, gl = _batch(0)
    if bad == "graph_len_one":
        gl = gl.clone()
        gl[0] = 1
    elif bad == "graph_len_above_L":
        gl = gl.clone()
        gl[0] = L + 1
    elif bad == "trans_shape":
        trans_logp = trans_logp[:, :, :-1]
    else:
        gl = gl[:-1]
    with pytest.raises(ValueError):
        decode(token_logp, trans_logp, gl)
