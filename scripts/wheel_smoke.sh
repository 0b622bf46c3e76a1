#!/usr/bin/env bash
# Packaging smoke test (CI runs it after the tests): build the wheel from a copy of the checkout,
# install it in a clean venv outside the tree, and from an empty directory run prepare -> train a
# few steps -> generate -> score on a tiny synthetic corpus, with a shipped recipe named, not a path.
#   usage: bash scripts/wheel_smoke.sh
#   VENV    the venv whose python builds the wheel (default .venv; scripts/test.sh makes it)
# torch is not installed a second time: the clean venv sees the builder's torch (and only the
# packages torch needs) through a .pth file, so pip installs codat's other dependencies from the
# index and matplotlib (the plot extra) stays absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
builder=${VENV:-$root/.venv}/bin/python
tmp=$(mktemp -d "${TMPDIR:-/tmp}/codat-wheel-smoke.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

# 1. A copy of the files git would commit (a stale build/ in the checkout cannot leak in).
mkdir "$tmp/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - ) | tar -xf - -C "$tmp/src"
"$builder" -m pip wheel -q --no-deps -w "$tmp/dist" "$tmp/src"
wheel=$(echo "$tmp"/dist/codat-*.whl)

# 2. The clean venv: torch (and its requirements) linked from the builder, the rest from pip.
"$builder" -m venv --clear "$tmp/venv"
"$builder" - "$tmp/torch-site" <<'PY'
import importlib.metadata as md
import pathlib
import re
import sys

out = pathlib.Path(sys.argv[1])
out.mkdir()
seen, todo = set(), ["torch"]
while todo:
    try:
        dist = md.distribution(todo.pop())
    except md.PackageNotFoundError:
        continue  # a requirement for another platform or Python
    name = dist.metadata["Name"].lower()
    if name in seen:
        continue
    seen.add(name)
    todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or []
             if "extra ==" not in r]
    for top in {pathlib.PurePath(f).parts[0] for f in dist.files or []}:
        src = pathlib.Path(dist.locate_file(top))
        if top not in ("..", "__pycache__") and src.exists() and not (out / top).exists():
            (out / top).symlink_to(src)
PY
site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
echo "$tmp/torch-site" > "$site/codat_smoke_torch.pth"
"$tmp/venv/bin/python" -m pip install -q "$wheel"

# 3. Outside the tree: the installed package, its version, its recipes, and no matplotlib.
mkdir "$tmp/work" && cd "$tmp/work"
export PATH="$tmp/venv/bin:$PATH"
python - "$wheel" <<'PY'
import importlib.util
import pathlib
import sys

import codat
from codat import recipes

assert pathlib.Path(codat.__file__).is_relative_to(sys.prefix), codat.__file__
assert f"codat-{codat.__version__}-" in pathlib.Path(sys.argv[1]).name, codat.__version__
assert (pathlib.Path(codat.__file__).parent / "py.typed").is_file()
assert "multi30k_deen_dat_small" in recipes.names(), recipes.names()
assert importlib.util.find_spec("matplotlib") is None, "matplotlib leaked into the core install"
words = "ein mann eine frau hund spielt im park mit dem ball auf der strasse".split()
pathlib.Path("raw").mkdir()
for split, n, seed in (("train", 200, 1), ("val", 12, 2), ("test", 8, 3)):
    lines = [" ".join(words[(seed * i + k) % len(words)] for k in range(3 + i % 5)) for i in range(n)]
    for lang in ("de", "en"):
        pathlib.Path(f"raw/{split}.{lang}").write_text("".join(s + "\n" for s in lines))
PY
codat --version
codat prepare --src de --tgt en --train raw/train --valid raw/val --test raw/test --out data \
  --vocab-size 60 --upsample-scale 3
codat train multi30k_deen_dat_small run_dir=run data.dir=data model.dim=32 model.heads=2 model.ffn_dim=64 \
  model.encoder_layers=1 model.decoder_layers=1 model.upsample_scale=3.0 model.max_length=32 \
  train.max_steps=10 train.eval_every=10 train.warmup_steps=2 train.max_tokens=400 \
  train.bf16=false train.threads=1 train.max_minutes=0 train.log_every=5 \
  train.glance_anneal_steps=10
codat generate run --input data/test.src.txt --output test.hyp
[ "$(wc -l < test.hyp)" -eq "$(wc -l < data/test.src.txt)" ]
codat score test.hyp data/test.ref.txt
echo "wheel smoke test passed in $((SECONDS - start)) s ($(basename "$wheel"))"
