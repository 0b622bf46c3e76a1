"""CTC non-autoregressive translation (Libovický & Helcl 2018) and CTC+GLAT (Gu & Kong 2021), so
that CoDAT's ranking losses can be trained on a CTC NAT as well as on DAT. model.arch ctc trains
with `ctc_step` (CTC+GLAT when the glancing ratio is > 0) and decodes with `ctc_greedy_decoder`;
the CTC maths is in `codat.ctc_maths`.

Choices (documented once, here):
- Output positions: L_b = floor(upsample_scale * m_b), m_b the source length counting </s>
  (`dat.graph_lengths` with min_length 1), clipped to [1, max_graph_positions]. Position t emits
  one of V + 1 classes: the V vocabulary ids and a blank, class V (`CtcOutput.token_logits` is
  (B, L, V + 1)).
- Tied weights: one embedding matrix is the encoder input, the decoder input and the output
  projection (as VanillaNAT / DAT). The blank has one extra learned vector, tied the same way: it
  is the blank's output vector and (scaled by sqrt(D), like the token embeddings) the decoder
  input of a glanced blank. No output bias, as for the tokens.
- Decoder input = "uniform copy" of the source token embeddings onto the L_b positions
  (`nat_core.uniform_copy_indices`: position t reads source content token
  round(t * (m' - 1) / (L_b - 1)), m' = m_b - 1 tokens without </s>; </s> only for an empty
  source), plus learned positions (max_graph_positions); a bidirectional decoder (DecoderLayer
  with the valid-position key mask) cross-attends to the encoder. Gu & Kong upsample the source
  the same way; Libovický & Helcl split projected encoder states instead.
- Targets are the content y (no <s>/</s>, `nat_core.content_targets`).
- Loss: -log p_CTC(y | x) / max(|y|, 1), mean over sentences (DAT's length-normalised DP loss).
  log-softmax and CTC are float32 (float64 stays) even under bf16 autocast. A sentence with no
  alignment contributes 0 and is counted in stats["invalid"].
- CTC+GLAT (Gu & Kong 2021): pass 1 (no grad, current mode) runs the plain inputs; the Viterbi
  alignment of the reference (`ctc_best_alignment`, blanks included) gives a label per position;
  `ctc_glance` reveals N = floor(ratio * d + 1/2) positions drawn uniformly among the L_b, d the
  Hamming distance between pass 1's argmax (over V + 1) and that alignment; their decoder inputs
  become the embeddings of their aligned labels (a blank: the blank vector). Pass 2 replays pass
  1's dropout masks (`glancing.replay_rng`). Revealed positions stay in the CTC loss, as in Gu &
  Kong.
- CoDAT on CTC (`ctc_codat_term`): sample K collapsed outputs per sentence from the un-glanced
  output (every position independently from softmax(logits / temperature)) -> reward (sentence
  BLEU) -> select -> score by log p_CTC(y_k | x) / max(|y_k|, 1), the marginal over all
  alignments (CTC's analogue of DAT's `samples_log_q`), with grad -> `objectives.sample_loss`.
  Top-p and the vertex-level top-tokens of DAT's Algorithm 2 have no CTC counterpart here.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from codat.config import CodatConfig, DecodeConfig, ModelConfig, RunConfig
from codat.ctc_maths import (
    ctc_glance,
    ctc_greedy_decode,
    ctc_log_likelihood,
    ctc_output_scores,
    ctc_sample,
)
from codat.dat import graph_lengths
from codat.data import PAD_ID, Batch
from codat.glancing import replay_rng
from codat.layers import bert_init, decoder_stack, shared_embedding_and_encoder, tied_logits
from codat.nat_core import content_targets, uniform_copy_indices
from codat.objectives import log_softmax_fp32
from codat.rewards import sentence_bleu
from codat.selection import sample_term, select_samples


class CtcOutput(NamedTuple):
    token_logits: torch.Tensor  # (B, L, V + 1): last class = blank
    out_lens: torch.Tensor  # (B,) L_b, positions t >= L_b are padding


class CtcEncoded(NamedTuple):
    states: torch.Tensor  # (B, S, D)
    src_mask: torch.Tensor  # (B, S) bool
    out_lens: torch.Tensor  # (B,)


class CTCModel(nn.Module):
    """Encoder, uniformly upsampled source embeddings as decoder input, bidirectional decoder,
    tied output projection plus a blank class (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.embed, self.encoder = shared_embedding_and_encoder(cfg)  # embed shared by all
        self.positions = nn.Embedding(cfg.max_graph_positions, D)
        self.decoder_layers = decoder_stack(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blank = nn.Parameter(torch.empty(D))  # blank output vector = blank input embedding
        self.apply(bert_init)
        nn.init.normal_(self.blank, mean=0.0, std=0.02)

    @property
    def blank_id(self) -> int:
        return self.cfg.vocab_size

    def output_lengths(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """L_b = floor(upsample_scale * m_b), m_b counting </s>, clipped to [1, max positions]."""
        return graph_lengths(
            src_lens,
            upsample_scale=self.cfg.upsample_scale,
            max_positions=self.cfg.max_graph_positions,
            min_length=1,
        )

    def train_positions(self, src_lens: torch.Tensor, tgt_lens: torch.Tensor) -> torch.Tensor:
        """Decoder positions of each training pair: the upsampled source (`output_lengths`)."""
        return self.output_lengths(src_lens)

    def max_target_lens(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """The longest trainable <s> y </s> of each source: the output size L_b (as DAT's graph
        size bounds its targets; a content y needs L_b >= |y| + its adjacent repeats)."""
        return self.output_lengths(src_lens)

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> CtcEncoded:
        S = src_ids.shape[1]
        src_mask = torch.arange(S, device=src_ids.device).unsqueeze(0) < src_lens.unsqueeze(1)
        return CtcEncoded(self.encoder(src_ids, src_mask), src_mask, self.output_lengths(src_lens))

    def upsampled_inputs(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
    ) -> torch.Tensor:  # (B, L, D), L = max L_b
        """Decoder input embeddings: the source content embeddings uniformly copied onto the L_b
        positions (scaled by sqrt(D); no positions). Padding positions read source position 0."""
        out_lens = self.output_lengths(src_lens)
        idx = uniform_copy_indices(src_lens, out_lens, int(out_lens.max()))
        return self.embed(src_ids.gather(1, idx)) * self.encoder.scale

    def label_embeddings(self, labels: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        """Decoder input embeddings of CTC labels in [0, V]: tokens as the encoder embeds them,
        the blank (V) by the blank vector, both scaled by sqrt(D)."""
        table = torch.cat([self.embed.weight, self.blank.unsqueeze(0)], dim=0)  # (V + 1, D)
        return F.embedding(labels, table) * self.encoder.scale

    def decode(self, enc: CtcEncoded, dec_inputs: torch.Tensor) -> CtcOutput:  # (B, L, D)
        B, L, _ = dec_inputs.shape
        if L != int(enc.out_lens.max()):
            raise ValueError(
                f"decoder inputs have {L} positions, expected {int(enc.out_lens.max())}"
            )
        if L > self.cfg.max_graph_positions:
            raise ValueError(
                f"{L} positions exceed max_graph_positions={self.cfg.max_graph_positions}"
            )
        pos = torch.arange(L, device=dec_inputs.device)
        mask = pos.unsqueeze(0) < enc.out_lens.unsqueeze(1)  # (B, L)
        x = self.drop(dec_inputs + self.positions(pos))
        for layer in self.decoder_layers:
            x = layer(x, mask, enc.states, enc.src_mask)
        token_logits = tied_logits(x, self.embed.weight)  # (B, L, V), tied
        blank_logits = tied_logits(x, self.blank.unsqueeze(0))  # (B, L, 1), the same way
        return CtcOutput(torch.cat([token_logits, blank_logits], dim=-1), enc.out_lens)

    def forward(
        self,
        src_ids: torch.Tensor,  # (B, S) </s>-terminated
        src_lens: torch.Tensor,  # (B,)
        dec_inputs: torch.Tensor | None = None,  # (B, L, D) glanced inputs; None = upsampled
    ) -> CtcOutput:
        enc = self.encode(src_ids, src_lens)
        if dec_inputs is None:
            dec_inputs = self.upsampled_inputs(src_ids, src_lens)
        return self.decode(enc, dec_inputs)


# ---------------------------------------------------------------------------------------------
# Training: glancing, loss, the step


def ctc_glat_inputs(
    model: CTCModel,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    targets: torch.Tensor,  # (B, N) content ids
    target_lens: torch.Tensor,  # (B,)
    *,
    ratio: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L, D) with grad, (B, L) bool
    """Decoder inputs for pass 2 and the reveal mask. ratio = 0 skips pass 1 and returns the plain
    upsampled inputs. The global RNG (CPU and, for CUDA inputs, CUDA) is restored after pass 1."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"glancing ratio must be in [0, 1], got {ratio}")
    plain = model.upsampled_inputs(src_ids, src_lens)  # (B, L, D)
    if ratio == 0:
        return plain, torch.zeros(plain.shape[:2], dtype=torch.bool, device=plain.device)
    with replay_rng(src_ids.device), torch.no_grad():
        out = model(src_ids, src_lens, plain.detach())
        reveal, aligned = ctc_glance(
            log_softmax_fp32(out.token_logits), out.out_lens, targets, target_lens,
            ratio=ratio, generator=generator,
        )  # fmt: skip
    glanced = model.label_embeddings(aligned.clamp(min=0)).to(plain.dtype)
    return torch.where(reveal.unsqueeze(-1), glanced, plain), reveal


def _normalised_nll(ll: torch.Tensor, target_lens: torch.Tensor) -> torch.Tensor:  # (B,)
    return -ll / target_lens.clamp(min=1).to(ll.dtype)


def ctc_training_loss(
    model: CTCModel,
    batch: Batch,
    *,
    ratio: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's CTC (ratio = 0) or CTC+GLAT (ratio > 0) loss: the mean over sentences of
    -log p_CTC(y | x) / max(|y|, 1); sentences without an alignment add 0 and are counted.
    stats: "invalid", and with glancing "glanced" (revealed / all valid positions)."""
    targets, target_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    reveal = None
    dec_inputs = None
    if ratio > 0:
        dec_inputs, reveal = ctc_glat_inputs(
            model, batch.src_ids, batch.src_lens, targets, target_lens,
            ratio=ratio, generator=generator,
        )  # fmt: skip
    elif ratio < 0:
        raise ValueError(f"glancing ratio must be in [0, 1], got {ratio}")
    out = model(batch.src_ids, batch.src_lens, dec_inputs)
    ll = ctc_log_likelihood(log_softmax_fp32(out.token_logits), out.out_lens, targets, target_lens)
    invalid = ~torch.isfinite(ll)
    per_sentence = _normalised_nll(ll.masked_fill(invalid, 0.0), target_lens)
    stats = {"invalid": float(invalid.sum())}
    if reveal is not None:
        stats["glanced"] = float(reveal.sum()) / max(int(out.out_lens.sum()), 1)
    return per_sentence.mean(), stats


def ctc_step(
    model: CTCModel,
    batch: Batch,
    *,
    cfg: RunConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The CTC (+GLAT when ratio > 0) loss of one micro-batch and its stats; for train.objective
    codat / reward plus codat.weight times `ctc_codat_term` on the un-glanced output."""
    with autocast:
        loss, stats = ctc_training_loss(model, batch, ratio=ratio, generator=generator)
    objective = cfg.train.objective
    if objective == "dp":
        return loss, stats
    stats["dp_loss"] = float(loss.detach())
    term, term_stats = ctc_codat_term(
        model,
        batch,
        objective=objective,
        codat=cfg.codat,
        alpha=cfg.codat.gate(),
        generator=generator,
        autocast=autocast,
    )
    stats.update(term_stats)
    return loss + cfg.codat.weight * term, stats


def ctc_sentence_loss(model: CTCModel, batch: Batch) -> torch.Tensor:  # (B,)
    """Per-sentence -log p_CTC(y | x) / max(|y|, 1) without glancing or grad (validation), in the
    model's current mode; inf where the sentence has no alignment."""
    targets, target_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    with torch.no_grad():
        out = model(batch.src_ids, batch.src_lens)
        logp = log_softmax_fp32(out.token_logits)
        return _normalised_nll(
            ctc_log_likelihood(logp, out.out_lens, targets, target_lens), target_lens
        )


def ctc_codat_term(
    model: CTCModel,
    batch: Batch,
    *,
    objective: str,  # "codat" or "reward"
    codat: CodatConfig,
    alpha: float,  # gate on the reference's CTC loss (math.inf: every sentence)
    generator: torch.Generator | None,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CoDAT's extra loss on CTC samples: one un-glanced forward with grad; sample K =
    codat.samples outputs (temperature codat.temperature), reward them by sentence BLEU, select
    (the alpha gate, then codat's best `kept` or reward's first `reward_samples`), score them by
    their CTC marginal on that output and compare (`objectives.sample_loss`). Scaled by the
    fraction of sentences through the gate."""
    ref_ids, ref_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    with autocast:
        out = model(batch.src_ids, batch.src_lens)  # un-glanced, with grad
    tokens, lengths = ctc_sample(
        out.token_logits, out.out_lens, codat.samples, temperature=codat.temperature,
        generator=generator,
    )  # fmt: skip
    with torch.no_grad():
        logp = log_softmax_fp32(out.token_logits.detach())
        ll = ctc_log_likelihood(logp, out.out_lens, ref_ids, ref_lens)
        rewards = sentence_bleu(tokens, lengths, ref_ids, ref_lens).float() / 100
    filter_key = None
    if codat.filter == "score":  # rank by the model's CTC marginal instead of the reward
        with torch.no_grad():
            filter_key = ctc_output_scores(out.token_logits.detach(), out.out_lens, tokens, lengths)
    selected = select_samples(
        tokens,
        lengths,
        rewards,
        _normalised_nll(ll, ref_lens),
        objective=objective,
        count=codat.per_sentence(objective),
        alpha=alpha,
        filter_key=filter_key,
        pad_id=PAD_ID,
    )
    scores, chosen = None, selected.chosen
    if len(chosen.rows):
        rows = chosen.rows
        scores = ctc_output_scores(
            out.token_logits[rows], out.out_lens[rows], chosen.tokens, chosen.lengths
        )  # (b, k), with grad
    return sample_term(
        scores,
        selected,
        objective=objective,
        margin=codat.margin,
        tie=codat.tie,
        pair_average=codat.pair_average,
        reward_temperature=codat.reward_temperature,
        target_lens=None if scores is None else chosen.lengths.clamp(min=1),
    )


def ctc_sequence_scores(
    model: CTCModel,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    tokens: torch.Tensor,  # (B, K, T)
    lengths: torch.Tensor,  # (B, K)
) -> torch.Tensor:  # (B, K) with grad
    """`ctc_output_scores` of the candidates under a fresh un-glanced forward pass."""
    out = model(src_ids, src_lens)
    return ctc_output_scores(out.token_logits, out.out_lens, tokens, lengths)


@torch.no_grad()
def ctc_greedy_decoder(
    model: CTCModel,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """Best-path decoding (`ctc_greedy_decode`) of the model's output, in its current mode."""
    out = model(src_ids, src_lens)
    return ctc_greedy_decode(out.token_logits, out.out_lens)
