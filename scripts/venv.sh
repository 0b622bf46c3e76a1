# Sourced by scripts/demo.sh and scripts/test.sh (one source for the set-up): defines `codat_venv
# EXTRAS`, which creates the virtual environment $VENV (default: .venv in the checkout) when it is
# missing, installs the pinned torch when the venv does not hold it, installs this checkout
# editable with EXTRAS ("" or e.g. "dev") unless it already did so for the same pyproject.toml,
# and activates the venv.
#   PYTHON           the interpreter that creates the venv (default python3; needs >= 3.10)
#   TORCH_INDEX_URL  the index torch comes from; https://download.pytorch.org/whl/cpu on a machine
#                    without an NVIDIA GPU skips the CUDA libraries that PyPI's Linux torch pulls in
CODAT_TORCH_VERSION=2.13.0

codat_venv() {
  local root venv python extras
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  venv=${VENV:-$root/.venv}
  python=${PYTHON:-python3}
  extras=${1:-}
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "codat needs Python >= 3.10; $python is $("$python" --version 2>&1) (set PYTHON=...)" >&2
      return 1
    fi
    "$python" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  if ! python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$CODAT_TORCH_VERSION')" \
    2>/dev/null; then
    if [ -z "${TORCH_INDEX_URL:-}" ] && ! command -v nvidia-smi >/dev/null; then
      echo "no NVIDIA GPU found: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu installs the" \
        "CPU-only torch (a much smaller download)" >&2
    fi
    python -m pip install -q "torch==$CODAT_TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
  # Reinstalled only when pyproject.toml changed since the last install of these extras here.
  local stamp="$venv/.codat-install-${extras:-core}" want
  want="$root $(cksum < "$root/pyproject.toml")"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q -e "$root${extras:+[$extras]}"
    echo "$want" > "$stamp"
  fi
}
