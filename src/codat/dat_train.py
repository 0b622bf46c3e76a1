"""DAT's training step (method.md §4: glancing + the DP loss) and CoDAT's sample term (paper §3,
method.md §9), as plain functions of an unwrapped `DATransformer` and a `Batch`.

`dat_step` is the step `train.py` runs for model.arch dat: the glanced DP loss of the batch, plus
for train.objective codat / reward `codat.weight * codat_term(...)` on the un-glanced DAG.
`codat_term` reads as the paper: sample -> reward -> select -> score -> loss.
`dat_sentence_loss` is the per-sentence validation loss (and what CoDAT's alpha is calibrated on).
With model.upsample predict, every forward here sizes the graph by the reference (`encode`'s
tgt_lens), and `dat_step` adds model.length_loss_weight times `length_loss`.
`StepOptions` holds the step's speed settings (how it computes, never what).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from codat.config import CodatConfig, RunConfig
from codat.dag import dag_best_path, dag_log_likelihood
from codat.dat import DagOutput, DATransformer, Encoded
from codat.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, Batch
from codat.decode import DagSamples, sample_dag
from codat.glancing import (
    aligned_tokens,
    argmax_hits,
    choose_glanced,
    force_alignment,
    replay_rng,
    reveal,
)
from codat.layers import DropoutTape
from codat.objectives import (
    dag_nll,
    gather_token_logp,
    gathered_samples_log_q,
    log_softmax_fp32,
    sample_targets,
    samples_log_q,
    token_logp_and_max,
)
from codat.rewards import sentence_bleu
from codat.selection import compact_distinct, sample_term, select_samples

SAMPLE_OBJECTIVES = ("codat", "reward")

# ---------------------------------------------------------------------------------------------
# The training step


@dataclass(frozen=True)
class StepOptions:
    """How `dat_step` computes, never what: each setting gives the same loss and gradients (float32:
    up to rounding; bf16: within bf16 noise) and is on by default. `StepOptions.plain()` turns all
    off (the step as first written), which `codat benchmark train` times against; two more live
    on the model (`layers.set_cpu_half_attention`, `DATransformer.fused_heads`)."""

    fused_token_logp: bool = True  # `gather_token_logp(fused=True)`: no float32 (B, L, V) log-probs
    share_encoder: bool = True  # glancing: pass 1 decodes pass 2's encoder states (one encoder run)
    replay_dropout: bool = True  # glancing: pass 2 reuses pass 1's masks (`layers.DropoutTape`)
    argmax_hits: bool = True  # glancing: `glancing.argmax_hits`, not an argmax over (B, L, V)

    @classmethod
    def plain(cls) -> StepOptions:
        return cls(False, False, False, False)


class Glance(NamedTuple):
    """What glancing's pass 1 decided (method.md §4)."""

    graph_ids: torch.Tensor  # (B, L) decoder inputs: revealed gold tokens, else placeholders
    path: torch.Tensor  # (B, L) target index aligned to each vertex by the best path, or -1
    keep: torch.Tensor  # (B, L) bool: the vertices whose gold token is revealed


def glance_inputs(
    model: DATransformer,
    batch: Batch,
    *,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
    encoded: Encoded | None = None,
    tape: DropoutTape | None = None,
    options: StepOptions = StepOptions(),
) -> Glance:
    """Glancing's pass 1, without grad: the best alignment of each reference, and the vertices
    whose aligned gold token pass 2 sees (`choose_glanced`). Pass 2 must see the same dropout
    masks: with a `tape`, pass 1 records them (pass 2 replays the tape); without one, the global
    RNG is restored after pass 1 so that pass 2 draws them again. `encoded`: the encoder states
    pass 2 will use (computed with grad by the caller), else pass 1 encodes the batch itself."""
    rng = replay_rng(batch.src_ids.device) if tape is None else tape.record()
    with rng, torch.no_grad(), autocast:
        out = model(batch.src_ids, batch.src_lens, encoded=encoded, tgt_lens=batch.tgt_lens)
        top = None
        if options.fused_token_logp:  # float32 values and row maxima, one chunked pass
            token_logp, top = token_logp_and_max(out.token_logits, batch.tgt_ids)
        else:  # the model's dtype (a bf16 (B, L, V) log-softmax), then the gather
            N = batch.tgt_ids.shape[1]
            token_logp = (
                torch.log_softmax(out.token_logits, dim=-1)
                .gather(-1, batch.tgt_ids.unsqueeze(1).expand(-1, out.token_logits.shape[1], N))
                .float()
            )  # (B, L, N)
        path, _ = dag_best_path(token_logp, out.trans_logp, out.graph_lens, batch.tgt_lens)
        if options.argmax_hits:
            oracle = aligned_tokens(path, batch.tgt_ids)
            candidates = None
            if top is not None:  # the oracle token's log-prob is its vertex's largest
                at_path = token_logp.gather(-1, path.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                candidates = at_path == top
            correct = argmax_hits(out.token_logits, oracle, candidates)
            keep = reveal(path, correct, batch.tgt_lens, ratio=ratio, generator=generator)
        else:
            keep, oracle = choose_glanced(
                path,
                out.token_logits.argmax(-1),
                batch.tgt_ids,
                batch.tgt_lens,
                ratio=ratio,
                generator=generator,
            )
        graph_ids = torch.where(keep, oracle, model.graph_inputs(out.graph_lens))
    return Glance(graph_ids, path, keep)


def glanced_dp_loss(
    out: DagOutput,
    batch: Batch,
    glance: Glance | None,
    *,
    fused: bool = True,
) -> tuple[torch.Tensor, int]:  # scalar, number of sentences without a path
    """CoDAT eq. (3), the DP loss, with every revealed target token forced onto its vertex (it adds
    no loss); sentences whose graph is too short for the target count 0 and are returned.
    `fused`: `gather_token_logp`'s."""
    token_logp = gather_token_logp(out.token_logits, batch.tgt_ids, fused=fused)  # (B, L, N)
    if glance is not None:
        token_logp = force_alignment(token_logp, glance.path, glance.keep)
    loss, _, invalid = dag_nll(token_logp, out.trans_logp, out.graph_lens, batch.tgt_lens)
    return loss, invalid


def glanced_forward(
    model: DATransformer,
    batch: Batch,
    *,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
    options: StepOptions,
) -> tuple[DagOutput, Glance, Encoded]:
    """Glancing's two passes (method.md §4): pass 1 (`glance_inputs`) picks the revealed tokens,
    pass 2, with grad and pass 1's dropout masks, is the output trained; returned with pass 2's
    encoder states (its length head's scores)."""
    encoded, tape = None, DropoutTape() if options.replay_dropout else None
    if options.share_encoder:
        with autocast:
            encoded = model.encode(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
    glance = glance_inputs(
        model,
        batch,
        ratio=ratio,
        generator=generator,
        autocast=autocast,
        encoded=encoded,
        tape=tape,
        options=options,
    )
    with autocast, contextlib.nullcontext() if tape is None else tape.replay():
        if encoded is None:  # as the forward would, first thing, with pass 1's masks
            encoded = model.encode(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
        out = model(batch.src_ids, batch.src_lens, glance.graph_ids, encoded=encoded)
    return out, glance, encoded


def dat_step(
    model: DATransformer,
    batch: Batch,
    *,
    cfg: RunConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
    options: StepOptions = StepOptions(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch of DAT and its statistics.

    With ratio > 0, glancing (`glanced_forward`). For train.objective codat / reward, plus
    codat.weight times the sample term on the un-glanced DAG, since the samples must come from
    the model as it decodes (method.md §9.8): pass 2's output when nothing was glanced, else one
    more forward. With model.upsample predict, plus model.length_loss_weight times `length_loss`
    (stats "length_loss", "length_acc"). `options`: speed settings only.
    """
    stats: dict[str, float] = {}
    glance = None
    if ratio > 0:
        out, glance, encoded = glanced_forward(
            model, batch, ratio=ratio, generator=generator, autocast=autocast, options=options
        )
        stats["glanced"] = float(glance.keep.sum()) / float(batch.tgt_lens.sum())
    else:
        with autocast:
            encoded = model.encode(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
            out = model(batch.src_ids, batch.src_lens, encoded=encoded)
    dp, invalid = glanced_dp_loss(out, batch, glance, fused=options.fused_token_logp)
    stats["invalid"] = invalid
    loss = dp
    if encoded.length_logits is not None:  # model.upsample predict
        length, stats["length_acc"] = length_loss(encoded.length_logits, batch.tgt_lens)
        stats["length_loss"] = float(length.detach())
        loss = dp + cfg.model.length_loss_weight * length
    objective = cfg.train.objective
    if objective == "dp":
        return loss, stats
    stats["dp_loss"] = float(dp.detach())
    if glance is not None:
        with autocast:
            out = model(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
    term, term_stats = codat_term(
        out,
        batch,
        objective=objective,
        codat=cfg.codat,
        alpha=cfg.codat.gate(),
        generator=generator,
        fused=options.fused_token_logp,
    )
    stats.update(term_stats)
    return loss + cfg.codat.weight * term, stats


def length_loss(
    length_logits: torch.Tensor,  # (B, C) the length head's scores
    tgt_lens: torch.Tensor,  # (B,) counting <s> and </s>
) -> tuple[torch.Tensor, float]:  # scalar with grad, accuracy in [0, 1]
    """model.upsample predict: the mean over sentences of the length head's cross-entropy against
    n_b, the reference's length counting <s> and </s> (above C - 1 = max_length: the last
    class), in float32; and the fraction of sentences whose argmax is that class."""
    targets = tgt_lens.clamp(max=length_logits.shape[1] - 1)
    logits = length_logits.float()
    accuracy = float((logits.argmax(-1) == targets).float().mean())
    return F.cross_entropy(logits, targets), accuracy


@torch.no_grad()
def dat_sentence_loss(model: DATransformer, batch: Batch) -> torch.Tensor:  # (B,)
    """-log P(Y|X) / N_b of each reference on the un-glanced DAG (inf when the graph is too short
    for it), in the model's current mode; a model.upsample predict graph is sized from the
    reference, as in training (no length loss)."""
    out = model(batch.src_ids, batch.src_lens, tgt_lens=batch.tgt_lens)
    return reference_loss(log_softmax_fp32(out.token_logits), out, batch)


# ---------------------------------------------------------------------------------------------
# CoDAT's sample term


def reference_loss(
    token_logp_vocab: torch.Tensor,  # (B, L, V) float32 log-probs of the DAG
    out: DagOutput,
    batch: Batch,
) -> torch.Tensor:  # (B,)
    """Per-sentence, length-normalised DP loss of the reference, no grad; inf when no path. What
    CoDAT's alpha gate compares with (method.md §9.7)."""
    with torch.no_grad():
        B, L, _ = token_logp_vocab.shape
        N = batch.tgt_ids.shape[1]
        token_logp = token_logp_vocab.gather(-1, batch.tgt_ids.unsqueeze(1).expand(B, L, N))
        ll = dag_log_likelihood(token_logp, out.trans_logp, out.graph_lens, batch.tgt_lens)
        return -ll / batch.tgt_lens.to(ll.dtype)


def codat_samples(
    token_logp_vocab: torch.Tensor,  # (B, L, V)
    out: DagOutput,
    *,
    codat: CodatConfig,
    generator: torch.Generator | None,
) -> DagSamples:
    """K = codat.samples paths per sentence (CoDAT Algorithms 2/3), without grad."""
    with torch.no_grad():
        return sample_dag(
            token_logp_vocab.detach(),
            out.trans_logp.detach(),
            out.graph_lens,
            num_samples=codat.samples,
            temperature=codat.temperature,
            top_p=codat.top_p,
            top_tokens=codat.top_tokens,
            generator=generator,
            special_ids=SPECIAL_IDS,
            pad_id=PAD_ID,
            mode=codat.sampler,
        )


def codat_term(
    out: DagOutput,  # the un-glanced DAG, with grad
    batch: Batch,
    *,
    objective: str,  # "codat" or "reward"
    codat: CodatConfig,
    alpha: float,  # DP-loss gate (math.inf: every sentence)
    generator: torch.Generator | None,
    fused: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CoDAT's extra loss on one micro-batch (paper §3): sample K outputs from the DAG, reward them
    by sentence BLEU against the reference, select (the alpha gate, then codat's best `kept` or
    reward's first `reward_samples`), score them by their DAG marginal with grad, and compare the
    scores: ranking constraints (CoDAT eq. (10)) or REINFORCE.

    The loss is scaled by the fraction of sentences that pass the gate (the others add 0, as in
    the DP loss's mean); it is exactly 0 when none passes. `fused` (a speed setting): the scores'
    token log-probs by `gather_token_logp(fused=True)` (the float32 (B, L, V) log-probs that the
    sampler reads then need no grad), else gathered from those log-probs.
    """
    if objective not in SAMPLE_OBJECTIVES:
        raise ValueError(f"train.objective='{objective}' has no sample term (codat or reward)")
    logits = out.token_logits.detach() if fused else out.token_logits
    token_logp_vocab = log_softmax_fp32(logits)  # (B, L, V), with grad unless fused
    samples = codat_samples(token_logp_vocab, out, codat=codat, generator=generator)
    ref_ids, ref_lens = batch.tgt_ids[:, 1:], batch.tgt_lens - 2  # without <s> and </s>
    with torch.no_grad():
        rewards = sentence_bleu(samples.tokens, samples.lengths, ref_ids, ref_lens).float() / 100
        ref_loss = reference_loss(token_logp_vocab, out, batch)
    selected = select_samples(
        samples.tokens,
        samples.lengths,
        rewards,
        ref_loss,
        objective=objective,
        count=codat.per_sentence(objective),
        alpha=alpha,
        pad_id=PAD_ID,
        filter_key=(
            score_filter_key(token_logp_vocab, out, samples, codat=codat)
            if objective == "codat"  # reward takes the first samples: no ranking key
            else None
        ),
    )
    scores, chosen, target_lens = None, selected.chosen, None
    if len(chosen.rows):
        rows = chosen.rows
        targets, target_lens = sample_targets(
            chosen.tokens, chosen.lengths, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
        )
        scores = chosen_log_q(out, token_logp_vocab, rows, targets, target_lens, fused=fused)
    return sample_term(
        scores,
        selected,
        objective=objective,
        margin=codat.margin,
        tie=codat.tie,
        pair_average=codat.pair_average,
        reward_temperature=codat.reward_temperature,
        target_lens=target_lens,
    )


def score_filter_key(
    token_logp_vocab: torch.Tensor,  # (B, L, V)
    out: DagOutput,
    samples: DagSamples,
    *,
    codat: CodatConfig,
) -> torch.Tensor | None:  # (B, K)
    """codat.filter score: the length-normalised DAG marginal of all K samples (no grad), by
    which the kept 25% are chosen instead of by reward; None for codat.filter reward. Each
    distinct sample is scored once (`compact_distinct`): at the paper's tau most of the K are
    repeats."""
    if codat.filter != "score":
        return None
    with torch.no_grad():
        tokens, lengths, slot = compact_distinct(samples.tokens, samples.lengths, pad_id=PAD_ID)
        targets, target_lens = sample_targets(
            tokens, lengths, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
        )
        packed = samples_log_q(
            token_logp_vocab.detach(), out.trans_logp.detach(), out.graph_lens, targets, target_lens
        )
        return packed.gather(1, slot)


def chosen_log_q(
    out: DagOutput,  # the un-glanced DAG, with grad
    token_logp_vocab: torch.Tensor,  # (B, L, V) its float32 log-probs (with grad unless fused)
    rows: torch.Tensor,  # (b,) the sentences of the chosen samples
    targets: torch.Tensor,  # (b, k, N') <s> y </s> of the chosen samples
    target_lens: torch.Tensor,  # (b, k)
    *,
    fused: bool,
) -> torch.Tensor:  # (b, k), with grad
    """`samples_log_q` of the chosen samples. fused: their token log-probs gathered from the
    logits of all B sentences (`gather_token_logp`, <pad> for the others), so that neither the
    (B, L, V) log-probs nor a (b, L, V) copy of their rows carries grad."""
    if not fused:
        return samples_log_q(
            token_logp_vocab[rows], out.trans_logp[rows], out.graph_lens[rows], targets, target_lens
        )
    B = out.token_logits.shape[0]
    ids = targets.new_full((B, targets[0].numel()), PAD_ID)
    ids[rows] = targets.flatten(1)
    token_logp = gather_token_logp(out.token_logits, ids)[rows]  # (b, L, k * N')
    return gathered_samples_log_q(
        token_logp, out.trans_logp[rows], out.graph_lens[rows], target_lens
    )
