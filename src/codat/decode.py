"""DAG decoders as pure tensor functions (method.md §5): greedy, lookahead, joint-Viterbi.

All take `token_logp (B, L, V)` log-probabilities, `trans_logp (B, L, L)` and `graph_lens (B,)`, and
return token ids `(B, T)` padded with `pad_id`, after collapsing consecutive duplicate tokens and
removing <s>, </s> and padding. Every walk advances the whole batch in one tensor step: there is no
Python loop over sentences.
"""

from __future__ import annotations

import torch


def collapse_tokens(
    tokens: torch.Tensor,  # (B, T) long
    valid_mask: torch.Tensor,  # (B, T) bool, True = token was emitted
    *,
    special_ids: tuple[int, ...],
    pad_id: int,
) -> torch.Tensor:  # (B, T') long
    """Drop consecutive repeats of a token, then specials and invalid slots; left-align the rest."""
    B, T = tokens.shape
    prev = torch.cat([tokens.new_full((B, 1), -1), tokens[:, :-1]], dim=1)
    prev_valid = torch.cat([valid_mask.new_zeros(B, 1), valid_mask[:, :-1]], dim=1)
    keep = valid_mask & ~(prev_valid & (tokens == prev))
    for sid in special_ids:
        keep &= tokens != sid
    # Stable sort puts the kept slots first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    out = tokens.gather(1, order).masked_fill(~keep.gather(1, order), pad_id)
    width = max(int(keep.sum(1).max()) if B else 0, 1)
    return out[:, :width]


def _check(token_logp: torch.Tensor, trans_logp: torch.Tensor, graph_lens: torch.Tensor) -> None:
    B, L, _ = token_logp.shape
    if trans_logp.shape != (B, L, L) or graph_lens.shape != (B,):
        raise ValueError(
            f"token_logp {tuple(token_logp.shape)}, trans_logp {tuple(trans_logp.shape)} and "
            f"graph_lens {tuple(graph_lens.shape)} do not agree on (B, L)"
        )
    if B and (int(graph_lens.min()) < 2 or int(graph_lens.max()) > L):
        raise ValueError(f"graph_lens must lie in [2, {L}], got {graph_lens.tolist()}")


def walk_successors(
    successor: torch.Tensor,  # (B, L) long: the next vertex chosen at each vertex
    graph_lens: torch.Tensor,  # (B,)
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T) long, (B, T) bool
    """Follow successor pointers from vertex 0 to vertex L_b - 1 for all sentences at once."""
    B, L = successor.shape
    last = (graph_lens - 1).long()
    cur = torch.zeros(B, dtype=torch.long, device=successor.device)
    done = cur >= last
    vertices, valid = [cur], [torch.ones_like(done)]
    for _ in range(L - 1):
        if bool(done.all()):
            break
        cur = torch.where(done, cur, successor.gather(1, cur.unsqueeze(1)).squeeze(1))
        vertices.append(cur)
        valid.append(~done)
        done = done | (cur >= last)
    return torch.stack(vertices, dim=1), torch.stack(valid, dim=1)


def lookahead_decode(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    *,
    beta: float,
    special_ids: tuple[int, ...],
    pad_id: int,
) -> torch.Tensor:  # (B, T)
    """Lookahead: a_{t+1} = argmax_j E[a_t, j] + beta * max_v log P(v | j); emit argmax tokens.

    beta multiplies the token score, as in DAT's code (method.md §5); beta = 0 is greedy.
    """
    _check(token_logp, trans_logp, graph_lens)
    vertex_logp, vertex_ids = token_logp.max(dim=-1)  # (B, L)
    scores = (
        trans_logp if beta == 0 else trans_logp + beta * vertex_logp.unsqueeze(1)
    )  # no 0 * -inf
    successor = scores.argmax(dim=-1)  # (B, L)
    path, valid = walk_successors(successor, graph_lens)
    tokens = vertex_ids.gather(1, path)
    return collapse_tokens(tokens, valid, special_ids=special_ids, pad_id=pad_id)


def greedy_decode(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    *,
    special_ids: tuple[int, ...],
    pad_id: int,
) -> torch.Tensor:  # (B, T)
    """Greedy: follow the most likely transition, a_{t+1} = argmax_j E[a_t, j]."""
    return lookahead_decode(
        token_logp, trans_logp, graph_lens, beta=0.0, special_ids=special_ids, pad_id=pad_id
    )


def joint_viterbi_path(
    vertex_logp: torch.Tensor,  # (B, L): max_v log P(v | j)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    *,
    length_beta: float,
    max_edges: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, T), (B, T) bool, (B,)
    """The path maximising (sum of its transition and vertex token scores) / (#edges)^beta.

    Joint-Viterbi (Shao et al. 2022): delta_1[j] = s_0 + E[0, j] + s_j,
    delta_{t+1}[j] = max_k delta_t[k] + E[k, j] + s_j;
    pick t* = argmax_t delta_t[L_b-1] / t^beta and backtrack.
    Every vertex of the path, both ends included, adds its token score.
    Returns the vertex path (B, T), its validity mask and the normalised score.
    """
    B, L = vertex_logp.shape
    steps = L - 1 if max_edges is None else max(1, min(max_edges, L - 1))
    rows = torch.arange(B, device=vertex_logp.device)
    last = (graph_lens - 1).long()
    delta = vertex_logp[:, :1] + trans_logp[:, 0, :] + vertex_logp  # (B, L), paths with 1 edge
    backs = []
    finals = [delta[rows, last]]
    for _ in range(1, steps):
        best, arg = (delta.unsqueeze(2) + trans_logp).max(dim=1)  # (B, L)
        delta = best + vertex_logp
        backs.append(arg)
        finals.append(delta[rows, last])
    edges = torch.arange(1, steps + 1, device=vertex_logp.device, dtype=vertex_logp.dtype)
    normalised = torch.stack(finals, dim=1) / edges.pow(length_beta)  # (B, steps)
    score, best_t = normalised.max(dim=1)  # best_t + 1 edges
    n_edges = best_t + 1
    width = int(n_edges.max()) + 1
    path = torch.zeros(B, width, dtype=torch.long, device=vertex_logp.device)
    vertex = last.clone()
    for t in range(width - 1, 0, -1):
        active = n_edges >= t
        path[:, t] = torch.where(active, vertex, path[:, t])
        if t >= 2:
            vertex = torch.where(active, backs[t - 2][rows, vertex], vertex)
    valid = torch.arange(width, device=path.device).unsqueeze(0) <= n_edges.unsqueeze(1)
    return path, valid, score


def joint_viterbi_decode(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    *,
    length_beta: float,
    special_ids: tuple[int, ...],
    pad_id: int,
    max_edges: int | None = None,
) -> torch.Tensor:  # (B, T)
    """Joint-Viterbi decoding: the best (path, argmax tokens) pair under length normalisation."""
    _check(token_logp, trans_logp, graph_lens)
    vertex_logp, vertex_ids = token_logp.max(dim=-1)
    path, valid, _ = joint_viterbi_path(
        vertex_logp, trans_logp, graph_lens, length_beta=length_beta, max_edges=max_edges
    )
    tokens = vertex_ids.gather(1, path)
    return collapse_tokens(tokens, valid, special_ids=special_ids, pad_id=pad_id)
