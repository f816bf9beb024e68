"""How a fused ``zaya.*`` op presents its faces: the torch custom op (eager reference), the ONNX translation
(a ``zaya``-domain node) and the ONNX function body that lets stock onnxruntime run that node by inlining.

Each op module calls :func:`register_onnx` and :func:`register_mlir` once; the exporter asks
:func:`translation_table`, :func:`function_protos` and :func:`mlir_decompositions` for everything registered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import onnx
import torch
import onnxscript
from onnx.defs import OpSchema

DOMAIN = "zaya"
ZAYA = onnxscript.values.Opset(DOMAIN, 1)
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


@dataclass(frozen=True)
class OnnxFace:
    torch_op: object  # torch.ops.zaya.<name>.default
    translate: Callable  # onnxscript-callable used by torch.onnx's custom_translation_table
    body: object  # onnxscript function (domain zaya) with the same name as the node


_FACES: dict[str, OnnxFace] = {}
_HELPERS: dict[str, object] = {}  # functions the bodies call (zaya domain), attached with every body


def register_schema(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
                    attributes: dict[str, OpSchema.AttrType]) -> None:
    """Declare ``zaya::name`` to onnx.defs so onnxscript can emit it (types: 'T' float, 'B' bool, 'I' int64)."""
    if onnx.defs.has(name, DOMAIN):
        return
    params = OpSchema.FormalParameter
    types = {"T": _FLOATS, "B": ["tensor(bool)"], "I": ["tensor(int64)"], "F": ["tensor(float)"]}
    used = sorted({t for _, t in inputs + outputs})
    onnx.defs.register_schema(OpSchema(
        name, DOMAIN, 1,
        inputs=[params(n, t) for n, t in inputs], outputs=[params(n, t) for n, t in outputs],
        type_constraints=[(t, types[t], "") for t in used],
        attributes=[OpSchema.Attribute(a, kind, "") for a, kind in attributes.items()],
    ))


def register_onnx(name: str, face: OnnxFace) -> None:
    _FACES[name] = face


def register_helper(name: str, body: object) -> None:
    """An ONNX function that op bodies call (or passes emit): attached to every lowered graph."""
    _HELPERS[name] = body


def translation_table() -> dict:
    return {face.torch_op: face.translate for face in _FACES.values()}


def function_protos(used: set[str] | None = None) -> list[onnx.FunctionProto]:
    """Function bodies of the registered ops (only ``used`` op types when given) and of their helpers."""
    return [face.body.to_function_proto() for name, face in _FACES.items() if used is None or name in used] + [
        body.to_function_proto() for body in _HELPERS.values()]


def registered() -> list[str]:
    return sorted(_FACES)


# ------------------------------------------------------------------------------------------------ MLIR face
_MLIR: dict[str, Callable] = {}  # by op name: OpOverload objects are not stable keys (torch.ops caches get rebuilt)
_MLIR_DECODE: dict[str, Callable] = {}  # faces specialised for one token per row


class _Faces(threading.local):
    """Which face ``call`` traces, set only inside ``mlir_faces()`` on this thread (no module-global switch)."""

    mlir: bool = False
    decode: bool = False
    triton: bool = False


_SCOPE = _Faces()


def register_mlir(name: str, decomposition: Callable, decode: Callable | None = None) -> None:
    """The op's MLIR face: a plain-torch decomposition with static control flow. The IREE path traces the
    fused model with every op replaced by its face (``mlir_faces``), so the importer sees only aten ops.
    ``decode``: a face for entries with one token per row, where a different dispatch is cheaper."""
    _MLIR[name] = decomposition
    if decode is not None:
        _MLIR_DECODE[name] = decode


def call(name: str, *args):  # noqa: ANN002, ANN201
    """Call ``zaya::name``: the custom op, or inside ``mlir_faces()`` its MLIR face inlined into the trace.
    (Tracing the faces directly is deterministic; decomposing the custom op afterwards with
    ``run_decompositions`` was found to leave the op in place once upstream transformers had run a model in
    the same process.)"""
    if _SCOPE.triton:
        return triton_face(name)(*args)
    if not _SCOPE.mlir:
        return getattr(torch.ops.zaya, name)(*args)
    face = _MLIR_DECODE.get(name, _MLIR[name]) if _SCOPE.decode else _MLIR[name]
    return face(*args)


@contextmanager
def mlir_faces(decode: bool = False) -> Iterator[None]:
    """Trace with the MLIR faces inside the block (this thread only, restored on exit, nestable); ``decode``:
    the traced entry has one token per row."""
    outer = (_SCOPE.mlir, _SCOPE.decode)
    _SCOPE.mlir, _SCOPE.decode = True, decode
    try:
        yield
    finally:
        _SCOPE.mlir, _SCOPE.decode = outer


def mlir_active() -> bool:
    """True inside ``mlir_faces()``: asked by model code whose IREE form differs from its reference (the
    sampler's sort-free top-k/top-p, ``models.ingraph_step.warp``)."""
    return _SCOPE.mlir


def decode_faces() -> bool:
    """True inside ``mlir_faces(decode=True)``: the entry being traced has one token per row."""
    return _SCOPE.mlir and _SCOPE.decode


_TRITON_FACES = {"moe_top1": "moe_top1_triton", "cca": "cca_triton", "block_attention": "block_attention_triton",
                 "residual_rmsnorm": "residual_rmsnorm_triton"}  # the last has no custom op: Triton path only


def triton_face(name: str) -> Callable:
    """The Triton implementation of ``zaya::name`` (same arguments as the reference; imports Triton)."""
    from .triton_support import load

    return getattr(load(name), _TRITON_FACES[name])


def triton_active() -> bool:
    """Whether this thread is inside ``triton_faces()``. Asked where only the Triton form of a computation
    exists (the residual + RMSNorm pair, the fused ops with the packed step's segment tables), so that outside
    the block the model runs, and traces, exactly its reference modules."""
    return _SCOPE.triton


@contextmanager
def triton_faces() -> Iterator[None]:
    """Run the fused ops as their Triton kernels inside the block (this thread only, restored on exit): the
    GPU path of the eager model (``runtime/graph_decode.py``), or the interpreter on CPU tensors."""
    outer = _SCOPE.triton
    _SCOPE.triton = True
    try:
        yield
    finally:
        _SCOPE.triton = outer


def _bool_and(a, b):  # noqa: ANN001, ANN202
    return torch.ops.aten.bitwise_and.Tensor(a, b)


def _bool_or(a, b):  # noqa: ANN001, ANN202
    return torch.ops.aten.bitwise_or.Tensor(a, b)


def _softmax(x, dim, dtype=None):  # noqa: ANN001, ANN202
    """``softmax`` as max, exp, sum and a multiply by the reciprocal. IREE raises the usual spelling (and
    ``e / e.sum()``) to ``linalg.softmax``, whose llvm-cpu code is ~8x slower than these ops apart: 6.5 ms vs
    0.8 ms for the packed step's [1, 2, 2, 68, 370] scores (45% of the step). The same values to an ulp."""
    if dtype is not None:
        x = x.to(dtype)
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e * torch.reciprocal(e.sum(dim, keepdim=True))


def _softmax_internal(x, dim, half_to_float):  # noqa: ANN001, ANN202
    return _softmax(x, dim, torch.float32 if half_to_float else None)


def _conv1d(x, w, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):  # noqa: ANN001, ANN202
    """Grouped 1-D convolution (stride 1, no padding: the CCA convs) as k shifted slices and one einsum.
    IREE's ROCm code generation rejects the grouped ``conv1d`` of the packed TiDAR step; the matmul form
    compiles for every target and is the same sum."""
    if tuple(stride) != (1,) or tuple(padding) != (0,) or tuple(dilation) != (1,):
        raise NotImplementedError("only the CCA form of conv1d (stride 1, no padding, no dilation) is decomposed")
    N, C, W = x.shape  # x [N, C, W], w [Co, C/g, k]
    Co, Cg, k = w.shape
    taps = torch.stack([x[:, :, j : W - k + 1 + j] for j in range(k)], dim=-1)  # [N, C, W-k+1, k]
    taps = taps.reshape(N, groups, Cg, W - k + 1, k)
    out = torch.einsum("ngctk,gock->ngot", taps, w.reshape(groups, Co // groups, Cg, k)).reshape(N, Co, W - k + 1)
    return out if bias is None else out + bias[None, :, None]


def mlir_decompositions(static_length: bool = False) -> dict:
    """Rewrites the IREE path needs after tracing with ``mlir_faces``: ``a & b`` on bool masks traces to
    ``aten.__and__.Tensor`` (same for ``|``), which turbine's importer does not legalize, so it becomes
    ``bitwise_and``/``bitwise_or``; ``softmax`` becomes its ops apart (``_softmax``: IREE's fused softmax is
    ~8x slower on the CPU). For programs with a static length, grouped ``conv1d`` becomes an einsum
    (``_conv1d``: ROCm rejects the packed step's grouped conv); with a dynamic length IREE's CPU backend
    miscompiles the sliced form (wrong prefill logits, while ``conv1d`` itself compiles everywhere), so there
    it stays ``conv1d``."""
    table = {torch.ops.aten.__and__.Tensor: _bool_and, torch.ops.aten.__or__.Tensor: _bool_or,
             torch.ops.aten.softmax.int: _softmax, torch.ops.aten._softmax.default: _softmax_internal}
    if static_length:
        table[torch.ops.aten.conv1d.default] = _conv1d
    return table
