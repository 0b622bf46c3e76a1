"""Conditional masked language model (CMLM) with mask-predict decoding (Ghazvininejad et al. 2019,
"Mask-Predict: Parallel Decoding of Conditional Masked Language Models").

Choices (documented once, here):
- `CMLM` has the layers of `codat.nat.VanillaNAT` (both are `nat_core.LengthNAT`: shared
  embeddings, the encoder, the length classifier on the mean-pooled encoder states (classes
  0..cfg.max_length content tokens), learned decoder positions, the bidirectional decoder and the
  output projection tied to the embeddings) and differs only in the decoder
  input. Targets are the content y_1..y_T without <s>/</s> (`nat_core.content_targets`);
  position t predicts y_t.
- Masked positions are given by a separate bool tensor `masked` (B*r, T), True = masked, not by a
  magic vocabulary id: the vocabulary and the tied output layer stay as they are, and the model
  can never emit [MASK]. The decoder input of a masked position is one learned vector
  `mask_embed` (an nn.Parameter of size D, initialised N(0, 0.02) like the embedding rows and
  scaled by sqrt(D) as they are); elsewhere it is the scaled embedding of tgt_ids. Whatever
  tgt_ids holds at masked positions is ignored. `masked=None` masks every position.
- Training (CMLM objective): per sentence, n_b ~ Uniform{1..T_b} (0 for an empty target), then
  n_b of the T_b positions uniformly without replacement; token NLL (optionally label-smoothed,
  as `nat_core.nat_loss`) on the masked positions only, averaged over all masked tokens of the
  batch, plus length_weight * the length cross-entropy (targets clamped to max_length).
- Validation (`cmlm_sentence_loss`): every position masked (deterministic), the per-sentence
  mean NLL of the content tokens; this is the model's iteration-0 prediction.
- Mask-predict: the top `length_beam` lengths (length 0 excluded) are decoded together as B*l
  decoder rows from one encoder pass. Iteration 0 masks everything and predicts the argmax token
  and its log-prob at every position; iteration t = 1..I-1 re-masks the n = floor(T * (I - t) / I)
  lowest-probability positions of each row (ties: lower position first) and re-predicts; only the
  re-masked positions update their tokens and log-probs. The candidate with the highest mean
  token log-prob is kept (ties: the likelier length). We rank by log-prob, which orders exactly as
  the paper's probabilities. Nothing is banned: a special id predicted at a position is dropped
  from the final output (as the other NAT decoders do), the output is left-aligned and PAD_ID
  padded.
- Log-softmax is in at least float32 (`objectives.log_softmax_fp32`), so bf16 autocast is safe.
  Decoding and validation run without grad in the model's current mode (callers call .eval()).
- model.arch cmlm trains with `cmlm_step` and decodes with `mask_predict_decoder`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from codat.config import DecodeConfig, ModelConfig, RunConfig
from codat.data import PAD_ID, Batch
from codat.nat_core import (
    LengthNAT,
    NatEncoded,
    NatOutput,
    content_targets,
    nat_loss,
    repeat_encoded,
)
from codat.npd import NpdSamples, pick_best_npd
from codat.objectives import log_softmax_fp32


class CMLM(LengthNAT):
    """Ghazvininejad et al. (2019) CMLM: VanillaNAT's layers, with a decoder that reads the
    partially masked target (token embeddings, a learned [MASK] vector at masked positions)
    instead of the copied source."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.mask_embed = nn.Parameter(torch.empty(cfg.dim))
        nn.init.normal_(self.mask_embed, mean=0.0, std=0.02)

    def masked_inputs(
        self,
        tgt_ids: torch.Tensor,  # (R, T) content ids; values at masked positions are ignored
        masked: torch.Tensor | None,  # (R, T) bool, True = masked; None = all masked
    ) -> torch.Tensor:  # (R, T, D)
        """Decoder input embeddings (no positions): sqrt(D) * (embedding of tgt_ids, or
        mask_embed where masked)."""
        tokens = self.embed_tokens(tgt_ids)  # (R, T, D)
        mask_vec = (self.mask_embed * self.encoder.scale).to(tokens.dtype)  # (D,)
        if masked is None:
            return mask_vec.expand_as(tokens)
        if masked.shape != tgt_ids.shape or masked.dtype != torch.bool:
            raise ValueError(
                f"masked must be a bool tensor shaped like tgt_ids {tuple(tgt_ids.shape)}, got "
                f"{masked.dtype} {tuple(masked.shape)}"
            )
        return torch.where(masked.unsqueeze(-1), mask_vec, tokens)

    def forward(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,) counting </s>
        tgt_ids: torch.Tensor,  # (B*r, T) content ids (no <s>/</s>), PAD_ID padded
        tgt_lens: torch.Tensor,  # (B*r,) content lengths T_b
        masked: torch.Tensor | None = None,  # (B*r, T) bool, True = masked; None = all masked
        *,
        repeats: int = 1,  # r decoder rows per sentence (row b*r + j is sentence b), one encoder
    ) -> NatOutput:  # token_logits (B*r, T, V), length_logits (B, max_length + 1), out_mask
        enc = self.encode(src_ids, src_lens)
        length_logits = self.length_logits(enc)
        if repeats != 1:
            enc = repeat_encoded(enc, repeats)
        R = len(enc.src_ids)
        if tgt_lens.shape != (R,) or tgt_ids.dim() != 2 or tgt_ids.shape[0] != R:
            raise ValueError(
                f"tgt_ids {tuple(tgt_ids.shape)} and tgt_lens {tuple(tgt_lens.shape)} must have "
                f"{R} = B * repeats rows"
            )
        token_logits = self.decode(enc, tgt_lens, self.masked_inputs(tgt_ids, masked))
        pos = torch.arange(tgt_ids.shape[1], device=tgt_lens.device)
        return NatOutput(token_logits, length_logits, pos.unsqueeze(0) < tgt_lens.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Training and validation


def random_masks(
    tgt_lens: torch.Tensor,  # (B,) content lengths T_b
    width: int,  # T >= max T_b
    *,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T) bool, True = masked
    """The CMLM training masks: n_b ~ Uniform{1..T_b} (0 when T_b = 0), then n_b of the T_b
    positions uniformly without replacement. Draws, in this order, B float64 uniforms for the
    counts and B x T uniforms for the positions, from `generator` on tgt_lens' device."""
    B, device = len(tgt_lens), tgt_lens.device
    u = torch.rand((B,), generator=generator, device=device, dtype=torch.float64)
    count = (torch.floor(u * tgt_lens) + 1).long().clamp(max=tgt_lens)  # (B,) in [1, T_b]
    valid = torch.arange(width, device=device).unsqueeze(0) < tgt_lens.unsqueeze(1)  # (B, T)
    noise = torch.rand((B, width), generator=generator, device=device)
    noise = noise.masked_fill(~valid, 2.0)  # padding sorts last
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, T) rank of each position in its row
    return valid & (rank < count.unsqueeze(1))


def cmlm_training_loss(
    model: CMLM,
    batch: Batch,
    *,
    generator: torch.Generator | None,
    length_weight: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's CMLM loss: mask with `random_masks`, NLL (label-smoothed when asked) of
    the masked tokens averaged over them, + length_weight * length cross-entropy.

    Stats: "masked" (fraction of the content tokens masked), "token_nll" and "length_nll"."""
    tgt_ids, tgt_lens = content_targets(batch.tgt_ids, batch.tgt_lens)  # (B, T), (B,)
    masked = random_masks(tgt_lens, tgt_ids.shape[1], generator=generator)  # (B, T)
    inputs = tgt_ids.masked_fill(masked, PAD_ID)  # the model ignores them anyway
    out = model(batch.src_ids, batch.src_lens, inputs, tgt_lens, masked)
    loss = nat_loss(
        out.token_logits,
        tgt_ids,
        masked,
        out.length_logits,
        tgt_lens.clamp(max=model.max_length),
        length_weight=length_weight,
        label_smoothing=label_smoothing,
    )
    stats = {
        "masked": float(masked.sum()) / max(int(tgt_lens.sum()), 1),
        "token_nll": float(loss.token_nll),
        "length_nll": float(loss.length_nll),
    }
    return loss.loss, stats


def cmlm_step(
    model: CMLM,
    batch: Batch,
    *,
    cfg: RunConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CMLM's loss of one micro-batch (`cmlm_training_loss` with train.label_smoothing) and its
    stats; CMLM does not glance (`ratio` is ignored)."""
    with autocast:
        return cmlm_training_loss(
            model, batch, generator=generator, label_smoothing=cfg.train.label_smoothing
        )


@torch.no_grad()
def cmlm_sentence_loss(model: CMLM, batch: Batch) -> torch.Tensor:  # (B,) float32
    """Validation: every position masked, the mean NLL of each sentence's content tokens (0 for
    an empty target). No length term; no grad; the model's current mode."""
    tgt_ids, tgt_lens = content_targets(batch.tgt_ids, batch.tgt_lens)  # (B, T), (B,)
    out = model(batch.src_ids, batch.src_lens, tgt_ids, tgt_lens, None)
    nll = (
        -log_softmax_fp32(out.token_logits).gather(-1, tgt_ids.unsqueeze(-1)).squeeze(-1)
    )  # (B, T)
    return (nll * out.out_mask).sum(1) / tgt_lens.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Decoding


def _predict(
    model: CMLM,
    enc: NatEncoded,  # R rows
    tokens: torch.Tensor,  # (R, T)
    lens: torch.Tensor,  # (R,)
    masked: torch.Tensor,  # (R, T) bool
) -> tuple[torch.Tensor, torch.Tensor]:  # (R, T) argmax ids, (R, T) their log-probs (float32+)
    logits = model.decode(enc, lens, model.masked_inputs(tokens, masked))
    logp, ids = log_softmax_fp32(logits).max(dim=-1)
    return ids, logp


@torch.no_grad()
def mask_predict(
    model: CMLM,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    *,
    iterations: int = 10,
    length_beam: int = 3,
) -> torch.Tensor:  # (B, T') ids, specials removed, left-aligned, PAD_ID padded, T' >= 1
    """Mask-predict (Ghazvininejad et al. 2019, §3): see the module docstring. One encoder pass,
    then `iterations` decoder passes over all B * length_beam candidates at once."""
    if iterations < 1 or not 1 <= length_beam <= model.max_length:
        raise ValueError(
            f"need iterations >= 1 and 1 <= length_beam <= max_length={model.max_length}, got "
            f"iterations={iterations}, length_beam={length_beam}"
        )
    B, l = src_ids.shape[0], length_beam
    if B == 0:
        return torch.full((0, 1), PAD_ID, dtype=torch.long, device=src_ids.device)
    enc = model.encode(src_ids, src_lens)
    length_logits = model.length_logits(enc).float()  # (B, C)
    length_logits[:, 0] = float("-inf")  # a candidate needs >= 1 position
    cand_lens = length_logits.topk(l, dim=-1).indices  # (B, l), likeliest first
    lens = cand_lens.reshape(B * l)  # (R,), row b*l + j = sentence b, j-th length
    enc = repeat_encoded(enc, l)
    T = int(lens.max())
    valid = torch.arange(T, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)  # (R, T)
    tokens = torch.full((B * l, T), PAD_ID, dtype=torch.long, device=lens.device)  # (R, T)
    tokens, logp = _predict(model, enc, tokens, lens, valid)  # iteration 0: all masked
    tokens = tokens.masked_fill(~valid, PAD_ID)
    logp = logp.masked_fill(~valid, 0.0)
    positions = torch.arange(T, device=lens.device).expand(B * l, T)
    for t in range(1, iterations):
        count = lens * (iterations - t) // iterations  # (R,) n = floor(T_b * (I - t) / I)
        # the n lowest log-probs of each row, ties to the lower position (a stable sort)
        key = logp.masked_fill(~valid, float("inf"))
        order = torch.sort(key, dim=1, stable=True).indices  # (R, T)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        masked = valid & (rank < count.unsqueeze(1))  # (R, T)
        new_tokens, new_logp = _predict(model, enc, tokens, lens, masked)
        tokens = torch.where(masked, new_tokens, tokens)
        logp = torch.where(masked, new_logp, logp)
    sums = logp.sum(1)  # (R,)
    samples = NpdSamples(tokens.view(B, l, T), cand_lens, (sums / lens).view(B, l), sums.view(B, l))
    return pick_best_npd(samples)


@torch.no_grad()
def mask_predict_decoder(
    model: CMLM,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """`mask_predict` with dc.iterations and dc.length_beam (deterministic: no generator)."""
    return mask_predict(
        model, src_ids, src_lens, iterations=dc.iterations, length_beam=dc.length_beam
    )
