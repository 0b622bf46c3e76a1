"""Vanilla NAT (Gu et al. 2018) and GLAT (Qian et al. 2021) baselines with noisy parallel
decoding (NPD), so that CoDAT's ranking losses can be trained on a vanilla NAT (CoDAT §3.3,
Table 2: GLAT + constraints on NPD samples). model.arch nat trains with `nat_step` (never
glances), glat with `glat_step`; both decode with `nat_argmax_decoder` / `nat_npd_decoder`.

Choices (documented once, here; the shared ones in `codat.nat_core`):
- Decoder input = "uniform copy" of the source embeddings (Gu et al. 2018, "Decoder Inputs"): t of T
  takes source content token round(t * (S'-1) / (T-1)), S' = source length without </s> (the
  </s> itself only when the source is empty), rounding half up; plus learned decoder positions.
- Output = the argmax token of every position. Vanilla NAT does not collapse repeats; `dedup`
  optionally removes consecutive duplicates. Specials (<pad>, <s>, </s>) are dropped from the
  final output, as the DAT decoders do.
- GLAT: pass 1 (no grad) predicts from the copied source, `nat_core.glancing_reveal` picks the
  positions whose decoder inputs become the reference embeddings; the loss covers only the other
  positions; pass 2 replays pass 1's dropout masks (`glancing.replay_rng`). The ratio is annealed
  with `codat.glancing.glance_ratio`.
- Decoding and CoDAT's candidates: noisy parallel decoding (`codat.npd`).
- CoDAT on NPD samples (`nat_codat_term`): sample (NPD, codat.noise) -> reward (sentence BLEU) ->
  select (`selection`) -> score (`nat_sample_scores`, with grad) -> `objectives.sample_loss`.
"""

from __future__ import annotations

import contextlib

import torch

from codat.config import CodatConfig, DecodeConfig, RunConfig
from codat.data import PAD_ID, Batch
from codat.glancing import replay_rng
from codat.nat_core import (
    LengthNAT,
    NatLoss,
    NatOutput,
    content_targets,
    glancing_reveal,
    nat_loss,
    repeat_encoded,
    token_logp_sums,
    uniform_copy_indices,
)
from codat.npd import nat_decode, nat_sample_scores, npd_samples, pick_best_npd
from codat.rewards import sentence_bleu
from codat.selection import sample_term, select_samples


class VanillaNAT(LengthNAT):
    """Gu et al. (2018) NAT without fertilities: shared embeddings, Encoder, length classifier,
    uniformly copied source embeddings as decoder input, bidirectional decoder, tied output."""

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
# Training: glancing, loss


def glat_inputs(
    model: VanillaNAT,
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

    The global RNG is restored after pass 1 (`replay_rng`), so pass 2 draws the same dropout
    masks. ratio = 0 skips pass 1.
    """
    T = tgt_ids.shape[1]
    valid = torch.arange(T, device=tgt_ids.device).unsqueeze(0) < tgt_lens.unsqueeze(1)
    copied = model.copy_inputs(src_ids, src_lens, tgt_lens, width=T)
    if ratio == 0:
        return copied, valid
    with replay_rng(src_ids.device), torch.no_grad():
        pred = model(src_ids, src_lens, tgt_lens, copied.detach()).token_logits.argmax(-1)
        reveal = glancing_reveal(pred, tgt_ids, tgt_lens, ratio=ratio, generator=generator)
    dec_inputs = torch.where(reveal.unsqueeze(-1), model.embed_tokens(tgt_ids), copied)
    return dec_inputs, valid & ~reveal


def glat_loss(
    model: VanillaNAT,
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
        model, batch.src_ids, batch.src_lens, tgt_ids, tgt_lens, ratio=ratio, generator=generator
    )
    out = model(batch.src_ids, batch.src_lens, tgt_lens, dec_inputs)
    return nat_loss(
        out.token_logits,
        tgt_ids,
        loss_mask,
        out.length_logits,
        tgt_lens.clamp(max=model.max_length),
        length_weight=length_weight,
        label_smoothing=label_smoothing,
    )


# ---------------------------------------------------------------------------------------------
# The training steps, validation loss and CoDAT's term


def glat_step(
    model: VanillaNAT,
    batch: Batch,
    *,
    cfg: RunConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GLAT's loss of one micro-batch (`glat_loss` at the glancing ratio; stats "length_nll" and,
    when it glances, "glance"); for train.objective codat / reward plus codat.weight times
    `nat_codat_term` on NPD samples (CoDAT Table 2: GLAT + NPD)."""
    with autocast:
        result = glat_loss(
            model,
            batch,
            ratio=ratio,
            generator=generator,
            label_smoothing=cfg.train.label_smoothing,
        )
    stats = {"length_nll": float(result.length_nll)}
    if ratio > 0:
        stats["glance"] = float(ratio)
    objective = cfg.train.objective
    if objective == "dp":
        return result.loss, stats
    stats["dp_loss"] = float(result.loss.detach())
    term, term_stats = nat_codat_term(
        model,
        batch,
        objective=objective,
        codat=cfg.codat,
        alpha=cfg.codat.gate(),
        generator=generator,
        autocast=autocast,
    )
    stats.update(term_stats)
    return result.loss + cfg.codat.weight * term, stats


def nat_step(
    model: VanillaNAT,
    batch: Batch,
    *,
    cfg: RunConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The vanilla NAT's loss (Gu et al. 2018): `glat_step` that never glances (`ratio` is
    ignored)."""
    return glat_step(model, batch, cfg=cfg, ratio=0.0, generator=generator, autocast=autocast)


@torch.no_grad()
def nat_sentence_loss(model: VanillaNAT, batch: Batch) -> torch.Tensor:  # (B,)
    """Token NLL per content token at the reference length (no length term), no grad, the model's
    current mode. A reference longer than max_length is scored on its first max_length tokens."""
    tgt_ids, tgt_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    tgt_lens = tgt_lens.clamp(max=model.max_length)
    lens = tgt_lens.clamp(min=1)
    out = model(batch.src_ids, batch.src_lens, lens)
    return (
        -token_logp_sums(out.token_logits, tgt_ids[:, : out.token_logits.shape[1]], tgt_lens) / lens
    )


def nat_codat_term(
    model: VanillaNAT,
    batch: Batch,
    *,
    objective: str,  # "codat" or "reward"
    codat: CodatConfig,
    alpha: float,  # gate on nat_sentence_loss (math.inf: every sentence)
    generator: torch.Generator | None,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CoDAT's extra loss on NPD samples (paper §3, Table 2): sample K = codat.samples candidates
    (noise codat.noise), reward them by sentence BLEU, select (the alpha gate, then codat's best
    `kept` or reward's first `reward_samples`), score them with grad (`nat_sample_scores`) and
    compare (`objectives.sample_loss`). Scaled by the fraction of sentences through the gate."""
    ref_ids, ref_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    with torch.no_grad(), autocast:
        samples = npd_samples(
            model,
            batch.src_ids,
            batch.src_lens,
            k=codat.samples,
            sigma=codat.noise,
            generator=generator,
        )
        ref_loss = nat_sentence_loss(model, batch)
    with torch.no_grad():
        rewards = sentence_bleu(samples.tokens, samples.lengths, ref_ids, ref_lens).float() / 100
    selected = select_samples(
        samples.tokens,
        samples.lengths,
        rewards,
        ref_loss,
        objective=objective,
        count=codat.per_sentence(objective),
        alpha=alpha,
        # codat.filter score: the NPD candidates' own length-normalised log-probs
        filter_key=samples.scores if codat.filter == "score" else None,
        pad_id=PAD_ID,
    )
    scores, chosen = None, selected.chosen
    if len(chosen.rows):
        rows = chosen.rows
        with autocast:
            scores = nat_sample_scores(
                model, batch.src_ids[rows], batch.src_lens[rows], chosen.tokens, chosen.lengths
            ).float()  # (b, k), with grad
    return sample_term(
        scores,
        selected,
        objective=objective,
        margin=codat.margin,
        tie=codat.tie,
        pair_average=codat.pair_average,
        reward_temperature=codat.reward_temperature,
        target_lens=None if scores is None else chosen.lengths,
    )


# ---------------------------------------------------------------------------------------------
# Decoders (generate.DECODERS["nat"] and ["glat"])


@torch.no_grad()
def nat_argmax_decoder(
    model: VanillaNAT,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """Argmax decoding of the dc.length_beam likeliest lengths, the best by mean log-prob."""
    return nat_decode(model, src_ids, src_lens, length_beam=dc.length_beam)


@torch.no_grad()
def nat_npd_decoder(
    model: VanillaNAT,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """Noisy parallel decoding: about dc.samples candidates (dc.samples // dc.length_beam per
    length, at least 1) with noise std dc.noise, the best by its noise-free mean log-prob."""
    samples = npd_samples(
        model,
        src_ids,
        src_lens,
        k=max(dc.samples // dc.length_beam, 1),
        sigma=dc.noise,
        generator=generator,
        length_beam=dc.length_beam,
    )
    return pick_best_npd(samples)
