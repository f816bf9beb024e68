"""The demo training corpus: the running interpreter's own standard-library source, available offline on every
machine. Split into train and held-out by file (a hash of the relative path), so held-out figures are measured
on files the model never saw."""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Test suites and vendored tools are large, repetitive and unlike everyday code: left out.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: tuple[Path, ...]
    heldout: tuple[Path, ...]

    @staticmethod
    def read(path: Path) -> str:
        return path.read_text(encoding="utf-8", errors="replace")


def stdlib_corpus(heldout_every: int = 20, root: Path | None = None) -> Corpus:
    """Every ``*.py`` file under the stdlib (minus tests), held out when ``sha1(relpath) % heldout_every == 0``."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = sorted(f for f in root.rglob("*.py") if not _SKIP_DIRS & set(f.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"{root}: no Python source files (is the standard library installed?)")

    def held(f: Path) -> bool:
        digest = hashlib.sha1(f.relative_to(root).as_posix().encode()).digest()
        return int.from_bytes(digest[:4], "little") % heldout_every == 0

    return Corpus(root, tuple(f for f in files if not held(f)), tuple(f for f in files if held(f)))


def encode_files(tokenizer, files: tuple[Path, ...], eos_id: int) -> np.ndarray:  # noqa: ANN001
    """One flat int32 stream: each file's tokens (no <bos>) followed by <eos>."""
    texts = [Corpus.read(f) for f in files]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = [np.array(e.ids + [eos_id], dtype=np.int32) for e in encodings]
    return np.concatenate(parts)


# Installed third-party packages whose source the demo model never saw: prompts "from other code bases".
FOREIGN_PACKAGES = ("click", "rich", "jinja2", "markdown_it", "pygments", "sympy", "networkx")


def foreign_files(packages: tuple[str, ...] = FOREIGN_PACKAGES) -> tuple[Path, ...]:
    """``*.py`` files (tests left out) of the installed ``packages`` that exist here, sorted by path."""
    import importlib.util

    files: list[Path] = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        root = Path(spec.origin).parent
        files += sorted(f for f in root.rglob("*.py") if not _SKIP_DIRS & set(f.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"none of {packages} is installed: no foreign Python source to measure on")
    return tuple(files)
