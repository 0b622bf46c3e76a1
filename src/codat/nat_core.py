"""The pieces the length-predicting NATs share (vanilla NAT / GLAT in `codat.nat`, CMLM in
`codat.cmlm`; CTC in `codat.ctc` reuses the copy, the targets and GLAT's reveal; DAT with
model.upsample predict the length head): `LengthNAT`, the base class of VanillaNAT and CMLM (their
layers and the methods they share), and public functions that the models call.

Choices (documented once, here):
- The decoder emits the target *content* y_1..y_T, without <s>/</s>: position t predicts y_t.
  `content_targets` turns a `Batch`'s `<s> y </s>` into that form. The length head predicts T
  (classes 0..max_length) from the mean-pooled encoder states (fairseq NAT's `embed_length`).
- `LengthNAT.__init__` builds, in this order, the shared embedding and encoder, the length head,
  the learned decoder positions (max_length of them), the bidirectional decoder stack and the
  input dropout, as the attributes embed, encoder, length_head, positions, decoder_layers, drop
  (the state-dict key names), then initialises them (`layers.bert_init`). `LengthNAT.decode` runs
  that stack with the output projection tied to the embeddings. A subclass differs only in its
  decoder inputs and its `forward`.
- Loss (`nat_loss`): the mean over the trained positions of the token NLL (optionally
  label-smoothed, by `F.cross_entropy`'s label_smoothing) plus length_weight * the length
  cross-entropy. Log-probabilities are in at least float32 (as `objectives.log_softmax_fp32`),
  so bf16 autocast is safe.
- GLAT's reveal (`glancing_reveal`, Qian et al. 2021): N = floor(ratio * d + 1/2) positions, d the
  Hamming distance of pass 1's prediction to the reference, drawn uniformly among the valid ones
  (GLAT's code truncates; we round as codat's DAT glancing does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from codat.config import ModelConfig
from codat.data import PAD_ID
from codat.layers import bert_init, decoder_stack, shared_embedding_and_encoder, tied_logits
from codat.objectives import log_softmax_fp32


class NatOutput(NamedTuple):
    token_logits: torch.Tensor  # (B*r, T, V), r = repeats
    length_logits: torch.Tensor  # (B, max_length + 1)
    out_mask: torch.Tensor  # (B*r, T) bool, True = t < T_b


class NatEncoded(NamedTuple):
    states: torch.Tensor  # (B, S, D)
    src_mask: torch.Tensor  # (B, S) bool
    src_ids: torch.Tensor  # (B, S)
    src_lens: torch.Tensor  # (B,)


class LengthNAT(nn.Module):
    """The length-predicting NAT without its decoder inputs (module docstring): shared embeddings,
    encoder, length classifier, learned decoder positions, bidirectional decoder, tied output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.max_length < 1:
            raise ValueError(f"model.max_length={cfg.max_length} must be >= 1")
        self.cfg, self.max_length = cfg, cfg.max_length
        # embed is shared by the encoder, the decoder inputs and the output projection
        self.embed, self.encoder = shared_embedding_and_encoder(cfg)
        self.length_head = build_length_head(cfg)
        self.positions = nn.Embedding(cfg.max_length, cfg.dim)
        self.decoder_layers = decoder_stack(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(bert_init)

    def output_lengths(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """The source lengths: what a decoding batch is sized by."""
        return src_lens

    def max_target_lens(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """The longest trainable <s> y </s>: the length head's max_length content tokens + 2."""
        return torch.full_like(src_lens, self.max_length + 2)

    def train_positions(self, src_lens: torch.Tensor, tgt_lens: torch.Tensor) -> torch.Tensor:
        """Decoder positions of each training pair: its target length."""
        return tgt_lens

    def encode(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
    ) -> NatEncoded:
        S = src_ids.shape[1]
        src_mask = torch.arange(S, device=src_ids.device).unsqueeze(0) < src_lens.unsqueeze(1)
        return NatEncoded(self.encoder(src_ids, src_mask), src_mask, src_ids, src_lens)

    def length_logits(self, enc: NatEncoded) -> torch.Tensor:  # (B, max_length + 1)
        """Scores of the content length T from the mean of the valid encoder states."""
        return masked_mean_length_logits(self.length_head, enc.states, enc.src_mask)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:  # (R, T, D)
        """Token embeddings scaled by sqrt(D), as the encoder scales them."""
        return self.embed(ids) * self.encoder.scale

    def decode(
        self,
        enc: NatEncoded,  # R rows
        tgt_lens: torch.Tensor,  # (R,)
        dec_inputs: torch.Tensor,  # (R, T, D)
    ) -> torch.Tensor:  # (R, T, V)
        """The bidirectional decoder over T positions (valid: t < max(T_b, 1)) plus learned
        positions, cross-attending to the encoder, projected onto the vocabulary by the tied
        embeddings."""
        T = dec_inputs.shape[1]
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
        return tied_logits(x, self.embed.weight)


def build_length_head(cfg: ModelConfig) -> nn.Linear:
    """The length classifier (fairseq NAT's `embed_length`): classes 0..max_length from the pooled
    encoder states (NAT / CMLM: the content length T; DAT, model.upsample predict: n, counting
    <s> and </s>)."""
    return nn.Linear(cfg.dim, cfg.max_length + 1)


def masked_mean_length_logits(
    length_head: nn.Linear,
    states: torch.Tensor,  # (B, S, D)
    src_mask: torch.Tensor,  # (B, S) bool
) -> torch.Tensor:  # (B, C)
    """The length head's scores of the mean of the valid encoder states."""
    mask = src_mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    return length_head(pooled)


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


# ---------------------------------------------------------------------------------------------
# Loss and glancing


class NatLoss(NamedTuple):
    loss: torch.Tensor  # scalar: token + length_weight * length
    token_nll: torch.Tensor  # scalar, detached
    length_nll: torch.Tensor  # scalar, detached


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
    # torch's label smoothing is the cross-entropy to (1 - eps) * onehot(y) + eps / V, the same
    # quantity as (1 - eps) * NLL + eps * mean_v(-log p_v); at least float32, as log_softmax_fp32
    logits = token_logits.to(torch.promote_types(token_logits.dtype, torch.float32))
    nll = F.cross_entropy(
        logits.flatten(0, 1), tgt_ids.flatten(), reduction="none", label_smoothing=label_smoothing
    ).view_as(tgt_ids)  # (B, T)
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


# ---------------------------------------------------------------------------------------------
# Candidate scores


def token_logp_sums(
    token_logits: torch.Tensor,  # (R, T, V)
    tokens: torch.Tensor,  # (R, T)
    lens: torch.Tensor,  # (R,)
) -> torch.Tensor:  # (R,)
    """sum_{t < T_r} log p(tokens[r, t]) of each row, log-softmax in at least float32."""
    logp = log_softmax_fp32(token_logits).gather(-1, tokens.unsqueeze(-1))
    valid = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < lens.unsqueeze(1)
    return (logp.squeeze(-1) * valid).sum(-1)
