"""What a compiled kernel really is, read from its code: register use, LDS/shared memory, occupancy and whether
its tile products run on the matrix cores. Read from the compiler's own output, not assumed from the source:
``tl.dot`` becomes MFMA only when the tile shapes, dtypes and layouts allow it, and falls back to FMA loops
silently otherwise.

* AMD (``amdgcn`` assembly, the text of the ``hsaco``): the AMDGPU back end's kernel descriptor and its
  ``; NumVgprs / NumAgprs / TotalNumSgprs / Occupancy`` notes; matrix instructions ``v_mfma_*``/``v_smfmac_*``
  (CDNA: gfx90a, gfx942) and ``v_wmma_*``/``v_swmmac_*`` (RDNA3: gfx1100).
* NVIDIA (``cubin``): SASS from ``nvdisasm`` (``HGMMA`` = wgmma on sm_90, ``HMMA`` = mma.sync) and register
  and shared use from ``cuobjdump -res-usage``, both shipped with Triton's NVIDIA back end; when those tools
  are missing, the PTX (``wgmma.mma_async``/``mma.sync``) is read instead and registers are left unknown.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

_AMD_MATRIX = re.compile(r"^\s*(v_(?:mfma|smfmac|wmma|swmmac)_\w+)", re.M)
_SASS_MATRIX = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA)\.[\w.]+")
_PTX_MATRIX = re.compile(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)")
_AMD_NOTES = {
    "vgprs": r";\s*NumVgprs:\s*(\d+)",
    "agprs": r";\s*NumAgprs:\s*(\d+)",
    "sgprs": r";\s*TotalNumSgprs:\s*(\d+)",
    "occupancy": r";\s*Occupancy:\s*(\d+)",
    "scratch_bytes": r";\s*ScratchSize:\s*(\d+)",
    "lds_static_bytes": r"\.amdhsa_group_segment_fixed_size\s+(\d+)",
}
# Waves per SIMD the hardware holds at best (the compiler's Occupancy note counts the same unit).
AMD_MAX_WAVES = {"gfx90a": 8, "gfx942": 8, "gfx1100": 16}
SM90 = {"regs": 65536, "max_warps": 64, "max_blocks": 32, "smem": 228 * 1024, "smem_per_block_reserved": 1024}


@dataclass
class CodeReport:
    """Resource use and matrix-core use of one compiled kernel for one architecture."""

    arch: str
    code_bytes: int
    vgprs: int | None = None  # AMD architected VGPRs; NVIDIA registers per thread
    agprs: int | None = None  # AMD accumulation VGPRs (CDNA)
    sgprs: int | None = None
    lds_bytes: int = 0  # LDS (AMD) / shared memory (NVIDIA) per workgroup, static + what Triton allocates
    scratch_bytes: int | None = None
    occupancy: int | None = None  # waves per SIMD (AMD, from the compiler) / warps per SM (NVIDIA, computed)
    occupancy_max: int | None = None
    matrix_instructions: list[str] = field(default_factory=list)  # distinct mnemonics, e.g. v_mfma_f32_32x32x8_bf16
    matrix_source: str = ""  # where they were read: amdgcn, sass or ptx

    @property
    def uses_matrix_cores(self) -> bool:
        return bool(self.matrix_instructions)

    def to_json(self) -> dict:
        return asdict(self) | {"uses_matrix_cores": self.uses_matrix_cores}


def amd_report(arch: str, amdgcn: str, hsaco: bytes, shared: int) -> CodeReport:
    """From the ``amdgcn`` assembly of one kernel (``shared``: the LDS Triton allocates dynamically)."""
    notes = {k: int(m.group(1)) if (m := re.search(p, amdgcn)) else None for k, p in _AMD_NOTES.items()}
    lds_static = notes.pop("lds_static_bytes") or 0
    return CodeReport(arch, len(hsaco), lds_bytes=lds_static + int(shared or 0), occupancy_max=AMD_MAX_WAVES.get(arch),
                      matrix_instructions=sorted(set(_AMD_MATRIX.findall(amdgcn))), matrix_source="amdgcn", **notes)


def _tool(name: str) -> str | None:
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and Path(path).exists():
            return path
    except Exception:  # noqa: BLE001 - an older Triton without knobs, or no NVIDIA back end
        pass
    return shutil.which(name)


def cuda_report(arch: str, cubin: bytes, ptx: str, shared: int, num_warps: int) -> CodeReport:
    """From the ``cubin`` (SASS and resource usage via Triton's bundled tools) or, without them, the PTX."""
    report = CodeReport(arch, len(cubin), lds_bytes=int(shared or 0), occupancy_max=SM90["max_warps"])
    nvdisasm, cuobjdump = _tool("nvdisasm"), _tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        if nvdisasm:
            sass = subprocess.run([nvdisasm, str(path)], capture_output=True, text=True).stdout
            report.matrix_instructions = sorted({m.group(0).split(" ")[0] for m in _SASS_MATRIX.finditer(sass)})
            report.matrix_source = "sass"
        if cuobjdump:
            usage = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True).stdout
            if m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage):
                report.vgprs = int(m.group(1))
                report.lds_bytes += int(m.group(3))
                report.scratch_bytes = int(m.group(2)) + int(m.group(4))  # spills and local arrays
    if not report.matrix_source:
        report.matrix_instructions = sorted(set(_PTX_MATRIX.findall(ptx)))
        report.matrix_source = "ptx"
    if report.vgprs:
        report.occupancy = _sm90_warps(report.vgprs, report.lds_bytes, num_warps)
    return report


def _sm90_warps(regs: int, smem: int, num_warps: int) -> int:
    """Resident warps per SM on sm_90 for a block of ``num_warps`` warps (registers allocated per warp in
    units of 256, shared memory plus the 1 KiB the driver reserves per block)."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(SM90["max_blocks"], SM90["max_warps"] // num_warps, SM90["regs"] // (per_warp * num_warps))
    if smem:
        blocks = min(blocks, SM90["smem"] // (smem + SM90["smem_per_block_reserved"]))
    return blocks * num_warps
