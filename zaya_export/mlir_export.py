"""Lower the traced entry points to one multi-entry MLIR module and compile it with IREE.

Importer: iree-turbine's FX importer, fed ``ExportedProgram`` objects of the same post-pass model as the ONNX
path (``FxPrograms`` with one program per entry; built by two processes, ``mlir_programs``). Chosen over
torch-mlir's ``export_and_import`` because it puts several entries into one module over one set of globals, and
marks weights as external parameters (``#flow.parameter.named<"model"::name>``) without a serialisation step of
its own; torch-mlir would give one module per entry with the weights inlined.

Weights are not copied: the parameter names are the artifact's safetensors keys, and the IREE runtime reads
``onnx/weights.safetensors`` directly as its parameter index. The MLIR face of each ``zaya.*`` op is a
plain-torch decomposition (``kernels.registry.register_mlir``) that the fused model calls while the MLIR
programs are traced, so the importer sees aten ops it legalizes.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from zaya_export.runtime.manifest import IreeModule

MLIR_FILE = "mlir/model.mlir"
PARAM_SCOPE = "model"

_CPU = ["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu"]


def _rocm(arch: str) -> list[str]:
    return ["--iree-hal-target-device=hip", f"--iree-rocm-target={arch}"]


@dataclass(frozen=True)
class Target:
    name: str
    flags: tuple[str, ...]
    driver: str  # IREE runtime driver that runs it
    arch: str | None = None  # AMD GPU architecture whose code objects the module must contain


# llvm-cpu for the host: x86-64-v3 (AVX2/FMA) is the portable baseline every current x86 server has; `host`
# would tie the artifact to the exporting machine's CPU.
TARGETS = {
    "cpu": Target("cpu", (*_CPU, "--iree-llvmcpu-target-cpu=x86-64-v3"), "local-task"),
    "gfx942": Target("gfx942", tuple(_rocm("gfx942")), "hip", "gfx942"),  # MI300X / MI325X (CDNA3)
    "gfx90a": Target("gfx90a", tuple(_rocm("gfx90a")), "hip", "gfx90a"),  # MI250X (CDNA2)
    "gfx1100": Target("gfx1100", tuple(_rocm("gfx1100")), "hip", "gfx1100"),  # RX 7900 (RDNA3)
}


def resolve_targets(named: tuple[Target | str, ...]) -> tuple[Target, ...]:
    """Targets given by name (``TARGETS``) or as :class:`Target`, each once, in order; ValueError names the
    unknown ones."""
    unknown = [t for t in named if isinstance(t, str) and t not in TARGETS]
    if unknown or not named:
        raise ValueError(f"unknown IREE target(s) {unknown or list(named)}; choose from {', '.join(TARGETS)}")
    return tuple(dict.fromkeys(TARGETS[t] if isinstance(t, str) else t for t in named))


def externalize_weights(model: torch.nn.Module) -> int:
    """Mark every parameter and buffer as an external parameter named by its state_dict key (the first name
    of a tied tensor, as ``write_weights`` stores it). Returns how many tensors were marked."""
    from iree.turbine.aot import ExternalTensorTrait

    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        ExternalTensorTrait(external_scope=PARAM_SCOPE, external_name=name).set(tensor)
    return len(seen)


# One external parameter and one read of it, as iree-turbine prints them (fp32 weights, or uint8 codes as i8).
_GLOBAL = re.compile(r'^(?P<head>\s*util\.global private @(?P<sym>[\w.$-]+) = #flow\.parameter\.named<'
                     r'"[^"]*"::"(?P<key>[^"]+)"> : )tensor<(?P<dims>(?:[0-9]+x)*)(?P<elem>f32|i8)>$', re.M)
_LOAD = re.compile(r'^(?P<indent>\s*)(?P<var>%[\w.$-]+) = util\.global\.load @(?P<sym>[\w.$-]+) : '
                   r'tensor<(?P<dims>(?:[0-9]+x)*)(?P<elem>f32|i8)>$', re.M)
_MLIR_FLOAT = {"BF16": "bf16", "F16": "f16"}  # safetensors dtype → MLIR element type
_WIDEN = {"f32": "arith.extf", "i8": "arith.extui"}  # traced element type → the op that widens the stored one


def store_parameters(path: Path, stored: Mapping[str, str], int4: Collection[str] = ()) -> int:
    """Retype the module's external parameters to what the weight file stores (``stored``: safetensors key →
    safetensors dtype; ``int4``: keys of uint8-traced codes the file packs two per byte) and widen each read
    where it is loaded (``arith.extf`` to fp32, ``arith.extui`` to i8), so IREE reads a bf16/fp16 or int4 weight
    file in place while the graphs compute as traced, as the ONNX graphs do. The widening sits next to its
    consumers, where IREE fuses it into their dispatches. Returns how many parameters were retyped;
    RuntimeError if a retyped parameter is read in a form this rewrite does not know."""
    text = path.read_text()
    retyped: dict[str, str] = {}  # symbol → stored element type

    def on_global(m: re.Match[str]) -> str:
        if m["elem"] == "i8":
            elem = "i4" if m["key"] in int4 else None
        else:
            elem = _MLIR_FLOAT.get(stored.get(m["key"], "F32"))
        if elem is None:
            return m[0]
        retyped[m["sym"]] = elem
        return f"{m['head']}tensor<{m['dims']}{elem}>"

    def on_load(m: re.Match[str]) -> str:
        elem = retyped.get(m["sym"])
        if elem is None:
            return m[0]
        wide, narrow = f"tensor<{m['dims']}{m['elem']}>", f"tensor<{m['dims']}{elem}>"
        return (f"{m['indent']}{m['var']}.stored = util.global.load @{m['sym']} : {narrow}\n"
                f"{m['indent']}{m['var']} = {_WIDEN[m['elem']]} {m['var']}.stored : {narrow} to {wide}")

    text = _LOAD.sub(on_load, _GLOBAL.sub(on_global, text))
    left = [sym for sym in retyped if re.search(rf"@{re.escape(sym)}\b(?!\s*=)[^\n]*(f32|i8)>", text)]
    missing = sorted(set(int4) - set(re.findall(r'::"([^"]+)"> : tensor<(?:[0-9]+x)*i4>$', text, re.M)))
    if missing:
        raise RuntimeError(f"int4 codes {missing[0]} are not an i8 parameter of the module")
    if left:
        raise RuntimeError(f"parameter {left[0]} is read in a form store_parameters does not rewrite")
    path.write_text(text)
    return len(retyped)


# With parameters stored narrower than fp32, IREE's constant-expression hoisting would turn each widened weight
# (every expert slice, in practice) into an fp32 global made at load: a second, wider copy of the weights.
NARROW_PARAMETER_FLAGS = ("--iree-opt-const-expr-hoisting=false",)
# Quantized matrices (models/quantized_matrix.py): on CPU, IREE keeps a matmul's producers out of its dispatch
# unless told otherwise, so the dequantization would write a float copy of every weight it reads per call; O3 CPU
# codegen vectorizes the fused dequantize-and-reduce (one int4 4096×2048 matvec, 1 thread: 4.2 ms at the default
# level, 1.15 ms at O3; an fp32 matvec of the same matrix 1.3 ms). The global --iree-opt-level=O3 is not usable:
# it breaks the dynamic-length softmax dispatch ("exceeded stack allocation limit").
QUANTIZED_FLAGS = ("--iree-dispatch-creation-block-matmul-producer-fusion=false", "--iree-llvmcpu-mlir-opt-level=O3")
# fp32 parameters on the CPU: data-tiled matmuls (weights packed once, at load, by constant-expression hoisting)
# on IREE's mmt4d microkernels. Demo checkpoint, local-sync, same process: decode 1.64 → 1.42 ms, verify (8
# tokens) 3.39 → 2.51, packed step 9.63 → 7.29, prefill (32 tokens) 12.5 → 10.7, decode at batch 2 4.17 → 3.30.
# The global-optimization path, not the dispatch-creation one: that one fails on products over a dynamic cache
# length at a fixed batch (the batch-1 twins' attention: "exceeded stack allocation limit"). Not with narrower
# stored parameters (hoisting is off there, so the packing would run on every call) nor quantized matrices.
DATA_TILING_FLAGS = ("--iree-global-opt-data-tiling", "--iree-llvmcpu-enable-ukernels=all")
# Rows per tile of those data-tiled products (x86 f32 mmt4d): a forward pays for its tokens rounded up to it. Demo
# checkpoint, local-sync: verify over 8 tokens 2.5 ms, over 9 tokens 4.1 ms.
DATA_TILED_ROWS = 8


class CompileJob:
    """``iree-compile`` of the module for one target, running in a child process from the moment it is made, so
    the export goes on (the ONNX lowering, the other targets) while it runs; :meth:`wait` collects it.

    ``extra_flags``: :data:`NARROW_PARAMETER_FLAGS`, :data:`QUANTIZED_FLAGS` as the module needs them. The
    compiler's messages go to a log file beside the output (a pipe nobody reads while the export works could
    fill and stall the compiler); the log is removed once the compile succeeds."""

    def __init__(self, mlir: Path, target: Target, out: Path, extra_flags: tuple[str, ...] = ()) -> None:
        import subprocess

        from iree.compiler.tools.core import CompilerOptions, TempFileSaver, build_compile_command_line

        self.target, self.out, self.flags = target, out, [*target.flags, *extra_flags]
        self.start = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        options = CompilerOptions(input_type="torch", target_backends=[], extra_args=self.flags,
                                  output_file=str(out))
        with TempFileSaver.implicit() as tfs:
            command = build_compile_command_line(str(mlir), tfs, options)
        self.log = out.with_suffix(".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)

    def wait(self) -> IreeModule:
        """Wait for the compiler; returns what the manifest records, or raises ``RuntimeError`` with the
        compiler's first error line."""
        if self.process.wait() != 0:
            lines = self.log.read_text(errors="replace").splitlines() or [f"exit status {self.process.returncode}"]
            first = next((ln for ln in lines if "error:" in ln), next((ln for ln in lines if "ERROR" in ln), lines[0]))
            raise RuntimeError(f"iree-compile failed for {self.target.name}: {first.strip()}")
        self.log.unlink(missing_ok=True)
        archs = amd_archs_in(self.out)
        if self.target.arch is not None and set(archs) != {self.target.arch}:
            raise RuntimeError(f"{self.out.name}: expected AMD code objects for {self.target.arch}, "
                               f"found {archs or 'none'}")
        return IreeModule(vmfb=f"iree/{self.out.name}", flags=("--iree-input-type=torch", *self.flags),
                          driver=self.target.driver, bytes=self.out.stat().st_size, amd_archs=tuple(archs),
                          seconds=round(time.perf_counter() - self.start, 1))

    def kill(self) -> None:
        """Stop the compiler if it still runs (the export failed or was interrupted)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# e_flags low byte of an AMDGPU ELF (EF_AMDGPU_MACH_*) → architecture.
_EF_AMDGPU_MACH = {0x3F: "gfx90a", 0x4C: "gfx942", 0x4F: "gfx950", 0x41: "gfx1100", 0x4E: "gfx1201"}
_EM_AMDGPU = 224


def amd_archs_in(path: Path) -> list[str]:
    """Architectures of every AMD GPU ELF code object embedded in a vmfb (empty for a CPU module)."""
    blob, archs = path.read_bytes(), []
    at = blob.find(b"\x7fELF")
    while at != -1:
        if at + 52 <= len(blob) and blob[at + 4] == 2 and struct.unpack_from("<H", blob, at + 18)[0] == _EM_AMDGPU:
            mach = struct.unpack_from("<I", blob, at + 48)[0] & 0xFF
            archs.append(_EF_AMDGPU_MACH.get(mach, hex(mach)))
        at = blob.find(b"\x7fELF", at + 4)
    return archs
