"""``zaya-export export``: checkpoint → fused, traced, lowered artifact. The phases, in order:

1. load the checkpoint (validated, mmapped);
2. model-level fusion passes (``fuse_cca``, ``fuse_attention``, ``fuse_moe``), each verified on a probe input;
3. trace every entry point with ``torch.export`` and check one fused op per layer in each graph;
4. lower each to ONNX (function bodies attached), run the ONNX cleanup passes, bind the shared weights;
5. write config, tokenizer, manifest (pass log, op counts, versions, hashes) atomically.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zaya_export.passes.base import PassError, PassManager
from zaya_export.passes.fusion import fusion_pipeline

from .artifact import FORMAT, SCHEMA_VERSION, atomic_directory, tool_versions, write_manifest
from .checkpoint import DTYPES, load_checkpoint
from .errors import ZayaError
from .onnx_export import WEIGHTS_FILE, bind_external_weights, lower_entry, save_entry, write_weights
from .tracing import Entry, entry_specs, example_inputs, export_entry, op_histogram

PASS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}


class ExportError(ZayaError):
    """The export pipeline could not produce a correct artifact."""


def _probe(model: torch.nn.Module) -> Callable[[Any], list]:
    """Outputs of the causal (prefill) and the bidirectional (draft) layouts on one fixed random input."""
    inputs = example_inputs(model, 2, 5, 4, seed=123)
    specs = entry_specs(4)

    def run(m: torch.nn.Module) -> list:
        with torch.no_grad():
            return [*Entry(m, specs["prefill"])(*inputs), *Entry(m, specs["draft"])(*inputs)]

    return run


def _dump(model: torch.nn.Module) -> str:
    return export_entry(model, entry_specs(1)["prefill"]).graph_module.print_readable(print_output=False)


def export_artifact(checkpoint: Path, out: Path, dtype: str | None = None, force: bool = False,
                    dump_after: tuple[str, ...] = (), dump_dir: Path | None = None, block_len: int | None = None,
                    levels: tuple[int, ...] | None = None,
                    status: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Run the whole pipeline; returns the manifest written to ``out/manifest.json``. ``block_len`` is the TiDAR
    draft count K of the verify/draft entries (default: the config's ``diffusion_block_len``)."""
    start = time.perf_counter()
    status(f"loading {checkpoint}")
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (use --force to replace it)")
    stored = dtype or "fp32"
    if stored not in DTYPES:
        raise ExportError(f"unknown dtype {stored!r}; choose one of {sorted(DTYPES)}")
    # The graphs compute in fp32 (onnxruntime's CPU kernels lack bf16 for most ops); --dtype sets how the
    # weights are stored, with one Cast per weight in the graph.
    model = load_checkpoint(checkpoint, dtype="fp32")
    if stored != "fp32":
        with torch.no_grad():  # compute with exactly the weights that will be stored
            for p in model.parameters():
                p.copy_(p.to(DTYPES[stored]).float())
    model_dtype = model.dtype
    block_len = block_len or model.config.diffusion_block_len
    if block_len < 1:
        raise ExportError(f"--block-len must be >= 1, got {block_len}")
    try:
        specs = entry_specs(block_len, levels, model.config.conv_history)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    levels = specs["step"].packed.levels
    status("fusing (fuse_cca, fuse_attention, fuse_moe)")
    passes = fusion_pipeline()
    try:
        manager = PassManager(passes, probe=_probe(model), atol=PASS_TOLERANCE[model_dtype], dump=_dump,
                              dump_after=dump_after, dump_dir=dump_dir or out.parent / f"{out.name}.dump")
        model_log = manager.run(model)
    except PassError as exc:
        raise ExportError(str(exc)) from None
    expected: dict[str, int] = {}
    for p in passes:
        expected.update(p.expected_ops(model))
    with atomic_directory(out, force) as tmp:
        (tmp / "onnx").mkdir()
        status("writing the shared weights")
        offsets = write_weights(model, tmp / "onnx" / WEIGHTS_FILE, DTYPES[stored])
        entries, onnx_logs, op_counts = {}, {}, {}
        for name, spec in specs.items():
            status(f"tracing {name}")
            program = export_entry(model, spec)
            hist = op_histogram(program)
            # the packed step keeps the reference CCA/attention (the fused ops are one-segment); MoE is fused
            want = {op: n for op, n in expected.items() if spec.packed is None or op == "zaya.moe_top1"}
            wrong = {op: hist.get(op, 0) for op in expected if hist.get(op, 0) != want.get(op, 0)}
            if wrong:
                raise ExportError(f"{name}: traced graph has {wrong} fused ops, expected {want}")
            status(f"lowering {name} to ONNX")
            try:
                onnx_model, log = lower_entry(program, want, spec.outputs, spec.inputs)
            except PassError as exc:
                raise ExportError(f"{name}: {exc}") from None
            bind_external_weights(onnx_model, offsets, tmp / "onnx")
            save_entry(onnx_model, tmp / "onnx" / f"{name}.onnx")
            entries[name] = {"onnx": f"onnx/{name}.onnx", "tokens": spec.tokens,
                             "inputs": _signature(onnx_model.graph.inputs),
                             "outputs": _signature(onnx_model.graph.outputs)}
            onnx_logs[name] = [r.to_json() for r in log]
            op_counts[name] = dict(sorted(hist.items()))
        for extra in ("tokenizer.json", "generation_config.json"):
            if (checkpoint / extra).is_file():
                shutil.copy2(checkpoint / extra, tmp / extra)
        model.config.to_json_file(tmp / "config.json")
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(checkpoint), "dtype": stored, "compute_dtype": "fp32",
            "config": model.config.to_dict(), "weights": f"onnx/{WEIGHTS_FILE}", "formats": ["onnx"],
            "entry_points": entries, "tidar": {"block_len": block_len, "levels": list(levels),
                                                "mask_token_id": model.config.mask_token_id},
            "pass_log": {"model": [r.to_json() for r in model_log], "onnx": onnx_logs},
            "op_counts": op_counts, "versions": tool_versions(), "validation": None,
            "export_seconds": round(time.perf_counter() - start, 2),
        }
        write_manifest(tmp, manifest)
    return manifest


def _signature(values) -> list[dict[str, Any]]:  # noqa: ANN001 - onnx_ir values
    return [{"name": v.name, "dtype": str(v.dtype), "shape": [str(d) if not isinstance(d, int) else d
                                                             for d in v.shape]} for v in values]
