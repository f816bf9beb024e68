"""AOT compilation of the Triton kernels for GPUs this machine does not have (no GPU, no ROCm/CUDA install):
code objects for gfx942, gfx90a, gfx1100 and sm_90, the tile-GEMM kernels on the matrix cores as read from the
compiled code, and ``export --kernels`` / ``--target gfx942`` writing them into the artifact, hashed, shown
by ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("triton")

from zaya_export.cli import main  # noqa: E402
from zaya_export.exporter import ExportOptions  # noqa: E402
from zaya_export.kernels import isa  # noqa: E402
from zaya_export.kernels.aot import MANIFEST, ModelDims, compile_kernels  # noqa: E402
from zaya_export.runtime.artifact import ArtifactError, open_artifact  # noqa: E402

ARCHS = ("gfx90a", "gfx1100", "sm_90")  # gfx942: every kernel, through the export below
# what each arch's matrix cores look like in its code: MFMA (CDNA), WMMA (RDNA3), wgmma/mma (Hopper SASS)
MATRIX = {"gfx942": ("v_mfma_",), "gfx90a": ("v_mfma_",), "gfx1100": ("v_wmma_",), "sm_90": ("HGMMA.", "HMMA.")}
TINY = ModelDims(head_dim=32, rotary_dim=16, groups=2, num_experts=4, cca_time0=2, cca_time1=2, hidden_size=128)
# a tile-GEMM kernel (tl.dot) and a GEMV per arch, to keep the compile time of the test small; the export test
# compiles and checks every kernel for gfx942
SUBSET = ("moe_grouped_swiglu", "moe_swiglu_gemv")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("aot")
    return out, compile_kernels(TINY, list(ARCHS), out, names=SUBSET)


def test_every_arch_gets_code_objects(compiled) -> None:
    out, records = compiled
    assert {(r["arch"], r["kernel"]) for r in records} == {(a, k) for a in ARCHS for k in SUBSET}
    for r in records:
        path = out / r["file"]
        assert path.suffix == (".cubin" if r["arch"] == "sm_90" else ".hsaco")
        assert path.stat().st_size == r["code_bytes"] > 0
        assert r["block"][0] == r["num_warps"] * r["warp_size"]
        assert r["vgprs"] and r["vgprs"] > 0, r  # registers read from the code (notes / cuobjdump)
        assert 1 <= r["occupancy"] <= r["occupancy_max"], r
        if r["arch"] != "sm_90":
            assert r["sgprs"] > 0 and r["scratch_bytes"] is not None
    for arch in ARCHS:
        listed = json.loads((out / arch / MANIFEST).read_text())
        assert sorted(r["kernel"] for r in listed) == sorted(SUBSET)


@pytest.mark.parametrize("arch", ARCHS)
def test_matmul_kernels_run_on_the_matrix_cores(compiled, arch: str) -> None:
    """tl.dot tiles compile to MFMA / WMMA / wgmma-or-mma instructions; the GEMV kernel (decode, bound by
    weight reads) has none, so the check is not vacuous."""
    _, records = compiled
    for r in (r for r in records if r["arch"] == arch):
        found = r["matrix_instructions"]
        if r["matmul"]:
            assert found and all(i.startswith(MATRIX[arch]) for i in found), (r["kernel"], found)
            assert "bf16" in found[0].lower(), found  # bf16 inputs, fp32 accumulation
        else:
            assert not found, (r["kernel"], found)


def test_amd_report_reads_the_compiler_notes() -> None:
    text = """
\t.amdhsa_group_segment_fixed_size 512
\tv_mfma_f32_32x32x8_bf16 v[0:15], v[28:29], v[20:21], 0
\tv_mfma_f32_32x32x8_bf16 v[0:15], v[30:31], v[22:23], v[0:15]
; TotalNumSgprs: 18
; NumVgprs: 36
; NumAgprs: 4
; ScratchSize: 0
; Occupancy: 8
"""
    r = isa.amd_report("gfx942", text, b"\0" * 100, shared=1024)
    assert (r.vgprs, r.agprs, r.sgprs, r.occupancy, r.lds_bytes, r.code_bytes) == (36, 4, 18, 8, 1536, 100)
    assert r.matrix_instructions == ["v_mfma_f32_32x32x8_bf16"] and r.uses_matrix_cores
    assert not isa.amd_report("gfx1100", "v_fma_f32 v0, v1, v2", b"", 0).uses_matrix_cores


def test_target_auto_selects_the_gpu_archs() -> None:
    opts = ExportOptions(formats=("onnx", "mlir"), targets=("cpu", "gfx942", "gfx1100"), kernels="auto").checked()
    assert opts.kernels == ("gfx942", "gfx1100")
    assert ExportOptions(formats=("onnx",), kernels="gfx90a,sm_90").checked().kernels == ("gfx90a", "sm_90")
    assert ExportOptions(formats=("onnx", "mlir"), targets=("gfx942",), kernels="off").checked().kernels == ()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kart")
    runner = CliRunner()
    result = runner.invoke(main, ["init", "--preset", "tiny", "--seed", "1", str(root / "ckpt")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", str(root / "ckpt"), "-o", str(root / "art"), "--kernels", "gfx942",
                                  "--tidar", "off", "--calibrate", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["kernels"]["gfx942"]
    return root / "art"


def test_export_writes_hashed_kernels_and_inspect_shows_them(artifact: Path) -> None:
    art = open_artifact(artifact)
    records = art.manifest.kernels["gfx942"]
    assert len(records) == 11
    for r in records:
        assert r["file"].startswith("kernels/gfx942/") and r["file"] in art.manifest.files
        assert art.path(r["file"]).stat().st_size == r["code_bytes"] and r["vgprs"] > 0 and r["sgprs"] > 0
        found = r["matrix_instructions"]  # every tile-GEMM kernel on MFMA, no GEMV on it
        assert (bool(found) and all(i.startswith("v_mfma_") for i in found)) if r["matmul"] else not found, r
    assert "kernels/gfx942/kernels.json" in art.manifest.files
    text = CliRunner().invoke(main, ["inspect", str(artifact)])
    assert text.exit_code == 0, text.output
    assert "kernels/gfx942/moe_grouped_swiglu:" in text.output and "matrix cores yes (v_mfma_" in text.output
    assert "MISSING" not in text.output
    info = json.loads(CliRunner().invoke(main, ["inspect", str(artifact), "--json"]).output)
    assert {k["kernel"] for k in info["kernels"]["gfx942"]} == {r["kernel"] for r in records}


def test_tampered_kernel_is_refused(artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    obj = copy / "kernels" / "gfx942" / "attention_decode.hsaco"
    obj.write_bytes(obj.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ArtifactError, match="sha256"):
        open_artifact(copy)


@pytest.mark.parametrize("value", ["gfx9000", "sm_1,gfx942"])
def test_bad_kernels_option_is_one_line(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(main, ["export", str(tmp_path / "none"), "-o", str(tmp_path / "o"),
                                       "--kernels", value])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--kernels" in lines[0], result.output
