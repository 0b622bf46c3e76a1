"""codat.recipes: the shipped training recipes (package data) and `resolve`'s lookup order: an
existing file, then a shipped recipe by NAME or NAME.yaml, else FileNotFoundError listing the
names; the checkout's configs/ is the same directory; every recipe loads."""

from __future__ import annotations

import pathlib

import pytest

from codat import recipes
from codat.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_names_are_the_yaml_files_beside_the_module():
    files = sorted(p.stem for p in recipes.RECIPE_DIR.glob("*.yaml"))
    assert recipes.names() == files
    assert "multi30k_deen_dat_small" in files and "multi30k_deen_dat_base" in files


@pytest.mark.parametrize("name", ["multi30k_deen_dat_small", "multi30k_deen_dat_small.yaml"])
def test_a_shipped_recipe_resolves_by_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such file here
    path = recipes.resolve(name)
    assert path == recipes.RECIPE_DIR / "multi30k_deen_dat_small.yaml"
    assert load_config(path).model.arch == "dat"


def test_an_existing_file_wins_over_a_recipe_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = pathlib.Path("multi30k_deen_dat_small.yaml")
    local.write_text("model: {arch: at}\n")
    assert recipes.resolve("multi30k_deen_dat_small.yaml") == local
    assert recipes.resolve(tmp_path / local) == tmp_path / local
    # The bare name is not a file here, so it still names the shipped recipe.
    assert recipes.resolve("multi30k_deen_dat_small").parent == recipes.RECIPE_DIR


@pytest.mark.parametrize(
    "name", ["no_such_recipe", "somewhere/multi30k_deen_dat_small", "__init__", "__init__.py", ""]
)
def test_an_unknown_name_raises_listing_the_recipes(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        recipes.resolve(name)
    message = str(e.value)
    assert repr(name) in message
    assert all(n in message for n in recipes.names())


def test_the_checkout_configs_dir_is_the_recipe_dir():
    configs = REPO / "configs"
    if not configs.exists():
        pytest.skip("not a source checkout")
    assert configs.resolve() == recipes.RECIPE_DIR
    assert (configs / "multi30k_deen_dat_small.yaml").is_file()


@pytest.mark.parametrize("name", recipes.names())
def test_every_shipped_recipe_loads(name):
    cfg = load_config(recipes.resolve(name))
    assert cfg.model.arch and cfg.run_dir
