"""Ahead-of-time compilation of the Triton kernels for GPU architectures this machine does not have.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(...))`` needs no GPU and no ROCm or
CUDA install: it yields an AMD code object (``hsaco``, with its ``amdgcn`` text) or a ``cubin``. Each kernel
is compiled once per architecture for the model's shapes (head_dim, rotary width, GQA group, experts, conv
taps, hidden size are compile-time constants; lengths, batch and strides stay runtime arguments) in the
serving dtype bf16, and described by what the compiled code shows (``isa.py``): registers, LDS, occupancy,
matrix-core instructions.

Compilation runs in a child Python process: Triton decides at import time whether ``@triton.jit`` functions
are compiled or interpreted (``TRITON_INTERPRET``), and a process that has run the kernels in the CPU
interpreter cannot compile them; the child starts without that variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# name → (Triton backend, arch, warp size). gfx942: MI300X/MI325X, gfx90a: MI250X, gfx1100: RX 7900, sm_90: H100/H200
ARCHS: dict[str, tuple[str, str | int, int]] = {
    "gfx942": ("hip", "gfx942", 64),
    "gfx90a": ("hip", "gfx90a", 64),
    "gfx1100": ("hip", "gfx1100", 32),
    "sm_90": ("cuda", 90, 32),
}
_FLOAT_ARGS = {"scale", "eps", "norm_scale"}
MANIFEST = "kernels.json"
# GEMV tiles (decode): few rows, long contiguous columns, so each thread streams its weights in wide loads
GEMV_ROWS, GEMV_COLS = 16, 256  # per architecture folder: one record per compiled kernel


@dataclass(frozen=True)
class ModelDims:
    """The model constants the kernels are specialised on (plain ints: kernels sit below ``models``)."""

    head_dim: int
    rotary_dim: int
    groups: int  # query heads per KV head
    num_experts: int
    cca_time0: int
    cca_time1: int
    hidden_size: int


@dataclass(frozen=True)
class KernelSpec:
    """One compiled specialisation: which Triton function, its constants, and how it is launched."""

    name: str  # file stem, e.g. moe_grouped_swiglu
    op: str  # the op whose kernel module holds it (triton_support.KERNEL_MODULES)
    function: str  # the @triton.jit function in that module
    constexprs: dict
    num_warps: int
    grid: str  # launch grid, in the wrapper's terms
    use: str  # which calls run it
    matmul: bool  # its products are tile GEMMs (tl.dot) that must run on the matrix cores
    pointers: dict = field(default_factory=dict)  # pointer args not bf16, e.g. {"choice_ptr": "*i32"}


def kernel_specs(d: ModelDims) -> list[KernelSpec]:
    """Every kernel the GPU path launches, for the model ``d``, in bf16."""
    e_pad = 1 << max(0, (d.num_experts - 1).bit_length())
    h_block = 1 << max(4, (d.hidden_size - 1).bit_length())
    i32 = "*i32"
    route = {"choice_ptr": i32, "order_ptr": i32, "tile_start_ptr": i32, "seg_start_ptr": i32, "count_ptr": i32}
    attn_ptrs = {"pvalid_ptr": "*i8", "nvalid_ptr": "*i8", "pos_ptr": i32, "tmpl_ptr": "*i8", "m_out": "*fp32",
                 "l_out": "*fp32", "acc_out": "*fp32"}
    attn = {"D": d.head_dim, "BLOCK_N": 32 if d.head_dim >= 128 else 64, "F32": False,  # as key_block()
            "FILL_VALUE": -3.4028234663852886e38}
    cca = {"KAPPA": d.cca_time0 + d.cca_time1 - 2, "K0": d.cca_time0, "K1": d.cca_time1, "D": d.head_dim,
           "ROT": d.rotary_dim, "G": d.groups, "F32": False}
    grouped = {"E_PAD": e_pad, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "F32": False}
    rows = 16 if d.head_dim >= 128 else 32
    return [
        KernelSpec("moe_swiglu_gemv", "moe_top1", "_swiglu_gemv", {"BLOCK_I": GEMV_ROWS, "BLOCK_H": GEMV_COLS}, 4,
                   f"(N, cdiv(I, {GEMV_ROWS}))", "decode: chosen expert's gate/up rows", False, route),
        KernelSpec("moe_down_gemv", "moe_top1", "_down_gemv", {"BLOCK_H": GEMV_ROWS, "BLOCK_I": GEMV_COLS}, 4,
                   f"(N, cdiv(H, {GEMV_ROWS}))", "decode: chosen expert's down rows", False,
                   route | {"weight_ptr": "*bf16"}),
        KernelSpec("moe_grouped_swiglu", "moe_top1", "_grouped_swiglu", grouped, 4,
                   "(cdiv(N, 64) + E, cdiv(I, 64))", "prefill/verify/step: grouped gate/up GEMM", True, route),
        KernelSpec("moe_grouped_down", "moe_top1", "_grouped_down", grouped, 4,
                   "(cdiv(N, 64) + E, cdiv(H, 64))", "prefill/verify/step: grouped down GEMM", True, route),
        KernelSpec("attention_decode", "block_attention", "_attention_split", attn | {"MODE": 0, "BLOCK_M": 16}, 4,
                   "(B*n_kv, cdiv(G*T, 16), splits)", "decode: split-K over the cache", True, attn_ptrs),
        KernelSpec("attention_causal", "block_attention", "_attention_split", attn | {"MODE": 0, "BLOCK_M": 64}, 4,
                   "(B*n_kv, cdiv(G*T, 64), 1)", "prefill, TiDAR verify", True, attn_ptrs),
        KernelSpec("attention_draft", "block_attention", "_attention_split", attn | {"MODE": 1, "BLOCK_M": 64}, 4,
                   "(B*n_kv, cdiv(G*T, 64), 1)", "TiDAR draft (bidirectional block)", True, attn_ptrs),
        KernelSpec("attention_step", "block_attention", "_attention_split", attn | {"MODE": 2, "BLOCK_M": 64}, 4,
                   "(B*n_kv, cdiv(G*T, 64), 1)", "packed TiDAR step (mask template)", True, attn_ptrs),
        KernelSpec("cca_decode", "cca", "_cca_heads", cca | {"BLOCK_T": 1}, 8,
                   "(B, n_q + n_kv, T)", "decode: conv/norm/RoPE per head (GEMV)", False, {"idx_ptr": i32}),
        KernelSpec("cca_rows", "cca", "_cca_heads", cca | {"BLOCK_T": rows}, 4,  # rows as cca_triton.row_block()
                   f"(B, n_q + n_kv, cdiv(T, {rows}))", "prefill/verify/draft/step: conv as d×d tile products", True,
                   {"idx_ptr": i32}),
        KernelSpec("residual_rmsnorm", "residual_rmsnorm", "_residual_rmsnorm", {"BLOCK_H": h_block},
                   8 if h_block >= 2048 else 4, "(N,)", "every layer, twice", False, {"res_ptr": "*fp32",
                                                                                      "h_out": "*fp32"}),
    ]


def _signature(fn, spec: KernelSpec) -> dict[str, str]:  # noqa: ANN001 - a triton JITFunction
    sig = {}
    for name in fn.arg_names:
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = spec.pointers[name]
        elif name.endswith(("_ptr", "_out")):
            sig[name] = "*bf16"
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def compile_one(spec: KernelSpec, arch: str, out_dir: Path) -> dict:
    """Compile ``spec`` for ``arch`` in this process; write ``<arch>/<name>.<hsaco|cubin>``; its record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import isa
    from .triton_support import load

    backend, target_arch, warp = ARCHS[arch]
    fn = getattr(load(spec.op), spec.function)
    signature = _signature(fn, spec)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=dict(spec.constexprs)),
                              target=GPUTarget(backend, target_arch, warp), options={"num_warps": spec.num_warps})
    meta = compiled.metadata
    kind = "hsaco" if backend == "hip" else "cubin"
    binary = compiled.asm[kind]
    if backend == "hip":
        report = isa.amd_report(arch, compiled.asm["amdgcn"], binary, meta.shared)
    else:
        report = isa.cuda_report(arch, binary, compiled.asm["ptx"], meta.shared, spec.num_warps)
    rel = Path(arch) / f"{spec.name}.{kind}"
    (out_dir / arch).mkdir(parents=True, exist_ok=True)
    (out_dir / rel).write_bytes(binary)
    return {"kernel": spec.name, "arch": arch, "file": rel.as_posix(), "format": kind, "symbol": meta.name,
            "function": f"{spec.op}:{spec.function}", "use": spec.use, "matmul": spec.matmul,
            "grid": spec.grid, "block": [spec.num_warps * warp, 1, 1], "num_warps": spec.num_warps,
            "warp_size": warp, "shared_bytes": int(meta.shared), "signature": signature,
            "constexprs": spec.constexprs, "triton": triton.__version__, **report.to_json()}


def compile_kernels(dims: ModelDims, archs: list[str], out_dir: Path, names: tuple[str, ...] | None = None,
                    timeout_s: float = 900) -> list[dict]:
    """Compile every kernel (or those ``names``) for every arch into ``out_dir/<arch>/`` (plus ``kernels.json``
    per arch), one child process per arch without ``TRITON_INTERPRET``; returns the records."""
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"no Triton target for {', '.join(unknown)}; known: {', '.join(ARCHS)}")
    from .triton_support import require_triton

    require_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    children = []  # one child per architecture, run side by side
    for arch in archs:
        request = json.dumps({"dims": asdict(dims), "archs": [arch], "out_dir": str(out_dir), "names": names})
        child = subprocess.Popen([sys.executable, "-c", f"from {__name__} import _child; _child()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
        children.append((arch, child, request))
    records = []
    for arch, child, request in children:
        try:
            out, err = child.communicate(request, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            raise RuntimeError(f"kernel AOT compilation for {arch} took over {timeout_s:.0f} s") from None
        if child.returncode:
            raise RuntimeError(f"kernel AOT compilation for {arch} failed: {err.strip()[-2000:]}")
        mine = json.loads(out.strip().splitlines()[-1])
        (out_dir / arch / MANIFEST).write_text(json.dumps(mine, indent=1, sort_keys=True) + "\n")
        records += mine
    return records


def _child() -> None:
    """Entry of the compiling child process: a JSON request on stdin, the records as one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    dims, out_dir = ModelDims(**request["dims"]), Path(request["out_dir"])
    specs = [s for s in kernel_specs(dims) if request.get("names") is None or s.name in request["names"]]
    records = [compile_one(spec, arch, out_dir) for arch in request["archs"] for spec in specs]
    sys.stdout.write(json.dumps(records) + "\n")
