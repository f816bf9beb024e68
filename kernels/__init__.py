"""Fused ``zaya.*`` ops. Each has an eager reference (a ``torch.library`` custom op) and an ONNX face (a
``zaya``-domain node plus an ONNX function body that stock onnxruntime inlines) and an MLIR face (a
decomposition IREE's importer legalizes), and a Triton kernel for GPUs (``<op>_triton.py``, imported only
when asked for: Triton is optional; ``triton_faces()``, ``aot.py``). Importing this package registers them
all."""

from . import block_attention, cca, moe_top1  # noqa: F401 - registration side effects
from .registry import (call, function_protos, mlir_decompositions, mlir_faces, registered, translation_table,
                       triton_faces)

__all__ = ["call", "function_protos", "mlir_decompositions", "mlir_faces", "registered", "translation_table",
           "triton_faces"]
