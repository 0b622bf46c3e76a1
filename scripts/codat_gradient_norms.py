"""How large is each stage-2 term's gradient next to the DP loss's? On real batches of a trained
DAT (eval mode: no dropout, no glancing), the L2 norm over all parameters of the gradient of
  dp      the DP loss (eq. 3),
  codat   the ranking term (eq. 10) with the given sampler and filter,
  reward  REINFORCE on R - mean(R) (codat.reward_temperature 0), and
  reward-kl  Appendix A's reverse KL, advantage R/T - log q (T = --reward-temperature),
each computed alone on the same batch and samples (one generator seed per batch), and their ratio
to the DP gradient's norm. The "+Reward" arm only differs from dp when this ratio is not tiny.

usage: python scripts/codat_gradient_norms.py CHECKPOINT DATA_DIR [--split val] [--batches 4]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from codat.checkpoint import load_model
from codat.config import CodatConfig
from codat.dat_train import codat_term, glanced_dp_loss
from codat.data import ParallelData, token_batches


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("data_dir")
    ap.add_argument("--split", default="val")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--sampler", default="paper")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--top-tokens", type=int, default=1)
    ap.add_argument("--filter", default="score")
    ap.add_argument("--reward-temperature", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_model(a.checkpoint)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    data = ParallelData.load(a.data_dir, a.split)
    sizes = torch.maximum(data.src_lens, data.tgt_lens)
    batches = token_batches(sizes, max_tokens=a.max_tokens, shuffle=True, seed=1)[: a.batches]
    base = {
        "samples": a.samples,
        "temperature": a.temperature,
        "top_p": 0.5,
        "top_tokens": a.top_tokens,
        "sampler": a.sampler,
        "filter": a.filter,
    }
    terms = {
        "codat": ("codat", CodatConfig(**base)),
        "reward": ("reward", CodatConfig(**base)),
        "reward-kl": ("reward", CodatConfig(**base, reward_temperature=a.reward_temperature)),
    }
    norms: dict[str, list[float]] = {"dp": [], **{k: [] for k in terms}}
    for i, idx in enumerate(batches):
        b = data.collate(idx)
        out = model(b.src_ids, b.src_lens)
        dp, _ = glanced_dp_loss(out, b, None)
        norms["dp"].append(grad_norm(dp, params))
        for name, (objective, cfg) in terms.items():
            generator = torch.Generator().manual_seed(i)
            loss, _ = codat_term(
                out, b, objective=objective, codat=cfg, alpha=math.inf, generator=generator
            )
            norms[name].append(grad_norm(loss, params) if loss.requires_grad else 0.0)
    print(f"{len(batches)} batches of {a.split} (<= {a.max_tokens} tokens), {a.checkpoint}")
    print("| term | gradient norm (mean over batches) | ratio to dp (mean ± std) |")
    print("|---|---|---|")
    for name, values in norms.items():
        ratios = [v / d for v, d in zip(values, norms["dp"], strict=True)]
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        norm, ratio = statistics.mean(values), statistics.mean(ratios)
        print(f"| {name} | {norm:.4g} | {ratio:.3g} ± {spread:.2g} |")


if __name__ == "__main__":
    main()
