#!/usr/bin/env bash
# One-command demo: prepare Multi30k De->En, train a small DAT for a bounded time on the CPU,
# translate test_2016_flickr and print its sacreBLEU.
#   usage: bash scripts/multi30k_demo.sh DATA_DIR [MINUTES] [WORK_DIR]
#   DATA_DIR holds train/val/test_2016_flickr .de/.en(.gz) files (e.g. ../shared/data/multi30k).
set -euo pipefail
data=${1:?usage: bash scripts/multi30k_demo.sh DATA_DIR [MINUTES] [WORK_DIR]}
minutes=${2:-15}
work=${3:-work/multi30k_demo}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
if [ ! -f "$work/data/meta.json" ]; then
  codat prepare --src de --tgt en --train "$data/train" --valid "$data/val" \
    --test "$data/test_2016_flickr" --out "$work/data" --vocab-size 8000 --upsample-scale 4
fi
rm -rf "$work/run"
codat train "$here/configs/multi30k_deen_dat_small.yaml" "data.dir=$work/data" "run_dir=$work/run" \
  "train.max_minutes=$minutes" train.warmup_steps=250 train.glance_anneal_steps=600 \
  train.eval_every=100 train.eval_max_sentences=300
codat generate "$work/run" --input "$work/data/test_2016_flickr.src.txt" --output "$work/test.hyp.en"
codat score "$work/test.hyp.en" "$work/data/test_2016_flickr.ref.txt"
