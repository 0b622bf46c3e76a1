"""codat: non-autoregressive generation with DA-Transformer and CoDAT, in plain PyTorch.

Shape letters used in every shape comment of the package:
  B batch, S source length, L graph (upsampled decoder) length, N target length,
  V vocabulary, D model width, H heads, K samples per source, T decoder steps.
"""

__version__ = "0.1.0"


def load(run_dir: str, *, device: str = "cpu") -> "Translator":  # noqa: F821
    """Load a trained checkpoint directory and return a `Translator` (see `codat.generate`)."""
    from codat.generate import Translator

    return Translator.from_dir(run_dir, device=device)

