"""What a path names: an exported artifact (``manifest.json``) or a checkpoint (``config.json``), opened into a
:class:`~zaya_export.runtime.session.Session`. The runtime is built from opened objects; telling the two kinds
apart is done here, once, at the top."""

from __future__ import annotations

from pathlib import Path

from zaya_export.errors import InputError
from zaya_export.models.checkpoint import load_checkpoint
from zaya_export.runtime.artifact import is_artifact, open_artifact
from zaya_export.runtime.session import BACKENDS, Session
from zaya_export.runtime.tokenizer import load_tokenizer


def kind(path: Path) -> str:
    """``artifact`` or ``checkpoint``; :class:`InputError` when ``path`` is neither."""
    if is_artifact(path):
        return "artifact"
    if (path / "config.json").is_file():
        return "checkpoint"
    raise InputError(f"{path}: neither an artifact (manifest.json) nor a checkpoint (config.json)")


def open_session(path: str | Path, backend: str | None = None, *, allow_version_mismatch: bool = False,
                 dtype: str | None = None, **options: object) -> Session:
    """A session on ``path``: an artifact on ``backend`` (default ``ort``; ``options`` go to
    :meth:`Session.from_artifact`: threads, device, target, state_on_device), or a checkpoint on the eager
    torch model (the only backend a checkpoint has)."""
    path = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if kind(path) == "artifact":
        artifact = open_artifact(path, allow_version_mismatch=allow_version_mismatch)
        return Session.from_artifact(artifact, backend or "ort", dtype=dtype, **options)  # type: ignore[arg-type]
    if backend not in (None, "torch"):
        raise InputError(f"{path}: the {backend} backend needs an exported artifact (run `zaya-export export`)")
    tok = path / "tokenizer.json"
    return Session.from_model(load_checkpoint(path, dtype=dtype),
                              tokenizer=load_tokenizer(tok) if tok.is_file() else None)
