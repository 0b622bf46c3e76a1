"""The training recipes shipped with codat: the YAML files beside this module (package data).

`codat train RECIPE` accepts a path or the name of a shipped recipe; `resolve` does the lookup:

    >>> from codat import recipes
    >>> recipes.resolve("multi30k_deen_dat_small").name
    'multi30k_deen_dat_small.yaml'

A source checkout also reaches these files as ``configs/`` (a symlink to this directory).
"""

from __future__ import annotations

import os
import pathlib

RECIPE_DIR = pathlib.Path(__file__).resolve().parent
SUFFIX = ".yaml"


def names() -> list[str]:
    """The names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in RECIPE_DIR.glob(f"*{SUFFIX}") if p.is_file())


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """The config file that ``name_or_path`` names.

    An existing file wins; otherwise a bare name (no directory part) is looked up among the
    shipped recipes as ``NAME`` or ``NAME.yaml``.

    Raises:
        FileNotFoundError: neither exists; the message lists the shipped recipe names.
    """
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    text = os.fspath(name_or_path)
    if text and path.name == text:  # a bare name: no directory part
        for candidate in (RECIPE_DIR / text, RECIPE_DIR / f"{text}{SUFFIX}"):
            if candidate.suffix == SUFFIX and candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"config file not found: {text!r} is neither a file nor a shipped recipe "
        f"(recipes: {', '.join(names())})"
    )
