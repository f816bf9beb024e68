"""``export --quant``: write a quantized weight file and point each ONNX entry's matmuls at it.

The weight file keeps every tensor the float artifact has, except the quantized matrices, which it holds as
``<name>.qweight`` / ``.scales`` (/ ``.zero_points``) (``models/quantization.py``). It is written tensor by
tensor (``write_streamed``) from a loaded model or straight from a streamed checkpoint, each matrix quantized
once on the way, so the working set is one matrix and its codes, at any model size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import torch

from zaya_export.models.quantization import PARTS, QuantScheme, quantized_slots, quantizing_producer
from zaya_export.models.safetensors_stream import TensorSlot, status_progress, write_streamed
from zaya_export.models.streaming import stored_dtype
from zaya_export.passes.base import PassManager, PassRecord
from zaya_export.passes.onnx_quant import QuantizeWeights, StoredMatrix

from .onnx_export import WEIGHTS_FILE


def write_quantized_weights(path: Path, shapes: dict[str, tuple[int, ...]], read: Callable[[str], torch.Tensor],
                            dtype: torch.dtype, scheme: QuantScheme, tied: bool, status: Callable[[str], None]
                            ) -> tuple[dict[str, tuple], dict[str, StoredMatrix]]:
    """Write the quantized weight file from native ``shapes`` and ``read(name)`` (the stored float dtype
    ``dtype`` for what stays float); returns the offsets (as ``write_weights``) and the quantized matrices."""
    slots = [TensorSlot(name, stored_dtype(name, dtype), shape) for name, shape in shapes.items()]
    slots, bits = quantized_slots(shapes, slots, scheme, tied)
    offsets = write_streamed(path, slots, quantizing_producer(read, scheme, bits, tied),
                             status_progress(status, f"quantizing and writing the weights ({scheme.name})"),
                             order=slots)
    if tied:  # the traced graph names the tied head separately; its embedding lookup reads the float table
        offsets["lm_head.weight"] = offsets["model.embed_tokens.weight"]
    shape_of = {s.name: s.shape for s in slots}
    matrices = {}
    for name, b in bits.items():
        parts = {p: (offsets[f"{name}.{p}"][0], offsets[f"{name}.{p}"][1], shape_of[f"{name}.{p}"])
                 for p in PARTS if f"{name}.{p}" in offsets}
        matrices[name] = StoredMatrix(bits=b, shape=_float_shape(shapes, name, tied), parts=parts)
    return offsets, matrices


def _float_shape(shapes: dict[str, tuple[int, ...]], name: str, tied: bool) -> tuple[int, ...]:
    return shapes["model.embed_tokens.weight"] if name == "lm_head.weight" and tied else shapes[name]


def quantize_entry(model: ir.Model, scheme: QuantScheme, matrices: dict[str, StoredMatrix], folder: Path
                   ) -> list[PassRecord]:
    """Run ``quantize_weights`` on one lowered, weight-bound entry; returns its pass log."""
    return PassManager([QuantizeWeights(scheme, matrices, WEIGHTS_FILE, folder)]).run(model)
