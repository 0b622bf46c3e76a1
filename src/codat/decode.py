"""DAG decoders as pure tensor functions (method.md §5): greedy, lookahead, joint-Viterbi.

All take `token_logp (B, L, V)` log-probabilities, `trans_logp (B, L, L)` and `graph_lens (B,)`, and
return token ids `(B, T)` padded with `pad_id`, after collapsing consecutive duplicate tokens and
removing <s>, </s> and padding. Every walk advances the whole batch in one tensor step: there is no
Python loop over sentences.
"""

from __future__ import annotations

from typing import NamedTuple

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


class DagSamples(NamedTuple):
    """K hypotheses per sentence drawn from the DAG (`sample_dag`)."""

    tokens: torch.Tensor  # (B, K, T) long: output ids (collapsed, no specials), pad_id-padded
    lengths: torch.Tensor  # (B, K) long: number of output ids
    paths: torch.Tensor  # (B, K, P) long: vertex path from 0 to L_b - 1, padded with L_b - 1
    path_lens: torch.Tensor  # (B, K) long: number of vertices on the path (both ends included)
    trans_score: torch.Tensor  # (B, K): sum of log P(a_{t+1} | a_t) over the path's edges
    token_score: torch.Tensor  # (B, K): sum of max_v log P(v | a_t) over the path's vertices


SAMPLERS = ("log", "paper", "dat")


def sampling_distribution(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    *,
    temperature: float,
    top_p: float,
    top_tokens: int = 1,
    mode: str = "log",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (B, L, L * c), (B, L, c), (B, L, c)
    """The distribution over (next vertex, its token) of every vertex, for one sampler `mode`.

    Candidates of vertex i are the pairs (j, v) of a successor j and one of the `top_tokens` (c)
    most likely tokens v of j (c = 1: the vertex's best token, the paper's Algorithm 2).
    Candidate index = j * c + (rank of v). Modes (method.md §9.5; tau = `temperature`):

    - log: P = E[i, j] + log P(v | j) on the log scale; keep the smallest set whose softmax(P)
      mass reaches `top_p` (the top one always), then softmax(P / tau) over that set.
    - paper: Algorithm 2/3 literally, on the probability scale: t = P(v | j) normalised by its sum
      over the sentence's vertices (and their c tokens), P = exp(E[i, j]) + t; keep the smallest
      set whose share of the row sum of P reaches `top_p`, then softmax(P / tau) over it.
      Impossible transitions (E = -inf) stay impossible.
    - dat: DAT v2.0's `inference_sample` without its n-gram bans and with beta = 1:
      S = log_softmax(E[i] / tau)[j] + log P(v | j) (tau on the transitions only); keep the c best
      candidates of the row, then those while the mass exp(S) before them is <= top_p, and draw
      proportionally to exp(S) (no further temperature).

    tau = 0 is the limit: the argmax of P (log, paper) or the argmax transition (dat, whose tokens
    stay random). Rows without successors (the last vertex and padding) put all mass on candidate
    0; a walk never reads them. Returns the row-stochastic matrix and the candidate tokens'
    log-probs and ids.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_tokens < 1:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1 and top_tokens >= 1, got {temperature}, "
            f"{top_p}, {top_tokens}"
        )
    if mode not in SAMPLERS:
        raise ValueError(f"sampler mode '{mode}': choose one of {', '.join(SAMPLERS)}")
    B, L, _ = trans_logp.shape
    if top_tokens > token_logp.shape[-1]:
        raise ValueError(f"top_tokens={top_tokens} exceeds the vocabulary ({token_logp.shape[-1]})")
    cand_logp, cand_ids = token_logp.float().topk(top_tokens, dim=-1)  # (B, L, c)
    if mode == "paper":
        probs = _paper_probs(cand_logp, trans_logp.float(), temperature, top_p)
    elif mode == "dat":
        probs = _dat_probs(cand_logp, trans_logp.float(), temperature, top_p)
    else:
        probs = _log_probs(cand_logp, trans_logp.float(), temperature, top_p)
    has_next = torch.isfinite(trans_logp).any(dim=-1, keepdim=True)  # (B, L, 1)
    first = torch.zeros_like(probs)
    first[..., 0] = 1
    return torch.where(has_next, probs, first), cand_logp, cand_ids


def _top_p_keep(mass: torch.Tensor, top_p: float, *, inclusive: bool) -> torch.Tensor:
    """Per row, the candidates kept by top-p: sorted by `mass` (B, L, C) descending, a candidate
    stays while the mass before it is < top_p (<= when `inclusive`); the top one always."""
    sorted_m, order = mass.sort(dim=-1, descending=True)
    before = sorted_m.cumsum(-1) - sorted_m
    keep_sorted = before <= top_p if inclusive else before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _tempered(score: torch.Tensor, allowed: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(score / tau) over `allowed` (B, L, C); tau = 0: one-hot of the allowed argmax."""
    score = score.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return torch.nn.functional.one_hot(score.argmax(-1), score.shape[-1]).to(score.dtype)
    return torch.softmax(score / temperature, dim=-1)


def _log_probs(cand_logp, trans, temperature, top_p) -> torch.Tensor:  # (B, L, L * c)
    B, L, c = cand_logp.shape
    joint = (trans.unsqueeze(-1) + cand_logp.unsqueeze(1)).reshape(B, L, L * c)
    has_next = torch.isfinite(joint).any(dim=-1, keepdim=True)  # (B, L, 1)
    joint = torch.where(has_next, joint, torch.zeros_like(joint))  # no NaN from all -inf rows
    if temperature == 0:
        return torch.nn.functional.one_hot(joint.argmax(-1), joint.shape[-1]).to(joint.dtype)
    keep = _top_p_keep(torch.softmax(joint, dim=-1), top_p, inclusive=False)
    return torch.softmax((joint / temperature).masked_fill(~keep, float("-inf")), dim=-1)


def _paper_probs(cand_logp, trans, temperature, top_p) -> torch.Tensor:  # (B, L, L * c)
    B, L, c = cand_logp.shape
    edge = torch.isfinite(trans)  # (B, L, L)
    # A vertex belongs to the graph when it is vertex 0 or some edge enters it.
    real = edge.any(dim=1)
    real[:, 0] = True
    t = cand_logp.exp() * real.unsqueeze(-1)  # (B, L, c)
    t = t / t.sum(dim=(1, 2), keepdim=True)  # Algorithm 2 line 2: t = t / SUM(t)
    score = (trans.exp().unsqueeze(-1) + t.unsqueeze(1)).reshape(B, L, L * c)  # line 3
    allowed = edge.unsqueeze(-1).expand(B, L, L, c).reshape(B, L, L * c)
    mass = score * allowed
    keep = _top_p_keep(mass / mass.sum(-1, keepdim=True).clamp(min=1e-30), top_p, inclusive=False)
    return _tempered(score, allowed & keep, temperature)  # lines 4-5


def _dat_probs(cand_logp, trans, temperature, top_p) -> torch.Tensor:  # (B, L, L * c)
    B, L, c = cand_logp.shape
    edge = torch.isfinite(trans)
    safe = torch.where(edge.any(-1, keepdim=True), trans, torch.zeros_like(trans))
    if temperature == 0:
        best = torch.nn.functional.one_hot(safe.argmax(-1), L).bool()
        trans_t = torch.zeros_like(trans).masked_fill(~best, float("-inf"))
    else:
        trans_t = torch.log_softmax(safe / temperature, dim=-1).masked_fill(~edge, float("-inf"))
    score = (trans_t.unsqueeze(-1) + cand_logp.unsqueeze(1)).reshape(B, L, L * c)
    top_score, top_idx = score.topk(c, dim=-1)  # DAT keeps top_cand_n joint candidates
    mass = top_score.exp()  # (B, L, c)
    keep = _top_p_keep(mass, top_p, inclusive=True)
    kept = mass * keep
    kept = kept / kept.sum(-1, keepdim=True).clamp(min=1e-30)
    return torch.zeros_like(score).scatter(-1, top_idx, kept)


def sample_dag(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    special_ids: tuple[int, ...],
    pad_id: int,
    top_tokens: int = 1,
    mode: str = "log",
) -> DagSamples:
    """Draw `num_samples` paths per sentence (CoDAT Algorithms 2/3), all walkers in one tensor.

    A path only moves forward, so a walker visits a vertex at most once: drawing one candidate
    (next vertex, its token) per (walker, vertex) up front (Algorithm 3's trick: one
    `multinomial` call for everything) and then following those pointers is an exact sample of
    Algorithm 2's walk. The walk is one gather per step for all B * K walkers. Vertex 0 shows its
    best token (<s>, dropped by the collapse) and the last vertex its drawn token (</s>), as in the
    other decoders. `token_score` sums the log-probs of the emitted vertex tokens. `mode` picks
    the step distribution (`sampling_distribution`: log, paper or dat).
    """
    _check(token_logp, trans_logp, graph_lens)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, L, _ = token_logp.shape
    K, c = num_samples, top_tokens
    if B == 0:
        empty = torch.zeros(0, K, dtype=torch.long, device=token_logp.device)
        return DagSamples(
            empty.unsqueeze(-1), empty, empty.unsqueeze(-1), empty, empty.float(), empty.float()
        )
    probs, cand_logp, cand_ids = sampling_distribution(
        token_logp, trans_logp, temperature=temperature, top_p=top_p, top_tokens=c, mode=mode
    )
    draw = torch.multinomial(probs.view(B * L, L * c), K, replacement=True, generator=generator)
    draw = draw.view(B, L, K)
    last = (graph_lens - 1).long().view(B, 1).expand(B, K)
    cur = torch.zeros(B, K, dtype=torch.long, device=token_logp.device)
    choice = torch.zeros_like(cur)  # rank of the token shown at cur
    done = cur >= last
    flat_trans = trans_logp.float().reshape(B, L * L)
    trans_score = torch.zeros(B, K, dtype=torch.float32, device=token_logp.device)
    vertices, choices = [cur], [choice]
    for _ in range(L - 1):
        if bool(done.all()):
            break
        cand = draw.gather(1, cur.unsqueeze(1)).squeeze(1)  # (B, K)
        nxt = torch.where(done, cur, cand // c)
        choice = torch.where(done, choice, cand % c)
        edge = flat_trans.gather(1, cur * L + nxt)
        trans_score = trans_score + torch.where(done, torch.zeros_like(edge), edge)
        cur = nxt
        vertices.append(cur)
        choices.append(choice)
        done = done | (cur >= last)
    paths = torch.stack(vertices, dim=2)  # (B, K, P)
    P = paths.shape[2]
    valid = torch.ones(B, K, P, dtype=torch.bool, device=paths.device)
    valid[:, :, 1:] = paths[:, :, 1:] != paths[:, :, :-1]
    flat = (paths * c + torch.stack(choices, dim=2)).reshape(B, K * P)  # index into (L * c)
    raw = cand_ids.reshape(B, L * c).gather(1, flat).view(B * K, P)
    token_score = (cand_logp.reshape(B, L * c).gather(1, flat).view(B, K, P) * valid).sum(-1)
    tokens = collapse_tokens(raw, valid.view(B * K, P), special_ids=special_ids, pad_id=pad_id)
    lengths = (tokens != pad_id).sum(-1).view(B, K)
    return DagSamples(
        tokens.view(B, K, -1), lengths, paths, valid.sum(-1), trans_score, token_score
    )


def rerank_scores(samples: DagSamples, *, beta: float) -> torch.Tensor:  # (B, K)
    """beta * (mean token log-prob per vertex) + (1 - beta) * (mean transition log-prob per edge).

    CoDAT's inference score beta * log q(y | x, a) + (1 - beta) * log q(a | x), each term
    length-normalised so that short and long hypotheses compete fairly.
    """
    n_vertices = samples.path_lens.to(samples.token_score.dtype)
    n_edges = (n_vertices - 1).clamp(min=1)
    return beta * samples.token_score / n_vertices + (1 - beta) * samples.trans_score / n_edges


def pick_best(samples: DagSamples, scores: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """The highest-scoring hypothesis of each sentence, (B, T) padded with pad_id."""
    best = scores.argmax(dim=1)  # (B,)
    rows = torch.arange(len(best), device=best.device)
    out = samples.tokens[rows, best]
    width = max(int(samples.lengths[rows, best].max()) if len(best) else 0, 1)
    return out[:, :width]


def sample_decode(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    beta: float,
    generator: torch.Generator | None,
    special_ids: tuple[int, ...],
    pad_id: int,
    top_tokens: int = 1,
) -> torch.Tensor:  # (B, T)
    """Sample K hypotheses per sentence and return the best under `rerank_scores`."""
    samples = sample_dag(
        token_logp,
        trans_logp,
        graph_lens,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        special_ids=special_ids,
        pad_id=pad_id,
        top_tokens=top_tokens,
    )
    return pick_best(samples, rerank_scores(samples, beta=beta), pad_id=pad_id)
