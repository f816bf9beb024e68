"""The artifact directory: a self-describing, tamper-evident bundle of exported entry points.

```
artifact/
  manifest.json        schema version, config, entry points (input/output names, shapes, dtypes), pass log,
                       op counts, tool versions, sha256 of every other file, validation summary
  config.json  generation_config.json  tokenizer.json (when the checkpoint has one)
  onnx/<entry>.onnx    one graph per entry point
  onnx/weights.safetensors   the only copy of the weights, shared by every entry (ONNX external data)
  report/              validation reports (json + md; outputs of `validate`, not hashed, never read back)
```

Writes are atomic: everything is built in a temporary sibling directory that replaces the target only when
complete, so a failed or interrupted export leaves nothing behind and never damages a good artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from zaya_export.errors import ZayaError
from zaya_export.models import ZayaConfig

from .calibration import CALIBRATION_FILE, Calibration
from .tokenizer import load_tokenizer
from zaya_export.models.safetensors_header import read_header
from .manifest import FORMAT, SCHEMA_VERSION, EntryPoint, Manifest, ManifestError

__all__ = ["FORMAT", "MANIFEST", "SCHEMA_VERSION", "Artifact", "ArtifactError", "Manifest", 
           "is_artifact", "open_artifact", "tool_versions", "write_manifest"]

MANIFEST = "manifest.json"
# Versions that must match between the exporting and the loading environment.
PINNED = ("zaya-export", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "iree-base-compiler",
          "iree-base-runtime", "iree-turbine")


class ArtifactError(ZayaError):
    """A missing, corrupt, tampered or mismatched artifact."""


def tool_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in PINNED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


REPORTS = "report"  # validation reports: written after export by ``validate``, never read back, not hashed
_MANIFEST_TMP = f".{MANIFEST}."  # prefix of the temporary file a manifest is written through


def _files(root: Path) -> list[Path]:
    """The artifact's hashed files: everything but the manifest, its temporary files and the reports."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(_MANIFEST_TMP) and p.relative_to(root).parts[0] != REPORTS)


def _write_json_atomically(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_MANIFEST_TMP, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Hash every file under ``root`` into ``manifest.files`` and write ``manifest.json`` atomically (export)."""
    manifest.files = {p.relative_to(root).as_posix(): sha256(p) for p in _files(root)}
    _write_json_atomically(root / MANIFEST, manifest.to_json())


@dataclass
class Artifact:
    """An opened, checked artifact: its root and typed manifest. Paths go through :meth:`path`, which keeps
    them inside ``root``; the config is the hashed ``config.json`` (checked equal to the manifest's copy)."""

    root: Path
    manifest: Manifest
    config: ZayaConfig

    @property
    def entry_points(self) -> dict[str, EntryPoint]:
        return self.manifest.entry_points

    def path(self, relative: str) -> Path:
        """``root / relative``, refused when it resolves outside the artifact (a link or an edited manifest)."""
        path = self.root / relative
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            raise ArtifactError(f"{self.root}: {relative!r} resolves outside the artifact") from None
        return path

    @property
    def weights(self) -> Path:
        return self.path(self.manifest.weights)

    @property
    def tokenizer(self) -> Path | None:
        path = self.root / "tokenizer.json"
        return path if path.is_file() else None

    @property
    def calibration(self) -> Calibration | None:
        """The acceptance histograms measured at export (``calibration.json``), None when the export skipped it.
        The file is hashed, so it is checked at open; its content is checked here."""
        path = self.root / CALIBRATION_FILE
        if not path.is_file() or self.manifest.tidar is None:
            return None
        try:
            return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")), self.manifest.tidar.block_len)
        except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise ArtifactError(f"{path}: invalid calibration ({exc})") from None

    def record_validation(self, summary: dict[str, Any]) -> None:
        """Store ``validate``'s summary in the manifest with one atomic replace. The file hashes are kept as
        they were checked when the artifact was opened: nothing changed since is ever blessed."""
        self.manifest.validation = summary
        for stale in self.root.glob(_MANIFEST_TMP + "*"):  # left by a validate that was killed
            stale.unlink(missing_ok=True)
        _write_json_atomically(self.root / MANIFEST, self.manifest.to_json())


def is_artifact(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def open_artifact(path: str | Path, verify: bool = True, allow_version_mismatch: bool = False) -> Artifact:
    """Load and check an artifact: schema and structure, every file's sha256, no unlisted files, every path the
    manifest names inside the artifact and hashed, the config, tool versions."""
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root}: not an artifact (no {MANIFEST})")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise ArtifactError(f"{mpath}: corrupt manifest (not readable JSON)") from None
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as exc:
        raise ArtifactError(f"{mpath}: {exc}") from None
    if verify:
        listed = manifest.files
        present = {p.relative_to(root).as_posix() for p in _files(root)}
        for rel in sorted(set(listed) - present):
            raise ArtifactError(f"{root / rel}: missing (listed in the manifest)")
        for rel in sorted(present - set(listed)):
            raise ArtifactError(f"{root / rel}: not part of the artifact (tampered?)")
        for rel, digest in sorted(listed.items()):
            if sha256(root / rel) != digest:
                raise ArtifactError(f"{root / rel}: sha256 does not match the manifest (tampered or corrupt)")
        for where, rel in manifest.paths().items():
            if rel not in listed:
                raise ArtifactError(f"{mpath}: {where} names {rel!r}, which is not one of the artifact's files")
    built, here = manifest.versions, tool_versions()
    diffs = [f"{k} {built.get(k)} (artifact) vs {here.get(k)} (here)" for k in PINNED if built.get(k) != here.get(k)]
    if diffs and not allow_version_mismatch:
        raise ArtifactError(f"{root}: built with other tool versions: {'; '.join(diffs)} "
                            "(re-export, or pass --allow-version-mismatch)")
    artifact = Artifact(root, manifest, _config(root, manifest))
    read_header(artifact.weights)  # sizes and offsets consistent: a truncated, re-hashed file is refused here
    if artifact.tokenizer is not None:
        load_tokenizer(artifact.tokenizer)  # an unusable tokenizer is a broken artifact, refused at the door
    for rel in manifest.paths().values():
        artifact.path(rel)
    return artifact


def _config(root: Path, manifest: Manifest) -> ZayaConfig:
    """The hashed ``config.json``; the manifest's copy (what ``inspect`` shows) must say the same."""
    try:
        on_disk = json.loads((root / "config.json").read_text(encoding="utf-8"))
        config = ZayaConfig.from_dict(on_disk, warn_unknown=False)
        copy = ZayaConfig.from_dict(manifest.config, warn_unknown=False)
    except Exception as exc:  # noqa: BLE001 - any parse or validation failure is an invalid artifact
        raise ArtifactError(f"{root}: invalid config ({exc})") from None
    hashed, shown = config.to_dict(), copy.to_dict()
    if hashed != shown:
        differ = sorted(k for k, v in hashed.items() if shown.get(k) != v)
        raise ArtifactError(f"{root}: the manifest's config differs from config.json in {', '.join(differ)} "
                            "(tampered?)")
    return config
