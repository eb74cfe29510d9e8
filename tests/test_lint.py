"""The tree stays ruff-clean and type-checked: both run with the tests, so CI enforces them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean(tmp_path: Path):
    """The type hints are checked (pyproject.toml's [tool.mypy]). mypy cannot follow the
    package-dir mapping, so it reads the package through a view: tiller/ with engine/ and
    server/ linked in where the installed package has them."""
    mypy = shutil.which("mypy") or str(Path(sys.executable).with_name("mypy"))
    if not Path(mypy).exists():
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    view = tmp_path / "tiller"
    view.mkdir()
    for path in (ROOT / "tiller").glob("*.py"):
        (view / path.name).symlink_to(path)
    (view / "engine").symlink_to(ROOT / "engine")
    (view / "server").symlink_to(ROOT / "server")
    result = subprocess.run([mypy, "--config-file", str(ROOT / "pyproject.toml"),
                             "--cache-dir", str(tmp_path / ".mypy_cache"), "-p", "tiller"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
