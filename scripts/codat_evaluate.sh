#!/usr/bin/env bash
# Evaluate one model for the CoDAT comparison (README "CoDAT on Multi30k"):
#   1. tune the sample decoder's rerank beta on VALID (paper settings: 128 samples, tau 0.05, top-p 0.5),
#   2. TEST BLEU with lookahead and with 128-sample decoding + rerank (beta from 1),
#   3. codat analyze on TEST: NCM, and Oracle BLEU of 128 samples drawn as in training
#      (tau 1, top-p 0.5, 5 tokens per vertex).
# usage: bash scripts/codat_evaluate.sh CHECKPOINT_DIR DATA_DIR OUT_DIR [VALID] [TEST]
set -euo pipefail
ckpt=${1:?usage: codat_evaluate.sh CHECKPOINT_DIR DATA_DIR OUT_DIR [VALID] [TEST]}
data=${2:?usage}
out=${3:?usage}
valid=${4:-val}
test=${5:-test_2016_flickr}
mkdir -p "$out"
bleu() { codat score "$1" "$2" | sed -n -E '1s/^BLEU = ([0-9.]+) .*/\1/p'; }
codat tune-beta "$ckpt" --data-dir "$data" --split "$valid" --samples 128 --temperature 0.05 \
  --top-p 0.5 --top-tokens 1 -o "$out/tune_beta.json" > /dev/null
beta=$(python3 -c "import json; print(json.load(open('$out/tune_beta.json'))['best_beta'])")
codat generate "$ckpt" -i "$data/$test.src.txt" -o "$out/$test.lookahead.hyp" --decoder lookahead
codat generate "$ckpt" -i "$data/$test.src.txt" -o "$out/$test.sample128.hyp" --decoder sample \
  --samples 128 --temperature 0.05 --top-p 0.5 --top-tokens 1 --rerank-token-weight "$beta"
codat analyze "$ckpt" --data-dir "$data" --split "$test" --samples 128 --temperature 1 \
  --top-p 0.5 --top-tokens 5 --rerank-token-weight "$beta" -o "$out/analyze_$test.json" > /dev/null
python3 - "$out" "$test" "$beta" "$(bleu "$out/$test.lookahead.hyp" "$data/$test.ref.txt")" \
  "$(bleu "$out/$test.sample128.hyp" "$data/$test.ref.txt")" <<'PY'
import json, sys
out, test, beta, look, samp = sys.argv[1:]
a = json.load(open(f"{out}/analyze_{test}.json"))
t = json.load(open(f"{out}/tune_beta.json"))
row = {"lookahead_bleu": float(look), "sample128_bleu": float(samp), "beta": float(beta),
       "valid_bleu_by_beta": t["bleu"], "ncm": a["ncm"], "oracle_bleu": a["oracle_bleu"],
       "distinct_per_sentence": a["distinct_per_sentence"]}
json.dump(row, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(row))
PY
