"""Triton is optional: with it absent the package imports, the exporter and CLI work, ``--kernels auto``
compiles nothing, and asking for a Triton path gives one clear error."""

from __future__ import annotations

import json
import subprocess
import sys

_NO_TRITON = """
import json, sys
sys.modules["triton"] = None  # not installed
import zaya_export.kernels, zaya_export.exporter, zaya_export.cli
from zaya_export.kernels import triton_faces
from zaya_export.kernels.registry import call
from zaya_export.kernels.triton_support import TritonUnavailable, load, triton_available
from zaya_export.kernel_aot import KernelBuildError, resolve_kernel_archs
out = {"available": triton_available(), "auto": resolve_kernel_archs("auto", ("cpu", "gfx942"))}
def face():
    with triton_faces():
        call("cca")
for attempt, fn in [("load", lambda: load("cca")), ("face", face),
                    ("explicit", lambda: resolve_kernel_archs("gfx942", ()))]:
    try:
        fn()
    except (TritonUnavailable, KernelBuildError) as exc:
        out[attempt] = str(exc)
print(json.dumps(out))
"""


def test_package_works_without_triton() -> None:
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["available"] is False and out["auto"] == []
    assert "pip install 'zaya-export[gpu]'" in out["load"] and "triton" in out["face"]
    assert "--kernels needs triton" in out["explicit"]
