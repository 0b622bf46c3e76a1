"""Vanilla NAT (Gu et al. 2018) and GLAT (Qian et al. 2021) baselines with noisy parallel
decoding (NPD), so that CoDAT's ranking losses can be trained on a vanilla NAT (CoDAT §3.3,
Table 2: GLAT + constraints on NPD samples).

Choices (documented once, here):
- The decoder emits the target *content* y_1..y_T, without <s>/</s>: position t predicts y_t.
  `content_targets` turns a `Batch`'s `<s> y </s>` into that form. The length head predicts T
  (classes 0..max_length) from the mean-pooled encoder states (fairseq NAT's `embed_length`).
- Decoder input = "uniform copy" of the source embeddings (Gu et al. 2018, "Decoder Inputs"): t of T
  takes source content token round(t * (S'-1) / (T-1)), S' = source length without </s> (the
  </s> itself only when the source is empty), rounding half up; plus learned decoder positions.
- Output = the argmax token of every position. Vanilla NAT does not collapse repeats; `dedup`
  optionally removes consecutive duplicates. Specials (<pad>, <s>, </s>) are dropped from the
  final output, as the DAT decoders do.
- GLAT (Qian et al. 2021): reveal N = floor(ratio * d + 0.5) reference tokens, d = Hamming
  distance of pass 1's argmax to the reference, at positions drawn uniformly at random; the loss
  covers only the other positions. GLAT's code truncates (N = long(ratio * d)); we round as
  codat's DAT glancing does (`codat.glancing.choose_glanced`). The ratio is annealed with
  `codat.glancing.glance_ratio`.
- NPD: K candidates per sentence, `length_beam` predicted lengths x `k` draws of Gaussian noise
  N(0, sigma^2) added to the decoder input embeddings (the paper's "Gaussian noise on the word
  embedding layer"), all in one batched decoder pass; each candidate is rescored without noise
  by its mean token log-prob (or by any external scores, e.g. an AR teacher as in Gu et al.).

The model only maps tensors to tensors; losses, glancing and decoding are the free functions below.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from codat.config import ModelConfig
from codat.data import PAD_ID, SPECIAL_IDS, Batch
from codat.decode import collapse_tokens
from codat.layers import bert_init, decoder_stack, shared_embedding_and_encoder


class NatOutput(NamedTuple):
    token_logits: torch.Tensor  # (B*r, T, V), r = repeats
    length_logits: torch.Tensor  # (B, max_length + 1)
    out_mask: torch.Tensor  # (B*r, T) bool, True = t < T_b


class NatEncoded(NamedTuple):
    states: torch.Tensor  # (B, S, D)
    src_mask: torch.Tensor  # (B, S) bool
    src_ids: torch.Tensor  # (B, S)
    src_lens: torch.Tensor  # (B,)


def uniform_copy_indices(
    src_lens: torch.Tensor,  # (B,) source lengths counting </s>
    tgt_lens: torch.Tensor,  # (B,) decoder lengths T_b
    width: int,
) -> torch.Tensor:  # (B, width) long
    """Gu et al. (2018) uniform copy: decoder position t of T_b reads source position
    floor(t * (m_b - 1) / (T_b - 1) + 1/2), m_b = max(S_b - 1, 1) real tokens without </s>.

    Exact integer arithmetic; T_b = 1 reads position 0; positions t >= T_b read 0 (padding).
    """
    t = torch.arange(width, device=src_lens.device).unsqueeze(0)  # (1, width)
    m = (src_lens - 1).clamp(min=1).unsqueeze(1)
    den = (tgt_lens - 1).clamp(min=1).unsqueeze(1)
    idx = (2 * t * (m - 1) + den) // (2 * den)
    return idx.masked_fill(t >= tgt_lens.unsqueeze(1), 0)


def repeat_encoded(enc: NatEncoded, k: int) -> NatEncoded:
    """Each sentence's encoding k times in a row: row b*k + j is sentence b."""
    return NatEncoded(*(x.repeat_interleave(k, dim=0) for x in enc))


class VanillaNAT(nn.Module):
    """Gu et al. (2018) NAT without fertilities: shared embeddings, Encoder, length classifier,
    uniformly copied source embeddings as decoder input, bidirectional decoder, tied output."""

    def __init__(self, cfg: ModelConfig, max_length: int = 256) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1")
        self.cfg, self.max_length = cfg, max_length
        D = cfg.dim
        self.embed, self.encoder = shared_embedding_and_encoder(cfg)  # embed shared by all
        self.length_head = nn.Linear(D, max_length + 1)  # classes T = 0..max_length
        self.positions = nn.Embedding(max_length, D)
        self.decoder_layers = decoder_stack(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(bert_init)

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> NatEncoded:
        S = src_ids.shape[1]
        src_mask = torch.arange(S, device=src_ids.device).unsqueeze(0) < src_lens.unsqueeze(1)
        return NatEncoded(self.encoder(src_ids, src_mask), src_mask, src_ids, src_lens)

    def length_logits(self, enc: NatEncoded) -> torch.Tensor:  # (B, max_length + 1)
        """Scores of the content length T from the mean of the valid encoder states."""
        mask = enc.src_mask.unsqueeze(-1).to(enc.states.dtype)
        pooled = (enc.states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.length_head(pooled)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        """Token embeddings scaled by sqrt(D), as the encoder scales them."""
        return self.embed(ids) * self.encoder.scale

    def copy_inputs(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
        tgt_lens: torch.Tensor,  # (B,)
        width: int | None = None,  # T; default max(max T_b, 1)
    ) -> torch.Tensor:  # (B, T, D)
        """Decoder input embeddings: the uniformly copied source embeddings (no positions)."""
        T = max(int(tgt_lens.max()), 1) if width is None else width
        idx = uniform_copy_indices(src_lens, tgt_lens, T)
        return self.embed_tokens(src_ids.gather(1, idx))

    def decode(
        self,
        enc: NatEncoded,
        tgt_lens: torch.Tensor,  # (B,)
        dec_inputs: torch.Tensor,  # (B, T, D)
    ) -> torch.Tensor:  # (B, T, V)
        B, T, _ = dec_inputs.shape
        if T > self.max_length or int(tgt_lens.max()) > T:
            raise ValueError(
                f"decoder width {T} must cover the lengths (max {int(tgt_lens.max())}) and be "
                f"<= max_length={self.max_length}"
            )
        pos = torch.arange(T, device=dec_inputs.device)
        mask = pos.unsqueeze(0) < tgt_lens.clamp(min=1).unsqueeze(1)  # empty target: 1 key
        x = self.drop(dec_inputs + self.positions(pos))
        for layer in self.decoder_layers:
            x = layer(x, mask, enc.states, enc.src_mask)
        return x @ self.embed.weight.t()  # tied to the embeddings

    def forward(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
        tgt_lens: torch.Tensor,  # (B*r,) content lengths T_b (no <s>/</s>)
        dec_inputs: torch.Tensor | None = None,  # (B*r, T, D); None = uniform copy
        *,
        repeats: int = 1,  # r decoder rows per sentence (NPD candidates), one encoder pass
    ) -> NatOutput:
        enc = self.encode(src_ids, src_lens)
        length_logits = self.length_logits(enc)
        if repeats != 1:
            enc = repeat_encoded(enc, repeats)
        if tgt_lens.shape != (len(enc.src_ids),):
            raise ValueError(f"tgt_lens {tuple(tgt_lens.shape)} != ({len(enc.src_ids)},)")
        if dec_inputs is None:
            dec_inputs = self.copy_inputs(enc.src_ids, enc.src_lens, tgt_lens)
        token_logits = self.decode(enc, tgt_lens, dec_inputs)
        pos = torch.arange(token_logits.shape[1], device=tgt_lens.device)
        return NatOutput(token_logits, length_logits, pos.unsqueeze(0) < tgt_lens.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Training: targets, loss, glancing


class NatLoss(NamedTuple):
    loss: torch.Tensor  # scalar: token + length_weight * length
    token_nll: torch.Tensor  # scalar, detached
    length_nll: torch.Tensor  # scalar, detached


def content_targets(
    tgt_ids: torch.Tensor,  # (B, N) <s> y </s>, PAD_ID padded
    tgt_lens: torch.Tensor,  # (B,) counting <s> and </s>
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, max(N - 2, 1)), (B,)
    """The reference content y (no <s>/</s>), PAD_ID padded, and its lengths N_b - 2."""
    lens = tgt_lens - 2
    width = max(tgt_ids.shape[1] - 2, 1)
    body = tgt_ids[:, 1 : 1 + width]
    if body.shape[1] < width:
        body = F.pad(body, (0, width - body.shape[1]), value=PAD_ID)
    pos = torch.arange(width, device=tgt_ids.device).unsqueeze(0)
    return body.masked_fill(pos >= lens.unsqueeze(1), PAD_ID), lens


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over V in at least float32 (float32 under bf16 autocast, float64 stays)."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def nat_loss(
    token_logits: torch.Tensor,  # (B, T, V)
    tgt_ids: torch.Tensor,  # (B, T) content ids
    loss_mask: torch.Tensor,  # (B, T) bool: positions that are trained
    length_logits: torch.Tensor,  # (B, C)
    length_targets: torch.Tensor,  # (B,) in [0, C)
    *,
    length_weight: float = 0.1,
    label_smoothing: float = 0.0,
) -> NatLoss:
    """Gu et al. (2018) NAT loss: mean over the trained positions of the token NLL (optionally
    label-smoothed, (1 - eps) * NLL + eps * mean_v(-log p_v), as fairseq NAT) plus
    length_weight * the cross-entropy of the length classifier, averaged over sentences."""
    C = length_logits.shape[1]
    if length_targets.numel() and (int(length_targets.min()) < 0 or int(length_targets.max()) >= C):
        raise ValueError(f"length targets must lie in [0, {C}), got {length_targets.tolist()}")
    logp = _log_softmax(token_logits)  # (B, T, V)
    nll = -logp.gather(-1, tgt_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if label_smoothing > 0:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    token = (nll * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    length = F.cross_entropy(length_logits.float(), length_targets)
    return NatLoss(token + length_weight * length, token.detach(), length.detach())


def glancing_reveal(
    pred_ids: torch.Tensor,  # (B, T) pass-1 argmax
    tgt_ids: torch.Tensor,  # (B, T)
    tgt_lens: torch.Tensor,  # (B,)
    *,
    ratio: float,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T) bool
    """GLAT's glancing sampling (Qian et al. 2021): reveal N_b = floor(ratio * d_b + 1/2) of the
    T_b reference positions, uniformly at random; d_b = Hamming distance(prediction, reference)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"glancing ratio must be in [0, 1], got {ratio}")
    B, T = tgt_ids.shape
    valid = torch.arange(T, device=tgt_ids.device).unsqueeze(0) < tgt_lens.unsqueeze(1)
    hamming = ((pred_ids != tgt_ids) & valid).sum(1)
    count = torch.floor(hamming.double() * ratio + 0.5).long()  # <= d_b <= T_b
    noise = torch.rand((B, T), generator=generator, device=tgt_ids.device)
    noise = noise.masked_fill(~valid, 2.0)  # padding sorts last
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each position among its row
    return valid & (rank < count.unsqueeze(1))


def glat_inputs(
    model: VanillaNAT,  # the unwrapped module: pass 1 needs no DDP
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    tgt_ids: torch.Tensor,  # (B, T) content ids
    tgt_lens: torch.Tensor,  # (B,) content lengths
    *,
    ratio: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T, D), (B, T) bool
    """GLAT training inputs (Qian et al. 2021): pass 1 (no grad, current mode) predicts from the
    copied source; `glancing_reveal` picks positions; their decoder inputs become the reference
    token embeddings. Returns the decoder inputs (with grad) and the loss mask (valid and not
    revealed: GLAT trains only the positions it did not reveal).

    The global RNG is restored after pass 1, so pass 2 draws the same dropout masks (as codat's DAT
    glancing does). ratio = 0 skips pass 1.
    """
    T = tgt_ids.shape[1]
    valid = torch.arange(T, device=tgt_ids.device).unsqueeze(0) < tgt_lens.unsqueeze(1)
    copied = model.copy_inputs(src_ids, src_lens, tgt_lens, width=T)
    if ratio == 0:
        return copied, valid
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if src_ids.is_cuda else None
    with torch.no_grad():
        pred = model(src_ids, src_lens, tgt_lens, copied.detach()).token_logits.argmax(-1)
        reveal = glancing_reveal(pred, tgt_ids, tgt_lens, ratio=ratio, generator=generator)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    dec_inputs = torch.where(reveal.unsqueeze(-1), model.embed_tokens(tgt_ids), copied)
    return dec_inputs, valid & ~reveal


def glat_loss(
    model: nn.Module,  # possibly DDP-wrapped
    core: VanillaNAT,  # the unwrapped module, for the no-grad glancing pass
    batch: Batch,
    *,
    ratio: float,
    generator: torch.Generator | None,
    length_weight: float = 0.1,
    label_smoothing: float = 0.0,
) -> NatLoss:
    """One micro-batch's GLAT loss (vanilla NAT when ratio = 0): glance, then `nat_loss` on the
    non-revealed content positions plus the length loss (targets clamped to max_length)."""
    tgt_ids, tgt_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    dec_inputs, loss_mask = glat_inputs(
        core, batch.src_ids, batch.src_lens, tgt_ids, tgt_lens, ratio=ratio, generator=generator
    )
    out = model(batch.src_ids, batch.src_lens, tgt_lens, dec_inputs)
    return nat_loss(
        out.token_logits,
        tgt_ids,
        loss_mask,
        out.length_logits,
        tgt_lens.clamp(max=core.max_length),
        length_weight=length_weight,
        label_smoothing=label_smoothing,
    )


# ---------------------------------------------------------------------------------------------
# Decoding: length beam, noisy parallel decoding, candidate scores


class NpdSamples(NamedTuple):
    tokens: torch.Tensor  # (B, K, T) long: argmax token of each position, PAD_ID beyond length
    lengths: torch.Tensor  # (B, K) long, >= 1
    scores: torch.Tensor  # (B, K): token_logp_sums / lengths under the noise-free model
    token_logp_sums: torch.Tensor  # (B, K): sum_t log p(y_t | x, T) under the noise-free model


def token_logp_sums(
    token_logits: torch.Tensor,  # (R, T, V)
    tokens: torch.Tensor,  # (R, T)
    lens: torch.Tensor,  # (R,)
) -> torch.Tensor:  # (R,)
    logp = _log_softmax(token_logits).gather(-1, tokens.unsqueeze(-1))
    valid = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < lens.unsqueeze(1)
    return (logp.squeeze(-1) * valid).sum(-1)


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
    model: nn.Module,  # VanillaNAT, possibly DDP-wrapped
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
