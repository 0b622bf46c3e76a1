"""One interface over the model families (`model.arch`), so that training, validation and decoding
run every model through the same data pipeline and loop.

A `Family` bundles, for one architecture:
- `build(cfg.model)`: the `nn.Module`;
- `loss(model, core, batch, tc=, ratio=, generator=, autocast=)`: the training loss of one
  micro-batch and its statistics (`model` may be DDP-wrapped, `core` is the unwrapped module; the
  glancing ratio `ratio` applies to the families that glance: dat, nat (= GLAT), ctc (= CTC+GLAT));
- `sentence_loss(core, batch)`: the per-sentence, length-normalised validation loss (B,), no grad;
  also what CoDAT's alpha gate compares with;
- `decoders`: name -> `(core, src_ids, src_lens, dc, generator) -> (B, T)` ids without specials,
  PAD_ID-padded; the first one is the family's default;
- `objectives`: the `train.objective` values the family supports.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from codat.cmlm import CMLM, cmlm_sentence_loss, cmlm_training_loss, mask_predict
from codat.config import DecodeConfig, ModelConfig, TrainConfig
from codat.contrastive import SampleSettings, ranking_terms, sample_terms
from codat.ctc import (
    CTCModel,
    CtcOutput,
    ctc_decode,
    ctc_log_likelihood,
    ctc_output_scores,
    ctc_sample,
    ctc_sentence_loss,
    ctc_training_loss,
)
from codat.dag import dag_best_path
from codat.dat import DagOutput, DATransformer
from codat.data import EOS_ID, PAD_ID, SPECIAL_IDS, Batch
from codat.decode import (
    DagSamples,
    greedy_decode,
    joint_viterbi_decode,
    lookahead_decode,
    pick_best,
    rerank_scores,
    sample_dag,
)
from codat.glancing import choose_glanced, force_alignment
from codat.nat import (
    VanillaNAT,
    content_targets,
    glat_loss,
    nat_decode,
    nat_sample_scores,
    npd_samples,
    pick_best_npd,
    token_logp_sums,
)
from codat.objectives import dag_nll, gather_token_logp
from codat.transformer import ATransformer, beam_search, greedy_search, label_smoothed_nll

Decoder = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, DecodeConfig, torch.Generator], torch.Tensor
]


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[ModelConfig], nn.Module]
    loss: Callable[..., tuple[torch.Tensor, dict]]
    sentence_loss: Callable[[nn.Module, Batch], torch.Tensor]
    decoders: dict[str, Decoder]
    objectives: tuple[str, ...] = ("dp",)
    glances: bool = False  # uses train.glance_* (dat, nat = GLAT, ctc = CTC+GLAT)

    @property
    def default_decoder(self) -> str:
        return next(iter(self.decoders))

    def decoder(self, name: str) -> Decoder:
        """The decoder `name` ('' = the family's default), or a ValueError naming the choices."""
        name = name or self.default_decoder
        if name not in self.decoders:
            raise ValueError(
                f"decoder '{name}' does not apply to model.arch={self.name} "
                f"(choose from {', '.join(self.decoders)})"
            )
        return self.decoders[name]


def sample_settings(tc: TrainConfig, *, objective: str | None = None, alpha=None):
    """The CoDAT sampling/ranking knobs of a train config (method.md §9.10)."""
    return SampleSettings(
        objective=objective or tc.objective,
        samples=tc.cl_samples,
        keep=tc.cl_keep,
        temperature=tc.cl_temperature,
        top_p=tc.cl_top_p,
        top_tokens=tc.cl_top_tokens,
        margin=tc.cl_margin,
        tie=tc.cl_tie,
        alpha=(tc.cl_alpha if tc.cl_alpha > 0 else math.inf) if alpha is None else alpha,
        reward_samples=tc.reward_samples,
    )


def _restore_rng(cpu_rng: torch.Tensor, cuda_rng: torch.Tensor | None) -> None:
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng)


# ---------------------------------------------------------------------------------------------
# DAT


def dat_loss(
    model: torch.nn.Module,  # possibly DDP-wrapped
    core: DATransformer,  # the unwrapped module, for the no-grad glancing pass
    batch: Batch,
    *,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict, DagOutput | None]:
    """DP loss of one micro-batch with glancing (method.md §4): pass 1 without grad finds the best
    alignment and the revealed vertices; pass 2, with identical dropout masks, is trained.
    Also returns pass 2's output when nothing was glanced (so CoDAT can reuse it), else None."""
    stats = {}
    graph_ids = None
    path = keep = None
    if ratio > 0:
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if batch.src_ids.is_cuda else None
        with torch.no_grad(), autocast:
            out1 = core(batch.src_ids, batch.src_lens)
            # Only the alignment is needed here, so the model's dtype suffices (no fp32 copy).
            tok1 = (
                torch.log_softmax(out1.token_logits, dim=-1)
                .gather(-1, batch.tgt_ids.unsqueeze(1).expand(-1, out1.token_logits.shape[1], -1))
                .float()
            )
            path, _ = dag_best_path(tok1, out1.trans_logp, out1.graph_lens, batch.tgt_lens)
            keep, oracle = choose_glanced(
                path,
                out1.token_logits.argmax(-1),
                batch.tgt_ids,
                batch.tgt_lens,
                ratio=ratio,
                generator=generator,
            )
            placeholders = core.graph_inputs(out1.graph_lens)
            graph_ids = torch.where(keep, oracle, placeholders)
            stats["glanced"] = float(keep.sum()) / float(batch.tgt_lens.sum())
        _restore_rng(cpu_rng, cuda_rng)  # pass 2 reuses pass 1's dropout masks
    with autocast:
        out = model(batch.src_ids, batch.src_lens, graph_ids)
    token_logp = gather_token_logp(out.token_logits, batch.tgt_ids)
    if keep is not None:
        token_logp = force_alignment(token_logp, path, keep)
    loss, _, invalid = dag_nll(token_logp, out.trans_logp, out.graph_lens, batch.tgt_lens)
    stats["invalid"] = invalid
    return loss, stats, (out if keep is None else None)


def dat_training_loss(
    model: torch.nn.Module,
    core: DATransformer,
    batch: Batch,
    *,
    tc: TrainConfig,
    ratio: float,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict]:
    """The configured objective: the DP loss, plus for codat/reward the sample term computed on
    the un-glanced DAG (the samples come from the model as it decodes, method.md §9.8)."""
    loss, stats, out = dat_loss(
        model, core, batch, ratio=ratio, generator=generator, autocast=autocast
    )
    if tc.objective == "dp":
        return loss, stats
    stats["dp_loss"] = float(loss.detach())
    if out is None:
        with autocast:  # the unwrapped module: its gradients join the DDP model's in one backward
            out = core(batch.src_ids, batch.src_lens)
    extra, sample_stats = sample_terms(out, batch, sample_settings(tc), generator)
    stats.update(sample_stats)
    return loss + tc.cl_weight * extra, stats


@torch.no_grad()
def dat_sentence_loss(core: DATransformer, batch: Batch) -> torch.Tensor:  # (B,)
    out = core(batch.src_ids, batch.src_lens)
    tok = gather_token_logp(out.token_logits, batch.tgt_ids)
    return dag_nll(tok, out.trans_logp, out.graph_lens, batch.tgt_lens)[1]


def _dat_decoder(decode: Callable[[DagOutput, DecodeConfig, torch.Generator], torch.Tensor]):
    def run(core, src_ids, src_lens, dc, generator):
        return decode(core(src_ids, src_lens), dc, generator)

    run.__doc__ = decode.__doc__
    return run


def _lookahead(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    logp = torch.log_softmax(out.token_logits.float(), dim=-1)
    return lookahead_decode(
        logp, out.trans_logp, out.graph_lens, beta=dc.beta, special_ids=SPECIAL_IDS, pad_id=PAD_ID
    )


def _greedy(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    logp = torch.log_softmax(out.token_logits.float(), dim=-1)
    return greedy_decode(
        logp, out.trans_logp, out.graph_lens, special_ids=SPECIAL_IDS, pad_id=PAD_ID
    )


def _joint_viterbi(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    logp = torch.log_softmax(out.token_logits.float(), dim=-1)
    return joint_viterbi_decode(
        logp,
        out.trans_logp,
        out.graph_lens,
        length_beta=dc.viterbi_beta,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def draw_samples(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> DagSamples:
    """K samples per sentence with `dc`'s samples / temperature / top_p / top_tokens."""
    return sample_dag(
        torch.log_softmax(out.token_logits.float(), dim=-1),
        out.trans_logp,
        out.graph_lens,
        num_samples=dc.samples,
        temperature=dc.temperature,
        top_p=dc.top_p,
        top_tokens=dc.top_tokens,
        generator=generator,
        special_ids=SPECIAL_IDS,
        pad_id=PAD_ID,
    )


def _sample(out: DagOutput, dc: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    samples = draw_samples(out, dc, generator)
    return pick_best(samples, rerank_scores(samples, beta=dc.sample_beta), pad_id=PAD_ID)


DAT_DECODERS = {
    "lookahead": _lookahead,
    "greedy": _greedy,
    "viterbi": _joint_viterbi,
    "sample": _sample,
}

DAT = Family(
    name="dat",
    build=DATransformer,
    loss=dat_training_loss,
    sentence_loss=dat_sentence_loss,
    decoders={name: _dat_decoder(f) for name, f in DAT_DECODERS.items()},
    objectives=("dp", "codat", "reward"),
    glances=True,
)


# ---------------------------------------------------------------------------------------------
# Autoregressive Transformer


def _at_io(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: decoder input <s> y, target y </s> (PAD_ID-padded)."""
    prev = batch.tgt_ids[:, :-1]
    target = batch.tgt_ids[:, 1:]
    return prev.masked_fill(prev == EOS_ID, PAD_ID), target


def at_training_loss(model, core, batch, *, tc, ratio, generator, autocast):
    prev, target = _at_io(batch)
    with autocast:
        logits = model(batch.src_ids, batch.src_lens, prev)
    loss, nll = label_smoothed_nll(logits, target, pad_id=PAD_ID, epsilon=tc.label_smoothing)
    return loss, {"nll": float(nll.detach())}


@torch.no_grad()
def at_sentence_loss(core, batch: Batch) -> torch.Tensor:  # (B,) mean NLL per target token
    prev, target = _at_io(batch)
    logp = torch.log_softmax(core(batch.src_ids, batch.src_lens, prev).float(), dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    valid = target != PAD_ID
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


def _at_beam(core, src_ids, src_lens, dc, generator):
    return beam_search(
        core,
        src_ids,
        src_lens,
        beam=dc.beam,
        length_penalty=dc.length_penalty,
        max_len_a=dc.max_len_a,
        max_len_b=dc.max_len_b,
    )


def _at_greedy(core, src_ids, src_lens, dc, generator):
    return greedy_search(core, src_ids, src_lens, max_len_a=dc.max_len_a, max_len_b=dc.max_len_b)


AT = Family(
    name="at",
    build=ATransformer,
    loss=at_training_loss,
    sentence_loss=at_sentence_loss,
    decoders={"beam": _at_beam, "greedy": _at_greedy},
)


# ---------------------------------------------------------------------------------------------
# Vanilla NAT / GLAT (glancing ratio > 0), with CoDAT's objectives on NPD samples (Table 2)


def _build_nat(cfg: ModelConfig) -> nn.Module:
    return VanillaNAT(cfg, max_length=cfg.max_length)


def nat_training_loss(model, core, batch, *, tc, ratio, generator, autocast):
    """GLAT's loss (vanilla NAT when ratio = 0); for codat/reward plus the ranking term on noisy
    parallel decoding samples scored by the model (CoDAT Table 2: GLAT + NPD)."""
    with autocast:
        result = glat_loss(
            model,
            core,
            batch,
            ratio=ratio,
            generator=generator,
            label_smoothing=tc.label_smoothing,
        )
    stats = {"length_nll": float(result.length_nll)}
    if ratio > 0:
        stats["glance"] = ratio
    if tc.objective == "dp":
        return result.loss, stats
    settings = sample_settings(tc)
    stats["dp_loss"] = float(result.loss.detach())
    with torch.no_grad(), autocast:
        samples = npd_samples(
            core,
            batch.src_ids,
            batch.src_lens,
            k=settings.samples,
            sigma=tc.cl_noise,
            generator=generator,
        )
        ref_loss = nat_sentence_loss(core, batch)

    def score(rows: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with autocast:
            return nat_sample_scores(
                core, batch.src_ids[rows], batch.src_lens[rows], tokens, lengths
            ).float()

    ref_ids, ref_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    extra, sample_stats = ranking_terms(
        samples.tokens, samples.lengths, ref_ids, ref_lens, ref_loss, settings, score
    )
    stats.update(sample_stats)
    return result.loss + tc.cl_weight * extra, stats


@torch.no_grad()
def nat_sentence_loss(core, batch: Batch) -> torch.Tensor:  # (B,) token NLL at the true length
    tgt_ids, tgt_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
    # A reference longer than the decoder can be (max_length) is scored on its first max_length.
    tgt_lens = tgt_lens.clamp(max=core.max_length)
    lens = tgt_lens.clamp(min=1)
    out = core(batch.src_ids, batch.src_lens, lens)
    return (
        -token_logp_sums(out.token_logits, tgt_ids[:, : out.token_logits.shape[1]], tgt_lens) / lens
    )


def _nat_argmax(core, src_ids, src_lens, dc, generator):
    return nat_decode(core, src_ids, src_lens, length_beam=dc.length_beam)


def _nat_npd(core, src_ids, src_lens, dc, generator):
    samples = npd_samples(
        core,
        src_ids,
        src_lens,
        k=max(dc.samples // dc.length_beam, 1),
        sigma=dc.noise,
        generator=generator,
        length_beam=dc.length_beam,
    )
    return pick_best_npd(samples)


NAT = Family(
    name="nat",
    build=_build_nat,
    loss=nat_training_loss,
    sentence_loss=nat_sentence_loss,
    decoders={"argmax": _nat_argmax, "npd": _nat_npd},
    objectives=("dp", "codat", "reward"),
    glances=True,
)


# ---------------------------------------------------------------------------------------------
# CTC NAT / CTC+GLAT (glancing ratio > 0), with CoDAT's objectives on CTC samples


def ctc_family_loss(model, core, batch, *, tc, ratio, generator, autocast):
    """CTC (+GLAT) loss; for codat/reward plus the ranking term on K samples drawn position by
    position from the un-glanced output, scored by their CTC marginal (all alignments)."""
    with autocast:
        loss, stats = ctc_training_loss(model, core, batch, ratio=ratio, generator=generator)
    if tc.objective == "dp":
        return loss, stats
    settings = sample_settings(tc)
    stats["dp_loss"] = float(loss.detach())
    with autocast:
        out = core(batch.src_ids, batch.src_lens)  # un-glanced, with grad
    tokens, lengths = ctc_sample(
        out, settings.samples, temperature=settings.temperature, generator=generator
    )
    with torch.no_grad():
        ref_ids, ref_lens = content_targets(batch.tgt_ids, batch.tgt_lens)
        ll = ctc_log_likelihood(
            torch.log_softmax(out.token_logits.detach().float(), dim=-1),
            out.out_lens,
            ref_ids,
            ref_lens,
        )
        ref_loss = -ll / ref_lens.clamp(min=1)

    def score(rows: torch.Tensor, chosen: torch.Tensor, chosen_lens: torch.Tensor):
        sub = CtcOutput(out.token_logits[rows], out.out_lens[rows])
        return ctc_output_scores(sub, chosen, chosen_lens)

    extra, sample_stats = ranking_terms(
        tokens, lengths, ref_ids, ref_lens, ref_loss, settings, score
    )
    stats.update(sample_stats)
    return loss + tc.cl_weight * extra, stats


def _ctc_greedy(core, src_ids, src_lens, dc, generator):
    return ctc_decode(core, src_ids, src_lens)


CTC = Family(
    name="ctc",
    build=CTCModel,
    loss=ctc_family_loss,
    sentence_loss=ctc_sentence_loss,
    decoders={"greedy": _ctc_greedy},
    objectives=("dp", "codat", "reward"),
    glances=True,
)


# ---------------------------------------------------------------------------------------------
# CMLM (mask-predict)


def cmlm_family_loss(model, core, batch, *, tc, ratio, generator, autocast):
    with autocast:
        return cmlm_training_loss(
            model, core, batch, generator=generator, label_smoothing=tc.label_smoothing
        )


def _mask_predict(core, src_ids, src_lens, dc, generator):
    return mask_predict(
        core, src_ids, src_lens, iterations=dc.iterations, length_beam=dc.length_beam
    )


CMLM_FAMILY = Family(
    name="cmlm",
    build=CMLM,
    loss=cmlm_family_loss,
    sentence_loss=cmlm_sentence_loss,
    decoders={"mask-predict": _mask_predict},
)


FAMILIES: dict[str, Family] = {f.name: f for f in (DAT, AT, NAT, CTC, CMLM_FAMILY)}


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ValueError(f"model.arch='{arch}' has no implementation (have {', '.join(FAMILIES)})")
    return FAMILIES[arch]


def family_of(model: nn.Module) -> Family:
    return family(model.cfg.arch)
