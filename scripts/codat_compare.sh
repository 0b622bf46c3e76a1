#!/usr/bin/env bash
# Stage 2 comparison on Multi30k De->En: three continuations of the same DAT checkpoint, same
# steps, same seed and data order -- objective dp | reward | codat (configs/multi30k_deen_codat_small.yaml).
# Usage: scripts/codat_compare.sh [STEPS=300] [OUT=runs] [extra key=value overrides...]
set -euo pipefail
STEPS=${1:-300}
OUT=${2:-runs}
shift $(( $# > 2 ? 2 : $# ))
for obj in codat reward dp; do
  echo "== objective $obj"
  codat train configs/multi30k_deen_codat_small.yaml "train.objective=$obj" \
    "train.max_steps=$STEPS" "run_dir=$OUT/m30k_deen_ft_$obj" "$@"
done
