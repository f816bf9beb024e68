"""The typed manifest: to_json/from_json round-trip, and every malformed field refused with its name."""

from __future__ import annotations

import copy

import pytest

from zaya_export.passes.base import PassRecord
from zaya_export.runtime.manifest import (EntryPoint, IreeModule, Manifest, ManifestError, MlirModule, PassLog,
                                          PortSig, StateEntry, TidarInfo)


def _manifest() -> Manifest:
    ports = (PortSig(name="input_ids", dtype="INT64", shape=("B", "T")), PortSig(name="past_k"))
    return Manifest(
        created="2026-12-03T00:00:00+00:00", source="ckpt", dtype="fp32", compute_dtype="fp32",
        config={"vocab_size": 64}, weights="onnx/weights.safetensors", formats=("onnx", "mlir"),
        entry_points={"decode": EntryPoint(tokens=1, inputs=ports, outputs=(PortSig(name="logits"),
                                                                          PortSig(name="new_k")), onnx="onnx/decode.onnx"),
                      "layers": EntryPoint(tokens=None, inputs=ports, outputs=(), debug=True)},
        mlir=MlirModule(module="zaya.mlir", importer="x", ops_per_entry={"decode": 3}, parameter_scope="model",
                        parameter_file="onnx/weights.safetensors",
                        state_entries={"commit": StateEntry(inputs=ports, mutates=("past_k",))}),
        iree={"cpu": IreeModule(vmfb="iree/cpu.vmfb", flags=("--a",), driver="local-task", bytes=10, amd_archs=(),
                                seconds=1.0)},
        tidar=TidarInfo(block_len=16, levels=(0, 6, 16), mask_token_id=4),
        pass_log=PassLog(model=[PassRecord("fuse_cca", 2, 0.5, max_abs_diff=1e-6, routing_flips=0)],
                         onnx={"decode": [PassRecord("dead_code", 3, 0.01)]}), files={"zaya.mlir": "ab"})


def test_round_trip():
    m = _manifest()
    again = Manifest.from_json(m.to_json())
    assert again == m and again.to_json() == m.to_json()
    assert again.entry_points["decode"].stateful and not again.entry_points["layers"].stateful
    assert [(r.name, r.rewrites) for r in again.pass_log.model] == [("fuse_cca", 2)]
    assert set(again.paths().values()) == {"onnx/weights.safetensors", "onnx/decode.onnx", "zaya.mlir", "iree/cpu.vmfb"}


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("weights"), "manifest: missing 'weights'"),
    (lambda m: m.update(weights=3), "manifest.weights: expected str, got int"),
    (lambda m: m.update(weights="C:\\\\x"), "points outside"),
    (lambda m: m.update(weights="~/x"), "points outside"),
    (lambda m: m["iree"]["cpu"].update(vmfb="../cpu.vmfb"), "manifest.iree.cpu.vmfb: '../cpu.vmfb' points outside"),
    (lambda m: m["mlir"]["parameters"].update(file="/w"), "parameters.file: '/w' points outside"),
    (lambda m: m["entry_points"]["decode"]["inputs"][0].update(name=None), r"inputs\[0\].name: expected str"),
    (lambda m: m["entry_points"]["decode"]["inputs"][0].update(shape=[1.5]), "shape: expected ints"),
    (lambda m: m["entry_points"]["decode"].update(debug="yes"), "debug: expected bool"),
    (lambda m: m["entry_points"]["decode"].update(tokens=True), "tokens: expected int or null, got bool"),
    (lambda m: m.update(entry_points={}), "entry_points: empty"),
    (lambda m: m["tidar"].update(block_len=0), "block_len: must be >= 1"),
    (lambda m: m["tidar"].update(levels=["a"]), "levels: expected integers"),
    (lambda m: m.update(mlir=None), "IREE modules without the MLIR module"),
    (lambda m: m["mlir"]["state_entries"]["commit"].update(outputs=[{"name": "x"}]), "a state commit has no outputs"),
    (lambda m: m["files"].update({"../x": "ab"}), "manifest.files: '../x' points outside"),
    (lambda m: m.update(schema_version=1), "schema version 1 is not supported"),
    (lambda m: m.update(format="other"), "not a zaya-export manifest"),
    (lambda m: m["entry_points"].update(decode=[]), "entry_points.decode: expected an object"),
    (lambda m: m["iree"]["cpu"].update(extra=1), "iree.cpu: unknown field"),
    (lambda m: m["pass_log"].update(model={}), "pass_log.model: expected list"),
    (lambda m: m["pass_log"]["model"][0].update(rewrites="2"), r"pass_log.model\[0\]: name must be a string"),
    (lambda m: m["pass_log"]["onnx"]["decode"][0].update(extra=1), r"pass_log.onnx.decode\[0\]: expected a pass"),
    (lambda m: m["pass_log"].update(other=[]), "pass_log: unknown field"),
])
def test_malformed_fields_are_named(change, message):
    raw = copy.deepcopy(_manifest().to_json())
    change(raw)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(raw)
