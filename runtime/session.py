"""``Session``: one interface over every backend, exposing the entry points of ``zaya_export.tracing``.

Backends take and return numpy arrays with the entry signature. ``ort`` runs the artifact's ONNX graphs with
onnxruntime; ``iree`` runs its compiled IREE module; ``torch`` runs the eager reference model (from an
artifact's weights or a checkpoint).

The decode state lives in :class:`KVCache`: preallocated buffers of a fixed capacity handed to the graph
whole, with a validity mask marking unfilled slots, so no step copies the cache. After each forward only the
T new key/value rows are written into the buffers. On IREE the same buffers live on the device
(``device_cache.DeviceKVCache``) and the module's in-place commit entries write them there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zaya_export.models import ZayaConfig

from .. import tracing
from ..commit_entry import UPDATE_OUTPUTS

if TYPE_CHECKING:
    from .device_cache import DeviceKVCache


class Backend:
    name = "base"

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class OrtBackend(Backend):
    """onnxruntime on the CPU (or an execution provider given explicitly, asserted to be in use).

    Sessions are created on first use of an entry: each onnxruntime session holds its own copy of the
    initializers, so AR decoding never pays for the TiDAR graphs it does not run."""

    name = "ort"

    def __init__(self, artifact, threads: int | None = None, providers: list[str] | None = None) -> None:  # noqa: ANN001
        import onnxruntime as ort

        self.ort, self.artifact = ort, artifact
        self.options = ort.SessionOptions()
        # Small graphs are dominated by per-op thread hand-offs: one thread decodes `tiny` ~30% faster than two.
        small = artifact.weights.stat().st_size < 64 * 2**20
        self.options.intra_op_num_threads = threads or (1 if small else (os.cpu_count() or 1))
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = providers or ["CPUExecutionProvider"]
        self.sessions: dict = {}

    def session(self, entry: str):  # noqa: ANN201 - onnxruntime.InferenceSession
        if entry not in self.sessions:
            if "onnx" not in self.artifact.entry_points.get(entry, {}):
                raise KeyError(f"the artifact has no ONNX graph for the {entry!r} entry point")
            path = self.artifact.path(self.artifact.entry_points[entry]["onnx"])
            session = self.ort.InferenceSession(str(path), self.options, providers=self.providers)
            if session.get_providers()[0] != self.providers[0]:  # ORT silently falls back to CPU
                raise RuntimeError(f"onnxruntime did not enable {self.providers[0]} (got {session.get_providers()})")
            self.sessions[entry] = (session, [o.name for o in session.get_outputs()])
        return self.sessions[entry]

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session, names = self.session(entry)
        return dict(zip(names, session.run(names, inputs)))


class IreeBackend(Backend):
    """The artifact's IREE module (``iree/<target>.vmfb``) on an IREE driver: ``local-task`` (CPU thread pool),
    ``local-sync`` (one thread) or ``hip`` (AMD GPU). Parameters are read in place from the artifact's
    safetensors file through an IREE parameter index, so no second copy of the weights is made."""

    name = "iree"

    def __init__(self, artifact, device: str = "local-task", target: str | None = None) -> None:  # noqa: ANN001
        import iree.runtime as rt

        from zaya_export.errors import InputError

        modules = artifact.manifest.get("iree") or {}
        if not modules:
            raise InputError(f"{artifact.root}: no IREE module (export with --format onnx,mlir --target cpu)")
        gpu = device.split(":")[0] in ("hip", "rocm")
        if target is None:
            wanted = [n for n, m in modules.items() if (m["driver"] == "hip") == gpu]
            if not wanted:
                raise InputError(f"{artifact.root}: no IREE module for device {device!r} (have {sorted(modules)})")
            target = wanted[0]
        if target not in modules:
            raise InputError(f"{artifact.root}: no IREE module for target {target!r} (have {sorted(modules)})")
        try:
            self.config = rt.Config(device)
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"IREE device {device!r} is not available here: {str(exc).splitlines()[0]}"
                             + (" (the hip driver needs the ROCm runtime, libamdhip64.so, and an AMD GPU)" if gpu
                                else "")) from None
        index = rt.ParameterIndex()
        index.load(str(artifact.weights))
        params = rt.create_io_parameters_module(self.config.vm_instance,
                                                index.create_provider(scope=artifact.manifest["mlir"]["parameters"]
                                                                      ["scope"]))
        vmfb = rt.VmModule.mmap(self.config.vm_instance, str(artifact.path(modules[target]["vmfb"])))
        self.context = rt.SystemContext(config=self.config, vm_modules=[
            params, rt.create_hal_module(self.config.vm_instance, self.config.device), vmfb])
        self.module = self.context.modules.module
        self.rt = rt
        # model entries, then the in-place state commits (absent from artifacts exported before them)
        self.entries = {**artifact.entry_points, **artifact.manifest["mlir"].get("state_entries", {})}
        self.target, self.device = target, device

    @property
    def commits_on_device(self) -> bool:
        return "commit" in self.entries

    def to_device(self, array: np.ndarray):  # noqa: ANN201 - iree.runtime.DeviceArray
        return self.rt.asdevicearray(self.config.device, np.ascontiguousarray(array))

    def run(self, entry: str, inputs: dict) -> dict:
        """Run one entry. Inputs may be numpy or device arrays. When the state comes in as device arrays
        (``DeviceKVCache``), the state outputs stay on the device for the in-place commit; everything else comes
        back as owned numpy arrays."""
        if entry not in self.entries:
            raise KeyError(f"the artifact has no {entry!r} entry point")
        spec = self.entries[entry]
        args = [inputs[i["name"]] for i in spec["inputs"]]
        outs = getattr(self.module, entry)(*[a if isinstance(a, self.rt.DeviceArray) else np.ascontiguousarray(a)
                                             for a in args])
        outs = [] if outs is None else outs if isinstance(outs, (list, tuple)) else [outs]
        resident = isinstance(inputs.get("past_k"), self.rt.DeviceArray)
        # to_host() may alias device buffers that the next call reuses: copy, as the other backends return owned
        # arrays (the TiDAR loop keeps a step's draft logits across the next forward)
        return {o["name"]: r if resident and o["name"] in UPDATE_OUTPUTS else np.array(r.to_host(), copy=True)
                for o, r in zip(spec["outputs"], outs)}


class TorchBackend(Backend):
    """The eager PyTorch reference model behind the same entry signature. State crosses the boundary as fp32
    (exact for fp16/bf16 values) because numpy has no bfloat16."""

    name = "torch"

    def __init__(self, model, block_len: int | None = None, levels: tuple[int, ...] | None = None,  # noqa: ANN001
                 tidar: bool = True) -> None:
        import torch

        self.torch, self.model = torch, model
        specs = tracing.entry_specs(block_len or model.config.diffusion_block_len, levels, model.config.conv_history)
        if not tidar:  # an AR artifact: the same entries as its graphs
            specs = {name: spec for name, spec in specs.items() if name in tracing.AR_ENTRIES}
        specs[tracing.PROBE.name] = tracing.PROBE
        self.entries = {name: tracing.Entry(model, spec).eval() for name, spec in specs.items()}

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        module = self.entries[entry]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in module.spec.inputs]
        args = [a.to(self.model.dtype) if a.is_floating_point() else a for a in args]
        with torch.no_grad():
            out = module(*args)
        return {n: (t.float() if t.is_floating_point() else t).numpy() for n, t in zip(module.spec.outputs, out)}


class KVCache:
    """Decode state of B rows in preallocated numpy buffers of ``capacity`` slots.

    Each row has its own length (TiDAR accepts a different number of drafts per row). Rows are written at
    their own offsets; slots a row has not filled stay invalid, which the graphs mask, so the buffers can be
    handed over whole without copying or compacting them.
    """

    def __init__(self, config: ZayaConfig, batch: int, capacity: int, dtype: type = np.float32) -> None:
        L, nkv, d = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        self.capacity = capacity
        self.lengths = np.zeros(batch, np.int64)
        self.k = np.zeros((L, batch, nkv, capacity, d), dtype)
        self.v = np.zeros_like(self.k)
        self.valid = np.zeros((batch, capacity), bool)
        self.conv = np.zeros((L, batch, config.conv_channels, config.conv_history), dtype)
        self.rho = np.zeros((L, batch, config.value_half), dtype)

    @property
    def length(self) -> int:
        return int(self.lengths.max())

    def inputs(self, ids: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Entry inputs for new tokens ``ids`` [B, T]: the whole buffers, unfilled slots marked invalid."""
        mask = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        return {"input_ids": ids.astype(np.int64), "input_mask": mask, "past_k": self.k, "past_v": self.v,
                "past_valid": self.valid, "conv_state": self.conv, "rho_state": self.rho}

    def commit(self, out: dict[str, np.ndarray], counts: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> None:
        """Keep the first ``counts[b]`` new tokens of row b (all T by default); ``mask`` marks left padding."""
        T = out["new_k"].shape[3]
        counts = np.full(len(self.lengths), T) if counts is None else np.asarray(counts)
        if (self.lengths + counts).max() > self.capacity:
            raise ValueError(f"cache full: committing {counts.max()} more tokens exceeds capacity {self.capacity}")
        kappa = self.conv.shape[-1]
        for b, n in enumerate(counts.tolist()):
            start, end = self.lengths[b], self.lengths[b] + n
            self.k[:, b, :, start:end] = out["new_k"][:, b, :, :n]
            self.v[:, b, :, start:end] = out["new_v"][:, b, :, :n]
            self.valid[b, start:end] = True if mask is None else mask[b, :n]
            if "conv_state_out" in out:  # committed in-graph (step_greedy, step_sample)
                if n > 0:
                    self.conv[:, b], self.rho[:, b] = out["conv_state_out"][:, b], out["rho_state_out"][:, b]
            else:
                self.conv[:, b] = out["conv_rows"][:, b, :, n : n + kappa]
                if n > 0:
                    self.rho[:, b] = out["omega"][:, b, n - 1]
            self.lengths[b] = end


class Session:
    """Open an artifact (``ort``, ``iree`` or ``torch`` backend) or a checkpoint (``torch`` only)."""

    def __init__(self, path: str | Path, backend: str = "ort", threads: int | None = None,
                 allow_version_mismatch: bool = False, dtype: str | None = None, device: str = "local-task",
                 target: str | None = None, state_on_device: bool = True) -> None:
        from zaya_export.artifact import is_artifact, open_artifact
        from zaya_export.checkpoint import load_checkpoint
        from zaya_export.errors import InputError
        from zaya_export.tokenizer import load_tokenizer

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
            self.levels = tuple(tidar.get("levels", ())) or tracing.default_levels(self.block_len)
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
        self.levels = tuple(levels or tracing.default_levels(self.block_len))
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
            from .device_cache import DeviceKVCache

            stateful = [e["tokens"] or 0 for e in self.artifact.entry_points.values()
                        if any(o["name"] == "new_k" for o in e["outputs"])]
            return DeviceKVCache(self.backend, self.config, batch, capacity, slack=max(stateful, default=0))
        return KVCache(self.config, batch, capacity)


def _model_from_artifact(artifact, dtype: str | None):  # noqa: ANN001, ANN202
    """The eager reference model on the artifact's own weights (the checkpoint loader, pointed at them)."""
    from zaya_export.checkpoint import load_checkpoint

    return load_checkpoint(artifact.root, dtype=dtype, weights_dir=artifact.weights.parent)
