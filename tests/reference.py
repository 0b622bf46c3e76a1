"""Slow, obviously-correct reference definitions of the DAG maths (method.md §3 and §5).

Everything here is a plain Python loop or an explicit enumeration of paths, in float64, written from
the definitions rather than from the fast code in `codat.dag` / `codat.decode`. Only use it on tiny
graphs (L <= 8): the number of paths grows as 2^(L-2).

Conventions (as in `codat.dag`): `token_logp (B, L, N)` holds log P(y_i | v_j) at [b, j, i] (for the
decoders, `(B, L, V)` holds log P(v | j) at [b, j, v]); `trans_logp (B, L, L)` holds
log P(v_k -> v_j) at [b, k, j], -inf unless k < j < L_b. A path for a target of length N_b is
0 = a_0 < a_1 < ... < a_{N_b-1} = L_b - 1.
"""

from __future__ import annotations

import itertools
import math

import torch

NEG_INF = float("-inf")


def random_dag(
    B: int,
    L: int,
    graph_lens: list[int] | torch.Tensor,
    n_cols: int,
    dtype: torch.dtype = torch.float64,
    *,
    drop_edges: float = 0.0,
    pad_token_logp: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L, n_cols), (B, L, L)
    """A random valid ragged DAG: `token_logp (B, L, n_cols)` and `trans_logp (B, L, L)`.

    Each row k < L_b - 1 of `trans_logp` is a log_softmax of random scores over its valid successors
    k < j < L_b; every other entry (and every row of the last vertex and of padding) is -inf.
    With `drop_edges > 0` that fraction of edges is removed at random, which leaves some
    (vertex, step) cells unreachable; the edges k -> k+1 and k -> L_b - 1 are always kept, so every
    row stays normalisable and the path 0, 1, ..., N_b - 2, L_b - 1 exists whenever L_b >= N_b.
    `token_logp` rows are log_softmax of random scores; padding vertices (j >= L_b) get the
    constant `pad_token_logp` (0 = the largest possible log-probability, so any leak shows).
    """
    graph_lens = [int(x) for x in graph_lens]
    assert len(graph_lens) == B and all(1 <= g <= L for g in graph_lens)
    token_logp = torch.log_softmax(2.0 * torch.randn(B, L, n_cols, dtype=torch.float64), dim=-1)
    trans_logp = torch.full((B, L, L), NEG_INF, dtype=torch.float64)
    scores = 2.0 * torch.randn(B, L, L, dtype=torch.float64)
    keep = torch.rand(B, L, L, dtype=torch.float64) >= drop_edges
    for b in range(B):
        Lb = graph_lens[b]
        token_logp[b, Lb:, :] = pad_token_logp
        for k in range(Lb - 1):
            succ = [j for j in range(k + 1, Lb) if j in (k + 1, Lb - 1) or bool(keep[b, k, j])]
            row = torch.log_softmax(scores[b, k, succ], dim=0)
            for j, value in zip(succ, row.tolist(), strict=True):
                trans_logp[b, k, j] = value
    return token_logp.to(dtype), trans_logp.to(dtype)


def all_paths(graph_len: int, target_len: int) -> list[tuple[int, ...]]:
    """Every path 0 = a_0 < ... < a_{N-1} = L-1 with exactly `target_len` vertices."""
    if target_len == 1:
        return [(0,)] if graph_len == 1 else []
    if graph_len < 2:
        return []
    middles = itertools.combinations(range(1, graph_len - 1), target_len - 2)
    return [(0, *mid, graph_len - 1) for mid in middles]


def path_score(
    token_logp: torch.Tensor,  # (L, N) of one sentence
    trans_logp: torch.Tensor,  # (L, L) of one sentence
    path: tuple[int, ...],
) -> torch.Tensor:  # scalar
    """sum_i log P(y_i | v_{a_i}) + sum_i log P(a_{i+1} | a_i), as a differentiable scalar."""
    terms = [token_logp[a, i] for i, a in enumerate(path)]
    terms += [trans_logp[a, c] for a, c in itertools.pairwise(path)]
    return torch.stack(terms).sum()


def brute_force_log_likelihood(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,) float64
    """log sum over all paths of exp(path score), by enumeration.

    Only paths with a finite score enter the torch.logsumexp (so autograd through it gives the
    exact gradient, never NaN). A sentence without any such path gets a constant -inf with no
    gradient (use `allow_unused`/`materialize_grads` when differentiating).
    """
    token_logp = token_logp.double()
    trans_logp = trans_logp.double()
    out = []
    for b in range(token_logp.shape[0]):
        Lb, Nb = int(graph_lens[b]), int(target_lens[b])
        scores = [path_score(token_logp[b], trans_logp[b], p) for p in all_paths(Lb, Nb)]
        finite = [s for s in scores if math.isfinite(float(s.detach()))]
        if finite:
            out.append(torch.logsumexp(torch.stack(finite), dim=0))
        else:
            out.append(torch.tensor(NEG_INF, dtype=torch.float64))
    return torch.stack(out)


@torch.no_grad()
def brute_force_best_path(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> tuple[torch.Tensor, torch.Tensor]:  # (B, L) long, (B,) float64
    """The highest-scoring path by enumeration.

    Returns `path[b, j]` = target index aligned to vertex j, or -1 where none is (all -1 when no
    finite path exists), and the best score (-inf when no finite path exists).
    """
    token_logp = token_logp.double()
    trans_logp = trans_logp.double()
    B, L, _ = token_logp.shape
    paths = torch.full((B, L), -1, dtype=torch.long)
    best_scores = torch.full((B,), NEG_INF, dtype=torch.float64)
    for b in range(B):
        best, best_p = NEG_INF, None
        for p in all_paths(int(graph_lens[b]), int(target_lens[b])):
            s = float(path_score(token_logp[b], trans_logp[b], p))
            if math.isfinite(s) and s > best:
                best, best_p = s, p
        if best_p is not None:
            best_scores[b] = best
            for i, a in enumerate(best_p):
                paths[b, a] = i
    return paths, best_scores


def clean_tokens(tokens: list[int], special_ids: tuple[int, ...], pad_id: int) -> list[int]:
    """Collapse consecutive repeats first, then drop special ids and pad (in that order)."""
    collapsed = [t for i, t in enumerate(tokens) if i == 0 or t != tokens[i - 1]]
    return [t for t in collapsed if t not in special_ids and t != pad_id]


@torch.no_grad()
def loop_lookahead(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    beta: float,
    special_ids: tuple[int, ...],
    pad_id: int,
) -> list[list[int]]:
    """Lookahead decoding, one sentence at a time, straight from the definition.

    Start at vertex 0; from vertex a go to argmax_{a < j < L_b} E[a, j] + beta * max_v logp[j, v];
    stop at L_b - 1. Emit argmax_v logp[j, v] for every visited vertex, both ends included, then
    collapse consecutive duplicates and remove special ids and pad.
    """
    out = []
    for b in range(token_logp.shape[0]):
        Lb = int(graph_lens[b])
        logp = token_logp[b].double().tolist()
        trans = trans_logp[b].double().tolist()
        s = [max(row) for row in logp]
        tok = [row.index(max(row)) for row in logp]
        a, visited = 0, [0]
        while a != Lb - 1:
            a = max(range(a + 1, Lb), key=lambda j, a=a: trans[a][j] + beta * s[j])
            visited.append(a)
        out.append(clean_tokens([tok[v] for v in visited], special_ids, pad_id))
    return out


@torch.no_grad()
def brute_force_joint_viterbi(
    token_logp: torch.Tensor,  # (B, L, V)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    length_beta: float,
    special_ids: tuple[int, ...],
    pad_id: int,
    max_edges: int | None = None,
) -> tuple[list[list[int]], torch.Tensor, list[tuple[int, ...]]]:
    """Joint-Viterbi by enumerating every path 0 -> L_b - 1 with any number of edges.

    score(path) = (sum of its edge log-probs + sum over all its vertices, both ends included, of
    max_v logp[j, v]) / (#edges) ** length_beta; paths with more than `max_edges` edges are left
    out. Returns the cleaned argmax tokens of the best path, its score (B,) and the path itself.
    """
    tokens_out, scores, paths = [], [], []
    for b in range(token_logp.shape[0]):
        Lb = int(graph_lens[b])
        logp = token_logp[b].double().tolist()
        trans = trans_logp[b].double().tolist()
        s = [max(row) for row in logp]
        tok = [row.index(max(row)) for row in logp]
        best, best_p = NEG_INF, None
        for r in range(Lb - 1):  # number of intermediate vertices
            for mid in itertools.combinations(range(1, Lb - 1), r):
                p = (0, *mid, Lb - 1)
                n_edges = len(p) - 1
                if max_edges is not None and n_edges > max_edges:
                    continue
                total = sum(trans[a][c] for a, c in itertools.pairwise(p)) + sum(s[v] for v in p)
                value = total / n_edges**length_beta
                if value > best:
                    best, best_p = value, p
        assert best_p is not None, "the chain 0 -> 1 -> ... -> L_b - 1 is always a path"
        tokens_out.append(clean_tokens([tok[v] for v in best_p], special_ids, pad_id))
        scores.append(best)
        paths.append(best_p)
    return tokens_out, torch.tensor(scores, dtype=torch.float64), paths


def loop_walk(successor: torch.Tensor, graph_lens: torch.Tensor) -> list[list[int]]:
    """Follow successor pointers from vertex 0 until vertex L_b - 1, one sentence at a time."""
    out = []
    for b in range(successor.shape[0]):
        last, v, walk = int(graph_lens[b]) - 1, 0, [0]
        while v != last:
            v = int(successor[b, v])
            walk.append(v)
        out.append(walk)
    return out


def sentence_bleu_loops(hyp: list[int], ref: list[int], max_order: int = 4) -> float:
    """Sentence BLEU of one hypothesis against one reference, the slow way.

    Written from the definition sacrebleu's `sentence_bleu` implements (tokenize="none",
    smooth_method="exp", effective order on): clipped n-gram counts, precisions in percent,
    the k-th order without a match gets 100 / (2^k * total), only orders with at least one
    hypothesis n-gram are averaged, brevity penalty when the hypothesis is shorter.
    """
    from collections import Counter

    correct, total = [], []
    for n in range(1, max_order + 1):
        hyp_grams = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        ref_grams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        correct.append(sum(min(c, ref_grams[g]) for g, c in hyp_grams.items()))
        total.append(sum(hyp_grams.values()))
    if sum(correct) == 0:
        return 0.0
    if len(hyp) >= len(ref):
        bp = 1.0
    else:
        bp = math.exp(1 - len(ref) / len(hyp))  # len(hyp) > 0 here: some order matched
    log_precisions = []
    misses = 0
    for c, t in zip(correct, total, strict=True):
        if t == 0:
            break  # no n-grams of this order or higher: the effective order ends here
        if c == 0:
            misses += 1
            log_precisions.append(math.log(100.0 / (2**misses * t)))
        else:
            log_precisions.append(math.log(100.0 * c / t))
    return bp * math.exp(sum(log_precisions) / len(log_precisions))


def exact_sample_path_probs(
    token_logp_b: torch.Tensor,  # (L, V) of one sentence
    trans_logp_b: torch.Tensor,  # (L, L) of one sentence
    graph_len: int,
    temperature: float,
    top_p: float,
) -> dict[tuple[int, ...], float]:
    """Probability of every path 0 -> L_b - 1 under CoDAT Algorithm 2 (DAG sampling), exactly.

    From vertex i the walk looks at its valid successors i < j < L_b with
    joint[j] = E[i, j] + max_v logp[j, v]. The successors are sorted by softmax(joint) descending
    and kept while the mass strictly before them is < top_p (the top one always). The next vertex
    is drawn from softmax(joint / temperature) over the kept ones (temperature 0 = the argmax of
    joint, the first one on ties). A path's probability is the product of its steps'
    probabilities. Every path with any number of intermediate vertices is enumerated.
    """
    Lb = int(graph_len)
    logp = token_logp_b.double().tolist()
    trans = trans_logp_b.double().tolist()
    s = [max(row) for row in logp]

    def softmax(values: dict[int, float]) -> dict[int, float]:
        m = max(values.values())
        exps = {j: math.exp(x - m) for j, x in values.items()}
        z = sum(exps.values())
        return {j: e / z for j, e in exps.items()}

    steps = []  # steps[i][j] = P(next = j | at i)
    for i in range(Lb - 1):
        joint = {j: trans[i][j] + s[j] for j in range(i + 1, Lb)}
        if temperature == 0:
            best = max(joint, key=lambda j, joint=joint: (joint[j], -j))
            steps.append({best: 1.0})
            continue
        p = softmax(joint)
        kept, mass = [], 0.0
        for j in sorted(p, key=lambda j, p=p: -p[j]):
            if kept and not mass < top_p:
                break
            kept.append(j)
            mass += p[j]
        steps.append(softmax({j: joint[j] / temperature for j in kept}))
    out = {}
    for r in range(Lb - 1):  # number of intermediate vertices
        for mid in itertools.combinations(range(1, Lb - 1), r):
            path = (0, *mid, Lb - 1)
            prob = 1.0
            for a, c in itertools.pairwise(path):
                prob *= steps[a].get(c, 0.0)
            out[path] = prob
    return out


def loop_contrastive_loss(
    scores: list[list[float]],  # [b][k] length-normalised log q of sample k
    rewards: list[list[float]],  # [b][k]
    margin: float,
    mask: list[list[bool]] | None = None,
    tie: float = 0.0,
) -> float:
    """CoDAT's ranking loss (eq. 10) as a double loop over the samples of each sentence.

    The samples taking part (mask True and a finite score) are ranked best-first by reward
    (rank 0 = best; equal rewards keep their index order). For every ordered pair (i, j) with
    R_i - R_j > tie the loss is max(0, s_j - s_i + (rank_j - rank_i) * margin). Returns the sum
    over all such pairs of all sentences divided by their number (0.0 when there are none).
    """
    total, count = 0.0, 0
    for b in range(len(scores)):
        part = [
            k
            for k in range(len(scores[b]))
            if (mask is None or mask[b][k]) and math.isfinite(scores[b][k])
        ]
        ranked = sorted(part, key=lambda k, b=b: -rewards[b][k])  # sorted() is stable
        rank = {k: r for r, k in enumerate(ranked)}
        for i in part:
            for j in part:
                if rewards[b][i] - rewards[b][j] > tie:
                    gap = rank[j] - rank[i]
                    total += max(0.0, scores[b][j] - scores[b][i] + gap * margin)
                    count += 1
    return total / count if count else 0.0


def loop_candidate_probs(
    token_logp_b: torch.Tensor,  # (L, V) of one sentence
    trans_logp_b: torch.Tensor,  # (L, L) of one sentence
    graph_len: int,
    temperature: float,
    top_p: float,
    top_tokens: int,
) -> list[dict[tuple[int, int], float]]:
    """Algorithm 2's step distribution over (next vertex, its token) pairs, one vertex at a time.

    Out of vertex i (< L_b - 1) the candidates are (j, r) for i < j < L_b and r < top_tokens:
    successor j showing its r-th most likely token (r = 0 the best), scored
    joint = E[i, j] + (r-th largest logp[j]). Top-p and temperature act on the candidates
    exactly as in `exact_sample_path_probs` (which is the top_tokens = 1 case). Returns, per
    vertex i, {(j, r): probability} (missing pairs have probability 0).
    """
    Lb = int(graph_len)
    logp = token_logp_b.double().tolist()
    trans = trans_logp_b.double().tolist()
    ranked = [sorted(row, reverse=True)[:top_tokens] for row in logp]
    out = []
    for i in range(Lb - 1):
        joint = {
            (j, r): trans[i][j] + ranked[j][r] for j in range(i + 1, Lb) for r in range(top_tokens)
        }
        if temperature == 0:
            best = max(joint, key=lambda c, joint=joint: (joint[c], -c[0], -c[1]))
            out.append({best: 1.0})
            continue
        m = max(joint.values())
        z = sum(math.exp(x - m) for x in joint.values())
        p = {c: math.exp(x - m) / z for c, x in joint.items()}
        kept, mass = [], 0.0
        for c in sorted(p, key=lambda c, p=p: -p[c]):
            if kept and not mass < top_p:
                break
            kept.append(c)
            mass += p[c]
        m = max(joint[c] / temperature for c in kept)
        z = sum(math.exp(joint[c] / temperature - m) for c in kept)
        out.append({c: math.exp(joint[c] / temperature - m) / z for c in kept})
    return out


def loop_duplicate_mask(
    tokens: list[list[list[int]]],  # [b][k] the sample's ids (anything may follow its length)
    lengths: list[list[int]],  # [b][k]
) -> list[list[bool]]:
    """True at [b][k] when sample k of sentence b equals an earlier sample j < k of the same
    sentence, both read only up to their own lengths (so different lengths never match)."""
    out = []
    for sent, lens in zip(tokens, lengths, strict=True):
        seen: set[tuple[int, ...]] = set()
        row = []
        for seq, n in zip(sent, lens, strict=True):
            key = tuple(seq[:n])
            row.append(key in seen)
            seen.add(key)
        out.append(row)
    return out


def loop_dp_gate(ref_loss: list[float], alpha: float) -> list[bool]:
    """CoDAT's alpha gate one sentence at a time: a sentence passes when the model's loss of its
    reference is a real number (not inf, -inf or NaN) no larger than alpha."""
    return [math.isfinite(x) and x <= alpha for x in ref_loss]


def loop_choose_samples(
    rewards: list[list[float]],  # [b][k]
    duplicates: list[list[bool]],  # [b][k]
    gate: list[bool],  # [b]
    objective: str,
    count: int,
) -> list[tuple[int, list[int]]]:
    """The samples that carry CoDAT's gradient, sentence by sentence: (b, chosen sample indices)
    for every sentence b that passes the gate, in order of b.

    codat: the distinct samples sorted by reward (best first), then the duplicates sorted by reward,
    and the first `count` of that list (a duplicate only takes a slot no distinct sample fills).
    reward: the first `count` samples as drawn. Both take all K when count >= K."""
    out = []
    for b, passes in enumerate(gate):
        if not passes:
            continue
        K = len(rewards[b])
        if objective == "reward":
            out.append((b, list(range(min(count, K)))))
            continue
        distinct = [k for k in range(K) if not duplicates[b][k]]
        repeats = [k for k in range(K) if duplicates[b][k]]
        best_first = sorted(distinct, key=lambda k, b=b: -rewards[b][k]) + sorted(
            repeats, key=lambda k, b=b: -rewards[b][k]
        )
        out.append((b, best_first[:count]))
    return out


def loop_uniform_copy(src_len: int, tgt_len: int) -> list[int]:
    """Gu et al. (2018) uniform copy for one sentence: decoder position t of T reads source token
    round(t * (m - 1) / (T - 1)), rounding halves up, over the m = max(src_len - 1, 1) source
    tokens before </s>; T = 1 reads token 0. Exact rational arithmetic."""
    from fractions import Fraction

    m = max(src_len - 1, 1)
    if tgt_len == 1:
        return [0]
    return [math.floor(Fraction(t * (m - 1), tgt_len - 1) + Fraction(1, 2)) for t in range(tgt_len)]


def loop_nat_sample_scores(model, src_ids, src_lens, tokens, lengths) -> torch.Tensor:
    """sum_t log softmax(logits_t)[y_t] / T of every NAT candidate, one sentence and one candidate
    at a time: the unpadded source alone through `model` with decoder length T = lengths[b][k],
    then a Python loop over positions. Returns (B, K) with the model's gradient."""
    B, K, _ = tokens.shape
    rows = []
    for b in range(B):
        S = int(src_lens[b])
        row = []
        for k in range(K):
            T = int(lengths[b, k])
            out = model(src_ids[b : b + 1, :S], src_lens[b : b + 1], lengths[b, k : k + 1])
            logp = torch.log_softmax(out.token_logits[0].double(), dim=-1)
            total = sum(logp[t, int(tokens[b, k, t])] for t in range(T))
            row.append(total / T)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def loop_label_smoothed_nll(
    logits: torch.Tensor, target_ids: torch.Tensor, pad_id: int, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross-entropy token by token: (1 - eps) * -log p(y) + eps * mean_v -log p(v),
    averaged over the non-pad targets; returns (loss, nll)."""
    losses, nlls = [], []
    for b in range(target_ids.shape[0]):
        for t in range(target_ids.shape[1]):
            y = int(target_ids[b, t])
            if y == pad_id:
                continue
            logp = logits[b, t] - torch.logsumexp(logits[b, t], dim=0)
            nlls.append(-logp[y])
            losses.append((1 - epsilon) * -logp[y] + epsilon * -logp.sum() / len(logp))
    return sum(losses) / len(losses), sum(nlls) / len(nlls)


def rank_all_sequences(
    sequence_logp, *, tokens: list[int], eos_id: int, max_len: int, length_penalty: float
) -> list[tuple[float, list[int]]]:
    """Every output of at most max_len tokens drawn from `tokens`, scored as beam search finishes
    it: log p(y </s>) / (|y| + 1) ** length_penalty; best first. `sequence_logp(seq)` scores a
    sequence ending in </s>."""
    ranked = []
    for n in range(max_len + 1):
        for seq in itertools.product(tokens, repeat=n):
            score = sequence_logp([*seq, eos_id]) / (n + 1) ** length_penalty
            ranked.append((score, list(seq)))
    return sorted(ranked, key=lambda item: item[0], reverse=True)


def loop_beam_search(
    next_logp,
    *,
    beam: int,
    eos_id: int,
    banned: tuple[int, ...],
    max_len: int,
    length_penalty: float,
) -> list[int]:
    """Beam search for one sentence with plain lists. `next_logp(prefix)` gives log p(v | prefix)
    for every v. Per step: every extension of every live hypothesis, banned tokens (and, at
    max_len, all but </s>) impossible; the 2K best; a </s> among the first K finishes (score
    logp / (t + 1) ** length_penalty, K best finished kept); the first K others stay live. Stop at
    max_len, or when K are finished and the best live hypothesis, normalised at its current length,
    does not beat the worst finished one. Returns the best finished output without </s>."""
    live = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []
    for t in range(max_len + 1):
        candidates = []
        for lp, seq in live:
            for v, token_lp in enumerate(next_logp(seq)):
                if v in banned or (t >= max_len and v != eos_id):
                    continue
                candidates.append((lp + token_lp, seq + [v]))
        candidates = sorted(candidates, key=lambda item: item[0], reverse=True)[: 2 * beam]
        for lp, seq in candidates[:beam]:
            if seq[-1] == eos_id and math.isfinite(lp):
                finished.append((lp / (t + 1) ** length_penalty, seq[:-1]))
        finished = sorted(finished, key=lambda item: item[0], reverse=True)[:beam]
        live = [(lp, s) for lp, s in candidates if s[-1] != eos_id and math.isfinite(lp)][:beam]
        if t >= max_len:
            break
        best_live = max((lp for lp, _ in live), default=-math.inf) / (t + 1) ** length_penalty
        if len(finished) == beam and best_live <= finished[-1][0]:
            break
    return finished[0][1]


def loop_mask_predict(
    model, src_ids, src_lens, *, iterations: int, length_beam: int, pad_id: int, special_ids
) -> list[list[int]]:
    """Mask-predict (Ghazvininejad et al. 2019) one sentence and one length candidate at a time,
    with plain lists: `model(src, src_lens, tgt_ids, tgt_lens, masked)` on a single unpadded row
    per call. Lengths: the `length_beam` best classes >= 1 of the length logits. Iteration 0 masks
    all T positions; iteration t re-masks the floor(T * (I - t) / I) positions of lowest log-prob
    (ties: lower position) and replaces only their tokens and log-probs by the new argmax. Keeps
    the candidate of best mean log-prob (first on ties), specials dropped."""
    out = []
    for b in range(src_ids.shape[0]):
        S = int(src_lens[b])
        src, slen = src_ids[b : b + 1, :S], src_lens[b : b + 1]

        def predict(tokens: list[int], masked: list[bool], src=src, slen=slen):
            size = torch.tensor([len(tokens)])
            res = model(src, slen, torch.tensor([tokens]), size, torch.tensor([masked]))
            logp = torch.log_softmax(res.token_logits[0].double(), dim=-1)
            ids = [int(logp[t].argmax()) for t in range(len(tokens))]
            return ids, [float(logp[t, ids[t]]) for t in range(len(tokens))], res.length_logits[0]

        length_logits = predict([pad_id], [True])[2].tolist()
        lengths = sorted(range(1, len(length_logits)), key=lambda c: -length_logits[c])
        best = None
        for T in lengths[:length_beam]:
            tokens, logps, _ = predict([pad_id] * T, [True] * T)
            for t in range(1, iterations):
                n = T * (iterations - t) // iterations
                remask = set(sorted(range(T), key=lambda i: (logps[i], i))[:n])
                new_tokens, new_logps, _ = predict(tokens, [i in remask for i in range(T)])
                for i in remask:
                    tokens[i], logps[i] = new_tokens[i], new_logps[i]
            score = sum(logps) / T
            if best is None or score > best[0]:
                best = (score, tokens)
        out.append([tok for tok in best[1] if tok not in special_ids])
    return out


def loop_cmlm_loss(
    model, src_ids, src_lens, tgt_ids, tgt_lens, masked, *, length_weight, epsilon, max_length
) -> torch.Tensor:
    """The CMLM loss with given masks, one sentence at a time: each unpadded row alone through
    `model(src, src_lens, tgt_ids, tgt_lens, masked)`; for every masked position
    (1 - eps) * -log p(y_t) + eps * mean_v -log p(v), summed over sentences and positions and
    divided by the number of masked tokens; plus length_weight * the mean over sentences of
    -log softmax(length logits)[min(T_b, max_length)]. Scalar with the model's gradient."""
    token_terms, length_terms = [], []
    for b in range(src_ids.shape[0]):
        S, T = int(src_lens[b]), int(tgt_lens[b])
        res = model(
            src_ids[b : b + 1, :S], src_lens[b : b + 1], tgt_ids[b : b + 1, :T],
            tgt_lens[b : b + 1], masked[b : b + 1, :T],
        )  # fmt: skip
        logp = torch.log_softmax(res.token_logits[0].double(), dim=-1)
        for t in range(T):
            if bool(masked[b, t]):
                nll = -logp[t, int(tgt_ids[b, t])]
                token_terms.append((1 - epsilon) * nll - epsilon * logp[t].mean())
        length_logp = torch.log_softmax(res.length_logits[0].double(), dim=-1)
        length_terms.append(-length_logp[min(T, max_length)])
    token = sum(token_terms) / max(len(token_terms), 1)
    return token + length_weight * sum(length_terms) / len(length_terms)


# ---------------------------------------------------------------------------------------------
# CTC (codat.ctc): explicit enumeration of all label sequences of one sentence's positions.


def loop_ctc_collapse(labels: list[int], blank: int, drop: tuple[int, ...] = ()) -> list[int]:
    """CTC's many-to-one map: merge consecutive repeats, then drop the blank (and `drop`)."""
    out, prev = [], None
    for c in labels:
        if c != prev and c != blank and c not in drop:
            out.append(c)
        prev = c
    return out


def brute_force_ctc_paths(logp: torch.Tensor, target: list[int]) -> list[tuple[int, ...]]:
    """Every label sequence over logp's (L, C) classes (blank = C - 1) that collapses to target."""
    L, C = logp.shape
    return [
        p
        for p in itertools.product(range(C), repeat=L)
        if loop_ctc_collapse(list(p), C - 1) == list(target)
    ]


def brute_force_ctc_log_likelihood(logp: torch.Tensor, target: list[int]) -> torch.Tensor:
    """log sum over the paths collapsing to target of prod_t p(path_t); -inf if there are none.
    logp (L_b, C) float64 log-probs, blank = C - 1; differentiable in logp."""
    paths = brute_force_ctc_paths(logp, target)
    if not paths:
        return logp.new_tensor(NEG_INF)
    steps = torch.arange(logp.shape[0])
    scores = [logp[steps, torch.tensor(p)].sum() for p in paths]
    return torch.logsumexp(torch.stack(scores), dim=0)


def brute_force_ctc_best_path(logp: torch.Tensor, target: list[int]) -> tuple[list[int], float]:
    """The most probable path (labels, blank = C - 1) collapsing to target, and its log-prob;
    ([], -inf) if there is none."""
    best, best_score = [], NEG_INF
    for p in brute_force_ctc_paths(logp, target):
        score = sum(float(logp[t, c]) for t, c in enumerate(p))
        if score > best_score:
            best, best_score = list(p), score
    return best, best_score


def brute_force_ctc_output_distribution(
    logp: torch.Tensor, drop: tuple[int, ...] = ()
) -> dict[tuple[int, ...], float]:
    """P(collapsed output) for every output of logp (L_b, C), blank = C - 1, `drop` removed too."""
    dist: dict[tuple[int, ...], float] = {}
    for p in itertools.product(range(logp.shape[1]), repeat=logp.shape[0]):
        key = tuple(loop_ctc_collapse(list(p), logp.shape[1] - 1, drop))
        prob = math.exp(sum(float(logp[t, c]) for t, c in enumerate(p)))
        dist[key] = dist.get(key, 0.0) + prob
    return dist


def _column_logsumexp(x: torch.Tensor) -> torch.Tensor:  # (L, L) -> (L,)
    """log sum_k exp(x[k, j]) for every column j, each shifted by its own max; an all -inf
    column gives -inf and passes a zero (not NaN) gradient."""
    m = x.detach().amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=0)
    return torch.where(s > 0, torch.log(torch.where(s > 0, s, torch.ones_like(s))) + m, NEG_INF)


def dense_dag_log_likelihood(
    token_logp: torch.Tensor,  # (B, L, N)
    trans_logp: torch.Tensor,  # (B, L, L)
    graph_lens: torch.Tensor,  # (B,)
    target_lens: torch.Tensor,  # (B,)
) -> torch.Tensor:  # (B,) float64
    """The forward algorithm in float64, one sentence and one step at a time (autograd backward).

    alpha_0[j] = token_logp[0, 0] if j = 0 else -inf;
    alpha_i[j] = token_logp[j, i] + log sum_k exp(alpha_{i-1}[k] + trans_logp[k, j]);
    the answer is alpha_{N_b - 1}[L_b - 1]. Each column's log-sum-exp subtracts its own max over
    the (L, L) table alpha[k] + E[k, j], so nothing underflows where the answer is finite.
    """
    token_logp, trans_logp = token_logp.double(), trans_logp.double()
    B, L, _ = token_logp.shape
    start = torch.full((L,), NEG_INF, dtype=torch.float64)
    start[0] = 0.0
    out = []
    for b in range(B):
        alpha = token_logp[b, :, 0] + start
        for i in range(1, int(target_lens[b])):
            alpha = token_logp[b, :, i] + _column_logsumexp(alpha.unsqueeze(1) + trans_logp[b])
        end = alpha[int(graph_lens[b]) - 1]
        out.append(torch.where(torch.isfinite(end), end, NEG_INF))
    return torch.stack(out)


def loop_candidate_probs_mode(
    token_logp_b: torch.Tensor,  # (L, V) of one sentence
    trans_logp_b: torch.Tensor,  # (L, L) of one sentence
    graph_len: int,
    temperature: float,
    top_p: float,
    top_tokens: int,
    mode: str,
) -> list[dict[tuple[int, int], float]]:
    """The step distribution over (next vertex j, token rank r) of each vertex i < L_b - 1 for
    the sampler modes of `codat.decode.sampling_distribution`, one vertex at a time in floats.

    log: `loop_candidate_probs`. paper (CoDAT Algorithm 2 literally): t[j][r] = P(r-th token | j)
    divided by the sum of t over all vertices < L_b and ranks; score = exp(E[i][j]) + t[j][r] over
    the existing edges; candidates sorted by score, kept while the score before them is < top_p
    times the row's total score (the first always); then softmax(score / tau) over the kept ones
    (tau = 0: the best score). dat (DAT v2.0 `inference_sample`, no bans, beta = 1): the
    transitions of i tempered, A[j] = E[i][j] / tau - logsumexp_j'(E[i][j'] / tau) (tau = 0: 0 for
    the best j, -inf elsewhere); score = A[j] + logP(r-th token | j); the top_tokens best scores
    are taken, in descending order while the mass exp(score) before them is <= top_p, and drawn
    with probability exp(score) / (sum over the taken).
    """
    if mode == "log":
        return loop_candidate_probs(
            token_logp_b, trans_logp_b, graph_len, temperature, top_p, top_tokens
        )
    Lb, c = int(graph_len), top_tokens
    logp = token_logp_b.double().tolist()
    trans = trans_logp_b.double().tolist()
    ranked = [sorted(row, reverse=True)[:c] for row in logp]
    out = []
    if mode == "paper":
        total = sum(math.exp(x) for j in range(Lb) for x in ranked[j])
        for i in range(Lb - 1):
            score = {
                (j, r): math.exp(trans[i][j]) + math.exp(ranked[j][r]) / total
                for j in range(i + 1, Lb)
                if trans[i][j] > float("-inf")
                for r in range(c)
            }
            row_sum = sum(score.values())
            kept, mass = [], 0.0
            for cand in sorted(score, key=lambda x, s=score: -s[x]):
                if kept and not mass < top_p * row_sum:
                    break
                kept.append(cand)
                mass += score[cand]
            if temperature == 0:
                out.append({max(kept, key=lambda x, s=score: s[x]): 1.0})
                continue
            m = max(score[x] / temperature for x in kept)
            z = sum(math.exp(score[x] / temperature - m) for x in kept)
            out.append({x: math.exp(score[x] / temperature - m) / z for x in kept})
        return out
    for i in range(Lb - 1):
        succ = [j for j in range(i + 1, Lb) if trans[i][j] > float("-inf")]
        if temperature == 0:
            best = max(succ, key=lambda j: (trans[i][j], -j))
            tempered = {best: 0.0}
        else:
            m = max(trans[i][j] / temperature for j in succ)
            lse = m + math.log(sum(math.exp(trans[i][j] / temperature - m) for j in succ))
            tempered = {j: trans[i][j] / temperature - lse for j in succ}
        score = {(j, r): a + ranked[j][r] for j, a in tempered.items() for r in range(c)}
        top = sorted(score, key=lambda x, s=score: -s[x])[:c]
        kept, mass = [], 0.0
        for cand in top:
            if kept and mass > top_p:
                break
            kept.append(cand)
            mass += math.exp(score[cand])
        z = sum(math.exp(score[x]) for x in kept)
        out.append({x: math.exp(score[x]) / z for x in kept})
    return out


def loop_sentence_contrastive_loss(
    scores: list[list[float]],  # [b][k]
    rewards: list[list[float]],  # [b][k]
    margin: float,
    mask: list[list[bool]] | None = None,
    tie: float = 0.0,
) -> float:
    """Appendix C's average of the ranking loss: per sentence the sum of its pair losses (as in
    `loop_contrastive_loss`) divided by n (n - 1) / 2 for its n participating samples, then the
    mean over the sentences with n >= 2 (0.0 when there are none)."""
    means = []
    for b in range(len(scores)):
        m = None if mask is None else [mask[b]]
        part = [
            k
            for k in range(len(scores[b]))
            if (mask is None or mask[b][k]) and math.isfinite(scores[b][k])
        ]
        n = len(part)
        if n < 2:
            continue
        pairs = sum(
            1 for i in part for j in part if rewards[b][i] - rewards[b][j] > tie
        )  # the count loop_contrastive_loss divides by
        pair_mean = loop_contrastive_loss([scores[b]], [rewards[b]], margin, m, tie)
        means.append(pair_mean * pairs / (n * (n - 1) / 2))
    return sum(means) / len(means) if means else 0.0


def loop_reverse_kl_reward_loss(
    log_q: torch.Tensor,  # (B, K) with grad
    rewards: list[list[float]],  # [b][k] on the 0-1 scale
    temperature: float,
    mask: list[list[bool]] | None = None,
) -> torch.Tensor:
    """Appendix A's REINFORCE estimate, one sample at a time: per sentence the participating
    samples (mask True, finite log q) get A_k = R_k / T - log q_k as a constant, minus the mean of
    A over them; loss = -sum (A_k - mean) * log q_k over all participating samples / their count."""
    total, count = log_q.new_zeros(()), 0
    for b in range(log_q.shape[0]):
        part = [
            k
            for k in range(log_q.shape[1])
            if (mask is None or mask[b][k]) and math.isfinite(float(log_q[b, k].detach()))
        ]
        adv = {k: rewards[b][k] / temperature - float(log_q[b, k].detach()) for k in part}
        mean = sum(adv.values()) / len(part) if part else 0.0
        for k in part:
            total = total - (adv[k] - mean) * log_q[b, k]
            count += 1
    return total / max(count, 1)


def loop_spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho by its textbook definition: Pearson's correlation of the ranks, tied values
    sharing the mean of the ranks they span (found by sorting); NaN when x or y is constant."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan
