"""DAT's decoders for `generate.DECODERS["dat"]` (method.md §5), each with the one decoder
signature `decoder(model, src_ids (B, S), src_lens (B,), dc, generator) -> (B, T)` ids without
specials, PAD_ID padded: lookahead, greedy, joint Viterbi, and CoDAT's sample + rerank
(Algorithms 2/3). The maths are the pure functions of `decode.py`; this module maps a
`DATransformer`'s output and the `DecodeConfig` onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from codat.config import DecodeConfig
from codat.dat import DagOutput
from codat.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS
from codat.decode import (
    DagSamples,
    greedy_decode,
    joint_viterbi_decode,
    lookahead_decode,
    pick_best,
    rerank_scores,
    sample_dag,
)
from codat.objectives import log_softmax_fp32, sample_targets, samples_log_q


def dat_lookahead_decoder(
    model: nn.Module,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """Lookahead: follow argmax_j log E[a, j] + lookahead_token_weight * max_v log P(v | j)."""
    out = model(src_ids, src_lens)
    return lookahead_decode(
        log_softmax_fp32(out.token_logits),
        out.trans_logp,
        out.graph_lens,
        beta=dc.lookahead_token_weight,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def dat_greedy_decoder(
    model: nn.Module,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """Greedy: follow the most likely transition, emit each vertex's argmax token."""
    out = model(src_ids, src_lens)
    return greedy_decode(
        log_softmax_fp32(out.token_logits),
        out.trans_logp,
        out.graph_lens,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def dat_viterbi_decoder(
    model: nn.Module,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """Joint Viterbi: the best (path, tokens) pair, score / length ** viterbi_length_exponent."""
    out = model(src_ids, src_lens)
    return joint_viterbi_decode(
        log_softmax_fp32(out.token_logits),
        out.trans_logp,
        out.graph_lens,
        length_beta=dc.viterbi_length_exponent,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def draw_samples(out: DagOutput, dc: DecodeConfig, generator: torch.Generator | None) -> DagSamples:
    """K = dc.samples paths per sentence (CoDAT Algorithms 2/3) with dc's temperature, top_p,
    top_tokens and sampler mode ('' = log, for configs that never resolved it)."""
    return sample_dag(
        log_softmax_fp32(out.token_logits),
        out.trans_logp,
        out.graph_lens,
        num_samples=dc.samples,
        temperature=dc.temperature,
        top_p=dc.top_p,
        top_tokens=dc.top_tokens,
        mode=dc.sampler or "log",
        generator=generator,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def marginal_scores(out: DagOutput, samples: DagSamples) -> torch.Tensor:  # (B, K)
    """log q(y_k | x) / |y_k| of each sample: the DAG marginal over all paths emitting <s> y </s>
    (the DP), not only the sampled path; -inf where no path of that length exists."""
    targets, target_lens = sample_targets(
        samples.tokens, samples.lengths, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
    )
    return samples_log_q(
        log_softmax_fp32(out.token_logits),
        out.trans_logp.float(),
        out.graph_lens,
        targets,
        target_lens,
    )


def dat_sample_decoder(
    model: nn.Module,
    src_ids: torch.Tensor,  # (B, S)
    src_lens: torch.Tensor,  # (B,)
    dc: DecodeConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:  # (B, T)
    """CoDAT's inference: K samples, the best by w * token score + (1 - w) * transition score,
    each length-normalised, w = dc.rerank_token_weight (dc.rerank score), or by the DAG marginal
    per token (dc.rerank marginal, `marginal_scores`)."""
    out = model(src_ids, src_lens)
    samples = draw_samples(out, dc, generator)
    if dc.rerank == "marginal":
        scores = marginal_scores(out, samples)
    else:
        scores = rerank_scores(samples, beta=dc.rerank_token_weight)
    return pick_best(samples, scores, pad_id=PAD_ID)
