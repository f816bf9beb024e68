"""``Session``: one interface over every backend (``backends``), exposing the entry points of
``zaya_export.models.entries``, with the decode state in host buffers (``host_cache.KVCache``) or, on IREE, on
the device (``device_cache.DeviceKVCache``, whose in-place commit entries write it there).
"""

from __future__ import annotations

import numpy as np

from zaya_export.models import entries
from zaya_export.models.checkpoint import DTYPES, load_checkpoint
from zaya_export.models.quantization import load_quantized
from zaya_export.errors import InputError

from .artifact import Artifact
from .backends import Backend, IreeBackend, OrtBackend, TorchBackend
from .device_cache import DeviceKVCache
from .host_cache import KVCache
from .tokenizer import load_tokenizer

__all__ = ["Backend", "DeviceKVCache", "IreeBackend", "KVCache", "OrtBackend", "Session", "TorchBackend"]

BACKENDS = ("ort", "iree", "torch")


class Session:
    """An opened artifact or model behind one entry-point interface. Build it from opened objects:
    :meth:`from_artifact` (``ort``, ``iree`` or ``torch`` on the artifact's own weights) or :meth:`from_model`
    (eager). Telling a path's kind apart is the caller's business (``zaya_export.sources``)."""

    def __init__(self, backend: Backend, config, block_len: int | None, levels: tuple[int, ...],  # noqa: ANN001
                 artifact: Artifact | None = None, tokenizer=None, state_on_device: bool = False) -> None:  # noqa: ANN001
        self.backend, self.config, self.artifact, self.tokenizer = backend, config, artifact, tokenizer
        self.block_len, self.levels = block_len, tuple(levels)
        self.state_on_device = state_on_device  # IREE: keep the decode state on the device (off: numpy, copied)

    @classmethod
    def from_artifact(cls, artifact: Artifact, backend: str = "ort", threads: int | None = None,
                      dtype: str | None = None, device: str = "auto", target: str | None = None,
                      state_on_device: bool = True) -> "Session":
        tidar = artifact.manifest.tidar
        tokenizer = load_tokenizer(artifact.tokenizer) if artifact.tokenizer is not None else None
        if backend in ("ort", "iree"):
            runner: Backend = OrtBackend(artifact, threads) if backend == "ort" \
                else IreeBackend(artifact, device, target)
            return cls(runner, artifact.config, tidar and tidar.block_len, tidar.levels if tidar else (),
                       artifact, tokenizer, state_on_device)
        if backend != "torch":
            raise InputError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
        model = artifact_model(artifact, dtype)
        block_len = tidar.block_len if tidar else model.config.diffusion_block_len
        levels = tidar.levels if tidar else entries.default_levels(block_len)
        runner = TorchBackend(model, block_len, levels, tidar=tidar is not None)
        return cls(runner, model.config, block_len, levels, artifact, tokenizer, state_on_device)

    @classmethod
    def from_model(cls, model, block_len: int | None = None,  # noqa: ANN001 - ZayaForCausalLM
                   levels: tuple[int, ...] | None = None, tokenizer=None) -> "Session":  # noqa: ANN001
        block_len = block_len or model.config.diffusion_block_len
        levels = tuple(levels or entries.default_levels(block_len))
        return cls(TorchBackend(model, block_len, levels), model.config, block_len, levels, tokenizer=tokenizer)

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(entry, inputs)

    def prepare(self, mode: str) -> None:
        """Load what ``mode`` will run before it is timed: onnxruntime builds a session per entry on first use
        (graph optimization, weight prepacking), which would otherwise land inside the first step."""
        if isinstance(self.backend, OrtBackend):
            names = {"ar": ["prefill", "decode"], "tidar": ["prefill", "draft", "verify"],
                     "tidar-fused": ["prefill", "draft", "step", "step_greedy", "step_sample"]}[mode]
            for name in names:
                if self.has(name):
                    self.backend.session(name)

    def has(self, entry: str) -> bool:
        if isinstance(self.backend, TorchBackend):
            return entry in self.backend.entries
        point = self.artifact.entry_points.get(entry)
        return point is not None and (self.backend.name != "ort" or point.onnx is not None)

    def new_cache(self, batch: int, capacity: int) -> "KVCache | DeviceKVCache":
        """Decode state for ``capacity`` tokens per row: on the device for IREE modules with the in-place
        commits (unless ``state_on_device`` is off), numpy buffers otherwise. InputError past the artifact's
        ``max_batch`` (``export --max-batch``)."""
        limit = self.artifact.manifest.max_batch if self.artifact is not None else None
        if limit is not None and batch > limit:
            raise InputError(f"{batch} sequences at once, but this artifact serves at most {limit} "
                             f"(exported with --max-batch {limit}): run them {limit} at a time, or export again "
                             "with a larger --max-batch")
        if isinstance(self.backend, IreeBackend) and self.backend.commits_on_device and self.state_on_device:
            stateful = [e.tokens or 0 for e in self.artifact.entry_points.values() if e.stateful]
            return DeviceKVCache(self.backend, self.config, batch, capacity, slack=max(stateful, default=0))
        return KVCache(self.config, batch, capacity)


def artifact_model(artifact: Artifact, dtype: str | None = None):  # noqa: ANN201 - ZayaForCausalLM
    """The eager reference model on the artifact's own weights (the checkpoint loader, pointed at them; a
    quantized artifact's matrices dequantized)."""
    scheme = artifact.manifest.scheme
    if scheme is not None:
        return load_quantized(artifact.weights, artifact.config, scheme, DTYPES[dtype or "fp32"])
    return load_checkpoint(artifact.root, dtype=dtype, weights_dir=artifact.weights.parent)
