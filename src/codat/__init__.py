"""codat: non-autoregressive generation with DA-Transformer and CoDAT, in plain PyTorch.

Shape letters used in every shape comment of the package:
  B batch, S source length, L graph (upsampled decoder) length, N target length,
  V vocabulary, D model width, H heads, K samples per source, T decoder steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codat.generate import Translator

__version__ = "0.1.0"


def load(run_dir: str, *, device: str = "cpu") -> Translator:
    """Load a run directory (its best/) or a checkpoint directory as a `Translator`
    (`codat.generate`): `codat.load("runs/dat").generate(["ein Satz ."])`."""
    from codat.generate import Translator

    return Translator.from_dir(run_dir, device=device)
