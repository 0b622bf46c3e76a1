#!/usr/bin/env bash
# The first hour in one command: create .venv when needed (scripts/venv.sh: pinned torch, codat
# editable), then run the Multi30k demo (scripts/multi30k_demo.sh: prepare, train a small DAT for a
# bounded time on the CPU, translate test_2016_flickr, print its sacreBLEU).
#   usage: bash scripts/demo.sh DATA_DIR [MINUTES] [WORK_DIR] [RUN_DIR]
#   e.g.   bash scripts/demo.sh ../shared/data/multi30k
#   CPU-only machine: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/demo.sh ...
set -euo pipefail
: "${1:?usage: bash scripts/demo.sh DATA_DIR [MINUTES] [WORK_DIR] [RUN_DIR]}"
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/venv.sh
. "$here/venv.sh"
codat_venv ""
exec bash "$here/multi30k_demo.sh" "$@"
