"""The export phase that AOT-compiles the Triton kernels into the artifact (``kernels/<arch>/``), for the
GPU architectures asked for: by default every GPU ``--target`` of the export, or an explicit list
(``--kernels gfx942,sm_90``; sm_90 is no IREE target, so it is only compiled when named).

Each arch folder holds the code objects (``*.hsaco`` for AMD, ``*.cubin`` for NVIDIA) and ``kernels.json``;
the manifest carries the same records (``manifest.kernels``) and hashes every file like any other."""

from __future__ import annotations

from pathlib import Path

from zaya_export.errors import ZayaError
from zaya_export.kernels.aot import ARCHS, ModelDims, compile_kernels
from zaya_export.kernels.triton_support import TritonUnavailable, triton_available
from zaya_export.models import ZayaConfig

KERNEL_DIR = "kernels"


class KernelBuildError(ZayaError):
    """The kernels could not be compiled as asked."""


def resolve_kernel_archs(kernels: str | tuple[str, ...], target_names: tuple[str, ...]) -> tuple[str, ...]:
    """``"auto"``: the GPU archs among the IREE targets; ``"off"``/empty: none; else the named archs."""
    if kernels == "auto":  # without triton installed, auto compiles nothing (the IREE modules do not need it)
        return tuple(t for t in target_names if t in ARCHS) if triton_available() else ()
    if kernels in ("off", "", ()):
        return ()
    names = tuple(dict.fromkeys(kernels.split(",") if isinstance(kernels, str) else kernels))
    unknown = [a for a in names if a not in ARCHS]
    if unknown:
        raise KernelBuildError(f"--kernels: no Triton target for {', '.join(unknown)}; choose from "
                               f"{', '.join(ARCHS)} (or auto, off)")
    if not triton_available():
        raise KernelBuildError("--kernels needs triton (pip install 'zaya-export[gpu]')")
    return names


def model_dims(config: ZayaConfig) -> ModelDims:
    """The constants the kernels are compiled for; one rotary width (the CCA kernel is specialised on it)."""
    rot = {config.rotary_dim(t) for t in config.layer_types}
    if len(rot) != 1:
        raise KernelBuildError(f"--kernels: the layer types use rotary widths {sorted(rot)}; the AOT kernels are "
                               "compiled for one")
    return ModelDims(head_dim=config.head_dim, rotary_dim=rot.pop(),
                     groups=config.num_key_value_groups, num_experts=config.num_experts,
                     cca_time0=config.cca_time0, cca_time1=config.cca_time1, hidden_size=config.hidden_size)


def build_kernels(config: ZayaConfig, archs: tuple[str, ...], artifact: Path) -> dict[str, list[dict]]:
    """Compile every kernel for ``archs`` into ``artifact/kernels``; the manifest's records by arch (file
    paths relative to the artifact)."""
    if not archs:
        return {}
    try:
        records = compile_kernels(model_dims(config), list(archs), artifact / KERNEL_DIR)
    except (TritonUnavailable, RuntimeError, ValueError) as exc:
        raise KernelBuildError(f"kernel compilation: {exc}") from None
    out: dict[str, list[dict]] = {a: [] for a in archs}
    for r in records:
        out[r["arch"]].append(r | {"file": f"{KERNEL_DIR}/{r['file']}"})
    return out
