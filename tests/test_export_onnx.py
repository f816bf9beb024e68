"""End to end: checkpoint → artifact (ONNX) → onnxruntime, against the eager model and upstream transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import random_model, small_config
from zaya_export.runtime.artifact import ArtifactError, open_artifact
from zaya_export.models.checkpoint import save_checkpoint
from zaya_export.cli import main
from zaya_export.exporter import ExportError, export_artifact
from zaya_export.output_dir import OutputError
from zaya_export.runtime.generate import generate, generate_greedy
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.session import Session
from zaya_export.sources import open_session
from zaya_export.validate import validate_artifact


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(num_hidden_layers=3, layer_types=["hybrid", "hybrid_sliding", "hybrid"],
                                     sliding_window=8), seed=11)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("export") / "ckpt")


@pytest.fixture(scope="module")
def artifact(ckpt):
    out = ckpt.parent / "artifact"
    export_artifact(ckpt, out)
    return out


def test_artifact_layout_and_manifest(artifact, model):
    art = open_artifact(artifact)
    m = art.manifest
    assert set(m.files) == {"config.json", "generation_config.json", "onnx/weights.safetensors", "calibration.json",
                               *(f"onnx/{e}.onnx" for e in ("prefill", "decode", "verify", "draft", "step", "step_greedy",
                                                                 "step_sample", "layers"))}
    assert m.tidar.to_json() == {"block_len": model.config.diffusion_block_len, "levels": [0, 6, 16],
                                 "mask_token_id": 4}
    assert m.op_counts["step"]["zaya.moe_top1"] == 3 and "zaya.cca" not in m.op_counts["step"]
    assert [(r.name, r.rewrites) for r in m.pass_log.model] == [
        ("fuse_cca", 3), ("fuse_attention", 3), ("fuse_moe", 3), ("pack_tidar_step", 3)]
    for entry in ("prefill", "decode", "verify", "draft"):
        assert m.op_counts[entry]["zaya.cca"] == 3
        assert m.entry_points[entry].input_names[:2] == ["input_ids", "input_mask"]
        assert {r.name for r in m.pass_log.onnx[entry]} == {"conv1d_as_2d", "rsqrt_as_div", "fold_constants",
                                                                     "dead_code", "check_fused_nodes", "unroll_experts"}
        # two RMSNorms a layer (before attention, before the MoE) and the final one; the router's is in its body
        assert [r.rewrites for r in m.pass_log.onnx[entry] if r.name == "rsqrt_as_div"] == [
            2 * model.config.num_hidden_layers + 1]
        unrolled = [r.rewrites for r in m.pass_log.onnx[entry] if r.name == "unroll_experts"]
        assert unrolled == [2 * model.config.num_experts * model.config.num_hidden_layers]
    # the packed steps' reference CCA convs (the CCA op's body is 2-D already): two per layer
    for entry in ("step", "step_greedy", "step_sample"):
        assert [r.rewrites for r in m.pass_log.onnx[entry] if r.name == "conv1d_as_2d"] == [
            2 * model.config.num_hidden_layers]
    assert set(m.versions) >= {"torch", "onnx", "onnxruntime", "zaya-export"}
    assert {**art.config.to_dict(), "dtype": None} == {**model.config.to_dict(), "dtype": None}


def test_onnxruntime_fuses_the_norms_and_builds_each_mask_once(artifact, model, tmp_path):
    """What onnxruntime makes of the decode graph: every RMSNorm one SimplifiedLayerNormalization (two a layer,
    the router's, the final one: ``rsqrt_as_div``) and the attention mask built once per window size, not once
    per layer (it reads only the validity inputs, so common-subexpression elimination merges the copies)."""
    import onnxruntime as ort

    from zaya_export.runtime.backends import shared_pool

    shared_pool(ort)  # sessions run on the process-wide pool
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.optimized_model_filepath = str(tmp_path / "decode.optimized.onnx")
    ort.InferenceSession(str(artifact / "onnx" / "decode.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count("SimplifiedLayerNormalization") == 3 * layers + 1
    assert "Reciprocal" not in ops
    assert ops.count("LessOrEqual") == 1  # the causal order: the same for every layer
    assert ops.count("Where") == len(set(model.config.layer_types)) < layers  # one additive bias per window size


def test_weights_are_stored_once(artifact, model):
    weights = artifact / "onnx" / "weights.safetensors"
    param_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n != "lm_head.weight")
    assert param_bytes <= weights.stat().st_size < param_bytes + 64 * 1024
    for entry in ("prefill", "decode", "verify", "draft", "step", "step_greedy", "step_sample", "layers"):
        path = artifact / "onnx" / f"{entry}.onnx"
        assert path.stat().st_size < param_bytes / 10  # graphs hold references, not weights
        proto = onnx.load(str(path), load_external_data=False)
        external = [i for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert {e.value for i in external for e in i.external_data if e.key == "location"} == {"weights.safetensors"}
        inline = [i for i in proto.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
        # at most the step mask template, or the int64 index range [0, V) of the in-graph argmax
        assert max((len(i.raw_data) for i in inline), default=0) <= max(68 * 68, model.config.vocab_size * 8)
        assert proto.opset_import and any(o.domain == "zaya" for o in proto.opset_import)
        onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("reference", ["eager", "hf"])
def test_ort_matches_the_source_model(artifact, ckpt, reference):
    report = validate_artifact(open_artifact(artifact), checkpoint=ckpt, reference=reference)
    assert report["ok"], [c for c in report["entries"] if not c["ok"]]
    assert max(c["max_abs"] for c in report["entries"]) <= 1e-4
    assert all(g["equal"] for g in report["greedy"])


def test_batched_padded_greedy_generation_matches_eager(artifact, model):
    prompts = [[5, 9, 31, 200, 7, 7, 8], [44], [300, 301, 302, 303]]
    ort_result = generate(open_session(artifact, "ort"), prompts, 12)
    assert ort_result.tokens == generate_greedy(model, prompts, 12).tokens
    assert ort_result.forwards == 12


def test_sampling_is_seeded_and_identical_across_backends(artifact):
    cfg = SamplerConfig(temperature=20.0, top_k=40, top_p=0.95, seed=7)  # flat enough to vary
    ort_tokens = generate(open_session(artifact, "ort"), [[5, 6, 7]], 20, sampler=cfg).tokens
    torch_tokens = generate(open_session(artifact, "torch"), [[5, 6, 7]], 20, sampler=cfg).tokens
    again = generate(open_session(artifact, "ort"), [[5, 6, 7]], 20, sampler=cfg).tokens
    other = generate(open_session(artifact, "ort"), [[5, 6, 7]], 20, sampler=SamplerConfig(temperature=20.0, seed=8)).tokens
    assert ort_tokens == torch_tokens == again
    assert other != ort_tokens


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _edit(artifact, change):
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _outside_link(artifact, rel):
    """``rel`` replaced by a link to an identical file outside the artifact: the hash still matches."""
    outside = artifact.parent / "outside.bin"
    shutil.copyfile(artifact / rel, outside)
    (artifact / rel).unlink()
    (artifact / rel).symlink_to(outside)


def _copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "copy")


@pytest.mark.parametrize("tamper, message", [
    (lambda a: _flip_last_byte(a / "onnx" / "decode.onnx"), "decode.onnx: sha256 does not match"),
    (lambda a: _flip_last_byte(a / "onnx" / "weights.safetensors"), "weights.safetensors: sha256 does not match"),
    (lambda a: (a / "onnx" / "weights.safetensors").unlink(), "weights.safetensors: missing"),
    (lambda a: (a / "onnx" / "extra.onnx").write_bytes(b"x"), "extra.onnx: not part of the artifact"),
    (lambda a: (a / "manifest.json").write_text("{"), "corrupt manifest"),
    (lambda a: (a / "manifest.json").write_text(
        (a / "manifest.json").read_text().replace('"schema_version": 2', '"schema_version": 99')), "schema version 99"),
    (lambda a: (a / "manifest.json").write_text(
        (a / "manifest.json").read_text().replace('"onnxruntime": "', '"onnxruntime": "0.0.')),
     "built with other tool versions: onnxruntime"),
    # an edited manifest cannot point a backend outside the artifact, nor at an unhashed file
    (lambda a: _edit(a, lambda m: m.update(weights="../other/onnx/weights.safetensors")), "points outside"),
    (lambda a: _edit(a, lambda m: m.update(weights="/etc/passwd")), "points outside"),
    (lambda a: _edit(a, lambda m: m["entry_points"]["decode"].update(onnx="onnx/../../x.onnx")), "points outside"),
    (lambda a: _edit(a, lambda m: m["files"].pop("onnx/decode.onnx") and (a / "onnx" / "decode.onnx").unlink()),
     "entry_points.decode.onnx names 'onnx/decode.onnx', which is not one of the artifact's files"),
    (lambda a: _outside_link(a, "onnx/decode.onnx"), "resolves outside the artifact"),
    # the config comes from the hashed config.json; an edit of the manifest's copy is refused
    (lambda a: _edit(a, lambda m: m["config"].update(eos_token_id=7)), "differs from config.json in eos_token_id"),
    (lambda a: _edit(a, lambda m: m.update(surprise=1)), "unknown field"),
    (lambda a: _edit(a, lambda m: m["entry_points"]["decode"].update(tokens="1")),
     r"entry_points.decode.tokens: expected int or null, got str"),
    (lambda a: _edit(a, lambda m: m["entry_points"]["decode"].pop("inputs")), "decode: missing 'inputs'"),
])
def test_tampered_artifacts_are_refused(artifact, tmp_path, tamper, message):
    copy = _copy(artifact, tmp_path)
    tamper(copy)
    with pytest.raises(ArtifactError, match=message):
        open_session(copy, "ort")


def test_export_is_atomic(ckpt, artifact, tmp_path, monkeypatch):
    import zaya_export.exporter as exporter

    before = {p.name: p.stat().st_mtime_ns for p in (artifact / "onnx").iterdir()}
    with pytest.raises(OutputError, match="already exists"):
        export_artifact(ckpt, artifact)

    calls = []

    def failing_save(model, path):
        calls.append(path)
        raise KeyboardInterrupt  # interrupted while writing the first graph

    monkeypatch.setattr(exporter, "save_entry", failing_save)
    with pytest.raises(KeyboardInterrupt):
        export_artifact(ckpt, tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        export_artifact(ckpt, artifact, force=True)
    assert calls and not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".artifact")]
    assert {p.name: p.stat().st_mtime_ns for p in (artifact / "onnx").iterdir()} == before
    open_artifact(artifact)


def test_cli_export_inspect_validate_bench_run(ckpt, artifact, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-artifact"
    result = runner.invoke(main, ["export", str(ckpt), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["entry_points"] == ["decode", "draft", "layers", "prefill", "step", "step_greedy",
                                                               "step_sample", "verify"]
    info = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).stdout)
    # the MoE reaches onnxruntime as its router op and one plain branch per expert (passes/moe_unroll)
    assert info["entry_points"]["decode"]["fused"] == {"zaya.CCA": 3, "zaya.BlockAttention": 3, "zaya.MoERouter": 3}
    result = runner.invoke(main, ["validate", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"]
    assert {p.name for p in (out / "report").iterdir()} == {"validation-ort-eager.json", "validation-ort-eager.md"}
    open_artifact(out)  # the report files are hashed into the manifest
    result = runner.invoke(main, ["bench", str(out), "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                                  "--json"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert bench["same_tokens"] and bench["decode_tok_per_s"]["ort"] > 0 and bench["speedup"]["ort"] > 0
    result = runner.invoke(main, ["bench", str(out), "--backend", "torch,ort", "--modes", "ar,tidar,tidar-fused",
                                  "--prompt-len", "8", "--new-tokens", "40", "--repeats", "1", "--w", "0", "--json"])
    assert result.exit_code == 0, result.output
    matrix = json.loads(result.stdout)
    for backend in ("torch", "ort"):
        rows = matrix[backend]["modes"]
        assert rows["ar"]["speedup_vs_ar"] == 1.0 and rows["tidar-fused"]["mean_accepted"] == 16
        assert rows["tidar-fused"]["forwards"] < rows["tidar"]["forwards"] < rows["ar"]["forwards"]
        assert all(r["speedup_vs_eager_ar"] > 0 for r in rows.values())
    assert matrix["torch"]["modes"]["ar"]["speedup_vs_eager_ar"] == 1.0
    result = runner.invoke(main, ["run", str(out), "--prompt-ids", "2,9,40", "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["backend"] == "ort"
    result = runner.invoke(main, ["run", str(ckpt), "--prompt-ids", "2,9", "--backend", "ort"])
    assert result.exit_code == 2 and "needs an exported artifact" in result.stderr


def test_validation_failure_exits_non_zero(artifact, tmp_path, monkeypatch):
    import zaya_export.validate as validate

    copy = _copy(artifact, tmp_path)
    monkeypatch.setitem(validate.TOLERANCES, "fp32", validate.Tolerance(0.0, 0.0, -1.0, 1.1, True))
    result = CliRunner().invoke(main, ["validate", str(copy)])
    assert result.exit_code == 1 and "validation failed" in result.stderr
    summary = open_artifact(copy).manifest.validation["validation-ort-eager"]
    assert summary["ok"] is False


def test_export_refuses_bad_input(ckpt, tmp_path):
    runner = CliRunner()
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    (broken / "config.json").write_text("{}")  # valid JSON, but the 8B default shapes do not match the weights
    result = runner.invoke(main, ["export", str(broken), "-o", str(tmp_path / "a")])
    assert result.exit_code == 2 and "error:" in result.stderr and not (tmp_path / "a").exists()
    result = runner.invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--format", "tflite"])
    assert result.exit_code == 2 and "unsupported --format tflite" in result.stderr
    result = runner.invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "c"), "--dump-after", "fuse_all"])
    assert result.exit_code == 2 and "unknown passes" in result.stderr


def test_other_levels_validate_against_their_own_step(ckpt, tmp_path):
    """An artifact exported with non-default --levels is checked against an eager step of the same layout (the
    eager reference used to build the default step, so every such artifact failed validation)."""
    out = tmp_path / "levels"
    manifest = export_artifact(ckpt, out, levels=(0, 2, 5), calibrate=0)
    assert manifest.tidar.levels == (0, 2, 5)
    report = validate_artifact(open_artifact(out))
    assert report["ok"], [c for c in report["entries"] if not c["ok"]]
    assert {c["entry"] for c in report["entries"]} >= {"step", "step_greedy", "step_sample"}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_narrow_weight_storage(ckpt, artifact, tmp_path, dtype):
    """--dtype bf16/fp16 stores the weights once at half the size; the graphs cast them and compute in fp32."""
    out = tmp_path / dtype
    manifest = export_artifact(ckpt, out, dtype=dtype, tidar="on" if dtype == "bf16" else "off")  # fp16: AR only
    assert (manifest.dtype, manifest.compute_dtype) == (dtype, "fp32")
    full = (artifact / "onnx" / "weights.safetensors").stat().st_size
    assert (out / "onnx" / "weights.safetensors").stat().st_size < 0.55 * full
    proto = onnx.load(str(out / "onnx" / "decode.onnx"), load_external_data=False)
    assert sum(n.op_type == "Cast" and n.input[0].endswith(".stored") for n in proto.graph.node) > 20
    art = open_artifact(out)
    own = validate_artifact(art)  # against its own (rounded) weights: fp32 tolerances
    assert own["ok"] and own["tolerance"]["logits_rtol"] == 2e-3
    source = validate_artifact(art, checkpoint=ckpt)  # against the fp32 source: the rounding shows
    assert source["ok"] and max(c["max_abs"] for c in source["entries"]) > 1e-4


def test_tidar_on_onnxruntime(artifact, model):
    """Greedy TiDAR over the ORT verify/draft graphs equals greedy AR; seeded stochastic TiDAR makes the same
    acceptance decisions as the eager backend."""
    from zaya_export.runtime.tidar import generate_tidar

    prompts = [[5, 9, 31, 200, 7, 7, 8], [44], [300, 301]]
    ort_session = open_session(artifact, "ort")
    assert ort_session.levels == (0, 6, 16)
    for fused in (False, True):
        greedy = generate_tidar(ort_session, prompts, 20, fused=fused)  # fused greedy: in-graph step_greedy
        assert greedy.tokens == generate_greedy(model, prompts, 20).tokens
        cfg = SamplerConfig(temperature=1.0, seed=3)
        got = generate_tidar(ort_session, prompts, 20, sampler=cfg, fused=fused)
        want = generate_tidar(Session.from_model(model), prompts, 20, sampler=cfg, fused=fused)
        assert (got.tokens, got.acceptance) == (want.tokens, want.acceptance)
        mixed = generate_tidar(ort_session, prompts, 20, w=0.0, fused=fused)
        assert mixed.mean_accepted == model.config.diffusion_block_len  # w = 0 accepts every draft
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt-ids", "5,9,31", "--mode", "tidar-fused",
                                       "--sampler", "mix", "--w", "0", "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "tidar-fused" and report["acceptance"][-1] == report["steps"]
    assert report["tokens_per_forward"] > 1
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt-ids", "5", "--sampler", "mix", "--mode", "ar"])
    assert result.exit_code == 2 and "needs --mode tidar" in result.stderr
    # --mode auto (the default) with logit mixing: a TiDAR mode, mixing is a TiDAR sampler
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt-ids", "5", "--sampler", "mix", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["mode"] in ("tidar", "tidar-fused")


def test_dump_after_any_phase(ckpt, tmp_path):
    """--dump-after takes every phase and every fusion pass; each dump is what that phase produced."""
    from zaya_export.exporter import PHASES

    dumps = tmp_path / "dumps"
    manifest = export_artifact(ckpt, tmp_path / "a", tidar="off", dump_dir=dumps,
                               dump_after=("prepare", "fuse_moe", "trace", "lower-onnx", "write", "lower-mlir"))
    names = sorted(p.name for p in dumps.iterdir())
    index = {name: i for i, (name, _) in enumerate(PHASES)}
    assert f"phase{index['prepare']}-prepare-prefill.txt" in names
    assert any(n.endswith("-fuse_moe.txt") for n in names)
    traced = (dumps / f"phase{index['trace']}-trace-prefill.txt").read_text()
    assert "zaya.moe_top1" in traced and "zaya.moe_top1" not in (
        dumps / f"phase{index['prepare']}-prepare-prefill.txt").read_text()
    assert "zaya.MoERouter" in (dumps / f"phase{index['lower-onnx']}-lower-onnx-decode.txt").read_text()
    written = json.loads((dumps / f"phase{index['write']}-write-manifest.txt").read_text())
    assert sorted(written["entry_points"]) == sorted(manifest.entry_points)
    assert "nothing to dump" in (dumps / f"phase{index['lower-mlir']}-lower-mlir.txt").read_text()
    with pytest.raises(ExportError, match="unknown passes or phases"):
        export_artifact(ckpt, tmp_path / "b", dump_after=("tracing",))
