"""Autoregressive Transformer baseline (Vaswani et al., 2017, "Attention Is All You Need"), built
from the same `layers.py` encoder and decoder layers as DAT by composition: post-norm layers, one
embedding matrix shared by the encoder input, the decoder input and the output projection.

Separate pieces, as in the rest of the package:
- `ATransformer`: the model; `forward` is teacher forcing (prev_ids = <s> y predicts y </s>) and
  `decode_step` the same decoder run one position at a time from a key/value cache;
- `label_smoothed_nll`: the training objective (fairseq's label-smoothed cross-entropy);
  `at_step` (model.arch at's training step) and `at_sentence_loss` (validation) apply it;
- `greedy_search` and `beam_search`: decoders (fairseq's `SequenceGenerator` rules), batched over
  sentences and beams; `at_beam_decoder` / `at_greedy_decoder` run them with a `DecodeConfig`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from codat.config import DecodeConfig, ModelConfig, RunConfig
from codat.data import BOS_ID, EOS_ID, PAD_ID, Batch
from codat.layers import (
    LayerCache,
    bert_init,
    decoder_stack,
    shared_embedding_and_encoder,
    tied_logits,
)


class EncoderOut(NamedTuple):
    states: torch.Tensor  # (B, S, D)
    src_mask: torch.Tensor  # (B, S) bool


class DecoderState(NamedTuple):
    """Incremental decoding state: one `LayerCache` per decoder layer and the source mask."""

    caches: tuple[LayerCache, ...]
    src_mask: torch.Tensor  # (B, S) bool

    @property
    def steps(self) -> int:
        """Positions decoded so far (= the position of the next input token)."""
        return self.caches[0].self_keys.shape[2]


class ATransformer(nn.Module):
    """Encoder-decoder Transformer with a causal decoder; `cfg.max_target_positions` bounds the
    target positions (<s> included); `cfg.upsample_scale` and `cfg.max_graph_positions` are
    unused."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.decoder_layers < 1:
            raise ValueError(f"model.decoder_layers={cfg.decoder_layers} must be >= 1")
        self.cfg = cfg
        D = cfg.dim
        self.embed, self.encoder = shared_embedding_and_encoder(cfg)  # embed shared by all
        self.target_positions = nn.Embedding(cfg.max_target_positions, D)
        self.decoder_layers = decoder_stack(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(bert_init)

    def output_lengths(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """The source lengths: what a decoding batch is sized by."""
        return src_lens

    def max_target_lens(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """The longest trainable <s> y </s>: the decoder reads <s> y, max_target_positions."""
        return torch.full_like(src_lens, self.cfg.max_target_positions + 1)

    def train_positions(self, src_lens: torch.Tensor, tgt_lens: torch.Tensor) -> torch.Tensor:
        """Decoder positions of each training pair: its target length."""
        return tgt_lens

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> EncoderOut:
        S = src_ids.shape[1]
        src_mask = torch.arange(S, device=src_ids.device).unsqueeze(0) < src_lens.unsqueeze(1)
        return EncoderOut(self.encoder(src_ids, src_mask), src_mask)

    def _embed_targets(self, ids: torch.Tensor, start: int) -> torch.Tensor:  # (B, T, D)
        T = ids.shape[1]
        if start + T > self.cfg.max_target_positions:
            raise ValueError(
                f"target position {start + T - 1} exceeds "
                f"max_target_positions={self.cfg.max_target_positions}"
            )
        pos = torch.arange(start, start + T, device=ids.device)
        return self.drop(self.embed(ids) * self.encoder.scale + self.target_positions(pos))

    def decode(
        self,
        enc: EncoderOut,
        prev_ids: torch.Tensor,  # (B, T) <s> y_1 ... y_{T-1}, PAD_ID padded
    ) -> torch.Tensor:  # (B, T, V) logits of y_1 ... y_T (</s> last)
        """Teacher-forced decoder: position t attends to prev_ids[:, :t+1] and the source."""
        x = self._embed_targets(prev_ids, 0)
        tgt_mask = prev_ids != PAD_ID  # only padded queries ever reach a padded key
        for layer in self.decoder_layers:
            x = layer(x, tgt_mask, enc.states, enc.src_mask, causal=True)
        return tied_logits(x, self.embed.weight)  # tied output projection, as in DAT

    def forward(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
        prev_ids: torch.Tensor,  # (B, T)
    ) -> torch.Tensor:  # (B, T, V)
        return self.decode(self.encode(src_ids, src_lens), prev_ids)

    def init_state(self, enc: EncoderOut, *, beams: int = 1) -> DecoderState:
        """Empty caches for `decode_step`, each sentence repeated `beams` times (rows b * beams +
        k). The cross-attention keys/values are computed once per sentence, then repeated."""
        caches = []
        for layer in self.decoder_layers:
            c = layer.init_cache(enc.states)
            caches.append(LayerCache(*(t.repeat_interleave(beams, dim=0) for t in c)))
        return DecoderState(tuple(caches), enc.src_mask.repeat_interleave(beams, dim=0))

    def decode_step(
        self,
        prev_ids: torch.Tensor,  # (B,) the input token of position t = state.steps
        state: DecoderState,
    ) -> tuple[torch.Tensor, DecoderState]:  # (B, V) logits of the token after it
        """`decode(...)[:, t]` computed from the cache in O(t) instead of O(t^2) per step."""
        x = self._embed_targets(prev_ids.unsqueeze(1), state.steps)  # (B, 1, D)
        caches = []
        for layer, cache in zip(self.decoder_layers, state.caches, strict=True):
            x, cache = layer.step(x, state.src_mask, cache)
            caches.append(cache)
        return tied_logits(x[:, 0], self.embed.weight), DecoderState(tuple(caches), state.src_mask)


def reorder_state(state: DecoderState, rows: torch.Tensor) -> DecoderState:  # rows (B,) long
    """Keep decoder row rows[i] as row i (beam search back-pointers).

    Only the self-attention caches move: `rows` must map every row to a row of the same sentence,
    whose source keys/values and mask are identical.
    """
    caches = tuple(
        c._replace(self_keys=c.self_keys[rows], self_values=c.self_values[rows])
        for c in state.caches
    )
    return DecoderState(caches, state.src_mask)


def label_smoothed_nll(
    logits: torch.Tensor,  # (B, T, V)
    target_ids: torch.Tensor,  # (B, T) y_1 ... </s>, pad_id padded
    *,
    pad_id: int,
    epsilon: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:  # () loss, () nll (detached); means over non-pad tokens
    """Label-smoothed cross-entropy (Szegedy et al., 2016), fairseq's original definition.

    Per target token: loss = (1 - eps) * (-log p(y)) + eps * mean_v(-log p(v)), i.e. the
    cross-entropy to (1 - eps) * onehot(y) + eps / V: exactly `F.cross_entropy`'s
    ``label_smoothing``, which computes it here. (fairseq since 2021 spreads eps over the V - 1
    other tokens instead.) Padding targets are ignored; log-probs are taken in float32.
    """
    if logits.shape[:2] != target_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} vs target_ids {tuple(target_ids.shape)}")
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon={epsilon} must be in [0, 1)")
    flat = logits.float().flatten(0, 1)  # (B*T, V)
    target = target_ids.flatten()  # (B*T,)
    count = (target != pad_id).sum().clamp(min=1)
    loss = (
        F.cross_entropy(flat, target, ignore_index=pad_id, reduction="sum", label_smoothing=epsilon)
        / count
    )
    if epsilon == 0:
        return loss, loss.detach()
    with torch.no_grad():
        nll = F.cross_entropy(flat, target, ignore_index=pad_id, reduction="sum") / count
    return loss, nll


def teacher_forcing(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # (B, N-1) each
    """Teacher forcing: decoder input <s> y, target y </s> (PAD_ID-padded)."""
    prev = batch.tgt_ids[:, :-1]
    target = batch.tgt_ids[:, 1:]
    return prev.masked_fill(prev == EOS_ID, PAD_ID), target


def at_step(
    model: ATransformer,
    batch: Batch,
    *,
    cfg: RunConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The label-smoothed NLL (epsilon train.label_smoothing) of one micro-batch under teacher
    forcing; stats "nll" (the unsmoothed NLL). The AT does not glance (`ratio` is ignored)."""
    prev, target = teacher_forcing(batch)
    with autocast:
        logits = model(batch.src_ids, batch.src_lens, prev)
    loss, nll = label_smoothed_nll(logits, target, pad_id=PAD_ID, epsilon=cfg.train.label_smoothing)
    return loss, {"nll": float(nll.detach())}


@torch.no_grad()
def at_sentence_loss(model: ATransformer, batch: Batch) -> torch.Tensor:  # (B,)
    """The mean NLL per target token (y and </s>) of each sentence under teacher forcing, no grad,
    the model's current mode."""
    prev, target = teacher_forcing(batch)
    logp = torch.log_softmax(model(batch.src_ids, batch.src_lens, prev).float(), dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    valid = target != PAD_ID
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


def _max_lens(model: ATransformer, src_lens: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Per-sentence limit on generated tokens before the forced </s>: floor(a * m + b), m counting
    the source </s>; fairseq uses the padded batch width for m, which makes outputs depend on the
    batch. Capped so that the forced </s> still has a position."""
    limit = model.cfg.max_target_positions - 1
    return (a * src_lens.double() + b).floor().long().clamp(min=0, max=limit)


def _step_logp(
    logits: torch.Tensor,  # (R, V)
    at_max: torch.Tensor,  # (R,) bool: only </s> is allowed
) -> torch.Tensor:  # (R, V) float32
    """log p of the next token; <pad> and <s> can never be generated (-inf, not renormalised, as
    fairseq's pad masking), and at the length limit every token but </s> is -inf."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    banned = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
    banned[[PAD_ID, BOS_ID]] = True
    banned = banned | (
        at_max.unsqueeze(1) & (torch.arange(logp.shape[-1], device=logp.device) != EOS_ID)
    )
    return logp.masked_fill(banned, float("-inf"))


def _strip(ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T'), </s> and trailing pad gone
    ids = ids.masked_fill(ids == EOS_ID, PAD_ID)
    width = int((ids != PAD_ID).sum(1).max()) if ids.numel() else 0
    return ids[:, :width]


@torch.no_grad()
def greedy_search(
    model: ATransformer,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    *,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
) -> torch.Tensor:  # (B, T) ids without <s>/</s>, PAD_ID padded
    """Argmax decoding: y_t = argmax_v log p(v | y_<t, x) until </s> or the length limit
    floor(max_len_a * src_len + max_len_b), where </s> is forced. Call with the model in eval mode.
    """
    enc = model.encode(src_ids, src_lens)
    state = model.init_state(enc)
    max_lens = _max_lens(model, src_lens, max_len_a, max_len_b)
    tokens = torch.full_like(src_lens, BOS_ID)
    done = torch.zeros_like(src_lens, dtype=torch.bool)
    out = []
    for t in range(int(max_lens.max()) + 1):
        logits, state = model.decode_step(tokens, state)
        tokens = _step_logp(logits, t >= max_lens).argmax(-1).masked_fill(done, PAD_ID)
        out.append(tokens)
        done = done | (tokens == EOS_ID)
        if done.all():
            break
    return _strip(torch.stack(out, dim=1))


class _Candidates(NamedTuple):
    """The 2K best one-token extensions (K = beam) of each sentence's live hypotheses, sorted best
    first (fewer than 2K when K * V < 2K)."""

    logp: torch.Tensor  # (B, 2K) summed log p of the extended hypothesis
    beam: torch.Tensor  # (B, 2K) long: the live hypothesis (0..K-1) it extends
    tok: torch.Tensor  # (B, 2K) long: the token it appends


def _top_candidates(
    live_logp: torch.Tensor,  # (B, K) summed log p of the live hypotheses, -inf if dead
    step_logp: torch.Tensor,  # (B * K, V) log p of the next token, row b * K + k
    V: int,
) -> _Candidates:
    """Rank every extension of every live hypothesis by summed log p and keep the 2K best."""
    B, K = live_logp.shape
    ext = live_logp.unsqueeze(2) + step_logp.view(B, K, V)  # (B, K, V)
    cand_logp, cand = ext.view(B, K * V).topk(min(2 * K, K * V), dim=1)  # (B, 2K) sorted
    return _Candidates(cand_logp, cand // V, cand % V)


def _store_finished(
    fin_ids: torch.Tensor,  # (B, K, T_max + 1) finished hypotheses, </s> included, PAD_ID padded
    fin_scores: torch.Tensor,  # (B, K) their scores, sorted best first, -inf for empty slots
    live_ids: torch.Tensor,  # (B, K, t) the live hypotheses before step t
    cand: _Candidates,
    done: torch.Tensor,  # (B,) bool: sentences that stopped
    *,
    t: int,
    length_penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, K, T_max + 1), (B, K)
    """Merge the candidates that finish at step t into each sentence's K best finished ones.

    As in fairseq, only a finite </s> among the K best candidates of a sentence that has not
    stopped finishes a hypothesis; its score is sum log p / (t + 1) ** length_penalty.
    """
    B, K, L = fin_ids.shape  # L = T_max + 1
    C = cand.tok.shape[1]  # 2K, or K * V when smaller
    is_eos, finite = cand.tok == EOS_ID, torch.isfinite(cand.logp)
    first_k = torch.arange(C, device=fin_ids.device) < K
    finish = is_eos & finite & first_k & ~done.unsqueeze(1)
    new_scores = (cand.logp / (t + 1) ** length_penalty).masked_fill(~finish, float("-inf"))
    new_ids = torch.cat(
        [
            live_ids.gather(1, cand.beam.unsqueeze(2).expand(-1, -1, t)),
            cand.tok.unsqueeze(2),
            torch.full((B, C, L - 1 - t), PAD_ID, dtype=torch.long, device=fin_ids.device),
        ],
        dim=2,
    )  # (B, 2K, T_max + 1)
    fin_scores, keep = torch.cat([fin_scores, new_scores], dim=1).topk(K, dim=1)  # (B, K)
    all_ids = torch.cat([fin_ids, new_ids], dim=1)  # (B, 3K, T_max + 1)
    return all_ids.gather(1, keep.unsqueeze(2).expand(-1, -1, L)), fin_scores


def _advance_live(
    live_ids: torch.Tensor,  # (B, K, t) the live hypotheses before step t
    cand: _Candidates,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K best candidates that are not </s> become the live hypotheses (fewer when few are
    finite: the rest get log p -inf and are dead).

    Returns:
        The new live_ids (B, K, t + 1), their summed log p (B, K), the old hypothesis each
        extends (B, K) and the token it appended (B, K).
    """
    K, t = live_ids.shape[1], live_ids.shape[2]
    is_eos, finite = cand.tok == EOS_ID, torch.isfinite(cand.logp)
    live_logp, pick = cand.logp.masked_fill(is_eos | ~finite, float("-inf")).topk(K, dim=1)
    live_beam, tokens = cand.beam.gather(1, pick), cand.tok.gather(1, pick)  # (B, K)
    live_ids = torch.cat(
        [live_ids.gather(1, live_beam.unsqueeze(2).expand(-1, -1, t)), tokens.unsqueeze(2)],
        dim=2,
    )  # (B, K, t + 1)
    return live_ids, live_logp, live_beam, tokens


def _beam_rows(live_beam: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B * K,)
    """The decoder row (b * K + k) each new live hypothesis continues, for `reorder_state`."""
    B, K = live_beam.shape
    return (torch.arange(B, device=live_beam.device).unsqueeze(1) * K + live_beam).view(-1)


def _beam_done(
    done: torch.Tensor,  # (B,) bool
    live_logp: torch.Tensor,  # (B, K) after step t
    fin_scores: torch.Tensor,  # (B, K) sorted best first
    max_lens: torch.Tensor,  # (B,)
    *,
    t: int,
    length_penalty: float,
) -> torch.Tensor:  # (B,) bool
    """A sentence stops at its length limit, or once it stores K finished hypotheses and none of
    its live ones beats the worst of them at their current length (t + 1 tokens)."""
    best_live = live_logp.max(dim=1).values / (t + 1) ** length_penalty
    full = torch.isfinite(fin_scores).all(dim=1)
    return done | (t >= max_lens) | (full & (best_live <= fin_scores[:, -1]))


@torch.no_grad()
def beam_search(
    model: ATransformer,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    *,
    beam: int = 5,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
) -> torch.Tensor:  # (B, T) ids of the best finished hypothesis, without <s>/</s>, PAD_ID padded
    """Beam search with fairseq's `SequenceGenerator` rules, all sentences and beams in one batch.

    Each step ranks the 2K best extensions (K = beam) of the live hypotheses by summed log p. A
    </s> among the first K is finished with score sum log p / len ** length_penalty (len counts
    </s>); each sentence stores its K best finished hypotheses. The first K extensions that are not
    </s> stay live. A sentence stops once it stores K finished hypotheses none of its live ones
    beats at their current length (Hugging Face's early_stopping=False), or at its length limit
    floor(max_len_a * src_len + max_len_b), where </s> is forced. Call in eval mode.
    """
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1")
    B, K, V = len(src_lens), beam, model.cfg.vocab_size
    dev = src_ids.device
    state = model.init_state(model.encode(src_ids, src_lens), beams=K)
    max_lens = _max_lens(model, src_lens, max_len_a, max_len_b)
    T_max = int(max_lens.max())
    live_ids = torch.full((B, K, 0), PAD_ID, dtype=torch.long, device=dev)
    live_logp = torch.full((B, K), float("-inf"), device=dev)
    live_logp[:, 0] = 0.0  # one empty hypothesis per sentence, no duplicates at step 0
    fin_ids = torch.full((B, K, T_max + 1), PAD_ID, dtype=torch.long, device=dev)
    fin_scores = torch.full((B, K), float("-inf"), device=dev)  # sorted best first
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    tokens = torch.full((B * K,), BOS_ID, dtype=torch.long, device=dev)
    for t in range(T_max + 1):
        logits, state = model.decode_step(tokens, state)  # (B * K, V)
        at_max = (t >= max_lens).repeat_interleave(K)
        cand = _top_candidates(live_logp, _step_logp(logits, at_max), V)
        fin_ids, fin_scores = _store_finished(
            fin_ids, fin_scores, live_ids, cand, done, t=t, length_penalty=length_penalty
        )
        live_ids, live_logp, live_beam, tokens = _advance_live(live_ids, cand)
        state = reorder_state(state, _beam_rows(live_beam))
        tokens = tokens.view(-1)  # (B, K) -> (B * K,)
        done = _beam_done(done, live_logp, fin_scores, max_lens, t=t, length_penalty=length_penalty)
        if done.all():
            break
    return _strip(fin_ids[:, 0])


def at_beam_decoder(
    model: ATransformer,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """`beam_search` with dc.beam, dc.length_penalty and the limit max_len_a * m + max_len_b."""
    return beam_search(
        model,
        src_ids,
        src_lens,
        beam=dc.beam,
        length_penalty=dc.length_penalty,
        max_len_a=dc.max_len_a,
        max_len_b=dc.max_len_b,
    )


def at_greedy_decoder(
    model: ATransformer,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """`greedy_search` with the length limit dc.max_len_a * m + dc.max_len_b."""
    return greedy_search(model, src_ids, src_lens, max_len_a=dc.max_len_a, max_len_b=dc.max_len_b)
