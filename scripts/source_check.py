"""Does a trained model read its source? Prints the mean per-token loss of the references of a
split given their own source and given another sentence's source (`evaluate.source_sensitivity`),
their difference and the share of sentences that the own source helps. A model that has learned
the task scores its own source far better; one that ignores its input (a language model of the
targets) scores both the same.

usage: python scripts/source_check.py RUN_OR_CHECKPOINT DATA_DIR [--split valid] [--sentences 200]
"""

from __future__ import annotations

import argparse

import torch

from codat.checkpoint import load_model
from codat.data import ParallelData
from codat.evaluate import source_sensitivity, truncate_sources


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory (its best/) or checkpoint directory")
    ap.add_argument("data_dir", help="prepared data directory (codat prepare)")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--sentences", type=int, default=200, help="the split's first N (0 = all)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0, help="seed of the source shuffle")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = load_model(args.run)
    data = ParallelData.load(args.data_dir, args.split)
    if args.sentences:
        n = min(args.sentences, len(data))
        data = ParallelData(data.src[:n], data.tgt[:n])
    data = truncate_sources(data, cfg.model.max_source_positions, split=args.split)
    r = source_sensitivity(model, cfg.model.arch, data, max_tokens=args.max_tokens, seed=args.seed)
    own, other = r.own[r.finite], r.shuffled[r.finite]
    diff = other - own
    left_out = int((~r.finite).sum())
    print(
        f"{args.split}[:{len(data)}] ({cfg.model.arch}), loss per token: own source "
        f"{own.mean():.4f}, another sentence's source {other.mean():.4f}; difference "
        f"{diff.mean():.4f} ± {diff.std():.4f}; own source better for "
        f"{int((diff > 0).sum())}/{len(diff)} sentences"
        + (f" ({left_out} left out: no alignment)" if left_out else "")
    )


if __name__ == "__main__":
    main()
