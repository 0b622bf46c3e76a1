#!/usr/bin/env bash
# One-command demo: prepare Multi30k De->En, train a small DAT for a bounded time on the CPU
# (the multi30k_deen_dat_demo recipe: 4k vocabulary, lambda 3, a linear learning-rate decay),
# translate test_2016_flickr, print its sacreBLEU and three example translations, and export the
# model (codat export) ready to publish.
#   usage: bash scripts/multi30k_demo.sh DATA_DIR [MINUTES] [WORK_DIR] [RUN_DIR]
#   DATA_DIR holds train/val/test_2016_flickr .de/.en(.gz) files (e.g. ../shared/data/multi30k).
#   Every call trains a new run in WORK_DIR/runs/DATE-TIME: earlier runs are kept. Pass the
#   RUN_DIR of an earlier run to continue it instead (MINUTES is then its total training time).
set -euo pipefail
usage="usage: bash scripts/multi30k_demo.sh DATA_DIR [MINUTES] [WORK_DIR] [RUN_DIR]"
data=${1:?$usage}
minutes=${2:-17}
work=${3:-work/multi30k_demo}
run=${4:-$work/runs/$(date +%Y%m%d-%H%M%S)}
test_set=test_2016_flickr
mkdir -p "$work"
if [ ! -f "$work/data/meta.json" ]; then
  codat prepare --src de --tgt en --train "$data/train" --valid "$data/val" \
    --test "$data/$test_set" --out "$work/data" --vocab-size 4000 --upsample-scale 3
fi
echo "run directory: $run"
codat train multi30k_deen_dat_demo "data.dir=$work/data" "run_dir=$run" \
  "train.max_minutes=$minutes" --resume auto --allow-change train.max_minutes
src="$work/data/$test_set.src.txt"
ref="$work/data/$test_set.ref.txt"
hyp="$run/$test_set.hyp.en"
codat generate "$run" --input "$src" --output "$hyp"
echo
echo "Three translations of Multi30k $test_set (German source, English reference, model output):"
for i in 1 2 3; do
  echo "  source:     $(sed -n "${i}p" "$src")"
  echo "  reference:  $(sed -n "${i}p" "$ref")"
  echo "  hypothesis: $(sed -n "${i}p" "$hyp")"
  echo
done
echo "BLEU on Multi30k $test_set De->En ($(wc -l < "$src") sentences, $hyp against $ref):"
codat score "$hyp" "$ref"
codat export "$run" "$run/export" --force
echo
echo "The model: $run/best (the best checkpoint by validation BLEU; last/ resumes training)."
echo "Publishable copy with its model card: $run/export"
echo "Use it: codat generate $run/export --input FILE, or in Python codat.load(\"$run/export\")"
