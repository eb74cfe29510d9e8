"""The distribution installs one import package, `tiller`: built as a wheel from the sources the
Dockerfile copies, installed into a fresh virtual environment, and used from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "tiller", "engine", "server")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, python of a fresh venv with the wheel installed, dependencies borrowed)."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("tiller-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)  # ensurepip: pip's bundled wheel, no network
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print("
                                "sysconfig.get_paths()['purelib'])"], capture_output=True,
                               text=True, check=True).stdout.strip())
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                                "-q", str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    # dependencies from the test environment: its site-packages as a plain path entry, whose
    # own .pth files (the editable tiller's finder among them) are therefore not run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return wheel, python


def run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd="/")


def test_the_wheel_holds_one_top_level_package(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        top = {name.split("/")[0] for name in z.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tiller"}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"tiller/cli.py", "tiller/engine/engine.py", "tiller/server/app.py"} <= names
    # the web UI is package data: every file of tiller/webui is in the wheel
    webui = {f"tiller/webui/{p.name}" for p in (ROOT / "tiller" / "webui").iterdir()
             if p.is_file()}
    assert "tiller/webui/index.html" in webui and webui <= names, webui - names


def test_tiller_imports_and_engine_server_do_not(installed: tuple[Path, Path]) -> None:
    _, python = installed
    env = python.parent.parent
    got = run(python, "-c", "import tiller.engine.engine, tiller.server.app, tiller.cli; "
              "print(tiller.engine.engine.__file__)")
    assert got.returncode == 0, got.stderr
    assert Path(got.stdout.strip()).is_relative_to(env)
    got = run(python, "-c", "from tiller.server.webui_routes import load_assets, webui_dir; "
              "print(webui_dir()); print(sorted(load_assets(webui_dir())))")
    assert got.returncode == 0, got.stderr
    folder, names = got.stdout.splitlines()
    assert Path(folder).is_relative_to(env) and "'app.js'" in names
    for name in ("engine", "server"):
        got = run(python, "-c", f"import {name}")
        assert got.returncode != 0 and "ModuleNotFoundError" in got.stderr, (name, got.stderr)


def test_the_tiller_command_works(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, python = installed
    command = python.with_name("tiller")
    got = subprocess.run([str(command), "--help"], capture_output=True, text=True)
    assert got.returncode == 0 and "serve" in got.stdout and "generate" in got.stdout
    got = run(python, "-m", "tiller", "serve", "--model", str(tmp_path / "missing.gguf"))
    assert got.returncode == 2 and "missing.gguf" in got.stderr
