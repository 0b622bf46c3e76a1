"""Tables of scripts/codat_experiment.sh: corpus BLEU of every (arm, seed) run on each test set
and decoder, mean +- std over seeds per arm, the paired difference to dp of the same seed and
sacreBLEU's paired bootstrap p-value against it (1000 resamples), and the val analysis
(Spearman of s_k and sentence BLEU, Oracle BLEU, distinct samples) and NCM when present.

usage: python scripts/codat_summary.py OUT [--arms dp,reward,codat] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics

from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

TESTS = ("test_2016_flickr", "test_2017_flickr")
DECODERS = ("lookahead", "sample")


def read(path: pathlib.Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_p(base: list[str], system: list[str], refs: list[str]) -> float:
    """sacreBLEU's paired bootstrap p-value of `system` against `base` (1000 resamples)."""
    test = PairedTest(
        [("base", base), ("system", system)],
        {"BLEU": BLEU()},
        [refs],
        test_type="bs",
        n_samples=1000,
    )
    return float(test()[1]["BLEU"][1].p_value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--arms", default="dp,reward,codat")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    arms = a.arms.split(",")
    runs: dict[str, dict[int, pathlib.Path]] = {arm: {} for arm in arms}
    for d in sorted(out.iterdir()):
        m = re.fullmatch(r"(\w+)-s(\d+)", d.name)
        if m and m[1] in runs and (d / "eval").is_dir():
            runs[m[1]][int(m[2])] = d / "eval"
    refs = {t: read(out / "raw" / f"{t}.en") for t in TESTS}
    bleu = BLEU()
    result: dict = {"runs": {}, "arms": {}}

    def score(path: pathlib.Path, test: str) -> float | None:
        return bleu.corpus_score(read(path), [refs[test]]).score if path.is_file() else None

    evals = {("base", 0): out / "base" / "eval"} if (out / "base" / "eval").is_dir() else {}
    evals.update({(arm, s): d for arm in arms for s, d in runs[arm].items()})
    for (arm, seed), d in evals.items():
        row: dict = {}
        for t in TESTS:
            for dec in DECODERS:
                row[f"{t}.{dec}"] = score(d / f"{t}.{dec}.hyp", t)
        for name, key in (("val_analyze.json", "val"), ("ncm_test_2016_flickr.json", "ncm")):
            if (d / name).is_file():
                row[key] = json.loads((d / name).read_text())
        result["runs"][f"{arm}-s{seed}"] = row

    print("| arm | seeds | " + " | ".join(f"{t} {dec}" for t in TESTS for dec in DECODERS) + " |")
    print("|---|---|" + "---|" * (len(TESTS) * len(DECODERS)))
    if ("base", 0) in evals:
        r = result["runs"]["base-s0"]
        cells = [
            f"{r[f'{t}.{dec}']:.2f}" if r[f"{t}.{dec}"] is not None else "–"
            for t in TESTS
            for dec in DECODERS
        ]
        print("| stage 1 (start) | – | " + " | ".join(cells) + " |")
    for arm in arms:
        cells = []
        for t in TESTS:
            for dec in DECODERS:
                vals = [result["runs"][f"{arm}-s{s}"][f"{t}.{dec}"] for s in sorted(runs[arm])]
                vals = [v for v in vals if v is not None]
                result["arms"].setdefault(arm, {})[f"{t}.{dec}"] = vals
                cells.append(mean_std(vals))
        print(f"| {arm} | {len(runs[arm])} | " + " | ".join(cells) + " |")

    print("\nPaired against dp of the same seed: BLEU difference (paired bootstrap p)")
    print("| arm | seed | " + " | ".join(f"{t} {dec}" for t in TESTS for dec in DECODERS) + " |")
    print("|---|---|" + "---|" * (len(TESTS) * len(DECODERS)))
    for arm in arms:
        if arm == "dp":
            continue
        for seed in sorted(set(runs[arm]) & set(runs.get("dp", {}))):
            cells = []
            for t in TESTS:
                for dec in DECODERS:
                    p_sys = runs[arm][seed] / f"{t}.{dec}.hyp"
                    p_dp = runs["dp"][seed] / f"{t}.{dec}.hyp"
                    if not (p_sys.is_file() and p_dp.is_file()):
                        cells.append("–")
                        continue
                    diff = score(p_sys, t) - score(p_dp, t)
                    p = paired_p(read(p_dp), read(p_sys), refs[t])
                    result["runs"][f"{arm}-s{seed}"][f"{t}.{dec}.vs_dp"] = {"diff": diff, "p": p}
                    cells.append(f"{diff:+.2f} (p = {p:.3f})")
            print(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
        diffs = []
        for t in TESTS:
            for dec in DECODERS:
                vals = [
                    result["runs"][f"{arm}-s{s}"][f"{t}.{dec}.vs_dp"]["diff"]
                    for s in sorted(runs[arm])
                    if f"{t}.{dec}.vs_dp" in result["runs"][f"{arm}-s{s}"]
                ]
                result["arms"].setdefault(arm, {})[f"{t}.{dec}.vs_dp"] = vals
                diffs.append(mean_std(vals))
        print(f"| {arm} | mean ± std | " + " | ".join(diffs) + " |")

    print("\nval (first 200 sentences, 128 samples): Spearman(s_k, sentence BLEU), Oracle BLEU,")
    print("distinct samples per sentence; NCM on test_2016_flickr (AT scorer) when measured")
    print("| run | Spearman | Oracle BLEU | reranked BLEU | distinct / 128 | NCM |")
    print("|---|---|---|---|---|---|")
    for name, r in result["runs"].items():
        v, n = r.get("val"), r.get("ncm")
        if v is None:
            continue
        rho = v.get("spearman_score_bleu")
        ncm = f"{n['ncm']:.4f}" if n else "–"
        print(
            f"| {name} | {rho:.4f} | {v['oracle_bleu']:.2f} | {v['rerank_bleu']:.2f} | "
            f"{v['distinct_per_sentence']:.1f} | {ncm} |"
            if rho is not None
            else f"| {name} | – | {v['oracle_bleu']:.2f} | {v['rerank_bleu']:.2f} | "
            f"{v['distinct_per_sentence']:.1f} | {ncm} |"
        )
    print("\n| arm | Spearman (mean ± std over seeds) | Oracle BLEU | NCM |")
    print("|---|---|---|---|")
    for arm in arms:
        rows = [result["runs"][f"{arm}-s{s}"] for s in sorted(runs[arm])]
        rho = [r["val"]["spearman_score_bleu"] for r in rows if r.get("val")]
        oracle = [r["val"]["oracle_bleu"] for r in rows if r.get("val")]
        ncm = [r["ncm"]["ncm"] for r in rows if r.get("ncm")]
        print(f"| {arm} | {mean_std(rho, 4)} | {mean_std(oracle)} | {mean_std(ncm, 4)} |")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
