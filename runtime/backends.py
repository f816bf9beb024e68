"""The backends behind :class:`~zaya_export.runtime.session.Session`, one entry-point signature for all:
numpy arrays in and out (``models.entries``). ``ort`` runs an artifact's ONNX graphs with onnxruntime,
``iree`` its compiled IREE module, ``torch`` the eager reference model."""

from __future__ import annotations

import os

import numpy as np

from zaya_export.models import entries
from zaya_export.models.commit_entry import UPDATE_OUTPUTS
from zaya_export.models.folded_entry import FOLDED, folded_name
from zaya_export.models.io_table import Name
from zaya_export.errors import InputError, ZayaError

from .device_cache import PENDING


class Backend:
    name = "base"

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def folds(self, commit: str) -> bool:
        """Whether a ``commit`` may wait for the next forward (only IREE modules run commits themselves)."""
        return False


SHARE_ABOVE_BYTES = 2**30


_POOL_THREADS: int | None = None


def shared_pool(ort, threads: int | None = None) -> int:  # noqa: ANN001 - the onnxruntime module
    """Size of the one intra-op thread pool every onnxruntime session of this process runs on, created on
    first use with ``threads`` (default: every core); later requests get the pool that exists.

    Per-session pools were measured worse on every count (demo checkpoint, 2 cores, in-process A/B): a
    session's own workers spin after each op and take the core the next session needs when TiDAR alternates
    verify and draft (verify+draft 8.4 ms with spinning per-session pools, 7.3 ms with one non-spinning
    thread, 5.6 ms with one shared spinning pool), and a spinning shared pool of two threads beats one thread
    even on the demo's 1-token decode (1.44 vs 1.58 ms) and on the 68-token packed step (7.7 vs 9.5 ms)."""
    global _POOL_THREADS
    if _POOL_THREADS is None:
        _POOL_THREADS = int(threads or os.cpu_count() or 1)
        ort.set_global_thread_pool_sizes(_POOL_THREADS, 1)
    return _POOL_THREADS


def ort_session(model: str | bytes, providers: list[str] | None = None, threads: int | None = None):  # noqa: ANN201
    """An onnxruntime session on the shared pool (:func:`shared_pool`), all graph optimizations on. Every
    session of a process that uses the pool must be made here (onnxruntime refuses a session with its own
    pool once a shared one exists)."""
    import onnxruntime as ort

    shared_pool(ort, threads)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"])


class OrtBackend(Backend):
    """onnxruntime on the CPU (or an execution provider given explicitly, asserted to be in use).

    Sessions are created on first use of an entry: each onnxruntime session holds its own copy of the
    initializers, so AR decoding never pays for the TiDAR graphs it does not run."""

    name = "ort"

    def __init__(self, artifact, threads: int | None = None, providers: list[str] | None = None) -> None:  # noqa: ANN001
        import onnxruntime as ort

        self.ort, self.artifact, self.threads = ort, artifact, threads
        self.providers = providers or ["CPUExecutionProvider"]
        self.sessions: dict = {}

    def entry_threads(self, entry: str) -> int:
        """Intra-op threads ``entry`` runs with: every session runs on the one process-wide pool."""
        return shared_pool(self.ort, self.threads)

    def shared_with(self, entry: str) -> str | None:
        """The entry whose session serves ``entry`` too. A quantized artifact's ``decode`` graph is its
        ``prefill`` graph at one token (both run the MoE unrolled per expert), and each onnxruntime session
        prepacks its own copy of the codes (8.3 GB of RSS per session for the int4 8B, measured): above
        :data:`SHARE_ABOVE_BYTES` of weights, decode runs on the prefill session, one copy for AR."""
        points = self.artifact.entry_points
        quantized = self.artifact.manifest.quant is not None
        if (entry == "decode" and quantized and "prefill" in points and points["prefill"].onnx
                and self.artifact.weights.stat().st_size > SHARE_ABOVE_BYTES):
            return "prefill"
        return None

    def session(self, entry: str):  # noqa: ANN201 - onnxruntime.InferenceSession
        shared = self.shared_with(entry)
        if shared is not None:
            return self.session(shared)
        if entry not in self.sessions:
            point = self.artifact.entry_points.get(entry)
            if point is None or point.onnx is None:
                raise KeyError(f"the artifact has no ONNX graph for the {entry!r} entry point")
            path = self.artifact.path(point.onnx)
            try:
                session = ort_session(str(path), self.providers, self.threads)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise BackendLoadError(f"{path}: onnxruntime refused the graph ({_first_line(exc)})") from None
            check_signature(path, point, [(a.name, a.shape) for a in session.get_inputs()],
                            [(a.name, a.shape) for a in session.get_outputs()])
            if session.get_providers()[0] != self.providers[0]:  # ORT silently falls back to CPU
                raise RuntimeError(f"onnxruntime did not enable {self.providers[0]} (got {session.get_providers()})")
            self.sessions[entry] = (session, [o.name for o in session.get_outputs()])
        return self.sessions[entry]

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session, names = self.session(entry)
        return dict(zip(names, session.run(names, inputs)))


def check_signature(path: object, point: object, inputs: list[tuple[str, list]],
                    outputs: list[tuple[str, list]]) -> None:
    """A graph's ``(name, shape)`` inputs and outputs must be what the manifest's entry ``point`` promises
    (names, and every fixed dimension): a graph swapped for another entry's (prefill's under decode, say) is
    refused before it runs."""
    for side, ports, args in (("inputs", point.inputs, inputs), ("outputs", point.outputs, outputs)):
        if [p.name for p in ports] != [name for name, _ in args]:
            raise BackendLoadError(f"{path}: graph {side} {[name for name, _ in args]} differ from the manifest's "
                                   f"{[p.name for p in ports]} (tampered?)")
        for port, (_, shape) in zip(ports, args):
            if port.shape is None:
                continue
            fixed = [d if isinstance(d, int) else None for d in port.shape]
            have = [d if isinstance(d, int) and d > 0 else None for d in (shape or [])]
            if fixed != have:
                raise BackendLoadError(f"{path}: {side[:-1]} {port.name} has shape {shape}, the manifest says "
                                       f"{list(port.shape)} (tampered?)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class BackendLoadError(ZayaError):
    """A backend refused an artifact's graph or module (corrupt, truncated, or edited and re-hashed)."""


SYNC_BELOW_BYTES = 64 * 2**20  # weights under which ``auto`` runs IREE on the calling thread (local-sync)


def cpu_device(artifact) -> str:  # noqa: ANN001 - runtime.artifact.Artifact
    """The IREE CPU driver for ``device="auto"``: ``local-sync`` (every dispatch on the calling thread) for a
    model under :data:`SYNC_BELOW_BYTES` of weights, whose dispatches are too small to pay for handing them to a
    thread pool, else ``local-task``. On the demo (21 MB, 2 cores) local-sync runs decode in 1.43 ms against
    2.39 and AR generation at 399 tok/s against 288; the packed TiDAR step, the one entry big enough to split,
    is slower on one thread (10.8 ms against 8.3)."""
    return "local-sync" if artifact.weights.stat().st_size < SYNC_BELOW_BYTES else "local-task"


class IreeBackend(Backend):
    """The artifact's IREE module (``iree/<target>.vmfb``) on an IREE driver: ``local-task`` (CPU thread pool),
    ``local-sync`` (one thread), ``auto`` (one of these two by the model's size, :func:`cpu_device`) or ``hip``
    (AMD GPU). Parameters are read in place from the artifact's safetensors file through an IREE parameter
    index, so no second copy of the weights is made."""

    name = "iree"

    def __init__(self, artifact, device: str = "auto", target: str | None = None) -> None:  # noqa: ANN001
        import iree.runtime as rt

        device = cpu_device(artifact) if device == "auto" else device
        modules = artifact.manifest.iree
        if not modules:
            raise InputError(f"{artifact.root}: no IREE module (export with --format onnx,mlir --target cpu)")
        gpu = device.split(":")[0] in ("hip", "rocm")
        if target is None:
            wanted = [n for n, m in modules.items() if (m.driver == "hip") == gpu]
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
        vmfb_path = artifact.path(modules[target].vmfb)
        try:
            index = rt.ParameterIndex()
            index.load(str(artifact.weights))
            params = rt.create_io_parameters_module(
                self.config.vm_instance, index.create_provider(scope=artifact.manifest.mlir.parameter_scope))
            vmfb = rt.VmModule.mmap(self.config.vm_instance, str(vmfb_path))
            self.context = rt.SystemContext(config=self.config, vm_modules=[
                params, rt.create_hal_module(self.config.vm_instance, self.config.device), vmfb])
            self.module = self.context.modules.module
        except (RuntimeError, ValueError, OSError) as exc:
            raise BackendLoadError(f"{vmfb_path}: IREE cannot load the module with its parameters "
                                   f"({_first_line(exc)})") from None
        self.rt = rt
        # model entries, then the in-place state commits (absent from artifacts exported before them)
        self.entries = {**artifact.entry_points, **artifact.manifest.mlir.state_entries}
        # entries with a fixed-batch-1 twin (``entries.batch1_twin``; none in modules exported before them)
        self.twins = {e for e in self.entries if vmfb.lookup_function(entries.batch1_twin(e)) is not None}
        # entries with a function for any batch (an export with --max-batch 1 keeps only the twins of these)
        self.any_batch = {e for e in self.entries if vmfb.lookup_function(e) is not None}
        self.target, self.device = target, device

    @property
    def commits_on_device(self) -> bool:
        return "commit" in self.entries

    def folds(self, commit: str) -> bool:
        """Whether some forward of the module runs ``commit`` first (``models.folded_entry``; none in modules
        exported before them): then a commit can wait for the next forward (``DeviceKVCache``)."""
        return any(folded_name(commit, e) in self.entries for e in FOLDED.get(commit, ()))

    def to_device(self, array: np.ndarray):  # noqa: ANN201 - iree.runtime.DeviceArray
        return self.rt.asdevicearray(self.config.device, np.ascontiguousarray(array))

    def run(self, entry: str, inputs: dict) -> dict:
        """Run one entry. Inputs may be numpy or device arrays. When the state comes in as device arrays
        (``DeviceKVCache``), the state outputs stay on the device for the in-place commit; everything else comes
        back as owned numpy arrays."""
        if entry not in self.entries:
            raise KeyError(f"the artifact has no {entry!r} entry point")
        pending = inputs.get(PENDING)
        if pending is not None:
            inputs = {k: v for k, v in inputs.items() if k != PENDING}
            if not pending.done:  # the previous forward's commit: in one call with this one where it can
                inputs, call = {**inputs, **pending.args}, folded_name(pending.name, entry)
                if call not in self.entries:
                    self.run(pending.name, inputs)
                    call = entry
                out = self.run(call, inputs)
                pending.done = True  # once it has run (a failed call leaves it waiting)
                return out
        spec = self.entries[entry]
        args = [inputs[n] for n in spec.input_names]
        if entry in self.twins and inputs[Name.INPUT_IDS].shape[0] == 1:
            entry = entries.batch1_twin(entry)  # one sequence: the function traced at a fixed batch of 1
        elif entry not in self.any_batch:
            raise InputError(f"the IREE module has {entry!r} for one sequence only (exported with --max-batch 1), "
                             f"called with a batch of {inputs[Name.INPUT_IDS].shape[0]}")
        try:
            outs = getattr(self.module, entry)(*[a if isinstance(a, self.rt.DeviceArray)
                                                 else np.ascontiguousarray(a) for a in args])
        except (RuntimeError, ValueError) as exc:  # e.g. a parameter the module names is not in the weights
            raise BackendLoadError(f"IREE failed to run {entry!r} ({_first_line(exc)})") from None
        outs = [] if outs is None else outs if isinstance(outs, (list, tuple)) else [outs]
        resident = isinstance(inputs.get(Name.PAST_K), self.rt.DeviceArray)
        # to_host() may alias device buffers that the next call reuses: copy, as the other backends return owned
        # arrays (the TiDAR loop keeps a step's draft logits across the next forward)
        return {n: r if resident and n in UPDATE_OUTPUTS else np.array(r.to_host(), copy=True)
                for n, r in zip(spec.output_names, outs)}


class TorchBackend(Backend):
    """The eager PyTorch reference model behind the same entry signature. State crosses the boundary as fp32
    (exact for fp16/bf16 values) because numpy has no bfloat16."""

    name = "torch"

    def __init__(self, model, block_len: int | None = None, levels: tuple[int, ...] | None = None,  # noqa: ANN001
                 tidar: bool = True) -> None:
        import torch

        self.torch, self.model = torch, model
        specs = entries.entry_specs(block_len or model.config.diffusion_block_len, levels, model.config.conv_history)
        if not tidar:  # an AR artifact: the same entries as its graphs
            specs = {name: spec for name, spec in specs.items() if name in entries.AR_ENTRIES}
        specs[entries.PROBE.name] = entries.PROBE
        self.entries = {name: entries.Entry(model, spec).eval() for name, spec in specs.items()}

    def run(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        module = self.entries[entry]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in module.spec.inputs]
        args = [a.to(self.model.dtype) if a.is_floating_point() else a for a in args]
        with torch.no_grad():
            out = module(*args)
        return {n: (t.float() if t.is_floating_point() else t).numpy() for n, t in zip(module.spec.outputs, out)}
