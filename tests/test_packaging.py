"""Packaging metadata and the set-up scripts: one version source, the SPDX licence and its file,
py.typed and the recipes as package data, matplotlib only in the plot and dev extras (and a clear
error without it), ruff pinned to the version in use, and the scripts that CI runs."""

from __future__ import annotations

import fnmatch
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import codat
from codat import plot, recipes

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
pytestmark = pytest.mark.skipif(not PYPROJECT.is_file(), reason="not a source checkout")


@pytest.fixture(scope="module")
def project():
    return tomllib.loads(PYPROJECT.read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower()


def test_the_version_has_one_source(project, capsys):
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "codat.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", codat.__version__)
    from codat.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"codat {codat.__version__}"


def test_the_licence_is_apache_2_in_spdx_and_in_the_file(project):
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    # setuptools refuses a licence classifier next to an SPDX expression
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_py_typed_and_every_recipe_are_package_data(project):
    package_data = project["tool"]["setuptools"]["package-data"]
    assert (pathlib.Path(codat.__file__).parent / "py.typed").is_file()
    assert "py.typed" in package_data["codat"]
    shipped = [p.name for p in recipes.RECIPE_DIR.iterdir() if p.suffix == ".yaml"]
    assert shipped
    for name in shipped:
        assert any(fnmatch.fnmatch(name, g) for g in package_data["codat.recipes"]), name


def test_matplotlib_is_the_plot_extra_only(project):
    core = {_name(r) for r in project["project"]["dependencies"]}
    extras = project["project"]["optional-dependencies"]
    assert "matplotlib" not in core
    assert "matplotlib" in {_name(r) for r in extras["plot"]}
    assert "matplotlib" in {_name(r) for r in extras["dev"]}  # the plot tests run under dev


def test_ruff_is_pinned_to_the_version_in_use(project):
    pins = [r for r in project["project"]["optional-dependencies"]["dev"] if _name(r) == "ruff"]
    assert len(pins) == 1 and "==" in pins[0], pins
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    out = subprocess.run([ruff, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == pins[0].split("==")[1].strip()


def test_codat_imports_and_plot_fails_clearly_without_matplotlib(tmp_path):
    # A fresh interpreter where `import matplotlib` fails, as in a core install without [plot].
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_loss": 2.0}\n')
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import codat.cli, codat.commands, codat.plot\n"
        "try:\n"
        f"    codat.plot.plot_run([{str(tmp_path)!r}])\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == plot.MISSING_MATPLOTLIB
    assert "pip install 'codat[plot]'" in plot.MISSING_MATPLOTLIB


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.sh")))
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)


def test_ci_runs_the_readme_test_script_then_the_wheel_smoke_test():
    lines = [x for x in (REPO / ".ci" / "run").read_text().splitlines() if x.startswith("bash ")]
    assert lines == ["bash scripts/test.sh", "bash scripts/wheel_smoke.sh"]
    subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], check=True)


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_loss": 2.0, "valid_bleu": 1.0}\n')
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
        "from codat.cli import main\n"
        f"main(['plot', {str(tmp_path)!r}, '--out', {str(tmp_path / 'x.png')!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "codat[plot]" in proc.stderr and "Traceback" not in proc.stderr
