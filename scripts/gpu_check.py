"""Entry of the device check (``scripts/gpu_check.sh``) for a machine where zaya-export is not pip-installed:
it maps the repository's folders to the ``zaya_export`` subpackages exactly as pyproject's
``[tool.setuptools.package-dir]`` does, then runs ``zaya_export.gpu_check``. Installs nothing.

The repository root is never put on ``sys.path`` (``kernels/`` would import a second time as a top-level
``kernels`` package and re-register every ``zaya.*`` op). Where onnx/onnxscript are missing (a GPU machine
with only torch and Triton), inert stand-ins let the op modules define their ONNX faces, which the GPU path
never calls; they are installed only for packages that cannot be imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAND_INS = {"onnx": ("defs",), "onnxscript": ()}  # package → submodules the op modules import


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``zaya_export.<sub>`` → folder, read from pyproject.toml (the single source of the mapping)."""
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib

        mapping = tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    except ImportError:  # Python < 3.11: the table is a flat list of "a" = "b" lines
        block = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
        mapping = dict(tuple(p.strip().strip('"') for p in line.split("=", 1)) for line in block.splitlines()
                       if "=" in line)
    return {name: root / folder for name, folder in mapping.items()}


class RepoFinder(importlib.abc.MetaPathFinder):
    """Finds ``zaya_export`` and its mapped subpackages in the repository folders."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        spec = importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        spec.loader_state = "zaya-export repo shim"
        return spec


class _Inert:
    """Stands in for any onnx/onnxscript object at import time: attributes and calls give itself, and a call
    with one function (a decorator being applied) gives that function back."""

    def __getattr__(self, name: str) -> _Inert:
        if name.startswith("__"):  # introspection (inspect, pickle) must see an ordinary object
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        if len(args) == 1 and callable(args[0]) and not kwargs and not isinstance(args[0], _Inert):
            return args[0]
        return self


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> _Inert:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def install(root: Path = ROOT, force: bool = False) -> list[str]:
    """Make ``import zaya_export...`` load from ``root`` (unless it is importable already and not ``force``);
    returns the packages given inert stand-ins."""
    if force or not _importable("zaya_export"):
        for name in [m for m in sys.modules if m == "zaya_export" or m.startswith("zaya_export.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, RepoFinder(package_dirs(root)))
    stood_in = []
    for name, subs in STAND_INS.items():
        if _importable(name):
            continue
        package = sys.modules[name] = _InertModule(name)
        package.__path__ = []  # a package, so ``from onnx.defs import ...`` resolves to the stand-in below
        stood_in.append(name)
        for sub in subs:
            module = sys.modules[f"{name}.{sub}"] = _InertModule(f"{name}.{sub}")
            setattr(package, sub, module)
            stood_in.append(f"{name}.{sub}")
    return stood_in


if __name__ == "__main__":
    stood_in = install()
    from zaya_export.gpu_check import main

    sys.exit(main(sys.argv[1:], stand_ins=stood_in))
