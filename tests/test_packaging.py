"""The installed (non-editable) package: adapters and cases live inside the manualprop namespace.

A bare top-level ``adapters`` would clash with AdapterHub's package of that name on PyPI.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy without build/: setuptools would zip whatever an earlier build left in build/lib.
    source, out = tmp_path_factory.mktemp("source") / "manualprop", tmp_path_factory.mktemp("wheel")
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns("build", "mutants", ".git", "*.egg-info", "__pycache__", ".*cache")
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{done.stdout}\n{done.stderr}")
    (path,) = out.glob("manualprop-*.whl")
    return path


def test_the_wheel_has_one_top_level_package_and_ships_the_cases(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"manualprop"}
    assert "manualprop/adapters/torch_engine.py" in names and "manualprop/adapters/keras_engine.py" in names
    assert any(n.startswith("manualprop/cases/seeds/") and n.endswith(".yaml") for n in names)


def test_the_wheel_ships_every_module_of_the_package(wheel):
    """setuptools takes the packages listed in pyproject.toml and no sub-package of theirs: one
    left out (the oracle once was) is missing from every install but an editable one."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"manualprop/{p.relative_to(ROOT / 'manualprop').as_posix()}" for p in (ROOT / "manualprop").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)


def test_the_installed_package_runs_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert not (site / "adapters").exists()
    code = (
        "import importlib.util, manualprop, manualprop.adapters.torch_engine as t\n"
        "from manualprop.harness import bundled_cases\n"
        f"assert manualprop.__file__.startswith({str(site)!r}), manualprop.__file__\n"
        f"assert str(bundled_cases()).startswith({str(site)!r}), bundled_cases()\n"
        "spec = importlib.util.find_spec('adapters')\n"
        f"assert spec is None or not str(spec.origin).startswith({str(site)!r})\n"
        "from manualprop.cli import main\n"
        "raise SystemExit(main(['run', '--engines', 'numpy,numeric', '-q']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed, 0 failed, 0 invalid" in done.stdout
