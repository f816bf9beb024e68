"""How a fused ``zaya.*`` op presents its faces: the torch custom op (eager reference), the ONNX translation
(a ``zaya``-domain node) and the ONNX function body that lets stock onnxruntime run that node by inlining.

Each op module calls :func:`register_onnx` once; the exporter asks :func:`translation_table` and
:func:`function_protos` for everything registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
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


def translation_table() -> dict:
    return {face.torch_op: face.translate for face in _FACES.values()}


def function_protos(used: set[str] | None = None) -> list[onnx.FunctionProto]:
    """Function bodies of the registered ops (only ``used`` op types when given)."""
    return [face.body.to_function_proto() for name, face in _FACES.items() if used is None or name in used]


def registered() -> list[str]:
    return sorted(_FACES)
