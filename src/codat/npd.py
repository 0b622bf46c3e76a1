"""Noisy parallel decoding (Gu et al. 2018, "NPD") of a vanilla NAT / GLAT, and the candidate
scores CoDAT trains on (CoDAT §3.3, Table 2: GLAT + constraints on NPD samples).

Choices (documented once, here):
- NPD: K candidates per sentence, `length_beam` predicted lengths x `k` draws of Gaussian noise
  N(0, sigma^2) added to the decoder input embeddings (the paper's "Gaussian noise on the word
  embedding layer"), all in one batched decoder pass; each candidate is rescored without noise
  by its mean token log-prob (or by any external scores, e.g. an AR teacher as in Gu et al.).
- Argmax decoding (`nat_decode`) is NPD without noise, one candidate per length.
- A candidate's score for CoDAT (`nat_sample_scores`) is its length-normalised token
  log-likelihood given its length, from the noise-free copied input, with grad.
- `pick_best_npd` keeps the best-scoring candidate of each sentence (CMLM's mask-predict uses it
  too), specials removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from codat.data import PAD_ID, SPECIAL_IDS
from codat.decode import collapse_tokens
from codat.nat_core import repeat_encoded, token_logp_sums

if TYPE_CHECKING:  # annotations only: codat.nat imports this module
    from codat.nat import VanillaNAT


class NpdSamples(NamedTuple):
    tokens: torch.Tensor  # (B, K, T) long: argmax token of each position, PAD_ID beyond length
    lengths: torch.Tensor  # (B, K) long, >= 1
    scores: torch.Tensor  # (B, K): token_logp_sums / lengths under the noise-free model
    token_logp_sums: torch.Tensor  # (B, K): sum_t log p(y_t | x, T) under the noise-free model


def npd_samples(
    model: VanillaNAT,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    *,
    k: int,
    sigma: float,
    generator: torch.Generator | None,
    length_beam: int = 1,
) -> NpdSamples:  # K = length_beam * k candidates per sentence
    """Noisy parallel decoding (Gu et al. 2018, "NPD"; CoDAT §3.3): for each of the `length_beam`
    most likely lengths (length 0 excluded), `k` candidates decoded from the copied source
    embeddings plus N(0, sigma^2) noise, all B*K in one decoder pass, argmax per position.
    Candidate j uses the (j // k)-th length. Scores: mean token log-prob under the noise-free
    decoder (a second pass when sigma > 0). Runs without grad, in the model's current mode.
    """
    if k < 1 or sigma < 0 or not 1 <= length_beam <= model.max_length:
        raise ValueError(
            f"need k >= 1, sigma >= 0 and 1 <= length_beam <= {model.max_length}, got k={k}, "
            f"sigma={sigma}, length_beam={length_beam}"
        )
    B = src_ids.shape[0]
    K = length_beam * k
    with torch.no_grad():
        enc = model.encode(src_ids, src_lens)
        length_logits = model.length_logits(enc).float()
        length_logits[:, 0] = float("-inf")  # a candidate needs >= 1 position
        lens = length_logits.topk(length_beam, dim=-1).indices  # (B, l)
        lens = lens.repeat_interleave(k, dim=1)  # (B, K)
        flat_lens = lens.reshape(B * K)
        enc = repeat_encoded(enc, K)
        clean = model.copy_inputs(enc.src_ids, enc.src_lens, flat_lens)  # (B*K, T, D)
        if sigma > 0:
            noise = torch.randn(clean.shape, generator=generator, device=clean.device)
            logits = model.decode(enc, flat_lens, clean + sigma * noise.to(clean.dtype))
            tokens = logits.argmax(-1)
            logits = model.decode(enc, flat_lens, clean)  # rescore without noise
        else:
            logits = model.decode(enc, flat_lens, clean)
            tokens = logits.argmax(-1)
        sums = token_logp_sums(logits, tokens, flat_lens)
    T = tokens.shape[1]
    pos = torch.arange(T, device=tokens.device).unsqueeze(0)
    tokens = tokens.masked_fill(pos >= flat_lens.unsqueeze(1), PAD_ID)
    return NpdSamples(tokens.view(B, K, T), lens, (sums / flat_lens).view(B, K), sums.view(B, K))


def nat_decode(
    model: VanillaNAT,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    *,
    length_beam: int = 1,
    dedup: bool = False,
) -> torch.Tensor:  # (B, T')
    """Argmax decoding with a length beam (Gu et al. 2018; Qian et al. 2021): decode the top
    `length_beam` lengths in parallel and keep the one with the best mean token log-prob."""
    samples = npd_samples(
        model, src_ids, src_lens, k=1, sigma=0.0, generator=None, length_beam=length_beam
    )
    return pick_best_npd(samples, dedup=dedup)


def nat_sample_scores(
    model: VanillaNAT,  # with grad
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    tokens: torch.Tensor,  # (B, K, T) candidate ids
    lengths: torch.Tensor,  # (B, K) >= 1
) -> torch.Tensor:  # (B, K), with grad
    """log q(y_k | x, T_k) / T_k: the NAT analogue of `objectives.samples_log_q`, the
    length-normalised sum of the candidate's token log-probs given its length (no length term),
    from the noise-free copied input. One encoder pass; the K candidates share it."""
    B, K, T = tokens.shape
    if lengths.shape != (B, K) or (lengths.numel() and int(lengths.min()) < 1):
        raise ValueError(f"lengths {tuple(lengths.shape)} must be (B, K) = ({B}, {K}) and >= 1")
    flat_lens = lengths.reshape(B * K)
    width = int(flat_lens.max())
    if width > T:
        raise ValueError(f"lengths up to {width} exceed the token width {T}")
    out = model(src_ids, src_lens, flat_lens, repeats=K)
    flat_tokens = tokens.reshape(B * K, T)[:, :width]
    sums = token_logp_sums(out.token_logits, flat_tokens, flat_lens)
    return (sums / flat_lens).view(B, K)


def pick_best_npd(
    samples: NpdSamples,
    scores: torch.Tensor | None = None,  # (B, K) any scorer's scores; None = samples.scores
    *,
    dedup: bool = False,
) -> torch.Tensor:  # (B, T')
    """The best candidate of each sentence, specials removed (and consecutive repeats when
    `dedup`), left-aligned and PAD_ID-padded."""
    scores = samples.scores if scores is None else scores
    B, K, T = samples.tokens.shape
    if scores.shape != (B, K):
        raise ValueError(f"scores {tuple(scores.shape)} != ({B}, {K})")
    rows = torch.arange(B, device=scores.device)
    best = scores.argmax(dim=1)
    tokens, lens = samples.tokens[rows, best], samples.lengths[rows, best]  # (B, T), (B,)
    valid = torch.arange(T, device=tokens.device).unsqueeze(0) < lens.unsqueeze(1)
    if dedup:
        return collapse_tokens(tokens, valid, special_ids=SPECIAL_IDS, pad_id=PAD_ID)
    keep = valid & ~torch.isin(tokens, torch.tensor(SPECIAL_IDS, device=tokens.device))
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept slots first
    out = tokens.gather(1, order).masked_fill(~keep.gather(1, order), PAD_ID)
    return out[:, : max(int(keep.sum(1).max()) if B else 0, 1)]
