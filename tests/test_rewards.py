"""Batched sentence BLEU (`codat.rewards.sentence_bleu`) against sacrebleu and a loop twin."""

import math

import pytest
import sacrebleu
import torch
from reference import sentence_bleu_loops

from codat.rewards import sentence_bleu

TOL = 1e-6


def sacre(hyp: list[int], ref: list[int]) -> float:
    return sacrebleu.sentence_bleu(
        " ".join(map(str, hyp)), [" ".join(map(str, ref))], tokenize="none"
    ).score


def pack(
    hyps: list[list[list[int]]], refs: list[list[int]], *, junk: torch.Generator | None = None
):
    """Pad B x K hypotheses and B references into the batched layout.

    Padding is random junk from the same small vocabulary (so it would create spurious
    matches if it leaked into the counts), or -1 without a generator.
    """
    B, K = len(hyps), len(hyps[0])
    T = max([len(h) for row in hyps for h in row] + [0])
    R = max([len(r) for r in refs] + [0])
    if junk is None:
        hyp_ids = torch.full((B, K, T), -1, dtype=torch.long)
        ref_ids = torch.full((B, R), -1, dtype=torch.long)
    else:
        hyp_ids = torch.randint(4, 10, (B, K, T), generator=junk)
        ref_ids = torch.randint(4, 10, (B, R), generator=junk)
    hyp_lens = torch.zeros(B, K, dtype=torch.long)
    for b in range(B):
        ref_ids[b, : len(refs[b])] = torch.tensor(refs[b], dtype=torch.long)
        for k in range(K):
            hyp_ids[b, k, : len(hyps[b][k])] = torch.tensor(hyps[b][k], dtype=torch.long)
            hyp_lens[b, k] = len(hyps[b][k])
    ref_lens = torch.tensor([len(r) for r in refs], dtype=torch.long)
    return hyp_ids, hyp_lens, ref_ids, ref_lens


def random_cases(seed: int, B: int = 25, K: int = 4, max_len: int = 12):
    """B sources x K hypotheses over ids 4..9, lengths 0..max_len, forced empties included."""
    g = torch.Generator().manual_seed(seed)

    def seq() -> list[int]:
        n = int(torch.randint(0, max_len + 1, (), generator=g))
        return torch.randint(4, 10, (n,), generator=g).tolist()

    refs = [seq() for _ in range(B)]
    hyps = []
    for b in range(B):
        row = []
        for _ in range(K):
            mode = int(torch.randint(0, 3, (), generator=g))
            if mode == 0 and refs[b]:  # noisy copy of the reference
                h = list(refs[b])
                for i in range(len(h)):
                    if float(torch.rand((), generator=g)) < 0.3:
                        h[i] = int(torch.randint(4, 10, (), generator=g))
                cut = int(torch.randint(0, len(h) + 1, (), generator=g))
                h = h[:cut] if float(torch.rand((), generator=g)) < 0.3 else h
                row.append(h)
            else:
                row.append(seq())
        hyps.append(row)
    refs[0] = []  # empty reference
    hyps[1][0] = []  # empty hypothesis
    hyps[2][1] = list(refs[2])  # exact match (possibly empty)
    hyps[3][2] = refs[3][:2]  # shorter than every order but 1 and 2
    return hyps, refs, g


SEEDS = [0, 1, 2, 3]  # 4 x 25 x 4 = 400 random hypotheses


@pytest.mark.parametrize("seed", SEEDS)
def test_random_batches_match_sacrebleu_and_twin(seed):
    hyps, refs, g = random_cases(seed)
    got = sentence_bleu(*pack(hyps, refs, junk=g))
    assert got.dtype == torch.float64 and got.shape == (len(hyps), len(hyps[0]))
    for b, row in enumerate(hyps):
        for k, h in enumerate(row):
            want = sacre(h, refs[b])
            assert got[b, k].item() == pytest.approx(want, abs=TOL), (h, refs[b])
            assert got[b, k].item() == pytest.approx(sentence_bleu_loops(h, refs[b]), abs=TOL)
    assert bool(((got >= 0) & (got <= 100 + 1e-9)).all())
    assert (got > 0).any() and (got == 0).any()  # the cases are not degenerate


@pytest.mark.parametrize("seed", SEEDS)
def test_twin_matches_sacrebleu(seed):
    hyps, refs, _ = random_cases(seed)
    for b, row in enumerate(hyps):
        for h in row:
            assert sentence_bleu_loops(h, refs[b]) == pytest.approx(sacre(h, refs[b]), abs=TOL)


def test_longer_sequences_and_int32_lengths():
    """Longer sequences (higher-order matches) with int32 lengths and a bigger vocabulary."""
    g = torch.Generator().manual_seed(7)
    B, K, T, R = 6, 3, 30, 28
    ref_ids = torch.randint(4, 8, (B, R), generator=g)
    hyp_ids = ref_ids[:, None, :T].repeat(1, K, 2)[..., :T].clone()
    noise = torch.rand(B, K, T, generator=g) < 0.2
    hyp_ids[noise] = torch.randint(4, 8, (int(noise.sum()),), generator=g)
    hyp_lens = torch.randint(0, T + 1, (B, K), generator=g).int()
    ref_lens = torch.randint(0, R + 1, (B,), generator=g).int()
    got = sentence_bleu(hyp_ids, hyp_lens, ref_ids, ref_lens)
    for b in range(B):
        ref = ref_ids[b, : ref_lens[b]].tolist()
        for k in range(K):
            hyp = hyp_ids[b, k, : hyp_lens[b, k]].tolist()
            assert got[b, k].item() == pytest.approx(sacre(hyp, ref), abs=TOL)


def one(hyp: list[int], ref: list[int], **kw) -> float:
    return sentence_bleu(*pack([[hyp]], [ref]), **kw)[0, 0].item()


def test_exact_match_is_100():
    ref = [4, 5, 6, 7, 8, 9, 4]
    assert one(ref, ref) == pytest.approx(100.0, abs=1e-9)
    assert one(ref, ref) == pytest.approx(sacre(ref, ref), abs=TOL)


def test_repeats_are_clipped():
    """ "the the the the" against a reference with one "the": unigram precision 1/4, not 4/4."""
    hyp, ref = [5, 5, 5, 5], [5, 6, 7, 8]
    got = one(hyp, ref)
    # Clipped: p1 = 25, then orders 2..4 have no match: 100/(2*3), 100/(4*2), 100/(8*1).
    clipped = math.exp((math.log(25) + math.log(100 / 6) + math.log(12.5) * 2) / 4)
    # Unclipped counting would credit all four 5s: p1 = 100.
    unclipped = math.exp((math.log(100) + math.log(100 / 6) + math.log(12.5) * 2) / 4)
    assert got == pytest.approx(clipped, abs=TOL)
    assert got == pytest.approx(sacre(hyp, ref), abs=TOL)
    assert got < 0.75 * unclipped
    # The repeated hypothesis scores well below the exact one-token match of equal length.
    assert got < one([5, 6, 7, 8], ref) / 5
    # Repeated bigrams are clipped too: "5 6 5 6 5 6" vs one "5 6".
    hyp2, ref2 = [5, 6, 5, 6, 5, 6], [5, 6, 7, 8, 9, 4]
    assert one(hyp2, ref2) == pytest.approx(sacre(hyp2, ref2), abs=TOL)
    assert one(hyp2, ref2) == pytest.approx(sentence_bleu_loops(hyp2, ref2), abs=TOL)


def test_short_hypotheses_use_effective_order():
    ref = [4, 5, 6, 7, 8]
    for hyp in ([4], [4, 5], [4, 5, 6], [9], [9, 4], [5, 4, 6]):
        assert one(hyp, ref) == pytest.approx(sacre(hyp, ref), abs=TOL), hyp
    # One correct token against a 5-token reference: precision 100, brevity penalty e^(1-5).
    assert one([4], ref) == pytest.approx(100 * math.exp(1 - 5), abs=TOL)
    # Short but complete: no brevity penalty and all (effective) orders match.
    assert one([4, 5, 6], [4, 5, 6]) == pytest.approx(100.0, abs=1e-9)


def test_empty_and_disjoint_are_zero():
    assert one([], [4, 5, 6]) == 0.0
    assert one([4, 5, 6], []) == 0.0
    assert one([], []) == 0.0
    assert one([4, 5, 6, 7, 4, 5], [8, 9, 8, 9, 8]) == 0.0
    assert sacre([4, 5, 6, 7, 4, 5], [8, 9, 8, 9, 8]) == 0.0


def test_padding_content_is_ignored():
    hyps, refs, g = random_cases(11, B=8, K=3)
    a = sentence_bleu(*pack(hyps, refs, junk=g))
    b = sentence_bleu(*pack(hyps, refs))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_max_order_other_than_4():
    hyp, ref = [4, 5, 6, 4, 7], [4, 5, 6, 7, 4, 7]
    for n in (1, 2, 3, 5):
        assert one(hyp, ref, max_order=n) == pytest.approx(
            sentence_bleu_loops(hyp, ref, max_order=n), abs=TOL
        )


def test_zero_width_inputs():
    hyp_ids = torch.zeros(2, 3, 0, dtype=torch.long)
    ref_ids = torch.zeros(2, 0, dtype=torch.long)
    out = sentence_bleu(
        hyp_ids, torch.zeros(2, 3, dtype=torch.long), ref_ids, torch.zeros(2, dtype=torch.long)
    )
    assert out.shape == (2, 3) and bool((out == 0).all())


@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 3), (2, 3), (2, 4), (2,)),  # hyp_ids not 3-D
        ((2, 3, 5), (2,), (2, 4), (2,)),  # hyp_lens not (B, K)
        ((2, 3, 5), (2, 4), (2, 4), (2,)),  # hyp_lens wrong K
        ((2, 3, 5), (2, 3), (3, 4), (2,)),  # ref_ids wrong B
        ((2, 3, 5), (2, 3), (2, 4, 1), (2,)),  # ref_ids not 2-D
        ((2, 3, 5), (2, 3), (2, 4), (3,)),  # ref_lens wrong B
        ((2, 3, 5), (2, 3), (2, 4), (2, 1)),  # ref_lens not 1-D
    ],
)
def test_shape_errors(shapes):
    h, hl, r, rl = (torch.zeros(s, dtype=torch.long) for s in shapes)
    with pytest.raises(ValueError):
        sentence_bleu(h, hl, r, rl)


def test_value_errors():
    h, hl = torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    r, rl = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="lengths"):
        sentence_bleu(h, hl + 4, r, rl)
    with pytest.raises(ValueError, match="lengths"):
        sentence_bleu(h, hl, r, rl + 5)
    with pytest.raises(ValueError, match="integer"):
        sentence_bleu(h.float(), hl, r, rl)
    with pytest.raises(ValueError, match="max_order"):
        sentence_bleu(h, hl, r, rl, max_order=0)
