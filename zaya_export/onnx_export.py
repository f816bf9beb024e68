"""Lower traced entry points to ONNX with one shared weight file.

Each entry becomes ``onnx/<entry>.onnx`` (opset 20). Every ``zaya.*`` custom op becomes a ``zaya``-domain node
carrying an ONNX function body, so stock onnxruntime runs it by inlining and a kernel library can replace it.
The weights are written once, as ``onnx/weights.safetensors``, and every entry's initializers point into that
file as ONNX external data (a safetensors payload is raw little-endian, exactly what external data is). ONNX
and onnxruntime refuse external data outside the model's folder, which is why the weights sit next to the
graphs. Graph protos stay small, so models over 2 GB are no special case.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

import zaya_export.kernels as kernels
from zaya_export.passes.base import PassManager, PassRecord
from zaya_export.passes.moe_unroll import UnrollExperts, moe_nodes
from zaya_export.passes.onnx_cleanup import onnx_pipeline

from zaya_export.models.checkpoint import save_tensors
from zaya_export.models.safetensors_header import read_header
from zaya_export.models.io_table import FORWARD_INPUTS

OPSET = 20
WEIGHTS_FILE = "weights.safetensors"
_PARAM_PREFIX = "model."
# torch.onnx warns once per torchvision op it cannot register; torchvision is not a dependency.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # tracing.Entry wraps the model as `.model`


def write_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> dict[str, tuple]:
    """Write the model's tensors once (native names, in ``dtype``; routing biases stay fp32) and return
    name → (offset, length, safetensors dtype) of each tensor's bytes in the file."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        want = torch.float32 if name.endswith("balancing_biases") or dtype is None else dtype
        tensors[name] = t.detach().to(want).contiguous()
    save_tensors(tensors, path)
    header = read_header(path)
    data_start = path.stat().st_size - max((i.end for i in header.values()), default=0)
    offsets = {name: (data_start + info.start, info.end - info.start, info.dtype) for name, info in header.items()}
    if model.config.tie_word_embeddings:  # the traced graph names the tied head separately
        offsets["lm_head.weight"] = offsets["model.embed_tokens.weight"]
    return offsets


def lower_entry(program: torch.export.ExportedProgram, expected_ops: dict[str, int],
                output_names: list[str], input_names: list[str] = list(FORWARD_INPUTS)) -> tuple[ir.Model, list[PassRecord]]:
    """ExportedProgram → ONNX IR model with function bodies attached and the cleanup pipeline applied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, dynamo=True, custom_translation_table=kernels.translation_table(), opset_version=OPSET,
            optimize=False, verbose=False, input_names=input_names, output_names=output_names,
        )
    model = onnx_program.model
    for proto in kernels.function_protos():
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    model.opset_imports.setdefault(kernels.registry.DOMAIN, 1)
    onnx_names = {op.split(".", 1)[1]: n for op, n in expected_ops.items()}
    expected = {_ONNX_OP[name]: n for name, n in onnx_names.items()}
    log = PassManager(onnx_pipeline(expected)).run(model)
    return model, log


_ONNX_OP = {"cca": "CCA", "block_attention": "BlockAttention", "moe_top1": "MoETop1"}


_IR_DTYPES = {"F32": ir.DataType.FLOAT, "F16": ir.DataType.FLOAT16, "BF16": ir.DataType.BFLOAT16,
              "U8": ir.DataType.UINT8}


def bind_external_weights(model: ir.Model, offsets: dict[str, tuple], folder: Path) -> int:
    """Point every parameter initializer at its bytes in the shared weight file (no bytes are copied into the
    graph); returns how many were bound.

    Weights stored in a narrower dtype than the graph computes in (``--dtype fp16|bf16``) get one ``Cast`` to
    the compute dtype right after the initializer: storage halves, the arithmetic stays fp32, which is what
    onnxruntime's CPU kernels support. A table only row-gathered (the embedding of a quantized artifact, whose
    head has its own codes) is gathered in the stored dtype and only the gathered rows are cast.
    """
    bound = 0
    casts = []
    for value in list(model.graph.initializers.values()):
        name = value.name[len(_PARAM_PREFIX):] if value.name.startswith(_PARAM_PREFIX) else value.name
        if name not in offsets or value.const_value is None:
            continue
        offset, length, stored = offsets[name]
        stored_dtype, compute = _IR_DTYPES[stored], value.const_value.dtype
        tensor = ir.ExternalTensor(WEIGHTS_FILE, offset, length, stored_dtype, shape=value.const_value.shape,
                                   name=value.name, base_dir=folder)
        if stored_dtype == compute:
            value.const_value = tensor
            bound += 1
            continue
        stored_value = ir.Value(name=value.name + ".stored", shape=value.shape, type=ir.TensorType(stored_dtype),
                                const_value=tensor)
        if _only_gathered(value):  # an embedding table: gather the rows, then cast only those
            for use in list(value.uses()):
                gather = use.node
                if gather.outputs[0].is_graph_output():
                    raise ValueError(f"{value.name}: a gathered weight is a graph output")
                gather.replace_input_with(0, stored_value)
                cast = ir.node("Cast", [gather.outputs[0]], attributes={"to": compute})
                for later in list(gather.outputs[0].uses()):
                    if later.node is not cast:
                        later.node.replace_input_with(later.idx, cast.outputs[0])
                cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(compute), gather.outputs[0].shape
                gather.outputs[0].type = ir.TensorType(stored_dtype)
                model.graph.insert_after(gather, cast)
            model.graph.initializers.pop(value.name)
            model.graph.register_initializer(stored_value)
        else:
            cast = ir.node("Cast", [stored_value], attributes={"to": compute})
            ir.convenience.replace_all_uses_with(value, cast.outputs[0])
            model.graph.initializers.pop(value.name)
            cast.outputs[0].name = value.name
            model.graph.register_initializer(stored_value)
            casts.append(cast)
        bound += 1
    first = next(iter(model.graph), None)
    for cast in casts:
        if first is None:
            model.graph.append(cast)
        else:
            model.graph.insert_before(first, cast)
    return bound


def _only_gathered(value: ir.Value) -> bool:
    """Whether every use of ``value`` is the table of a row ``Gather`` (the embedding): casting the gathered
    rows instead of the whole table spares a float copy of it (2.1 GB at 8B) in every session."""
    uses = list(value.uses())
    return bool(uses) and all(u.node.op_type == "Gather" and u.idx == 0 and u.node.domain == ""
                              and (u.node.attributes.get("axis") is None or u.node.attributes["axis"].value == 0)
                              for u in uses)


def unroll_entry(model: ir.Model) -> list[PassRecord]:
    """Run ``unroll_experts`` on one lowered, weight-bound float entry (one with MoE nodes); returns its log."""
    if not moe_nodes(model):
        return []
    return PassManager([UnrollExperts()]).run(model)


def save_entry(model: ir.Model, path: Path) -> None:
    """Serialize (external data references only) and run the full ONNX checker on the file."""
    onnx.save_model(ir.serde.serialize_model(model), str(path))
    onnx.checker.check_model(str(path), full_check=True)
