#!/usr/bin/env bash
# Set-up and tests in one command, the command CI runs (.ci/run): create the venv when needed
# (scripts/venv.sh with the dev extra; VENV picks its directory, default .venv), then the lint
# (ruff check + format --check) and the fast tests (pytest -q; extra arguments go to pytest,
# e.g. `-m slow` or a test file).
#   usage: bash scripts/test.sh [PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
. scripts/venv.sh
codat_venv dev
python -c "import torch, codat; print('torch', torch.__version__, 'codat', codat.__version__)"
ruff check src tests
ruff format --check src tests
python -m pytest -q "$@"
