#!/usr/bin/env bash
# Evaluate a finished run: average its kept best checkpoints, choose between best/ and the average
# by validation BLEU (model selection on val only), then score the test split with each decoder.
#   usage: [DECODERS="beam greedy"] bash scripts/evaluate_run.sh RUN_DIR DATA_DIR [VALID] [TEST]
# DECODERS (default: the DAT decoders "lookahead greedy viterbi"); the first one selects on val.
set -euo pipefail
read -r -a decoders <<< "${DECODERS:-lookahead greedy viterbi}"
run=${1:?usage: evaluate_run.sh RUN_DIR DATA_DIR [VALID_SPLIT] [TEST_SPLIT]}
data=${2:?usage: evaluate_run.sh RUN_DIR DATA_DIR [VALID_SPLIT] [TEST_SPLIT]}
valid=${3:-val}
test=${4:-test_2016_flickr}
out="$run/eval"
mkdir -p "$out"
codat average "$run"
bleu() { codat score "$1" "$2" | sed -n -E '1s/^BLEU = ([0-9.]+) .*/\1/p'; }
best_bleu=-1
for ckpt in best averaged; do
  codat generate "$run/$ckpt" -i "$data/$valid.src.txt" -o "$out/$valid.$ckpt.hyp" \
    --decoder "${decoders[0]}"
  b=$(bleu "$out/$valid.$ckpt.hyp" "$data/$valid.ref.txt")
  echo "valid BLEU ($ckpt, ${decoders[0]}): $b"
  if python3 -c "import sys; sys.exit(0 if float('$b') > float('$best_bleu') else 1)"; then
    best_bleu=$b; chosen=$ckpt
  fi
done
echo "chosen on $valid: $chosen"
for decoder in "${decoders[@]}"; do
  hyp="$out/$test.$chosen.$decoder.hyp"
  start=$(date +%s.%N)
  codat generate "$run/$chosen" -i "$data/$test.src.txt" -o "$hyp" --decoder "$decoder"
  secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  echo "== $test, $chosen checkpoint, $decoder decoder (${secs}s incl. model load)"
  codat score "$hyp" "$data/$test.ref.txt"
done
