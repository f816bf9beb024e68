"""Fused zaya.* ops: eager reference, ONNX and MLIR lowerings, Triton kernels."""
