"""CoDAT fine-tuning terms (paper §3, method.md §9): samples from the model's own DAG, ranked by
sentence BLEU against the reference, trained with ranking constraints (`codat`) or REINFORCE
(`reward`), on top of the DP loss.

One call per micro-batch: `sample_terms(out, batch, settings, generator)` takes the un-glanced
`DagOutput` (with grad), draws K samples per sentence without grad, and returns the extra loss and
its statistics. Everything is batched over sentences and samples. `ranking_terms` is the part that
does not depend on the model (rewards, gate, selection, loss): any model that can produce samples
and score them with grad uses it (the vanilla NAT / GLAT with noisy parallel decoding does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from codat.dag import dag_log_likelihood
from codat.dat import DagOutput
from codat.data import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, Batch
from codat.decode import sample_dag
from codat.objectives import contrastive_loss, reinforce_loss, sample_targets, samples_log_q
from codat.rewards import sentence_bleu

OBJECTIVES = ("dp", "codat", "reward")


@dataclass(frozen=True)
class SampleSettings:
    objective: str  # "codat" or "reward"
    samples: int = 128  # K per sentence
    keep: float = 0.25  # codat: fraction of the K kept, best by reward
    temperature: float = 0.1
    top_p: float = 0.5
    top_tokens: int = 1  # candidate tokens per vertex (1 = Algorithm 2's best token)
    margin: float = 0.001  # eps_LB per rank gap
    tie: float = 0.001  # rewards (BLEU / 100) closer than this are ties
    alpha: float = math.inf  # DP-loss gate: sentences above it get no extra term
    reward_samples: int = 32  # reward: the first R of the K (i.i.d.) samples carry the gradient

    def __post_init__(self) -> None:
        if self.objective not in ("codat", "reward"):
            raise ValueError(f"objective must be 'codat' or 'reward', got '{self.objective}'")
        if self.samples < 2 or not 0 < self.keep <= 1:
            raise ValueError(f"need samples >= 2 and 0 < keep <= 1: {self.samples}, {self.keep}")

    @property
    def kept(self) -> int:
        return max(2, math.ceil(self.samples * self.keep))


def reference_content(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # (B, N-1), (B,)
    """The reference without <s> and </s>, as the samples come out of the decoder."""
    return batch.tgt_ids[:, 1:], batch.tgt_lens - 2


def duplicate_mask(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # (B, K) bool
    """True for a sample identical to an earlier sample of the same sentence."""
    B, K, T = tokens.shape
    pos = torch.arange(T, device=tokens.device)
    clean = tokens.masked_fill(pos >= lengths.unsqueeze(-1), PAD_ID)
    same = (clean.unsqueeze(2) == clean.unsqueeze(1)).all(-1)  # (B, K, K)
    earlier = torch.ones(K, K, dtype=torch.bool, device=tokens.device).tril(-1)
    return (same & earlier).any(-1)


def reference_dp_loss(logp: torch.Tensor, out: DagOutput, batch: Batch) -> torch.Tensor:  # (B,)
    """Per-sentence, length-normalised DP loss of the reference on the un-glanced DAG (no grad):
    the quantity the alpha gate compares with (method.md §9.7)."""
    with torch.no_grad():
        B, L, _ = logp.shape
        N = batch.tgt_ids.shape[1]
        tok = logp.gather(-1, batch.tgt_ids.unsqueeze(1).expand(B, L, N))
        ll = dag_log_likelihood(tok, out.trans_logp, out.graph_lens, batch.tgt_lens)
        return -ll / batch.tgt_lens.to(ll.dtype)


def sample_terms(
    out: DagOutput,
    batch: Batch,
    settings: SampleSettings,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict]:
    """The extra loss of `codat` / `reward` for one micro-batch of DAT, and its statistics."""
    logp = torch.log_softmax(out.token_logits.float(), dim=-1)  # (B, L, V), with grad
    with torch.no_grad():
        samples = sample_dag(
            logp.detach(),
            out.trans_logp.detach(),
            out.graph_lens,
            num_samples=settings.samples,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_tokens=settings.top_tokens,
            generator=generator,
            special_ids=SPECIAL_IDS,
            pad_id=PAD_ID,
        )
        ref_loss = reference_dp_loss(logp, out, batch)  # (B,); inf when no path

    def score(rows: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        targets, target_lens = sample_targets(
            tokens, lengths, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID
        )
        return samples_log_q(
            logp[rows], out.trans_logp[rows], out.graph_lens[rows], targets, target_lens
        )

    ref_ids, ref_lens = reference_content(batch)
    return ranking_terms(
        samples.tokens, samples.lengths, ref_ids, ref_lens, ref_loss, settings, score
    )


def ranking_terms(
    tokens: torch.Tensor,  # (B, K, T) sample ids (no grad), PAD_ID beyond each length
    lengths: torch.Tensor,  # (B, K)
    ref_ids: torch.Tensor,  # (B, R) reference content ids
    ref_lens: torch.Tensor,  # (B,)
    ref_loss: torch.Tensor,  # (B,) the model's length-normalised loss of the reference (gate)
    settings: SampleSettings,
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict]:
    """The model-independent part of `codat` / `reward`: sentence-BLEU rewards, the alpha gate,
    the choice of samples, and the contrastive or REINFORCE loss of their scores.

    `score(rows, tokens, lengths)` returns, with grad, the model's length-normalised log q of the
    chosen samples tokens (b, k, t) / lengths (b, k) of the sentences `rows` (b,): the DAG
    marginal for DAT, the token log-probs given the length for a vanilla NAT.
    """
    with torch.no_grad():
        rewards = sentence_bleu(tokens, lengths, ref_ids, ref_lens).float() / 100
        gate = torch.isfinite(ref_loss) & (ref_loss <= settings.alpha)
        duplicates = duplicate_mask(tokens, lengths)
    stats = {
        "gate_pass": float(gate.float().mean()),
        "distinct": float((~duplicates).float().mean()),
        "sample_bleu": float(rewards.mean()) * 100,
        "oracle_bleu": float(rewards.amax(1).mean()) * 100,
    }
    rows = gate.nonzero().squeeze(1)
    K = tokens.shape[1]
    if len(rows) == 0:
        stats["cl_loss" if settings.objective == "codat" else "reward_loss"] = 0.0
        return rewards.new_zeros(()), stats

    if settings.objective == "codat":
        # Distinct samples first: a duplicate may only fill a slot no distinct sample can.
        key = torch.where(duplicates, rewards - 2.0, rewards)[rows]
        idx = key.topk(min(settings.kept, K), dim=1).indices  # (b, kept)
    else:
        idx = torch.arange(min(settings.reward_samples, K), device=rows.device)
        idx = idx.unsqueeze(0).expand(len(rows), -1)
    chosen = tokens[rows].gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    chosen_lens = lengths[rows].gather(1, idx)
    scores = score(rows, chosen[..., : max(int(chosen_lens.max()), 1)], chosen_lens)
    picked_rewards = rewards[rows].gather(1, idx)
    if settings.objective == "codat":
        mask = ~duplicates[rows].gather(1, idx)
        loss = contrastive_loss(
            scores, picked_rewards, margin=settings.margin, mask=mask, tie=settings.tie
        )
        stats["cl_loss"] = float(loss.detach())
    else:
        loss = reinforce_loss(scores, picked_rewards, rewards[rows].mean(1))
        stats["reward_loss"] = float(loss.detach())
    # Whole-batch scale: sentences that fail the gate contribute 0, as with the DP loss mean.
    return loss * (len(rows) / len(gate)), stats
