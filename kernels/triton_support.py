"""Triton is an optional dependency (the ``gpu`` extra): the package, the exporter and every CPU path work
without it, so the Triton kernel modules are imported only when a Triton path is asked for, through
:func:`load`, which turns a missing Triton into one clear error instead of an ImportError deep in a stack."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

# The kernel modules (kernels/<op>_triton.py), by the op they implement.
KERNEL_MODULES = {
    "moe_top1": "moe_top1_triton",
    "block_attention": "block_attention_triton",
    "cca": "cca_triton",
    "residual_rmsnorm": "residual_norm_triton",
}


class TritonUnavailable(RuntimeError):
    """A Triton path was requested where Triton is not installed (install the ``gpu`` extra)."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def require_triton() -> ModuleType:
    """The ``triton`` module, or :class:`TritonUnavailable` with what to install."""
    try:
        import triton
    except ImportError as exc:  # also a module masked as None in sys.modules
        raise TritonUnavailable("the Triton kernels need triton (pip install 'zaya-export[gpu]', "
                                f"triton==3.8.0; >=3.6 works): {exc}") from None
    return triton


def load(op: str) -> ModuleType:
    """The Triton kernel module of ``op`` (imported on first use)."""
    if op not in KERNEL_MODULES:
        raise KeyError(f"no Triton kernel for {op!r}; have {sorted(KERNEL_MODULES)}")
    require_triton()
    return importlib.import_module(f"{__package__}.{KERNEL_MODULES[op]}")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on a GPU tensor, or on CPU tensors only under the interpreter."""
    for t in tensors:
        if t.device.type == "cpu" and not interpreting():
            raise TritonUnavailable("Triton kernels need GPU tensors (or TRITON_INTERPRET=1 to run them on the CPU)")
