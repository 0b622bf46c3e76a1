"""DA-Transformer (method.md §2): encoder + decoder over L = floor(lambda * m) graph vertices,
a token distribution per vertex and a multi-head gated transition matrix between vertices.

With model.upsample predict (method.md §2.2), L = floor(lambda * n) instead, n the target length
counting <s> and </s>: the reference's when `encode` is given `tgt_lens` (training, validation
loss), else the argmax of a length head on the mean-pooled encoder states (`nat_core`'s).

The model only maps tensors to a `DagOutput`; losses live in `objectives.py`, decoders in
`decode.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from codat.config import ModelConfig
from codat.dag import NEG_INF, log_softmax_safe, logsumexp_safe
from codat.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from codat.layers import (
    Dropout,
    bert_init,
    decoder_stack,
    shared_embedding_and_encoder,
    tied_logits,
)
from codat.nat_core import build_length_head, masked_mean_length_logits


def graph_lengths(
    src_lens: torch.Tensor,  # (B,) source lengths m_b, counting </s>
    *,
    upsample_scale: float,
    max_positions: int,
    min_length: int = 2,
) -> torch.Tensor:  # (B,) long
    """The upsampled output size L_b = floor(lambda * m_b), clipped to [min_length, max_positions]
    (DAT's graph: at least <s> and </s>; CTC's output positions: min_length 1)."""
    L = torch.floor(src_lens.double() * upsample_scale).long()
    return L.clamp(min=min_length, max=max_positions)


class DagOutput(NamedTuple):
    token_logits: torch.Tensor  # (B, L, V)
    trans_logp: torch.Tensor  # (B, L, L) float32, -inf unless u < v < L_b
    graph_lens: torch.Tensor  # (B,)


class Encoded(NamedTuple):
    states: torch.Tensor  # (B, S, D)
    src_mask: torch.Tensor  # (B, S) bool
    graph_lens: torch.Tensor  # (B,)
    length_logits: torch.Tensor | None = None  # (B, max_length + 1), model.upsample predict


class DATransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, H = cfg.dim, cfg.heads
        self.embed, self.encoder = shared_embedding_and_encoder(cfg)  # embed shared by all
        self.graph_positions = nn.Embedding(cfg.max_graph_positions, D)
        self.decoder_layers = decoder_stack(cfg)
        self.drop = Dropout(cfg.dropout)
        # Transition head: features [h ; separate learned position] -> per-head query/key + gate.
        self.link_positions = nn.Embedding(cfg.max_graph_positions, D)
        self.link_query = nn.Linear(2 * D, D)
        self.link_key = nn.Linear(2 * D, D)
        self.link_gate = nn.Linear(2 * D, H)
        # A speed setting, exact up to rounding (False: as first written): `transitions` without
        # the (B, L, 2D) feature concatenation and with torch's fused log-softmax / logsumexp, and
        # the token head's weight gradient in its faster matmul layout (`layers.tied_logits`).
        self.fused_heads = True
        self.apply(bert_init)
        # Only for predict, created and initialised last: the other weights start the same.
        self.length_head = build_length_head(cfg) if cfg.upsample == "predict" else None
        if self.length_head is not None:
            self.length_head.apply(bert_init)

    def graph_sizes(self, lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """floor(upsample_scale * lens) clipped to [2, max_graph_positions] (`graph_lengths`)."""
        return graph_lengths(
            lens,
            upsample_scale=self.cfg.upsample_scale,
            max_positions=self.cfg.max_graph_positions,
        )

    def output_lengths(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """The graph size L_b of each source as far as it is known before encoding, what a
        decoding batch holds: floor(lambda * m_b) (`graph_sizes`). With model.upsample predict
        only an estimate: the graph follows the length head (`encode`; `generate` sizes its
        batches by that)."""
        return self.graph_sizes(src_lens)

    def max_target_lens(self, src_lens: torch.Tensor) -> torch.Tensor:  # (B,)
        """The longest target (<s> y </s>) a graph can hold: one vertex per token at most. With
        model.upsample predict the graph is sized from the target: any up to max_graph_positions."""
        if self.length_head is not None:
            return torch.full_like(src_lens, self.cfg.max_graph_positions)
        return self.output_lengths(src_lens)

    def train_positions(self, src_lens: torch.Tensor, tgt_lens: torch.Tensor) -> torch.Tensor:
        """The graph size L_b of each training pair: from the source, or with model.upsample
        predict from the reference's length n_b (as `encode` sizes it in training)."""
        return self.graph_sizes(tgt_lens if self.length_head is not None else src_lens)

    def encode(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
        *,
        tgt_lens: torch.Tensor | None = None,  # (B,) references' lengths, counting <s> </s>
    ) -> Encoded:
        """The encoder states and the graph size: `output_lengths` for model.upsample source
        (`tgt_lens` unused); for predict, `graph_sizes` of `tgt_lens` when given (training and
        validation loss: every reference fits), else of the length head's argmax (inference)."""
        S = src_ids.shape[1]
        src_mask = torch.arange(S, device=src_ids.device).unsqueeze(0) < src_lens.unsqueeze(1)
        states = self.encoder(src_ids, src_mask)
        if self.length_head is None:
            return Encoded(states, src_mask, self.output_lengths(src_lens))
        length_logits = masked_mean_length_logits(self.length_head, states, src_mask)
        lens = length_logits.argmax(-1) if tgt_lens is None else tgt_lens
        return Encoded(states, src_mask, self.graph_sizes(lens), length_logits)

    def graph_inputs(self, graph_lens: torch.Tensor) -> torch.Tensor:  # (B, L) long
        """Placeholder decoder input [<s>, <unk> x (L_b - 2), </s>, <pad> ...]."""
        L = int(graph_lens.max())
        pos = torch.arange(L, device=graph_lens.device).unsqueeze(0)
        ids = torch.full((len(graph_lens), L), UNK_ID, dtype=torch.long, device=graph_lens.device)
        ids = ids.masked_fill(pos == 0, BOS_ID).masked_fill(
            pos == graph_lens.unsqueeze(1) - 1, EOS_ID
        )
        return ids.masked_fill(pos >= graph_lens.unsqueeze(1), PAD_ID)

    def decode(self, enc: Encoded, graph_ids: torch.Tensor) -> DagOutput:
        """Run the decoder on graph inputs (B, L): placeholders, or glanced target tokens."""
        B, L = graph_ids.shape
        if L > self.cfg.max_graph_positions:
            raise ValueError(
                f"graph size {L} exceeds max_graph_positions={self.cfg.max_graph_positions}"
            )
        pos = torch.arange(L, device=graph_ids.device)
        graph_mask = pos.unsqueeze(0) < enc.graph_lens.unsqueeze(1)  # (B, L)
        x = self.drop(self.embed(graph_ids) * self.encoder.scale + self.graph_positions(pos))
        for layer in self.decoder_layers:
            x = layer(x, graph_mask, enc.states, enc.src_mask)
        token_logits = tied_logits(x, self.embed.weight, fast=self.fused_heads)  # (B, L, V)
        trans_logp = self.transitions(x, graph_mask)
        return DagOutput(token_logits, trans_logp, enc.graph_lens)

    def transitions(self, h: torch.Tensor, graph_mask: torch.Tensor) -> torch.Tensor:  # (B, L, L)
        """log P(v | u) = log sum_h gate_h(u) softmax_{u < v < L_b}(q_h(u) . k_h(v) / sqrt(d_h)).

        q, k and the gate read the features [h ; link position] (method.md §2.3); the scores and
        everything after them run in float32 even under autocast. `fused_heads`: each linear
        map of the features as its h part plus its (L, D) position part, then torch's log_softmax
        and logsumexp with the rows and columns that have no successor masked around them; else
        the concatenation and the -inf-safe composites, as first written. Same values.
        """
        B, L, D = h.shape
        H = self.cfg.heads
        pos = torch.arange(L, device=h.device)
        valid = (pos.unsqueeze(0) > pos.unsqueeze(1)).unsqueeze(0) & graph_mask.unsqueeze(1)
        if not self.fused_heads:
            feats = torch.cat([h, self.link_positions(pos).expand(B, L, D).to(h.dtype)], dim=-1)
            q, k, gate = self.link_query(feats), self.link_key(feats), self.link_gate(feats)
        else:
            where = self.link_positions.weight[:L]  # (L, D)

            def features(linear: nn.Linear) -> torch.Tensor:  # linear([h ; where]), float32
                w = linear.weight
                return (
                    F.linear(h, w[:, :D]).float() + F.linear(where, w[:, D:], linear.bias).float()
                )

            q, k, gate = (
                features(self.link_query),
                features(self.link_key),
                features(self.link_gate),
            )
        q = q.float().view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, d)
        k = k.float().view(B, L, H, D // H).transpose(1, 2)
        log_gate = torch.log_softmax(gate.float(), dim=-1).transpose(1, 2).unsqueeze(-1)
        with torch.autocast(device_type=h.device.type, enabled=False):
            scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5  # (B, H, L, L)
            if not self.fused_heads:
                scores = scores.masked_fill(~valid.unsqueeze(1), NEG_INF)
                per_head = log_softmax_safe(scores, dim=-1)  # rows without successors stay -inf
                return logsumexp_safe(per_head + log_gate, dim=1)
            # A row without successors (u = L_b - 1, padding) is normalised over all L columns
            # instead of none, so that no NaN arises; where() and masked_fill() take it out again.
            kept = valid | ~valid.any(dim=-1, keepdim=True)
            per_head = torch.log_softmax(scores.masked_fill(~kept.unsqueeze(1), NEG_INF), dim=-1)
            mixed = torch.where(valid.unsqueeze(1), per_head + log_gate, 0.0)
            return torch.logsumexp(mixed, dim=1).masked_fill(~valid, NEG_INF)

    def forward(
        self,
        src_ids: torch.Tensor,  # (B, S)
        src_lens: torch.Tensor,  # (B,)
        graph_ids: torch.Tensor | None = None,  # (B, L) glanced decoder input; None = placeholders
        *,
        encoded: Encoded | None = None,  # `encode(src_ids, src_lens)` done already: reuse it
        tgt_lens: torch.Tensor | None = None,  # (B,) `encode`'s: size a predict graph by them
    ) -> DagOutput:
        enc = self.encode(src_ids, src_lens, tgt_lens=tgt_lens) if encoded is None else encoded
        if graph_ids is None:
            graph_ids = self.graph_inputs(enc.graph_lens)
        return self.decode(enc, graph_ids)
