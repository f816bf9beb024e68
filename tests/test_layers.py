"""The layering contract (``[tool.importlinter]`` in pyproject.toml): kernels → models → passes → runtime →
tool modules, each importing only those below. import-linter resolves a package by its folder, and the
installed tree maps four folders into ``zaya_export`` (``package-dir``), so the test lints a copy laid out as
one package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("kernels", "models", "passes", "runtime")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy(tmp: Path) -> Path:
    pkg = tmp / "zaya_export"
    shutil.copytree(ROOT / "zaya_export", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in SUBPACKAGES:
        shutil.copytree(ROOT / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__", "zaya1-demo"))
    return tmp


def test_layers_import_downward_only(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    tree = _copy(tmp_path)
    state = tree / "zaya_export" / "models" / "state.py"
    state.write_text(state.read_text() + "\nfrom zaya_export.runtime import sampling  # noqa: E402\n")
    result = _lint(tree)
    assert result.returncode != 0 and "zaya_export.models.state -> zaya_export.runtime.sampling" in result.stdout
