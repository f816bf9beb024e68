"""The device check's CPU-checkable parts: argument handling (one ``error:`` line, exit 2), the import shim
that maps the repository folders to the ``zaya_export`` subpackages without an install (and stands in for
onnx/onnxscript where the GPU machine lacks them), and a clear refusal where no GPU is visible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zaya_export.gpu_check import parse_args, peak_gbps

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv,message", [(["--parts", "parity,nope"], "--parts"), (["--preset", "8b"], "--preset"),
                                          (["--new-tokens", "0"], "--new-tokens"), (["--device", "tpu"], "--device")])
def test_bad_arguments_are_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_defaults_and_peak_table() -> None:
    args = parse_args([])
    assert args.parts == ["parity", "greedy", "speed", "bandwidth"] and args.preset == "small"
    assert peak_gbps("NVIDIA H200", None) == 4800.0 and peak_gbps("NVIDIA H100 PCIe", None) == 2000.0
    assert peak_gbps("AMD Instinct MI300X", None) == 5300.0 and peak_gbps("Unknown", None) is None
    assert peak_gbps("Unknown", 1000.0) == 1000.0


_SHIM = """
import json, sys
sys.path.insert(0, {scripts!r})
for name in ("onnx", "onnxscript"):
    sys.modules[name] = None  # as on the GPU machine: not installed
import gpu_check
stood_in = gpu_check.install(force=True)
import zaya_export.kernels as k
from zaya_export.kernels.triton_support import KERNEL_MODULES
from zaya_export.runtime import graph_decode
from zaya_export.models import zaya
from zaya_export import gpu_check as tool
print(json.dumps({{"stood_in": stood_in, "shim": sys.modules["zaya_export.models"].__spec__.loader_state,
                  "models": zaya.__file__, "kernels_top_level": "kernels" in sys.modules,
                  "ops": k.registered(), "tool": tool.__file__}}))
"""


def test_import_shim_maps_the_folders_without_an_install() -> None:
    proc = subprocess.run([sys.executable, "-c", _SHIM.format(scripts=str(ROOT / "scripts"))], capture_output=True,
                          text=True, cwd=ROOT / "scripts")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shim"] == "zaya-export repo shim"  # loaded by the shim's finder, not the installed package
    assert Path(out["models"]) == ROOT / "models" / "zaya.py"
    assert Path(out["tool"]) == ROOT / "zaya_export" / "gpu_check.py"
    assert out["stood_in"] == ["onnx", "onnx.defs", "onnxscript"] and not out["kernels_top_level"]
    assert out["ops"] == ["BlockAttention", "CCA", "MoETop1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_script_refuses_without_a_gpu() -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--parts", "parity"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: no GPU visible")
