"""``zaya-export export``: checkpoint → fused, traced, lowered artifact, as a list of phases (``PHASES``):

1. ``prepare``: check the options, load the checkpoint (validated, mmapped), round the weights to the stored dtype;
2. ``calibrate``: greedy TiDAR acceptance histograms on held-out prompts with the eager model
   (``calibration.json``, read by the cost model of ``run --mode auto``);
3. ``fuse``: the model-level fusion passes (``fuse_cca``, ``fuse_attention``, ``fuse_moe``), each verified on a
   probe input, inside a scope that unfuses the model again on every way out;
4. ``block``: ``--block-len auto`` picks the draft length by the cost model (``block_choice``) and settles the
   calibration (and ``--levels auto``) at it;
5. ``pack``: ``pack_tidar_step`` adds the packed single-forward TiDAR entries (verified against verify/draft);
   an AR export keeps prefill and decode only;
6. ``trace``: every entry point through ``torch.export``, checked for one fused op per layer; for MLIR, a forked
   second process starts building a share of the module's programs (``mlir_programs``: each entry with each
   ``zaya.*`` op as its MLIR face, the in-place state commits, the folded commits, the batch-1 twins);
7. ``weights``: the shared weights, stored once (safetensors layout) in the stored dtype;
8. ``lower-mlir``: the parent builds the rest of the programs, and both shares are merged into one MLIR module
   whose weights are external parameters read from the same file; ``iree-compile`` for each target starts in a
   child process and runs while the next phase works;
9. ``lower-onnx``: each entry to ONNX (function bodies attached), the ONNX cleanup passes, weights bound, the
   MoE unrolled per expert (float) or onto its codes (quantized);
10. ``iree-compile``: waits for the compilers (a failure ends the export like any other phase);
11. ``kernels``: AOT Triton code objects for the GPU archs asked for;
12. ``write``: config, tokenizer, manifest (pass log, op counts, versions, compiler flags, hashes); the artifact
   directory appears only when every phase succeeded.

``--dump-after`` takes a phase (what it produced: the prefill graph after prepare/fuse, the packed step after
pack, every traced graph, every ONNX graph as text, the MLIR module, the manifest) or a fusion pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import zaya_export.kernels as kernels
from zaya_export.errors import ZayaError
from zaya_export.models import ZayaForCausalLM
from zaya_export.models.checkpoint import DTYPES, load_checkpoint
from zaya_export.models.commit_entry import COMMIT_SPECS, export_commit
from zaya_export.models.folded_entry import FoldedSpec, export_folded, folded_specs
from zaya_export.models.packed import packed_layout
from zaya_export.models.quantization import QuantError, QuantScheme
from zaya_export.models.quantized_matrix import quantized_matrices
from zaya_export.models.safetensors_header import read_header
from zaya_export.models.io_table import MAX_BATCH
from zaya_export.models.entries import (AR_ENTRIES, PROBE, Entry, EntrySpec, base_entry_specs, batch1_twin,
                                        default_levels, entry_specs, example_inputs, export_entry, greedy_inputs,
                                        op_histogram)
from zaya_export.passes.base import PassError, PassManager, PassRecord
from zaya_export.passes.fusion import fused, fusion_pipeline
from zaya_export.passes.probe_check import tolerance_for
from zaya_export.passes.tidar_packing import ExportPlan, PackTidarStep
from zaya_export.output_dir import writing
from zaya_export.runtime.artifact import tool_versions, write_manifest
from zaya_export.runtime.calibration import CALIBRATION_FILE, Calibration
from zaya_export.runtime.tokenizer import load_tokenizer
from zaya_export.runtime.manifest import (EntryPoint, Manifest, MlirModule, PassLog, PortSig, StateEntry,
                                          TidarInfo)
from zaya_export.passes.onnx_quant import StoredMatrix

from .kernel_aot import build_kernels, resolve_kernel_archs
from .mlir_export import (DATA_TILED_ROWS, DATA_TILING_FLAGS, MLIR_FILE, NARROW_PARAMETER_FLAGS, PARAM_SCOPE,
                          QUANTIZED_FLAGS, CompileJob, Target, externalize_weights, resolve_targets, store_parameters)
from .mlir_programs import (ChildBuild, MlirBuildError, MlirProgram, build_module, collect, merge_modules,
                            ops_per_function, split)
from .onnx_export import WEIGHTS_FILE, bind_external_weights, lower_entry, save_entry, unroll_entry, write_weights
from .quant_export import quantize_entry, write_quantized_weights
from .weights_stream import STREAM_CHOICES, StreamedCheckpoint, fuse_streamed, open_streamed, write_streamed_weights

# What a phase can show for --dump-after: name → a function making the text, called only when that phase's dump
# was asked for (at 8B, printing a traced graph or an ONNX file costs minutes).
Dumps = dict[str, Callable[[], str]]

FORMATS = ("onnx", "mlir")
MLIR_PARTS = "mlir-parts"  # the MLIR modules of the two processes, merged into MLIR_FILE (``mlir_programs``)
MAX_BLOCK_LEN = 256  # TiDAR drafts per step: ZAYA1 uses 16; beyond this the step's graphs and masks get huge
TIDAR_CHOICES = ("auto", "on", "off")


class ExportError(ZayaError):
    """The export pipeline could not produce a correct artifact."""


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Everything ``export`` is asked for, checked once (:meth:`checked`) before any work: the CLI passes the
    user's values through and never re-checks them."""

    dtype: str = "fp32"  # how the weights are stored; the graphs compute in fp32
    formats: tuple[str, ...] = ("onnx",)
    targets: tuple[Target | str, ...] | None = None  # IREE targets; None: cpu when mlir is exported
    tidar: str = "auto"  # auto: the TiDAR entries when the config names a mask token or a block length
    block_len: int | str | None = None  # draft count K (default: the config's diffusion_block_len), or "auto"
    levels: tuple[int, ...] | str | None = None  # acceptance levels of the packed step; "auto": calibrated
    calibrate: int = 4  # prompts for the acceptance histograms of run --mode auto (0: skip)
    force: bool = False
    dump_after: tuple[str, ...] = ()  # phases or fusion passes
    dump_dir: Path | None = None
    kernels: str | tuple[str, ...] = ()  # Triton kernels to AOT-compile: GPU archs, "auto" (the GPU targets), "off"
    stream: str = "auto"  # on: weights streamed from the checkpoint (weights_stream); auto: above 2B params
    quant: str | None = None  # weight-only quantization (models/quantization.SCHEMES); None: float weights
    group_size: int = 32
    quant_head: str = "int8"  # the LM head under int4: kept at int8, or "same"
    quant_accuracy: int = 4  # MatMulNBits accuracy_level (not a CLI flag: 0, exact fp32, is for tests)
    # most sequences per call; 1: the MLIR module gets the fixed-batch-1 function of each fixed-length entry only
    max_batch: int = MAX_BATCH

    def scheme(self) -> QuantScheme | None:
        if self.quant is None:
            return None
        return QuantScheme.parse(self.quant, self.group_size, self.quant_head, self.quant_accuracy)

    def checked(self) -> ExportOptions:
        """These options with targets resolved to :class:`Target`; raises :class:`ExportError` on any bad one."""
        if self.dtype not in DTYPES:
            raise ExportError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        formats = tuple(dict.fromkeys(self.formats))
        unsupported = sorted(set(formats) - set(FORMATS))
        if unsupported or not formats:
            raise ExportError(f"unsupported --format {','.join(unsupported) or repr(self.formats)}; available: "
                              f"{', '.join(FORMATS)}")
        if self.targets is not None and "mlir" not in formats:
            raise ExportError("--target compiles the MLIR module: add mlir to --format")
        targets: tuple[Target, ...] = ()
        if "mlir" in formats:
            try:
                targets = resolve_targets(("cpu",) if self.targets is None else self.targets)
            except ValueError as exc:
                raise ExportError(str(exc)) from None
        if self.tidar not in TIDAR_CHOICES:
            raise ExportError(f"--tidar must be one of {', '.join(TIDAR_CHOICES)}, got {self.tidar!r}")
        if self.stream not in STREAM_CHOICES:
            raise ExportError(f"--stream must be one of {', '.join(STREAM_CHOICES)}, got {self.stream!r}")
        try:
            scheme = self.scheme()
        except QuantError as exc:
            raise ExportError(str(exc)) from None
        if isinstance(self.block_len, str) and self.block_len != "auto":
            raise ExportError(f"--block-len must be an integer or auto, got {self.block_len!r}")
        if isinstance(self.block_len, int) and not 1 <= self.block_len <= MAX_BLOCK_LEN:
            raise ExportError(f"--block-len must be in [1, {MAX_BLOCK_LEN}] (the packed step runs about "
                              f"(K+1)·levels tokens per forward), got {self.block_len}")
        if isinstance(self.levels, str) and self.levels != "auto":
            raise ExportError(f"--levels must be comma-separated integers or auto, got {self.levels!r}")
        if not 1 <= self.max_batch <= MAX_BATCH:
            raise ExportError(f"--max-batch must be in [1, {MAX_BATCH}], got {self.max_batch}")
        dumpable = [name for name, _ in PHASES] + [p.name for p in fusion_pipeline()]
        unknown = sorted(set(self.dump_after) - set(dumpable))
        if unknown:
            raise ExportError(f"--dump-after names unknown passes or phases {unknown}; choose from {dumpable}")
        archs = resolve_kernel_archs(self.kernels, tuple(t.name for t in targets))
        return dataclasses.replace(self, formats=formats, targets=targets, kernels=archs)


@dataclass
class ExportRun:
    """What the phases hand on to each other: the model as it is rewritten, the entry points, the traced
    programs and the manifest's parts as they are made."""

    checkpoint: Path
    out: Path
    options: ExportOptions
    tmp: Path  # the artifact being written (renamed to ``out`` at the end)
    status: Callable[[str], None]
    model: ZayaForCausalLM | None = None
    scope: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # holds the fusion scope
    with_tidar: bool = False
    block_len: int = 0
    levels: tuple[int, ...] = ()
    model_log: list[PassRecord] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)  # fused op → count per traced graph
    specs: dict[str, EntrySpec] = field(default_factory=dict)
    programs: dict[str, torch.export.ExportedProgram] = field(default_factory=dict)
    mlir_work: list[MlirProgram] = field(default_factory=list)  # the MLIR programs the parent builds
    mlir_child: ChildBuild | None = None  # the rest, built meanwhile by a forked child (``mlir_programs``)
    entries: dict[str, EntryPoint] = field(default_factory=dict)
    op_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    offsets: dict[str, tuple] = field(default_factory=dict)
    onnx_logs: dict[str, list[PassRecord]] = field(default_factory=dict)
    mlir: MlirModule | None = None
    iree: dict[str, Any] = field(default_factory=dict)
    compiling: dict[str, CompileJob] = field(default_factory=dict)  # target → iree-compile running meanwhile
    kernels: dict[str, list[dict]] = field(default_factory=dict)  # AOT Triton kernels by arch (kernel_aot)
    manifest: Manifest | None = None
    source: StreamedCheckpoint | None = None  # a streamed export reads its weights from here (weights_stream)
    packed: tuple[dict[str, EntrySpec], list[PassRecord]] | None = None  # streamed: specs and log of the pack
    quantized: dict[str, StoredMatrix] = field(default_factory=dict)  # --quant: where each matrix's codes lie
    calibration: Calibration | None = None  # acceptance histograms at block_len (``_calibrate``)
    block_choice: dict[str, Any] | None = None  # --block-len auto: the timed forwards and the candidates


def _check_companions(checkpoint: Path, vocab_size: int) -> None:
    """The files copied into the artifact beside the weights must be usable, or every later ``run --prompt``
    would fail: tokenizer.json must load and fit the vocabulary, generation_config.json must be a JSON object."""
    tok_path = checkpoint / "tokenizer.json"
    if tok_path.is_file():
        size = load_tokenizer(tok_path).get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise ExportError(f"{tok_path}: {size} tokens, more than the model's vocab_size {vocab_size}")
    gen_path = checkpoint / "generation_config.json"
    if gen_path.is_file():
        try:
            ok = isinstance(json.loads(gen_path.read_text(encoding="utf-8")), dict)
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            raise ExportError(f"{gen_path}: not a JSON object")


def _prepare(run: ExportRun) -> Dumps:
    opts = run.options
    run.source = open_streamed(run.checkpoint, opts.stream)
    if run.source is not None:  # tensors are read when written; the model to trace holds shapes only
        run.status(f"reading the headers of {run.checkpoint} (streamed export)")
        model = run.source.stand_in(DTYPES[opts.dtype])
        _check_companions(run.checkpoint, model.config.vocab_size)
    else:
        run.status(f"loading {run.checkpoint}")
        model = load_checkpoint(run.checkpoint, dtype="fp32")
        _check_companions(run.checkpoint, model.config.vocab_size)
        if opts.dtype != "fp32":
            with torch.no_grad():  # compute with exactly the weights that will be stored
                for p in model.parameters():
                    p.copy_(p.to(DTYPES[opts.dtype]).float())
    run.model = model
    run.with_tidar = model.config.declares_tidar if opts.tidar == "auto" else opts.tidar == "on"
    if not run.with_tidar and (opts.block_len is not None or opts.levels is not None):
        why = "an AR checkpoint (its config names no mask token)" if opts.tidar == "auto" else "--tidar off"
        raise ExportError(f"--block-len/--levels shape the TiDAR entry points, which {why} does not get: "
                          "add --tidar on to export them")
    run.block_len = opts.block_len if isinstance(opts.block_len, int) else model.config.diffusion_block_len
    if not 1 <= run.block_len <= MAX_BLOCK_LEN:
        raise ExportError(f"the config's diffusion_block_len must be in [1, {MAX_BLOCK_LEN}], got {run.block_len}")
    auto = opts.levels in (None, "auto")  # "auto" replaces these after the calibration (``_calibrate``)
    run.levels = default_levels(run.block_len) if auto else tuple(opts.levels)
    if run.with_tidar:
        try:  # refused here, before the calibration runs TiDAR with them
            packed_layout(run.block_len, run.levels, model.config.conv_history)
        except ValueError as exc:
            raise ExportError(f"--levels: {exc}") from None
    return {"prefill": lambda: _prefill_graph(model)}


CALIBRATE_MAX_PARAMS = 2_000_000_000  # beyond this, eager generation at export would take longer than the export


def _calibrate(run: ExportRun) -> Dumps:
    """Acceptance histograms on held-out code (``calibrate``), for the cost model of ``run --mode auto``."""
    params = sum(p.numel() for p in run.model.parameters())
    if not run.with_tidar or not run.options.calibrate or params > CALIBRATE_MAX_PARAMS or run.source is not None:
        for flag, value, kept in (("--block-len", run.options.block_len, str(run.block_len)),
                                  ("--levels", run.options.levels, ",".join(map(str, run.levels)))):
            if run.with_tidar and value == "auto":
                run.status(f"{flag} auto: no calibration to choose from, keeping {kept}")
        return {}  # (a streamed export has no eager model to generate with)
    run.calibration = _measure(run)
    if run.options.block_len != "auto":  # else the block phase settles K first, then the levels
        run.calibration = _settle_levels(run, run.calibration)
    return {"calibration": lambda: json.dumps(run.calibration.to_json())}


def _measure(run: ExportRun, modes: tuple[str, ...] = ("tidar", "tidar-fused")) -> Calibration:
    """Greedy acceptance histograms of ``modes`` at ``run.block_len`` and ``run.levels`` (``calibrate``)."""
    from .calibrate import measure_acceptance

    run.status(f"calibrating: {', '.join(modes)} acceptance at K = {run.block_len} on {run.options.calibrate} "
               "held-out prompts")
    tok_path = run.checkpoint / "tokenizer.json"
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    return measure_acceptance(run.model, tokenizer, run.block_len, run.levels, run.options.calibrate, modes=modes)


def _settle_levels(run: ExportRun, calibration: Calibration) -> Calibration:
    """``--levels auto``: the packed step's levels from ``calibration``'s fused histogram, measured again with
    them, so ``calibration.json`` (written here) describes the step that is exported."""
    if run.options.levels == "auto":
        from .calibrate import levels_from_histogram

        chosen = levels_from_histogram(calibration.acceptance["tidar-fused"], len(run.levels), run.levels)
        run.status(f"--levels auto: {','.join(map(str, chosen))} from the fused acceptance histogram "
                   f"{calibration.acceptance['tidar-fused']}")
        if chosen != run.levels:  # the two-forward mode has no levels: only the fused one is measured again
            run.levels = chosen
            fused = _measure(run, modes=("tidar-fused",)).acceptance
            calibration = dataclasses.replace(calibration, acceptance={**calibration.acceptance, **fused})
    (run.tmp / CALIBRATION_FILE).write_text(json.dumps(calibration.to_json()) + "\n")
    return calibration


def _choose_block(run: ExportRun) -> Dumps:
    """``--block-len auto``: the draft length the cost model predicts fastest here (``block_choice``), then the
    calibration at that length and its levels."""
    if run.options.block_len != "auto" or run.calibration is None:
        return {}
    from .block_choice import COST_PROBE, forward_cost
    from zaya_export.runtime.costmodel import block_candidates, choose_block

    K = run.block_len
    if run.options.levels not in (None, "auto"):  # fixed levels must fit every candidate: only K itself does
        run.status(f"--block-len auto with fixed --levels: keeping K = {K}")
        run.calibration = _settle_levels(run, run.calibration)
        return {}
    run.status(f"--block-len auto: timing one forward over 2..{K + 1} tokens on onnxruntime")
    cost, times = forward_cost(run.model, _wanted_ops(run, COST_PROBE), run.tmp / "cost_probe",
                               list(range(2, K + 2)), DTYPES[run.options.dtype])  # every candidate's verify/draft
    hist = run.calibration.acceptance["tidar"]
    candidates = block_candidates(cost, hist, K)
    # IREE's data-tiled CPU module (fp32 weights) pays a forward's rows in whole tiles: K′ must suit it too
    tiled = [block_candidates(cost, hist, K, DATA_TILED_ROWS)] if _data_tiled_cpu(run.options) else []
    best = choose_block(candidates, others=tiled)
    note = ""
    if tiled:
        share = tiled[0][best.block_len - 1].tok_per_s / max(c.tok_per_s for c in tiled[0])
        note = f"; IREE cpu at {share:.0%} of its best"
    run.status(f"--block-len auto: K = {best.block_len} (two-forward TiDAR {best.tok_per_s:.0f} tok/s predicted; "
               f"K = {K}: {candidates[-1].tok_per_s:.0f}{note})")
    run.block_choice = {"forward_ms": {t: round(ms, 4) for t, ms in times.items()},
                        "candidates": [c.to_json() for c in candidates], "chosen": best.block_len}
    if tiled:
        run.block_choice["iree_cpu_candidates"] = [c.to_json() for c in tiled[0]]
    if best.block_len != K:
        run.block_len, run.levels = best.block_len, default_levels(best.block_len)
        run.calibration = _measure(run)
    run.calibration = _settle_levels(run, run.calibration)
    return {"block_choice": lambda: json.dumps(run.block_choice, indent=1)}


def _data_tiled_cpu(opts: ExportOptions) -> bool:
    """Whether the export compiles a CPU IREE module with data-tiled products (fp32 weights, unquantized)."""
    return ("mlir" in opts.formats and opts.dtype == "fp32" and opts.quant is None
            and any(t.driver == "local-task" for t in opts.targets))


def _fuse(run: ExportRun) -> Dumps:
    if run.source is not None:
        try:
            run.model_log, run.packed = fuse_streamed(run, _probe, _prefill_graph, _dump_dir(run))
        except PassError as exc:
            raise ExportError(str(exc)) from None
        for p in fusion_pipeline():
            run.expected.update(p.expected_ops(run.model))
        return {"prefill": lambda: _prefill_graph(run.model)}
    run.status("fusing (fuse_cca, fuse_attention, fuse_moe)")
    model, opts = run.model, run.options
    passes = fusion_pipeline()
    names = {p.name for p in passes}
    try:  # fused until the export ends (``run.scope``)
        run.model_log = run.scope.enter_context(fused(
            model, passes, probe=_probe(model, run.with_tidar), tolerance=tolerance_for(model.dtype),
            dump=_prefill_graph, dump_after=[n for n in opts.dump_after if n in names], dump_dir=_dump_dir(run)))
    except PassError as exc:
        raise ExportError(str(exc)) from None
    for p in passes:
        run.expected.update(p.expected_ops(model))
    return {"prefill": lambda: _prefill_graph(model)}


def _pack(run: ExportRun) -> Dumps:
    specs = base_entry_specs(run.block_len)
    if not run.with_tidar:
        run.specs = {name: spec for name, spec in specs.items() if name in AR_ENTRIES}
        return {}
    if run.packed is not None:  # streamed: packed and checked on the truncated model (fuse_streamed)
        run.specs, pack_log = run.packed
        run.model_log += pack_log
        return {name: (lambda spec=spec: repr(spec)) for name, spec in run.specs.items()}
    run.status("packing the TiDAR step (pack_tidar_step)")
    plan, packer = ExportPlan(run.model, specs), PackTidarStep(run.block_len, run.levels)
    try:
        pack_log = PassManager([packer]).run(plan)
    except PassError as exc:
        raise ExportError(str(exc)) from None
    run.model_log += [dataclasses.replace(r, **packer.check.to_json()) for r in pack_log]
    run.specs = plan.specs
    return {name: (lambda spec=spec: repr(spec)) for name, spec in plan.specs.items()}


def _trace(run: ExportRun) -> Dumps:
    if "mlir" in run.options.formats:  # the MLIR programs: a share starts at once in a second process
        externalize_weights(run.model)  # before tracing: the MLIR programs then refer to the weights by name
        entries = len(run.specs) + 1
        run.mlir_work, child = split(_mlir_programs(run), parent_extra=ONNX_TRACE_COST * entries)
        if child:
            run.status(f"building {len(child)} of the MLIR programs in a second process")
            run.mlir_child = ChildBuild(child, run.tmp / MLIR_PARTS / "child.mlir")
            run.scope.callback(run.mlir_child.kill)  # a failed or interrupted export leaves no child running
    for name, spec in {**run.specs, PROBE.name: PROBE}.items():
        run.status(f"tracing {name}")
        program = export_entry(run.model, spec)
        hist = op_histogram(program)
        want = _wanted_ops(run, spec)
        wrong = {op: hist.get(op, 0) for op in run.expected if hist.get(op, 0) != want.get(op, 0)}
        if wrong:
            raise ExportError(f"{name}: traced graph has {wrong} fused ops, expected {want}")
        run.programs[name] = program
        run.op_counts[name] = dict(sorted(hist.items()))
        # names only until the ONNX graph gives shapes and dtypes: one form for every reader
        run.entries[name] = EntryPoint(tokens=spec.tokens, inputs=tuple(PortSig(name=n) for n in spec.inputs),
                                       outputs=tuple(PortSig(name=n) for n in spec.outputs), debug=spec.probe)
    return {name: (lambda p=p: p.graph_module.print_readable(print_output=False)) for name, p in run.programs.items()}


# Tracing an entry for ONNX costs about half of tracing and rewriting one MLIR program (``MlirProgram.cost``).
ONNX_TRACE_COST = 0.45


def _mlir_programs(run: ExportRun) -> list[MlirProgram]:
    """Every function of the MLIR module: the fused model's entries with each ``zaya.*`` op as its MLIR face (and
    the fixed-batch twin of each fixed-length one), the in-place state commits the IREE runtime keeps the state
    on the device with, and each commit folded into the forward that follows it."""

    def entry(spec: EntrySpec | FoldedSpec, batch: int | None) -> Callable[[], torch.export.ExportedProgram]:
        def trace() -> torch.export.ExportedProgram:
            tokens = spec.forward.tokens if isinstance(spec, FoldedSpec) else spec.tokens
            with _mlir_tracing(run, decode=tokens == 1):
                if isinstance(spec, FoldedSpec):
                    return export_folded(run.model, spec, batch=batch)
                return export_entry(run.model, spec, batch=batch)
        return trace

    programs = []
    for name, spec in {**run.specs, PROBE.name: PROBE, **folded_specs(run.specs)}.items():
        fixed = (spec.forward if isinstance(spec, FoldedSpec) else spec).tokens is not None
        if not fixed or run.options.max_batch > 1:  # --max-batch 1: a fixed-length entry gets its twin only
            programs.append(MlirProgram(name, entry(spec, None), static_length=fixed))
        if fixed:  # fixed length: IREE also gets the fixed-batch twin (rewriting it costs about twice as much)
            programs.append(MlirProgram(batch1_twin(name), entry(spec, 1), static_length=True, cost=1.8))
    for name in COMMIT_SPECS:
        programs.append(MlirProgram(name, lambda n=name: export_commit(run.model.config, n), static_length=False,
                                    cost=0.1))
    return programs


@contextlib.contextmanager
def _mlir_tracing(run: ExportRun, decode: bool) -> Iterator[None]:
    """Trace the fused model with every ``zaya.*`` op as its MLIR face (``decode``: one token per row), on the
    quantized matrices when the export quantizes (their parameters externalized under the artifact's names)."""
    with kernels.mlir_faces(decode=decode), quantized_matrices(run.model, run.options.scheme()) as swapped:
        if swapped:
            externalize_weights(run.model)
        yield


def _weights(run: ExportRun) -> Dumps:
    run.status("writing the shared weights")
    (run.tmp / "onnx").mkdir()
    path, dtype, scheme = run.tmp / "onnx" / WEIGHTS_FILE, DTYPES[run.options.dtype], run.options.scheme()
    tied = run.model.config.tie_word_embeddings
    if scheme is not None and run.source is not None:
        run.offsets, run.quantized = write_quantized_weights(path, run.source.shapes,
                                                             lambda n: run.source.read(n, dtype), dtype, scheme,
                                                             tied, run.status)
    elif scheme is not None:
        state = {n: t for n, t in run.model.state_dict().items() if not (n == "lm_head.weight" and tied)}
        run.offsets, run.quantized = write_quantized_weights(path, {n: tuple(t.shape) for n, t in state.items()},
                                                             state.__getitem__, dtype, scheme, tied, run.status)
    elif run.source is not None:
        run.offsets = write_streamed_weights(run.source, run.tmp / "onnx" / WEIGHTS_FILE, DTYPES[run.options.dtype],
                                             run.status)
    else:
        run.offsets = write_weights(run.model, run.tmp / "onnx" / WEIGHTS_FILE, DTYPES[run.options.dtype])
    return {"offsets": lambda: "\n".join(f"{k} {v}" for k, v in run.offsets.items())}


def _lower_onnx(run: ExportRun) -> Dumps:
    if "onnx" not in run.options.formats:
        return {}
    for name, program in run.programs.items():
        run.status(f"lowering {name} to ONNX")
        spec = run.specs.get(name, PROBE)
        try:
            onnx_model, log = lower_entry(program, _wanted_ops(run, spec), spec.outputs, spec.inputs)
        except PassError as exc:
            raise ExportError(f"{name}: {exc}") from None
        if run.quantized:  # before binding: the quantized matrices' float initializers are gone by then
            log = [*log, *quantize_entry(onnx_model, run.options.scheme(), run.quantized, run.tmp / "onnx")]
        bind_external_weights(onnx_model, run.offsets, run.tmp / "onnx")
        if not run.quantized:  # (a quantized entry's experts were expanded onto their codes above)
            log = [*log, *unroll_entry(onnx_model)]
        save_entry(onnx_model, run.tmp / "onnx" / f"{name}.onnx")
        run.entries[name] = dataclasses.replace(run.entries[name], onnx=f"onnx/{name}.onnx",
                                                inputs=_signature(onnx_model.graph.inputs),
                                                outputs=_signature(onnx_model.graph.outputs))
        run.onnx_logs[name] = list(log)
    run.programs.clear()  # the ONNX files are written: free the traced graphs
    return {name: (lambda e=e: _onnx_text(run.tmp / e.onnx)) for name, e in run.entries.items() if e.onnx}


def _lower_mlir(run: ExportRun) -> Dumps:
    if "mlir" not in run.options.formats:
        return {}
    parts, module, per_program = [], run.tmp / MLIR_FILE, 0.0
    try:
        if run.mlir_work:
            start = time.perf_counter()
            build_module(run.mlir_work, run.tmp / MLIR_PARTS / "parent.mlir", run.status)
            per_program = (time.perf_counter() - start) / len(run.mlir_work)
            parts.append(run.tmp / MLIR_PARTS / "parent.mlir")
            run.mlir_work.clear()
        if run.mlir_child is not None:  # silent for 10 programs' time (≥ 10 min): stopped, its share built here
            parts.append(collect(run.mlir_child, max(600.0, 10 * per_program), run.status))
            run.mlir_child = None
        if len(parts) > 1:
            merge_modules(parts, module)
        else:
            module.parent.mkdir(parents=True, exist_ok=True)
            parts[0].rename(module)
        shutil.rmtree(run.tmp / MLIR_PARTS)
        ops = ops_per_function(module.read_text())
    except MlirBuildError as exc:
        raise ExportError(str(exc)) from None
    try:
        stored = {name: info.dtype for name, info in read_header(run.tmp / "onnx" / WEIGHTS_FILE).items()}
        int4 = [f"{name}.{part}" for name, m in run.quantized.items() if m.bits == 4 and len(m.shape) == 2
                for part in ("qweight", "zero_points") if part in m.parts]  # plain matrices: see QuantizedMatrix
        narrow = store_parameters(run.tmp / MLIR_FILE, stored, int4) > 0 or bool(run.quantized)
        flags = (*(NARROW_PARAMETER_FLAGS if narrow else ()), *(QUANTIZED_FLAGS if run.quantized else ()))
        cpu_flags = DATA_TILING_FLAGS if not narrow else ()
    except Exception as exc:  # importer/decomposition failures come as many exception types
        raise ExportError(f"MLIR lowering failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    run.mlir = MlirModule(
        module=MLIR_FILE, importer="iree-turbine FxPrograms", ops_per_entry=ops, parameter_scope=PARAM_SCOPE,
        parameter_file=f"onnx/{WEIGHTS_FILE}",
        state_entries={name: StateEntry(inputs=tuple(PortSig(name=n) for n in spec.inputs),
                                        outputs=tuple(PortSig(name=n) for n in spec.outputs),
                                        mutates=tuple(spec.mutates))
                       for name, spec in {**COMMIT_SPECS, **folded_specs(run.specs)}.items()})
    for target in run.options.targets:  # in child processes, while the ONNX lowering runs (``_iree_compile``)
        run.status(f"iree-compile for {target.name} (in the background)")
        job = CompileJob(run.tmp / MLIR_FILE, target, run.tmp / "iree" / f"{target.name}.vmfb",
                         (*flags, *(cpu_flags if target.driver == "local-task" else ())))
        run.scope.callback(job.kill)  # a failed or interrupted export leaves no compiler running
        run.compiling[target.name] = job
    return {"module": lambda: (run.tmp / MLIR_FILE).read_text()}


def _iree_compile(run: ExportRun) -> Dumps:
    for name, job in run.compiling.items():
        run.status(f"waiting for iree-compile ({name})")
        try:
            run.iree[name] = job.wait()
        except RuntimeError as exc:
            raise ExportError(str(exc)) from None
    run.compiling.clear()
    return {}


def _kernels(run: ExportRun) -> Dumps:
    if run.options.kernels:
        run.status(f"Triton kernels for {', '.join(run.options.kernels)}")
        run.kernels = build_kernels(run.model.config, run.options.kernels, run.tmp)
    return {}


def _write(run: ExportRun) -> Dumps:
    opts, config = run.options, run.model.config
    for extra in ("tokenizer.json", "generation_config.json"):
        if (run.checkpoint / extra).is_file():
            shutil.copy2(run.checkpoint / extra, run.tmp / extra)
    config.to_json_file(run.tmp / "config.json")
    tidar = TidarInfo(block_len=run.block_len, levels=run.levels, mask_token_id=config.mask_token_id)
    run.manifest = Manifest(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), source=str(run.checkpoint),
        dtype=opts.dtype, compute_dtype="fp32", config=config.to_dict(), weights=f"onnx/{WEIGHTS_FILE}",
        formats=opts.formats, mlir=run.mlir, iree=run.iree, kernels=run.kernels, entry_points=run.entries,
        tidar=tidar if run.with_tidar else None,
        pass_log=PassLog(model=run.model_log, onnx=run.onnx_logs), op_counts=run.op_counts,
        versions=tool_versions(), export_seconds=0.0,
        quant=None if opts.quant is None else opts.scheme().to_json(), max_batch=opts.max_batch)
    return {"manifest": lambda: json.dumps(run.manifest.to_json(), indent=1)}


# The export, in order. A phase reads and extends the ExportRun and returns its Dumps.
PHASES: tuple[tuple[str, Callable[[ExportRun], Dumps]], ...] = (
    ("prepare", _prepare),
    ("calibrate", _calibrate),
    ("fuse", _fuse),
    ("block", _choose_block),
    ("pack", _pack),
    ("trace", _trace),
    ("weights", _weights),
    ("lower-mlir", _lower_mlir),
    ("lower-onnx", _lower_onnx),
    ("iree-compile", _iree_compile),
    ("kernels", _kernels),
    ("write", _write),
)


def export_artifact(checkpoint: Path, out: Path, *, status: Callable[[str], None] = lambda msg: None,
                    **options: Any) -> Manifest:
    """Run every phase of :data:`PHASES` on ``checkpoint``; returns the manifest written to
    ``out/manifest.json``. ``options``: the fields of :class:`ExportOptions`. Nothing appears at ``out`` unless
    every phase succeeds."""
    start = time.perf_counter()
    opts = ExportOptions(**options).checked()
    with writing(out, opts.force, "artifact", sources=[checkpoint]) as tmp:
        run = ExportRun(checkpoint=checkpoint, out=out, options=opts, tmp=tmp, status=status)
        with run.scope:  # the fusion scope: the model is unfused again on every way out
            for index, (name, phase) in enumerate(PHASES):
                dumps = phase(run)
                if name in opts.dump_after:
                    _write_dumps(run, index, name, dumps)
        manifest = dataclasses.replace(run.manifest, export_seconds=round(time.perf_counter() - start, 2))
        write_manifest(tmp, manifest)
    return manifest


def _wanted_ops(run: ExportRun, spec: EntrySpec) -> dict[str, int]:
    """Fused op → count an entry's graph must hold: the packed step keeps the reference CCA/attention (the
    fused ops are one-segment), so only its MoE is fused."""
    return {op: n for op, n in run.expected.items() if spec.packed is None or op == "zaya.moe_top1"}


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


def _prefill_graph(model: torch.nn.Module) -> str:
    return export_entry(model, entry_specs(1)["prefill"]).graph_module.print_readable(print_output=False)


def _dump_dir(run: ExportRun) -> Path:
    return run.options.dump_dir or run.out.parent / f"{run.out.name}.dump"


def _write_dumps(run: ExportRun, index: int, phase: str, dumps: Dumps) -> None:
    folder = _dump_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in dumps.items():
        (folder / f"phase{index}-{phase}-{name}.txt").write_text(text())
    if not dumps:
        (folder / f"phase{index}-{phase}.txt").write_text(f"{phase}: nothing to dump for this export\n")


def _onnx_text(path: Path) -> str:
    import onnx

    return onnx.printer.to_text(onnx.load(str(path), load_external_data=False))


def _signature(values) -> tuple[PortSig, ...]:  # noqa: ANN001 - onnx_ir values
    return tuple(PortSig(name=v.name, dtype=str(v.dtype),
                         shape=tuple(d if isinstance(d, int) else str(d) for d in v.shape)) for v in values)
