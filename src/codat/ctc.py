"""CTC non-autoregressive translation (Libovický & Helcl 2018) and CTC+GLAT (Gu & Kong 2021), so
that CoDAT's ranking losses can be trained on a CTC NAT as well as on DAT.

Choices (documented once, here):
- Output positions: L_b = floor(upsample_scale * m_b), m_b the source length counting </s> (as
  DAT's graph size), clipped to [1, max_graph_positions]. Position t emits one of V + 1 classes:
  the V vocabulary ids and a blank, class V (`CtcOutput.token_logits` is (B, L, V + 1)).
- Tied weights: one embedding matrix is the encoder input, the decoder input and the output
  projection (as VanillaNAT / DAT). The blank has one extra learned vector, tied the same way: it
  is the blank's output vector and (scaled by sqrt(D), like the token embeddings) the decoder
  input of a glanced blank. No output bias, as for the tokens.
- Decoder input = "uniform copy" of the source token embeddings onto the L_b positions
  (`codat.nat.uniform_copy_indices`: position t reads source content token
  round(t * (m' - 1) / (L_b - 1)), m' = m_b - 1 tokens without </s>; </s> only for an empty
  source), plus learned positions (max_graph_positions); a bidirectional decoder (DecoderLayer
  with the valid-position key mask) cross-attends to the encoder. Gu & Kong upsample the source
  the same way; Libovický & Helcl split projected encoder states instead.
- Targets are the content y (no <s>/</s>, `codat.nat.content_targets`). Collapse = merge
  consecutive repeats, then drop blanks; <pad>/<s>/</s> are ordinary classes for the CTC maths and
  are dropped from decoded output afterwards (as DAT's decoders drop them).
- Loss: -log p_CTC(y | x) / max(|y|, 1), mean over sentences (DAT's length-normalised DP loss).
  log-softmax and CTC are float32 (float64 stays) even under bf16 autocast. A sentence with no
  alignment (L_b < |y| + #adjacent repeats) contributes 0 and is counted in stats["invalid"]; its
  target is replaced by the empty one before `F.ctc_loss`, so no inf/NaN reaches the backward.
- CTC+GLAT (Gu & Kong 2021): pass 1 (no grad, current mode) runs the plain inputs; the Viterbi
  alignment of the reference (`ctc_best_alignment`, blanks included) gives a label per position;
  d = Hamming distance between pass 1's argmax (over V + 1) and it over the L_b positions; reveal
  N = floor(ratio * d + 1/2) positions drawn uniformly among the L_b (`codat.nat.glancing_reveal`,
  the rounding of codat's DAT glancing); their decoder inputs become the embeddings of their
  aligned labels (a blank: the blank vector). The global RNG is restored after pass 1, so pass 2
  has the same dropout masks. Revealed positions stay in the CTC loss, as in Gu & Kong.
- CoDAT on CTC: `ctc_sample` draws K collapsed samples per sentence (every position independently
  from softmax(logits / temperature)); `ctc_output_scores` / `ctc_sequence_scores` give
  log p_CTC(y_k | x) / max(|y_k|, 1), the marginal over all alignments (CTC's analogue of DAT's
  `samples_log_q`), with grad, for `objectives.contrastive_loss` / `reinforce_loss`. Top-p and
  the vertex-level top-tokens of DAT's Algorithm 2 have no CTC counterpart here.
- Sample scores use `F.ctc_loss` on a compact class set per sample, [its distinct tokens,
  blank, rest], where rest = log(1 - sum of the others) keeps every row a distribution: the
  (B*K, L, V + 1) log-probs of a full-vocabulary call do not fit in memory for K ~ 32 and
  V ~ 40k. `F.ctc_loss`'s backward returns exp(log_probs) - posterior (the gradient w.r.t. the
  logits of a softmax), not the gradient w.r.t. its log_probs input; because the compact row is a
  coarse-graining of the softmax, the exp(log_probs) part cancels in the chain rule and the
  gradient w.r.t. the model's logits is exact (checked against brute force in the tests).
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
from codat.nat import _log_softmax, content_targets, glancing_reveal, uniform_copy_indices

NEG_INF = float("-inf")
_UNUSED_LOGP = -1e4  # log-prob of a compact class no target uses: exp() is exactly 0


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

    def out_lens(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """L_b = floor(upsample_scale * m_b), m_b counting </s>, clipped to [1, max positions]."""
        L = torch.floor(src_lens.double() * self.cfg.upsample_scale).long()
        return L.clamp(min=1, max=self.cfg.max_graph_positions)

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> CtcEncoded:
        S = src_ids.shape[1]
        src_mask = torch.arange(S, device=src_ids.device).unsqueeze(0) < src_lens.unsqueeze(1)
        return CtcEncoded(self.encoder(src_ids, src_mask), src_mask, self.out_lens(src_lens))

    def upsampled_inputs(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
    ) -> torch.Tensor:  # (B, L, D), L = max L_b
        """Decoder input embeddings: the source content embeddings uniformly copied onto the L_b
        positions (scaled by sqrt(D); no positions). Padding positions read source position 0."""
        out_lens = self.out_lens(src_lens)
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
        token_logits = x @ self.embed.weight.t()  # (B, L, V), tied
        blank_logits = x @ self.blank.to(x.dtype).unsqueeze(1)  # (B, L, 1)
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
# CTC likelihood and alignment


def ctc_min_lengths(
    targets: torch.Tensor,  # (B, N) label ids, padded
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,)
    """The fewest positions an alignment of each target needs: |y| + #(y_j == y_{j-1})."""
    N = targets.shape[1]
    pos = torch.arange(1, N, device=targets.device).unsqueeze(0)
    repeats = (targets[:, 1:] == targets[:, :-1]) & (pos < target_lens.unsqueeze(1))
    return target_lens + repeats.sum(1)


def _ctc_ll(
    log_probs: torch.Tensor,  # (R, L, C) float
    in_lens: torch.Tensor,  # (R,)
    targets: torch.Tensor,  # (R, N) in [0, C), != blank
    target_lens: torch.Tensor,  # (R,)
    blank: int,
) -> torch.Tensor:  # (R,) -inf where no alignment exists, never NaN in the backward
    feasible = ctc_min_lengths(targets, target_lens) <= in_lens
    safe_lens = torch.where(feasible, target_lens, torch.zeros_like(target_lens))
    nll = F.ctc_loss(
        log_probs.transpose(0, 1),  # (L, R, C)
        targets,
        in_lens,
        safe_lens,
        blank=blank,
        reduction="none",
        zero_infinity=False,
    )
    return torch.where(feasible, -nll, torch.full_like(nll, NEG_INF))


def ctc_log_likelihood(
    logp: torch.Tensor,  # (B, L, V + 1) log-softmax, blank = V
    out_lens: torch.Tensor,  # (B,)
    targets: torch.Tensor,  # (B, N) content ids, PAD_ID padded
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,) log p_CTC(y | x), -inf where no alignment
    """The CTC marginal over all alignments (`F.ctc_loss`, full vocabulary)."""
    return _ctc_ll(logp, out_lens, targets, target_lens, blank=logp.shape[-1] - 1)


def ctc_best_alignment(
    logp: torch.Tensor,  # (B, L, V + 1) log-probs, blank = V
    out_lens: torch.Tensor,  # (B,) L_b
    targets: torch.Tensor,  # (B, N) content ids, padded
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B, L) long
    """The label (blank = V) every position takes on the most probable CTC path of the target
    (Viterbi over the 2N + 1 blank-interleaved states, vectorised over sentences and states, a loop
    over positions). Positions t >= L_b, and every position of a sentence with no alignment,
    are -1."""
    B, L, C = logp.shape
    N = targets.shape[1]
    blank = C - 1
    S = 2 * N + 1
    dev = logp.device
    z = torch.full((B, S), blank, dtype=torch.long, device=dev)  # blank-interleaved labels
    z[:, 1::2] = targets
    s_idx = torch.arange(S, device=dev).unsqueeze(0)  # (1, S)
    state_ok = s_idx <= 2 * target_lens.unsqueeze(1)  # (B, S)
    skip_ok = torch.zeros(B, S, dtype=torch.bool, device=dev)
    skip_ok[:, 2:] = (z[:, 2:] != blank) & (z[:, 2:] != z[:, :-2])  # s-2 -> s allowed
    em = logp.gather(-1, z.unsqueeze(1).expand(B, L, S))  # (B, L, S)
    em = em.masked_fill(~state_ok.unsqueeze(1), NEG_INF)
    delta = em[:, 0].masked_fill(s_idx >= 2, NEG_INF)  # (B, S): start in state 0 or 1
    ninf = delta.new_full((B, 1), NEG_INF)
    back = []  # back[t - 1]: (B, S) how many states the best path moved at step t (0, 1, 2)
    for t in range(1, L):
        one = torch.cat([ninf, delta[:, :-1]], dim=1)
        two = torch.cat([ninf, ninf, delta[:, :-2]], dim=1)[:, :S].masked_fill(~skip_ok, NEG_INF)
        best, arg = torch.stack([delta, one, two], dim=-1).max(dim=-1)  # (B, S)
        active = (t < out_lens).unsqueeze(1)  # padding positions keep the final scores
        delta = torch.where(active, best + em[:, t], delta)
        back.append(torch.where(active, arg, torch.zeros_like(arg)))
    end_blank = 2 * target_lens  # (B,) last state: the final blank or the last token
    end_token = (end_blank - 1).clamp(min=0)
    score_blank = delta.gather(1, end_blank.unsqueeze(1)).squeeze(1)
    score_token = delta.gather(1, end_token.unsqueeze(1)).squeeze(1)
    score_token = score_token.masked_fill(target_lens == 0, NEG_INF)
    state = torch.where(score_token > score_blank, end_token, end_blank)  # (B,)
    feasible = torch.maximum(score_blank, score_token) > NEG_INF
    labels = torch.empty(B, L, dtype=torch.long, device=dev)
    for t in range(L - 1, -1, -1):
        labels[:, t] = z.gather(1, state.unsqueeze(1)).squeeze(1)
        if t > 0:
            state = state - back[t - 1].gather(1, state.unsqueeze(1)).squeeze(1)
    valid = (torch.arange(L, device=dev).unsqueeze(0) < out_lens.unsqueeze(1)) & feasible[:, None]
    return labels.masked_fill(~valid, -1)


# ---------------------------------------------------------------------------------------------
# Training: glancing, loss


def ctc_glance(
    logp: torch.Tensor,  # (B, L, V + 1) pass-1 log-probs
    out_lens: torch.Tensor,  # (B,)
    targets: torch.Tensor,  # (B, N) content ids
    target_lens: torch.Tensor,  # (B,)
    *,
    ratio: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L) bool reveal, (B, L) long aligned labels
    """CTC+GLAT's choice: the Viterbi alignment of the reference, d_b = #positions t < L_b whose
    argmax differs from the aligned label (blank included), and N_b = floor(ratio * d_b + 1/2)
    positions revealed uniformly among the L_b. Sentences with no alignment reveal nothing."""
    aligned = ctc_best_alignment(logp, out_lens, targets, target_lens)  # (B, L)
    feasible = aligned[:, 0] >= 0  # L_b >= 1, so position 0 is aligned iff the sentence is
    span = torch.where(feasible, out_lens, torch.zeros_like(out_lens))
    reveal = glancing_reveal(logp.argmax(-1), aligned, span, ratio=ratio, generator=generator)
    return reveal, aligned


def ctc_glat_inputs(
    core: CTCModel,  # the unwrapped module: pass 1 needs no DDP
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
    plain = core.upsampled_inputs(src_ids, src_lens)  # (B, L, D)
    if ratio == 0:
        return plain, torch.zeros(plain.shape[:2], dtype=torch.bool, device=plain.device)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if src_ids.is_cuda else None
    with torch.no_grad():
        out = core(src_ids, src_lens, plain.detach())
        reveal, aligned = ctc_glance(
            _log_softmax(out.token_logits), out.out_lens, targets, target_lens,
            ratio=ratio, generator=generator,
        )  # fmt: skip
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)
    glanced = core.label_embeddings(aligned.clamp(min=0)).to(plain.dtype)
    return torch.where(reveal.unsqueeze(-1), glanced, plain), reveal


def _normalised_nll(ll: torch.Tensor, target_lens: torch.Tensor) -> torch.Tensor:  # (B,)
    return -ll / target_lens.clamp(min=1).to(ll.dtype)


def ctc_training_loss(
    model: nn.Module,  # CTCModel, possibly DDP-wrapped
    core: CTCModel,  # the unwrapped module, for the no-grad glancing pass
    batch: Batch,
    *,
    ratio: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict]:
    """One micro-batch's CTC (ratio = 0) or CTC+GLAT (ratio > 0) loss: the mean over sentences of
    -log p_CTC(y | x) / max(|y|, 1); sentences without an alignment add 0 and are counted.
    stats: "invalid" (int), and with glancing "glanced" (revealed / all valid positions)."""
    targets, target_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    reveal = None
    dec_inputs = None
    if ratio > 0:
        dec_inputs, reveal = ctc_glat_inputs(
            core, batch.src_ids, batch.src_lens, targets, target_lens,
            ratio=ratio, generator=generator,
        )  # fmt: skip
    elif ratio < 0:
        raise ValueError(f"glancing ratio must be in [0, 1], got {ratio}")
    out = model(batch.src_ids, batch.src_lens, dec_inputs)
    ll = ctc_log_likelihood(_log_softmax(out.token_logits), out.out_lens, targets, target_lens)
    invalid = ~torch.isfinite(ll)
    per_sentence = _normalised_nll(ll.masked_fill(invalid, 0.0), target_lens)
    stats: dict = {"invalid": int(invalid.sum())}
    if reveal is not None:
        stats["glanced"] = float(reveal.sum()) / max(int(out.out_lens.sum()), 1)
    return per_sentence.mean(), stats


def ctc_sentence_loss(core: CTCModel, batch: Batch) -> torch.Tensor:  # (B,)
    """Per-sentence -log p_CTC(y | x) / max(|y|, 1) without glancing or grad (validation), in the
    model's current mode; inf where the sentence has no alignment."""
    targets, target_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    with torch.no_grad():
        out = core(batch.src_ids, batch.src_lens)
        ll = ctc_log_likelihood(_log_softmax(out.token_logits), out.out_lens, targets, target_lens)
    return _normalised_nll(ll, target_lens)


# ---------------------------------------------------------------------------------------------
# Decoding, sampling and sample scores (CoDAT)


def _collapse(
    labels: torch.Tensor,  # (R, L) classes in [0, V]
    in_lens: torch.Tensor,  # (R,)
    blank: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # (R, T) PAD_ID padded, T >= 1; (R,)
    valid = torch.arange(labels.shape[1], device=labels.device).unsqueeze(0) < in_lens.unsqueeze(1)
    tokens = collapse_tokens(labels, valid, special_ids=(*SPECIAL_IDS, blank), pad_id=PAD_ID)
    return tokens, (tokens != PAD_ID).sum(1)


def ctc_greedy_decode(out: CtcOutput) -> torch.Tensor:  # (B, T) PAD_ID padded, T >= 1
    """Best-path decoding: argmax per position, merge repeats, drop blanks and specials."""
    blank = out.token_logits.shape[-1] - 1
    return _collapse(out.token_logits.argmax(-1), out.out_lens, blank)[0]


def ctc_decode(
    model: CTCModel,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B, T)
    """`ctc_greedy_decode` of the model's output, without grad, in the model's current mode."""
    with torch.no_grad():
        return ctc_greedy_decode(model(src_ids, src_lens))


def ctc_sample(
    out: CtcOutput,
    k: int,
    *,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, K, T) PAD_ID padded, T >= 1; (B, K)
    """K samples per sentence: every position t < L_b draws a class from
    softmax(logits / temperature) independently (one batched `torch.multinomial`), then each
    label sequence is collapsed like `ctc_greedy_decode`. No grad."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    B, L, C = out.token_logits.shape
    with torch.no_grad():
        probs = torch.softmax(out.token_logits.detach().float() / temperature, dim=-1)
        draws = torch.multinomial(probs.view(B * L, C), k, replacement=True, generator=generator)
        labels = draws.view(B, L, k).permute(0, 2, 1).reshape(B * k, L)
        tokens, lengths = _collapse(labels, out.out_lens.repeat_interleave(k), C - 1)
    return tokens.view(B, k, -1), lengths.view(B, k)


def ctc_output_scores(
    out: CtcOutput,  # with grad, e.g. the un-glanced output of the training step
    tokens: torch.Tensor,  # (B, K, T) content ids, PAD_ID beyond each length
    lengths: torch.Tensor,  # (B, K) >= 0
) -> torch.Tensor:  # (B, K) with grad
    """log p_CTC(y_k | x) / max(|y_k|, 1) of each candidate, -inf where it has no alignment.

    `F.ctc_loss` on a compact class set per candidate (see the module docstring): columns 0..T-1
    are the log-probs of the candidate's tokens (a token's first occurrence carries it, later
    occurrences point there; unused columns ~ -inf), column T the blank, T + 1 the rest."""
    logp = _log_softmax(out.token_logits)  # (B, L, C)
    B, L, C = logp.shape
    _, K, T = tokens.shape
    if lengths.shape != (B, K):
        raise ValueError(f"lengths {tuple(lengths.shape)} != ({B}, {K})")
    pos = torch.arange(T, device=tokens.device)
    valid = pos < lengths.unsqueeze(-1)  # (B, K, T)
    ids = tokens.masked_fill(~valid, PAD_ID)
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & valid.unsqueeze(-2)  # [b, k, i, j]
    first = same.to(torch.int8).argmax(-1)  # (B, K, T): first j with y_j == y_i
    used = valid & (first == pos)  # (B, K, T) columns that carry a distinct token
    tok = logp.gather(-1, ids.reshape(B, 1, K * T).expand(B, L, K * T))  # (B, L, K*T)
    tok = tok.view(B, L, K, T).permute(0, 2, 1, 3)  # (B, K, L, T)
    tok = tok.masked_fill(~used.unsqueeze(2), _UNUSED_LOGP)
    blank = logp[..., C - 1].unsqueeze(1).unsqueeze(-1).expand(B, K, L, 1)
    known = torch.logsumexp(torch.cat([tok, blank], dim=-1), dim=-1, keepdim=True)
    tiny = torch.finfo(logp.dtype).tiny
    rest = torch.log(torch.clamp(-torch.expm1(known), min=tiny))  # log(1 - sum of the others)
    compact = torch.cat([tok, blank, rest], dim=-1).reshape(B * K, L, T + 2)
    ll = _ctc_ll(
        compact,
        out.out_lens.repeat_interleave(K),
        first.reshape(B * K, T),
        lengths.reshape(B * K),
        blank=T,
    )
    return (ll / lengths.reshape(B * K).clamp(min=1).to(ll.dtype)).view(B, K)


def ctc_sequence_scores(
    model: nn.Module,  # CTCModel, possibly DDP-wrapped
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    tokens: torch.Tensor,  # (B, K, T)
    lengths: torch.Tensor,  # (B, K)
) -> torch.Tensor:  # (B, K) with grad
    """`ctc_output_scores` of the candidates under a fresh un-glanced forward pass."""
    return ctc_output_scores(model(src_ids, src_lens), tokens, lengths)
