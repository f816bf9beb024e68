"""zaya-export: export ZAYA1 checkpoints to ONNX and MLIR/IREE, run them, and prove parity with the source."""

__version__ = "0.1.0"
