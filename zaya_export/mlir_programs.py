"""The MLIR programs of an export, built by two processes at once.

Each program is traced (``torch.export``) and rewritten for IREE (``run_decompositions``), single-threaded Python
that was the longest part of an export (the demo: 190 of 332 s for 22 programs, one core busy, the other idle).
So the work is split: a forked child traces, rewrites and imports its share into a module file of its own while
the parent goes on with the export (the ONNX traces, then its own share); the parent then merges the two modules
into one (:func:`merge_modules`: one set of parameter globals, every function once). A fork, not a fresh
interpreter: the child needs the fused, packed model exactly as the parent has it, and tracing reads no weights.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import zaya_export.kernels as kernels


@dataclass(frozen=True)
class MlirProgram:
    """One function of the module: how to trace it, whether its token count is fixed, and its relative cost."""

    name: str
    trace: Callable[[], torch.export.ExportedProgram]
    static_length: bool
    cost: float = 1.0  # tracing + rewriting time relative to a dynamic-batch entry (demo: ~5 s)


class MlirBuildError(RuntimeError):
    """A program that could not be traced, rewritten or imported (the message names it)."""


def build_module(programs: Sequence[MlirProgram], path: Path, status: Callable[[str], None] = lambda msg: None
                 ) -> None:
    """Trace and rewrite ``programs`` and import them as the functions of one module written to ``path``."""
    from iree.turbine import aot
    from iree.turbine.aot.fx_programs import ExportTargetDef, FxPrograms

    programs_def = FxPrograms()
    for program in programs:
        status(f"tracing and rewriting {program.name} for MLIR")
        try:
            exported = program.trace()
        except Exception as exc:  # torch.export raises many types; name the program and the first line
            raise MlirBuildError(f"{program.name}: tracing for MLIR failed: {_first_line(exc)}") from None
        table = kernels.mlir_decompositions(static_length=program.static_length)
        try:
            programs_def.programs[program.name] = ExportTargetDef(exported.run_decompositions(table))
        except Exception as exc:
            raise MlirBuildError(f"MLIR lowering failed: {program.name}: {_first_line(exc)}") from None
    try:
        output = aot.export(programs_def)
        path.parent.mkdir(parents=True, exist_ok=True)
        output.save_mlir(str(path))
    except Exception as exc:  # importer failures come as many exception types
        raise MlirBuildError(f"MLIR lowering failed: {_first_line(exc)}") from None


def split(programs: Sequence[MlirProgram], parent_extra: float, workers: int | None = None
          ) -> tuple[list[MlirProgram], list[MlirProgram]]:
    """(parent's share, child's share) with about equal cost, the parent's including ``parent_extra`` (the other
    work it does meanwhile, in the same units). With one core, or no ``os.fork``, the parent does it all."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 2 or not hasattr(os, "fork"):
        return list(programs), []
    parent, child, loads = [], [], [parent_extra, 0.0]
    for program in sorted(programs, key=lambda p: -p.cost):  # longest first, each to the lighter side
        side = 0 if loads[0] <= loads[1] else 1
        (parent, child)[side].append(program)
        loads[side] += program.cost
    order = {p.name: i for i, p in enumerate(programs)}  # the module's functions in the caller's order
    return sorted(parent, key=lambda p: order[p.name]), sorted(child, key=lambda p: order[p.name])


class ChildBuild:
    """:func:`build_module` of some programs in a forked child process, started at once. :meth:`wait` collects
    it: the module's path, :class:`MlirBuildError` with the child's message if it failed, or None if it made no
    progress for ``stall_s`` (it is then stopped, and the caller builds those programs itself)."""

    def __init__(self, programs: Sequence[MlirProgram], path: Path) -> None:
        self.programs, self.path = list(programs), path
        self.error, self.progress = path.with_suffix(".error"), path.with_suffix(".progress")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.progress.write_text("")
        self.pid = os.fork()
        if self.pid == 0:  # the child: build, report, and leave without running the parent's cleanups
            code = 1
            try:
                _single_threaded_mlir()
                torch.set_num_threads(1)  # the parent goes on using the other core
                with self.progress.open("a") as progress:
                    build_module(programs, path, lambda msg: (progress.write(msg + "\n"), progress.flush()))
                code = 0
            except BaseException as exc:  # noqa: BLE001 - anything, even an interrupt, is reported to the parent
                self.error.write_text(str(exc) if isinstance(exc, MlirBuildError) else _first_line(exc))
            finally:
                os._exit(code)

    def done(self) -> int:
        """How many of its programs the child has started."""
        return len(self.progress.read_text().splitlines())

    def wait(self, stall_s: float = 600.0, poll_s: float = 0.2) -> Path | None:
        last, since = -1, time.monotonic()
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if (done := self.progress.stat().st_size) != last:
                last, since = done, time.monotonic()
            elif time.monotonic() - since > stall_s:
                self.kill()
                return None
            time.sleep(poll_s)
        self.pid = 0
        if os.waitstatus_to_exitcode(status) != 0:
            message = self.error.read_text() if self.error.is_file() else f"exit status {status}"
            raise MlirBuildError(message)
        return self.path

    def kill(self) -> None:
        """Stop the child if it still runs (the export failed or was interrupted)."""
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0


def collect(child: ChildBuild, stall_s: float, status: Callable[[str], None] = lambda msg: None) -> Path:
    """The child's module: waited for, or, if the child stalls, built here instead."""
    status(f"waiting for the MLIR programs of the second process ({child.done()} of {len(child.programs)} "
           "started)")
    built = child.wait(stall_s)
    if built is None:
        status(f"the second process made no progress for {stall_s:.0f} s: building its programs here")
        built = child.path.with_name(f"{child.path.stem}-here.mlir")
        build_module(child.programs, built, status)
    return built


def _single_threaded_mlir() -> None:
    """In the forked child, make the importer's MLIR contexts single-threaded. A fork copies no threads, but the
    compiler library's thread pool, once the parent has used it (any earlier import or merge in this process),
    still counts its workers: a context that hands it work waits forever (seen: the verifier in
    ``aot.export``). iree-turbine makes its context with ``Context()`` and takes no context from its caller."""
    from iree.compiler import ir
    from iree.turbine.aot import exporter

    def context() -> ir.Context:
        made = ir.Context()
        made.enable_multithreading(False)
        return made

    exporter.Context = context


def merge_modules(parts: Sequence[Path], out: Path) -> None:
    """One module from ``parts`` (modules imported from the same model): every parameter global once, every
    function of every part. Parsed into one MLIR context, so resources of the same name in two parts (the
    importer numbers its literals per module) are told apart by the parser, not by text edits; a constant
    global whose name another part already uses for other contents (the importer names them by shape and
    dtype, e.g. ``@__auto.constant_68_68_torch.uint8``) is renamed in its part before the move."""
    from iree.compiler import ir

    with ir.Context() as context:
        merged = ir.Module.parse(parts[0].read_text(), context)
        have = {_symbol(op): _text(op) for op in merged.body.operations}
        for index, part in enumerate(parts[1:], start=1):
            module = ir.Module.parse(part.read_text(), context)
            for op in list(module.body.operations):
                symbol = _symbol(op)
                if symbol in have and op.operation.name == "util.global" and have[symbol] != _text(op):
                    renamed = f"{symbol}.part{index}"
                    ir.SymbolTable.replace_all_symbol_uses(symbol, renamed, module.operation)
                    ir.SymbolTable.set_symbol_name(op.operation, renamed)
                    symbol = renamed
                if symbol in have:  # the same global, declared by both parts: kept once
                    if op.operation.name != "util.global":
                        raise MlirBuildError(f"merging MLIR modules: two definitions of @{symbol}")
                    continue
                op.operation.detach_from_parent()
                merged.body.append(op)
                have[symbol] = _text(op)
        try:
            merged.operation.verify()
        except ir.MLIRError as exc:
            raise MlirBuildError(f"the merged MLIR module does not verify: {_first_line(exc)}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(str(merged))


def _symbol(op) -> str:  # noqa: ANN001 - an MLIR operation
    attributes = op.operation.attributes
    return str(attributes["sym_name"]).strip('"') if "sym_name" in attributes else f"<unnamed {id(op)}>"


def _text(op) -> str:  # noqa: ANN001 - an MLIR operation
    """A global's declaration, to compare two parts' (nothing for the large functions). Generic form: the
    pretty printer falls back to it for an op whose module does not verify, as a part does while its ops move."""
    return op.operation.get_asm(print_generic_op_form=True) if op.operation.name == "util.global" else ""


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


_FUNC = re.compile(r"^\s*func\.func @([\w.$-]+)\(")


def ops_per_function(text: str) -> dict[str, int]:
    """MLIR operations in each function of a printed module."""
    counts, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if (m := _FUNC.match(line)) is not None:
            current = m[1]
            counts[current] = 0
        elif current and "=" in stripped and not stripped.startswith("//"):
            counts[current] += 1
    return counts
