"""``zaya-export export``: checkpoint → fused, traced, lowered artifact. The phases, in order:

1. load the checkpoint (validated, mmapped);
2. model-level fusion passes (``fuse_cca``, ``fuse_attention``, ``fuse_moe``), each verified on a probe input,
   then ``pack_tidar_step`` (adds the packed single-forward TiDAR entries, verified against verify/draft);
3. trace every entry point with ``torch.export`` and check one fused op per layer in each graph;
4. lower each to ONNX (function bodies attached), run the ONNX cleanup passes, bind the shared weights;
5. (``--format mlir``) trace the same fused model with each ``zaya.*`` op as its MLIR face, add the in-place
   state commits (``commit_entry``), import every entry into one MLIR module whose weights are external
   parameters read from the same safetensors file, and ``iree-compile`` it for each ``--target``;
6. write config, tokenizer, manifest (pass log, op counts, versions, compiler flags, hashes) atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import zaya_export.kernels as kernels
from zaya_export.passes.base import PassError, PassManager
from zaya_export.passes.fusion import fusion_pipeline
from zaya_export.passes.probe_check import tolerance_for
from zaya_export.passes.tidar_packing import ExportPlan, PackTidarStep

from zaya_export.runtime.artifact import FORMAT, SCHEMA_VERSION, atomic_directory, tool_versions, write_manifest
from zaya_export.models.checkpoint import DTYPES, load_checkpoint
from zaya_export.models.commit_entry import COMMIT_SPECS, export_commit
from zaya_export.errors import ZayaError
from .mlir_export import MLIR_FILE, PARAM_SCOPE, Target, compile_target, externalize_weights, lower_module
from .onnx_export import WEIGHTS_FILE, bind_external_weights, lower_entry, save_entry, write_weights
from zaya_export.models.entries import (AR_ENTRIES, PROBE, Entry, base_entry_specs, default_levels, entry_specs, example_inputs,
                      export_entry, greedy_inputs, op_histogram)

FORMATS = ("onnx", "mlir")

TIDAR_CHOICES = ("auto", "on", "off")


class ExportError(ZayaError):
    """The export pipeline could not produce a correct artifact."""


def _probe(model: torch.nn.Module, tidar: bool) -> Callable[[Any], list]:
    """Outputs of the causal (prefill) and, for TiDAR, the bidirectional (draft) layouts on two fixed inputs:
    random ids over a random cache, and the model's own greedy continuation over a real prompt state."""
    inputs = [example_inputs(model, 2, 5, 4, seed=123), greedy_inputs(model, 2, 5, 6, seed=7)]
    specs = entry_specs(4)
    names = ["prefill", "draft"] if tidar else ["prefill"]

    def run(m: torch.nn.Module) -> list:
        with torch.no_grad():
            return [out for x in inputs for name in names for out in Entry(m, specs[name])(*x)]

    return run


def _dump(model: torch.nn.Module) -> str:
    return export_entry(model, entry_specs(1)["prefill"]).graph_module.print_readable(print_output=False)


def export_artifact(checkpoint: Path, out: Path, dtype: str | None = None, force: bool = False,
                    dump_after: tuple[str, ...] = (), dump_dir: Path | None = None, block_len: int | None = None,
                    levels: tuple[int, ...] | None = None, formats: tuple[str, ...] = ("onnx",),
                    targets: tuple[Target, ...] = (), tidar: str = "auto",
                    status: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Run the whole pipeline; returns the manifest written to ``out/manifest.json``. ``block_len`` is the TiDAR
    draft count K of the verify/draft entries (default: the config's ``diffusion_block_len``). ``formats``:
    ``onnx`` and/or ``mlir``; ``targets``: IREE targets to compile the MLIR module for. ``tidar``: add the
    TiDAR entry points (verify, draft, the packed step) — ``auto``: when the checkpoint is a diffusion one (its
    config names a mask token or a block length); an AR checkpoint gets prefill and decode only."""
    start = time.perf_counter()
    status(f"loading {checkpoint}")
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (use --force to replace it)")
    stored = dtype or "fp32"
    if stored not in DTYPES:
        raise ExportError(f"unknown dtype {stored!r}; choose one of {sorted(DTYPES)}")
    if not formats or set(formats) - set(FORMATS):
        raise ExportError(f"unknown format(s) {sorted(set(formats) - set(FORMATS)) or formats}; choose from "
                          f"{', '.join(FORMATS)}")
    if targets and "mlir" not in formats:
        raise ExportError("--target compiles the MLIR module: add mlir to --format")
    if tidar not in TIDAR_CHOICES:
        raise ExportError(f"--tidar must be one of {', '.join(TIDAR_CHOICES)}, got {tidar!r}")
    if "mlir" in formats and stored != "fp32":
        raise ExportError(f"--format mlir reads the weights in place as IREE parameters, which needs them stored "
                          f"in the compute dtype: use --dtype fp32 (got {stored})")
    # The graphs compute in fp32 (onnxruntime's CPU kernels lack bf16 for most ops); --dtype sets how the
    # weights are stored, with one Cast per weight in the graph.
    model = load_checkpoint(checkpoint, dtype="fp32")
    if stored != "fp32":
        with torch.no_grad():  # compute with exactly the weights that will be stored
            for p in model.parameters():
                p.copy_(p.to(DTYPES[stored]).float())
    with_tidar = model.config.declares_tidar if tidar == "auto" else tidar == "on"
    if not with_tidar and (block_len is not None or levels is not None):
        why = "an AR checkpoint (its config names no mask token)" if tidar == "auto" else "--tidar off"
        raise ExportError(f"--block-len/--levels shape the TiDAR entry points, which {why} does not get: "
                          "add --tidar on to export them")
    block_len = block_len or model.config.diffusion_block_len
    if block_len < 1:
        raise ExportError(f"--block-len must be >= 1, got {block_len}")
    levels = tuple(levels or default_levels(block_len))
    status("fusing (fuse_cca, fuse_attention, fuse_moe)")
    passes = fusion_pipeline()
    try:
        manager = PassManager(passes, probe=_probe(model, with_tidar), tolerance=tolerance_for(model.dtype),
                              dump=_dump, dump_after=dump_after, dump_dir=dump_dir or out.parent / f"{out.name}.dump")
        model_log = manager.run(model)
    except PassError as exc:
        raise ExportError(str(exc)) from None
    expected: dict[str, int] = {}
    for p in passes:
        expected.update(p.expected_ops(model))
    specs = base_entry_specs(block_len)
    if with_tidar:
        status("packing the TiDAR step (pack_tidar_step)")
        plan, packer = ExportPlan(model, specs), PackTidarStep(block_len, levels)
        try:
            pack_log = PassManager([packer]).run(plan)
        except PassError as exc:
            raise ExportError(str(exc)) from None
        model_log += [dataclasses.replace(r, **packer.check.to_json()) for r in pack_log]
        specs = plan.specs
    else:
        specs = {name: spec for name, spec in specs.items() if name in AR_ENTRIES}
    if "mlir" in formats:
        externalize_weights(model)  # before tracing: the programs then refer to the weights by name
    with atomic_directory(out, force) as tmp:
        (tmp / "onnx").mkdir()
        status("writing the shared weights")
        offsets = write_weights(model, tmp / "onnx" / WEIGHTS_FILE, DTYPES[stored])
        entries, onnx_logs, op_counts, programs = {}, {}, {}, {}
        for name, spec in {**specs, PROBE.name: PROBE}.items():
            status(f"tracing {name}")
            program = export_entry(model, spec)
            hist = op_histogram(program)
            # the packed step keeps the reference CCA/attention (the fused ops are one-segment); MoE is fused
            want = {op: n for op, n in expected.items() if spec.packed is None or op == "zaya.moe_top1"}
            wrong = {op: hist.get(op, 0) for op in expected if hist.get(op, 0) != want.get(op, 0)}
            if wrong:
                raise ExportError(f"{name}: traced graph has {wrong} fused ops, expected {want}")
            # names only until the ONNX graph gives shapes and dtypes: one form for every reader
            entries[name] = {"tokens": spec.tokens, "inputs": [{"name": n} for n in spec.inputs],
                             "outputs": [{"name": n} for n in spec.outputs], "debug": spec.probe}
            op_counts[name] = dict(sorted(hist.items()))
            if "mlir" in formats:  # the same fused model, each zaya.* op traced as its MLIR face
                try:
                    with kernels.mlir_faces(decode=spec.tokens == 1):
                        programs[name] = export_entry(model, spec)
                except Exception as exc:  # torch.export raises many types; name the entry and the first line
                    raise ExportError(f"{name}: tracing the MLIR faces failed: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0]}") from None
            if "onnx" not in formats:
                continue
            status(f"lowering {name} to ONNX")
            try:
                onnx_model, log = lower_entry(program, want, spec.outputs, spec.inputs)
            except PassError as exc:
                raise ExportError(f"{name}: {exc}") from None
            bind_external_weights(onnx_model, offsets, tmp / "onnx")
            save_entry(onnx_model, tmp / "onnx" / f"{name}.onnx")
            entries[name].update(onnx=f"onnx/{name}.onnx", inputs=_signature(onnx_model.graph.inputs),
                                 outputs=_signature(onnx_model.graph.outputs))
            onnx_logs[name] = [r.to_json() for r in log]
        mlir_info, iree_info = None, {}
        if "mlir" in formats:
            status("tracing the in-place state commits")
            for name in COMMIT_SPECS:  # the IREE runtime keeps the state on the device and commits with these
                programs[name] = export_commit(model.config, name)
            try:
                static = {name for name, e in entries.items() if e["tokens"] is not None}
                ops = lower_module(programs, tmp / MLIR_FILE, static, status)
            except Exception as exc:  # importer/decomposition failures come as many exception types
                raise ExportError(f"MLIR lowering failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
            del programs
            mlir_info = {"module": MLIR_FILE, "importer": "iree-turbine FxPrograms", "ops_per_entry": ops,
                         "parameters": {"scope": PARAM_SCOPE, "file": f"onnx/{WEIGHTS_FILE}"},
                         "state_entries": {name: {"inputs": [{"name": n} for n in spec.inputs], "outputs": [],
                                                  "mutates": spec.mutates} for name, spec in COMMIT_SPECS.items()}}
            for target in targets:
                status(f"iree-compile for {target.name}")
                try:
                    vmfb = tmp / "iree" / f"{target.name}.vmfb"
                    iree_info[target.name] = compile_target(tmp / MLIR_FILE, target, vmfb)
                except RuntimeError as exc:
                    raise ExportError(str(exc)) from None
        for extra in ("tokenizer.json", "generation_config.json"):
            if (checkpoint / extra).is_file():
                shutil.copy2(checkpoint / extra, tmp / extra)
        model.config.to_json_file(tmp / "config.json")
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(checkpoint), "dtype": stored, "compute_dtype": "fp32",
            "config": model.config.to_dict(), "weights": f"onnx/{WEIGHTS_FILE}", "formats": list(formats),
            "mlir": mlir_info, "iree": iree_info,
            "entry_points": entries, "tidar": {"block_len": block_len, "levels": list(levels),
                                                "mask_token_id": model.config.mask_token_id} if with_tidar else None,
            "pass_log": {"model": [r.to_json() for r in model_log], "onnx": onnx_logs},
            "op_counts": op_counts, "versions": tool_versions(), "validation": None,
            "export_seconds": round(time.perf_counter() - start, 2),
        }
        write_manifest(tmp, manifest)
    return manifest


def _signature(values) -> list[dict[str, Any]]:  # noqa: ANN001 - onnx_ir values
    return [{"name": v.name, "dtype": str(v.dtype), "shape": [str(d) if not isinstance(d, int) else d
                                                             for d in v.shape]} for v in values]
