#!/usr/bin/env bash
# Batch-size-1 latency and speed-up over AT beam search of every model trained by the Multi30k
# recipes (README "Baselines"), in one run on the first 200 test sentences, 3 passes.
#   usage: bash scripts/speed_table.sh [DATA_DIR=data-bin/m30k_deen_8k] [OUT_JSON] [extra options]
set -euo pipefail
data=${1:-data-bin/m30k_deen_8k}
out=${2:-runs/speed_table.json}
shift $(( $# > 2 ? 2 : $# ))
ckpt() { if [ -d "runs/$1/averaged" ]; then echo "runs/$1/averaged"; else echo "runs/$1"; fi; }
codat benchmark speed \
  "at=$(ckpt m30k_deen_at_small)" \
  "nat=$(ckpt m30k_deen_nat_small)" \
  "glat=$(ckpt m30k_deen_glat_small)" \
  "ctc=$(ckpt m30k_deen_ctc_small)" \
  "ctc_glat=$(ckpt m30k_deen_ctc_glat_small)" \
  "cmlm=$(ckpt m30k_deen_cmlm_small)" \
  "dat=$(ckpt m30k_deen_dat_small)" \
  -i "$data/test_2016_flickr.src.txt" --max-sentences 200 --repeats 3 --json "$out" "$@"
