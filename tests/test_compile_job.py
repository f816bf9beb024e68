"""``iree-compile`` in the background (``mlir_export.CompileJob``): it runs while the export lowers ONNX, its
failure is the export's clear error, and no compiler outlives a failed export."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import random_model, small_config
from zaya_export import exporter
from zaya_export.exporter import ExportError, export_artifact
from zaya_export.mlir_export import CompileJob, resolve_targets
from zaya_export.models.checkpoint import save_checkpoint

_ADD = """func.func @main(%a: tensor<4xf32>, %b: tensor<4xf32>) -> tensor<4xf32> {
  %0 = arith.addf %a, %b : tensor<4xf32>
  return %0 : tensor<4xf32>
}
"""


def test_a_job_compiles_and_reports(tmp_path):
    (tmp_path / "ok.mlir").write_text(_ADD)
    job = CompileJob(tmp_path / "ok.mlir", resolve_targets(("cpu",))[0], tmp_path / "iree" / "cpu.vmfb")
    module = job.wait()
    assert module.vmfb == "iree/cpu.vmfb" and module.bytes == (tmp_path / "iree" / "cpu.vmfb").stat().st_size > 0
    assert module.driver == "local-task" and module.flags[0] == "--iree-input-type=torch"
    assert not (tmp_path / "iree" / "cpu.log").exists()  # the log goes once the compile succeeded


def test_a_failing_compile_names_the_first_error(tmp_path):
    (tmp_path / "bad.mlir").write_text("func.func @main( garbage\n")
    job = CompileJob(tmp_path / "bad.mlir", resolve_targets(("cpu",))[0], tmp_path / "iree" / "cpu.vmfb")
    with pytest.raises(RuntimeError, match=r"iree-compile failed for cpu: .*bad.mlir:1:\d+: error: "):
        job.wait()


def test_kill_stops_a_running_compiler(tmp_path):
    (tmp_path / "ok.mlir").write_text(_ADD)
    job = CompileJob(tmp_path / "ok.mlir", resolve_targets(("cpu",))[0], tmp_path / "iree" / "cpu.vmfb")
    job.kill()
    assert job.process.poll() is not None
    job.kill()  # idempotent


def test_a_failed_export_leaves_no_compiler_running(tmp_path, monkeypatch):
    """The ONNX lowering fails while the compiler runs: the export raises its error, the compiler is gone and
    nothing is written."""
    ckpt = save_checkpoint(random_model(small_config(num_hidden_layers=1, layer_types=["hybrid"])), tmp_path / "c")
    jobs: list[CompileJob] = []

    class Recorded(CompileJob):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            jobs.append(self)

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise exporter.PassError("injected lowering failure")

    monkeypatch.setattr(exporter, "CompileJob", Recorded)
    monkeypatch.setattr(exporter, "lower_entry", broken)
    with pytest.raises(ExportError, match="injected lowering failure"):
        export_artifact(ckpt, tmp_path / "a", formats=("onnx", "mlir"), targets=("cpu",), tidar="off")
    assert len(jobs) == 1 and jobs[0].process.poll() is not None
    assert not Path(tmp_path / "a").exists()
