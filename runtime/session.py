"""``Session``: one interface over every backend (``backends``), exposing the entry points of
``zaya_export.models.entries``, with the decode state in host buffers (``host_cache.KVCache``) or, on IREE, on
the device (``device_cache.DeviceKVCache``, whose in-place commit entries write it there).
"""

from __future__ import annotations

from pathlib import Path

from zaya_export.models import entries
from zaya_export.models.io_table import Name
from zaya_export.models.checkpoint import load_checkpoint
from zaya_export.errors import InputError

from .artifact import is_artifact, open_artifact
from .backends import Backend, IreeBackend, OrtBackend, TorchBackend
from .device_cache import DeviceKVCache
from .host_cache import KVCache
from .tokenizer import load_tokenizer

__all__ = ["Backend", "DeviceKVCache", "IreeBackend", "KVCache", "OrtBackend", "Session", "TorchBackend"]


class Session:
    """Open an artifact (``ort``, ``iree`` or ``torch`` backend) or a checkpoint (``torch`` only)."""

    def __init__(self, path: str | Path, backend: str = "ort", threads: int | None = None,
                 allow_version_mismatch: bool = False, dtype: str | None = None, device: str = "local-task",
                 target: str | None = None, state_on_device: bool = True) -> None:
        path = Path(path)
        self.state_on_device = state_on_device  # IREE: keep the decode state on the device (off: numpy, copied)
        self.artifact = open_artifact(path, allow_version_mismatch=allow_version_mismatch) if is_artifact(path) \
            else None
        if backend in ("ort", "iree"):
            if self.artifact is None:
                raise InputError(f"{path}: the {backend} backend needs an exported artifact (run `zaya-export export`)")
            self.backend: Backend = OrtBackend(self.artifact, threads) if backend == "ort" \
                else IreeBackend(self.artifact, device, target)
            self.config = self.artifact.config
            tidar = self.artifact.manifest.get("tidar") or {}
            self.block_len, self.levels = tidar.get("block_len"), tuple(tidar.get("levels", ()))
        elif backend == "torch":
            model = load_checkpoint(path, dtype=dtype) if self.artifact is None \
                else _model_from_artifact(self.artifact, dtype)
            tidar = (self.artifact.manifest.get("tidar") or {}) if self.artifact else {}
            self.block_len = tidar.get("block_len") or model.config.diffusion_block_len
            self.levels = tuple(tidar.get("levels", ())) or entries.default_levels(self.block_len)
            ar_artifact = self.artifact is not None and self.artifact.manifest.get("tidar") is None
            self.backend = TorchBackend(model, self.block_len, self.levels, tidar=not ar_artifact)
            self.config = model.config
        else:
            raise InputError(f"unknown backend {backend!r}; choose ort, iree or torch")
        tok = (self.artifact.tokenizer if self.artifact else (path / "tokenizer.json"))
        self.tokenizer = load_tokenizer(tok) if tok is not None and tok.is_file() else None

    @classmethod
    def from_model(cls, model, block_len: int | None = None,  # noqa: ANN001 - ZayaForCausalLM
                   levels: tuple[int, ...] | None = None) -> "Session":
        self = cls.__new__(cls)
        self.artifact, self.tokenizer, self.state_on_device = None, None, False
        self.block_len = block_len or model.config.diffusion_block_len
        self.levels = tuple(levels or entries.default_levels(self.block_len))
        self.backend, self.config = TorchBackend(model, self.block_len, self.levels), model.config
        return self

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(entry, inputs)

    def has(self, entry: str) -> bool:
        if isinstance(self.backend, TorchBackend):
            return entry in self.backend.entries
        return entry in self.artifact.entry_points and (self.backend.name != "ort"
                                                        or "onnx" in self.artifact.entry_points[entry])

    def new_cache(self, batch: int, capacity: int) -> "KVCache | DeviceKVCache":
        """Decode state for ``capacity`` tokens per row: on the device for IREE modules with the in-place
        commits (unless ``state_on_device`` is off), numpy buffers otherwise."""
        if isinstance(self.backend, IreeBackend) and self.backend.commits_on_device and self.state_on_device:
            stateful = [e["tokens"] or 0 for e in self.artifact.entry_points.values()
                        if any(o["name"] == Name.NEW_K for o in e["outputs"])]
            return DeviceKVCache(self.backend, self.config, batch, capacity, slack=max(stateful, default=0))
        return KVCache(self.config, batch, capacity)


def _model_from_artifact(artifact, dtype: str | None):  # noqa: ANN001, ANN202
    """The eager reference model on the artifact's own weights (the checkpoint loader, pointed at them)."""
    return load_checkpoint(artifact.root, dtype=dtype, weights_dir=artifact.weights.parent)
