"""Glancing training for DAT (method.md §4): reveal some aligned target tokens to the decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from codat.dag import NEG_INF


def glance_ratio(step: int, *, start: float, end: float, anneal_steps: int) -> float:
    """Linear anneal start -> end over anneal_steps (DAT's `0.5:0.1@200k`, with its +1)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / (anneal_steps + 1)


@contextlib.contextmanager
def replay_rng(device: torch.device) -> Iterator[None]:
    """Run the block, then restore torch's global RNG (CPU, and CUDA for a CUDA device) to its
    state before it: glancing's pass 2 then draws exactly pass 1's dropout masks."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def argmax_hits(
    token_logits: torch.Tensor,  # (B, L, V)
    ids: torch.Tensor,  # (B, L) one token per vertex
    candidates: torch.Tensor | None = None,  # (B, L) bool: rows that may hit, if known
) -> torch.Tensor:  # (B, L) bool
    """token_logits.argmax(-1) == ids, without the argmax over V of every row (slow in bfloat16
    on CPU): a row can only hit where the logit of its id equals the row maximum, and only those
    rows take the argmax (the first maximal index, as argmax's). `candidates`, when given, must
    include every row that hits (e.g. where the id's log-prob equals the row's largest)."""
    B, L, V = token_logits.shape
    flat = token_logits.reshape(B * L, V)
    ids = ids.reshape(B * L)
    if candidates is None:
        candidates = flat.gather(-1, ids.unsqueeze(-1)).squeeze(-1) == flat.amax(dim=-1)
    rows = candidates.reshape(B * L).nonzero().squeeze(1)
    hits = torch.zeros(B * L, dtype=torch.bool, device=flat.device)
    hits[rows] = flat[rows].float().argmax(dim=-1) == ids[rows]
    return hits.view(B, L)


def choose_glanced(
    path: torch.Tensor,  # (B, L) target index aligned to each vertex, or -1
    pred_ids: torch.Tensor,  # (B, L) argmax token of each vertex (pass 1)
    tgt_ids: torch.Tensor,  # (B, N)
    target_lens: torch.Tensor,  # (B,)
    *,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L) bool, (B, L) long
    """`number-random` glancing: reveal K = floor((N_b - #correct) * ratio + 0.5) aligned vertices.

    The K vertices are drawn uniformly among the aligned ones (<s>/</s> included). Returns the
    reveal mask and the aligned gold token of every vertex.
    """
    oracle = aligned_tokens(path, tgt_ids)
    keep = reveal(path, pred_ids == oracle, target_lens, ratio=ratio, generator=generator)
    return keep, oracle


def aligned_tokens(
    path: torch.Tensor,  # (B, L) target index aligned to each vertex, or -1
    tgt_ids: torch.Tensor,  # (B, N)
) -> torch.Tensor:  # (B, L) long
    """The gold token aligned to each vertex (that of target 0 where none is)."""
    return tgt_ids.gather(1, path.clamp(min=0))


def reveal(
    path: torch.Tensor,  # (B, L) target index aligned to each vertex, or -1
    correct: torch.Tensor,  # (B, L) bool: the vertex predicts its aligned gold token
    target_lens: torch.Tensor,  # (B,)
    *,
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (B, L) bool
    """`choose_glanced`'s draw, given which vertices predict their aligned gold token."""
    aligned = path >= 0
    same = (aligned & correct).sum(dim=1)
    count = torch.floor((target_lens - same).double() * ratio + 0.5).long()  # (B,)
    noise = torch.rand(path.shape, generator=generator, device=path.device)
    noise = noise.masked_fill(~aligned, NEG_INF)
    order = noise.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(path.shape[1], device=path.device).expand_as(order)
    )
    return aligned & (rank < count.unsqueeze(1))


def force_alignment(
    token_logp: torch.Tensor,  # (B, L, N)
    path: torch.Tensor,  # (B, L)
    keep: torch.Tensor,  # (B, L) bool
) -> torch.Tensor:  # (B, L, N)
    """Make every revealed target token i sit at its vertex j*: column i becomes 0 at j*, -inf
    elsewhere, so paths must pass through j* and the revealed token adds no loss or gradient."""
    B, L, N = token_logp.shape
    target_of_vertex = torch.where(keep, path, torch.full_like(path, N))
    forced = torch.zeros(B, N + 1, dtype=torch.bool, device=path.device)
    forced.scatter_(1, target_of_vertex, True)
    forced = forced[:, :N]  # (B, N)
    hit = target_of_vertex.unsqueeze(2) == torch.arange(N, device=path.device)  # (B, L, N)
    fixed = torch.zeros_like(token_logp).masked_fill(~hit, NEG_INF)
    return torch.where(forced.unsqueeze(1), fixed, token_logp)
