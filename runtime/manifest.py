"""The artifact's ``manifest.json`` as types: every reader goes through :class:`Manifest`, never through keys.

``Manifest.from_json`` is the only parser. It checks the structure field by field and refuses what is not
there, has the wrong type, or was not written by ``to_json`` (unknown keys), so an edited or foreign manifest
fails with one line naming the field instead of a ``KeyError`` deep in a backend. Every path the manifest names
(weights, graphs, the MLIR module, IREE modules) must be relative, stay inside the artifact and be one of the
hashed files: an edit cannot point a backend at another artifact's weights or at ``/etc``.

What hashes can and cannot do: they catch corruption and a changed file whose manifest was left alone; whoever
edits a file can also edit the manifest. The config the runtime uses is read from the hashed ``config.json``
and must equal the manifest's copy (``artifact.Artifact.config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from zaya_export.errors import ZayaError
from zaya_export.output_dir import ARTIFACT_FORMAT
from zaya_export.models.commit_entry import COMMIT_SPECS
from zaya_export.models.io_table import MAX_BATCH, Name
from zaya_export.models.quantization import QuantError, QuantScheme
from zaya_export.passes.base import PassRecord

FORMAT = ARTIFACT_FORMAT  # defined beside the output protocol, which recognises artifacts by it
SCHEMA_VERSION = 2  # 2: TiDAR entries; state outputs conv_rows/omega


class ManifestError(ZayaError):
    """A manifest that is not one this version writes."""


_MISSING = object()


def _get(d: dict, key: str, types: type | tuple[type, ...], where: str, default: Any = _MISSING) -> Any:  # noqa: ANN401
    if key not in d:
        if default is _MISSING:
            raise ManifestError(f"{where}: missing {key!r}")
        return default
    value = d[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise ManifestError(f"{where}.{key}: expected {_names(types)}, got {type(value).__name__}")
    return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in _tuple(types))


def _only(d: Any, keys: set[str], where: str) -> dict:  # noqa: ANN401
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    extra = sorted(set(d) - keys)
    if extra:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(extra)}")
    return d


def relative_path(value: Any, where: str) -> str:  # noqa: ANN401
    """A path inside the artifact: relative, POSIX, no ``..``; returned unchanged."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: expected a relative path, got {value!r}")
    path = PurePosixPath(value)
    if path.is_absolute() or "\\" in value or ".." in path.parts or value.startswith("~"):
        raise ManifestError(f"{where}: {value!r} points outside the artifact")
    return value


@dataclass(frozen=True, kw_only=True)
class PortSig:
    """One input or output of a graph: its name, and once lowered to ONNX its dtype and (symbolic) shape."""

    name: str
    dtype: str | None = None
    shape: tuple[int | str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.shape is not None:
            out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_json(cls, d: Any, where: str) -> PortSig:  # noqa: ANN401
        d = _only(d, {"name", "dtype", "shape"}, where)
        shape = _get(d, "shape", (list, type(None)), where, None)
        if shape is not None and not all(isinstance(s, (int, str)) and not isinstance(s, bool) for s in shape):
            raise ManifestError(f"{where}.shape: expected ints and dimension names")
        return cls(name=_get(d, "name", str, where), dtype=_get(d, "dtype", (str, type(None)), where, None),
                   shape=None if shape is None else tuple(shape))


def _ports(d: dict, key: str, where: str) -> tuple[PortSig, ...]:
    return tuple(PortSig.from_json(p, f"{where}.{key}[{i}]") for i, p in enumerate(_get(d, key, list, where)))


@dataclass(frozen=True, kw_only=True)
class EntryPoint:
    """One exported entry: ``tokens`` is its static token count (None: dynamic T), ``onnx`` its graph file
    (None when only MLIR was written), ``debug`` marks the probe entry (not for decoding)."""

    tokens: int | None
    inputs: tuple[PortSig, ...]
    outputs: tuple[PortSig, ...]
    debug: bool = False
    onnx: str | None = None

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [p.name for p in self.outputs]

    @property
    def stateful(self) -> bool:
        """Whether it returns a state update (so a cache must have room for its tokens)."""
        return Name.NEW_K in self.output_names

    def to_json(self) -> dict[str, Any]:
        out = {"tokens": self.tokens, "inputs": [p.to_json() for p in self.inputs],
               "outputs": [p.to_json() for p in self.outputs], "debug": self.debug}
        if self.onnx is not None:
            out["onnx"] = self.onnx
        return out

    @classmethod
    def from_json(cls, d: Any, where: str) -> EntryPoint:  # noqa: ANN401
        d = _only(d, {"tokens", "inputs", "outputs", "debug", "onnx"}, where)
        onnx = _get(d, "onnx", (str, type(None)), where, None)
        return cls(tokens=_get(d, "tokens", (int, type(None)), where), inputs=_ports(d, "inputs", where),
                   outputs=_ports(d, "outputs", where), debug=_get(d, "debug", bool, where, False),
                   onnx=None if onnx is None else relative_path(onnx, f"{where}.onnx"))


@dataclass(frozen=True, kw_only=True)
class StateEntry:
    """A function of the MLIR module that mutates the decode state in place (inputs by name; it mutates
    ``mutates``): a commit entry (no outputs), or a commit folded into the next forward (``commit_then_*``,
    ``models.folded_entry``), which returns that forward's outputs."""

    inputs: tuple[PortSig, ...]
    mutates: tuple[str, ...]
    outputs: tuple[PortSig, ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [p.name for p in self.outputs]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [p.to_json() for p in self.inputs], "outputs": [p.to_json() for p in self.outputs],
                "mutates": list(self.mutates)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> StateEntry:  # noqa: ANN401
        d = _only(d, {"inputs", "outputs", "mutates"}, where)
        outputs = _ports(d, "outputs", where) if "outputs" in d else ()
        if outputs and where.rsplit(".", 1)[-1] in COMMIT_SPECS:
            raise ManifestError(f"{where}.outputs: a state commit has no outputs")
        return cls(inputs=_ports(d, "inputs", where), outputs=outputs,
                   mutates=tuple(map(str, _get(d, "mutates", list, where))))


@dataclass(frozen=True, kw_only=True)
class MlirModule:
    """The torch-mlir module: its file, the weights as IREE parameters (``scope`` in ``parameter_file``)."""

    module: str
    importer: str
    ops_per_entry: dict[str, Any]
    parameter_scope: str
    parameter_file: str
    state_entries: dict[str, StateEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "importer": self.importer, "ops_per_entry": self.ops_per_entry,
                "parameters": {"scope": self.parameter_scope, "file": self.parameter_file},
                "state_entries": {n: s.to_json() for n, s in self.state_entries.items()}}

    @classmethod
    def from_json(cls, d: Any, where: str) -> MlirModule:  # noqa: ANN401
        d = _only(d, {"module", "importer", "ops_per_entry", "parameters", "state_entries"}, where)
        params = _only(_get(d, "parameters", dict, where), {"scope", "file"}, f"{where}.parameters")
        states = _get(d, "state_entries", dict, where, {})
        return cls(module=relative_path(_get(d, "module", str, where), f"{where}.module"),
                   importer=_get(d, "importer", str, where), ops_per_entry=_get(d, "ops_per_entry", dict, where),
                   parameter_scope=_get(params, "scope", str, f"{where}.parameters"),
                   parameter_file=relative_path(_get(params, "file", str, f"{where}.parameters"),
                                                f"{where}.parameters.file"),
                   state_entries={n: StateEntry.from_json(s, f"{where}.state_entries.{n}") for n, s in states.items()})


@dataclass(frozen=True, kw_only=True)
class IreeModule:
    """One compiled IREE module (``vmfb``) for a target, with the flags and driver it was compiled for."""

    vmfb: str
    flags: tuple[str, ...]
    driver: str
    bytes: int
    amd_archs: tuple[str, ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"vmfb": self.vmfb, "flags": list(self.flags), "driver": self.driver, "bytes": self.bytes,
                "amd_archs": list(self.amd_archs), "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: Any, where: str) -> IreeModule:  # noqa: ANN401
        d = _only(d, {"vmfb", "flags", "driver", "bytes", "amd_archs", "seconds"}, where)
        return cls(vmfb=relative_path(_get(d, "vmfb", str, where), f"{where}.vmfb"),
                   flags=tuple(map(str, _get(d, "flags", list, where))), driver=_get(d, "driver", str, where),
                   bytes=_get(d, "bytes", int, where), amd_archs=tuple(map(str, _get(d, "amd_archs", list, where))),
                   seconds=float(_get(d, "seconds", (int, float), where)))


@dataclass(frozen=True, kw_only=True)
class TidarInfo:
    """The TiDAR shape the graphs were traced for: K drafts, the packed step's proposal levels, the mask id."""

    block_len: int
    levels: tuple[int, ...]
    mask_token_id: int | None

    def to_json(self) -> dict[str, Any]:
        return {"block_len": self.block_len, "levels": list(self.levels), "mask_token_id": self.mask_token_id}

    @classmethod
    def from_json(cls, d: Any, where: str) -> TidarInfo:  # noqa: ANN401
        d = _only(d, {"block_len", "levels", "mask_token_id"}, where)
        levels = _get(d, "levels", list, where)
        if not all(isinstance(x, int) for x in levels):
            raise ManifestError(f"{where}.levels: expected integers")
        block_len = _get(d, "block_len", int, where)
        if block_len < 1:
            raise ManifestError(f"{where}.block_len: must be >= 1, got {block_len}")
        return cls(block_len=block_len, levels=tuple(levels),
                   mask_token_id=_get(d, "mask_token_id", (int, type(None)), where))


@dataclass(kw_only=True)
class PassLog:
    """Which passes ran at export and what each did: the model-level passes (fusion, packing) in order, and
    the ONNX cleanup passes per entry point."""

    model: list[PassRecord] = field(default_factory=list)
    onnx: dict[str, list[PassRecord]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": [r.to_json() for r in self.model],
                "onnx": {n: [r.to_json() for r in log] for n, log in self.onnx.items()}}

    @classmethod
    def from_json(cls, d: Any, where: str) -> PassLog:  # noqa: ANN401
        d = _only(d, {"model", "onnx"}, where)

        def records(items: Any, at: str) -> list[PassRecord]:  # noqa: ANN401
            if not isinstance(items, list):
                raise ManifestError(f"{at}: expected a list")
            try:
                return [PassRecord.from_json(r, f"{at}[{i}]") for i, r in enumerate(items)]
            except ValueError as exc:
                raise ManifestError(str(exc)) from None

        return cls(model=records(_get(d, "model", list, where, []), f"{where}.model"),
                   onnx={n: records(log, f"{where}.onnx.{n}") for n, log in _get(d, "onnx", dict, where, {}).items()})


_KEYS = {"format", "schema_version", "created", "source", "dtype", "compute_dtype", "config", "weights", "formats",
         "mlir", "iree", "entry_points", "tidar", "pass_log", "op_counts", "versions", "validation",
         "export_seconds", "files", "kernels", "quant", "max_batch"}


@dataclass(kw_only=True)
class Manifest:
    """What an export wrote. ``validation`` (the per-run summaries) and ``files`` (sha256 of every other file)
    are the only fields that change after export."""

    created: str
    source: str
    dtype: str
    compute_dtype: str
    config: dict[str, Any]
    weights: str
    formats: tuple[str, ...]
    entry_points: dict[str, EntryPoint]
    mlir: MlirModule | None = None
    iree: dict[str, IreeModule] = field(default_factory=dict)
    tidar: TidarInfo | None = None
    pass_log: PassLog = field(default_factory=PassLog)
    op_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    export_seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    # AOT-compiled Triton kernels by GPU arch: one record per code object (file, launch, resource use, matrix
    # instructions found), as kernels/aot.py writes them
    kernels: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # weight-only quantization (models/quantization.QuantScheme as JSON); None: float weights
    quant: dict[str, Any] | None = None
    # most sequences one call serves (``export --max-batch``); 1: the IREE module holds fixed-batch-1 functions only
    max_batch: int = MAX_BATCH

    @property
    def scheme(self) -> QuantScheme | None:
        return None if self.quant is None else QuantScheme.from_json(self.quant, "manifest.quant")

    def paths(self) -> dict[str, str]:
        """Every file the manifest points a reader at, by the field that names it."""
        out = {"weights": self.weights}
        out |= {f"entry_points.{n}.onnx": e.onnx for n, e in self.entry_points.items() if e.onnx}
        if self.mlir is not None:
            out |= {"mlir.module": self.mlir.module, "mlir.parameters.file": self.mlir.parameter_file}
        out |= {f"iree.{t}.vmfb": m.vmfb for t, m in self.iree.items()}
        out |= {f"kernels.{a}.{k['kernel']}": k["file"] for a, ks in self.kernels.items() for k in ks}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created": self.created, "source": self.source,
                "dtype": self.dtype, "compute_dtype": self.compute_dtype, "config": self.config,
                "weights": self.weights, "formats": list(self.formats),
                "mlir": None if self.mlir is None else self.mlir.to_json(),
                "iree": {t: m.to_json() for t, m in self.iree.items()},
                "entry_points": {n: e.to_json() for n, e in self.entry_points.items()},
                "tidar": None if self.tidar is None else self.tidar.to_json(), "pass_log": self.pass_log.to_json(),
                "op_counts": self.op_counts, "versions": self.versions, "validation": self.validation,
                "export_seconds": self.export_seconds, "files": self.files,
                **({"kernels": self.kernels} if self.kernels else {}),  # absent without kernels: the old format
                **({"quant": self.quant} if self.quant else {}),
                **({"max_batch": self.max_batch} if self.max_batch != MAX_BATCH else {})}  # absent: the old format

    @classmethod
    def from_json(cls, d: Any) -> Manifest:  # noqa: ANN401
        """Parse a loaded ``manifest.json``; :class:`ManifestError` names the first bad field."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError("not a zaya-export manifest")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"schema version {d.get('schema_version')!r} is not supported "
                                f"(this zaya-export reads {SCHEMA_VERSION})")
        d = _only(d, _KEYS, "manifest")
        w = "manifest"
        entries = _get(d, "entry_points", dict, w)
        if not entries:
            raise ManifestError("manifest.entry_points: empty")
        mlir, tidar = _get(d, "mlir", (dict, type(None)), w, None), _get(d, "tidar", (dict, type(None)), w, None)
        if _get(d, "iree", dict, w, {}) and mlir is None:
            raise ManifestError("manifest.iree: IREE modules without the MLIR module they were compiled from")
        files = _get(d, "files", dict, w, {})
        for rel, digest in files.items():
            relative_path(rel, "manifest.files")
            if not isinstance(digest, str):
                raise ManifestError(f"manifest.files.{rel}: expected a sha256 string")
        return cls(
            created=_get(d, "created", str, w), source=_get(d, "source", str, w), dtype=_get(d, "dtype", str, w),
            compute_dtype=_get(d, "compute_dtype", str, w, "fp32"), config=_get(d, "config", dict, w),
            weights=relative_path(_get(d, "weights", str, w), "manifest.weights"),
            formats=tuple(map(str, _get(d, "formats", list, w))),
            entry_points={n: EntryPoint.from_json(e, f"manifest.entry_points.{n}") for n, e in entries.items()},
            mlir=None if mlir is None else MlirModule.from_json(mlir, "manifest.mlir"),
            iree={t: IreeModule.from_json(m, f"manifest.iree.{t}") for t, m in _get(d, "iree", dict, w, {}).items()},
            tidar=None if tidar is None else TidarInfo.from_json(tidar, "manifest.tidar"),
            pass_log=PassLog.from_json(_get(d, "pass_log", dict, w, {}), "manifest.pass_log"),
            op_counts=_get(d, "op_counts", dict, w, {}),
            versions=_get(d, "versions", dict, w, {}), validation=_get(d, "validation", (dict, type(None)), w, None),
            export_seconds=float(_get(d, "export_seconds", (int, float), w, 0.0)), files=files,
            kernels=_kernels(_get(d, "kernels", dict, w, {})), quant=_quant(_get(d, "quant", (dict, type(None)), w, None)),
            max_batch=_max_batch(_get(d, "max_batch", int, w, MAX_BATCH)))


def _max_batch(n: int) -> int:
    if not 1 <= n <= MAX_BATCH:
        raise ManifestError(f"manifest.max_batch: expected 1..{MAX_BATCH}, got {n}")
    return n


def _quant(d: dict | None) -> dict | None:
    """``manifest.quant``: a scheme this version can run."""
    if d is not None:
        try:
            QuantScheme.from_json(d, "manifest.quant")
        except QuantError as exc:
            raise ManifestError(str(exc)) from None
    return d


def _kernels(d: dict) -> dict[str, list[dict[str, Any]]]:
    """``manifest.kernels``: arch → records, each naming its code object by a path inside the artifact."""
    for arch, records in d.items():
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ManifestError(f"manifest.kernels.{arch}: expected a list of kernel records")
        for i, r in enumerate(records):
            where = f"manifest.kernels.{arch}[{i}]"
            _get(r, "kernel", str, where)
            r["file"] = relative_path(_get(r, "file", str, where), f"{where}.file")
    return d
