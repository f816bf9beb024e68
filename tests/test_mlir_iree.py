"""MLIR/IREE path: one multi-entry module from the same fused programs as ONNX, compiled for the CPU and AMD GPUs,
run by the IREE backend and checked three ways (eager ↔ ORT ↔ IREE), plus ``--bisect``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_model, small_config
from zaya_export.runtime.artifact import open_artifact
from zaya_export.bisect import bisect, describe
from zaya_export.models.checkpoint import save_checkpoint
from zaya_export.models.entries import batch1_twin
from zaya_export.cli import main
from zaya_export.errors import InputError
from zaya_export.exporter import ExportError, export_artifact
from zaya_export.kernels.moe_top1 import moe_top1_gathered, moe_top1_selected, moe_top1_static
from zaya_export.kernels.registry import _conv1d, _softmax, _softmax_internal
from zaya_export.mlir_export import DATA_TILING_FLAGS, NARROW_PARAMETER_FLAGS, TARGETS, amd_archs_in, store_parameters
from zaya_export.models.folded_entry import FOLDED, folded_name
from zaya_export.runtime.cost_curve import entry_inputs
from zaya_export.runtime.generate import generate, generate_greedy
from zaya_export.runtime.device_cache import DeviceKVCache
from zaya_export.runtime.sampling import SamplerConfig
from zaya_export.runtime.session import KVCache, Session
from zaya_export.sources import open_session
from zaya_export.runtime.tidar import generate_tidar
from zaya_export.models.ingraph_step import first_argmax
from zaya_export.validate import cross_check, validate_artifact

# CDNA3 and RDNA3 (gfx90a, CDNA2, compiles through the same HIP path; left out to keep the suite's time)
GPU_TARGETS = ("gfx942", "gfx1100")


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=8),
                        seed=5)


FOLDED_FUNCTIONS = {folded_name(c, e) for c, forwards in FOLDED.items() for e in forwards}


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("mlir") / "ckpt")
    out = ckpt.parent / "artifact"
    export_artifact(ckpt, out, formats=("onnx", "mlir"), targets=tuple(TARGETS[t] for t in ("cpu", *GPU_TARGETS)))
    return out


# ------------------------------------------------------------------------------------------ MLIR faces (unit)
@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 3), groups=st.sampled_from([1, 2, 6]), k=st.integers(1, 3), W=st.integers(3, 9),
       bias=st.booleans())
def test_conv1d_decomposition_equals_conv1d(N, groups, k, W, bias):
    g = torch.Generator().manual_seed(N * 100 + W * 10 + k)
    C = 12
    x, w = torch.randn(N, C, W, generator=g), torch.randn(C, C // groups, k, generator=g)
    b = torch.randn(C, generator=g) if bias else None
    torch.testing.assert_close(_conv1d(x, w, b, groups=groups), F.conv1d(x, w, b, groups=groups), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(1, 1), (3, 7), (2, 2, 5, 33)]), scale=st.sampled_from([1.0, 100.0]),
       masked=st.booleans(), half=st.booleans())
def test_softmax_decomposition_equals_softmax(shape, scale, masked, half):
    """The MLIR path's softmax (ops apart, so IREE does not raise it to its slow fused softmax): the same values
    to rounding, at logit scale ~100, on rows masked with the dtype's minimum (all-masked rows uniform) and on
    fp16 input widened to fp32 as attention does."""
    g = torch.Generator().manual_seed(len(shape) * 10 + int(scale))
    x = torch.randn(shape, generator=g) * scale
    if masked:
        x[..., : shape[-1] // 2 + 1] = torch.finfo(x.dtype).min  # a row whose every key is masked when width 1
        x.view(-1, shape[-1])[0] = torch.finfo(x.dtype).min
    if half:
        x = x.clamp(-6e4, 6e4).half()
        torch.testing.assert_close(_softmax(x, -1, torch.float32), torch.softmax(x, -1, dtype=torch.float32))
        torch.testing.assert_close(_softmax_internal(x, -1, True), torch.softmax(x.float(), -1))
    else:
        torch.testing.assert_close(_softmax(x, -1), torch.softmax(x, -1))


def test_static_moe_equals_sparse_moe(model):
    layer = model.model.layers[1].mlp  # with EDA
    gate, ex = layer.gate, layer.experts
    x, prev = torch.randn(11, model.config.hidden_size), torch.randn(11, model.config.router_hidden_size)
    mlp = gate.router_mlp
    args = (x, prev, gate.down_proj.weight, gate.down_proj.bias, gate.router_states_scale, mlp.norm.weight,
            mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.out_proj.weight, gate.balancing_biases,
            ex.gate_up_proj, ex.down_proj, model.config.rms_norm_eps)
    with torch.no_grad():
        out, state = layer(x[None], prev)  # the reference model's sparse (data-dependent) MoE
        for face in (moe_top1_static, moe_top1_gathered):
            got_out, got_state = face(*args)
            torch.testing.assert_close(got_out, out[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_state, state, atol=1e-5, rtol=1e-5)
        for row in range(len(x)):  # one token: the selected expert read in place (the batch-1 decode face)
            got_out, got_state = moe_top1_selected(x[row:row + 1], prev[row:row + 1], *args[2:])
            torch.testing.assert_close(got_out[0], out[0, row], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_state[0], state[row], atol=1e-5, rtol=1e-5)
        # the skip class (bias it to win everywhere) gives zero output in every face
        skip = args[:11] + (gate.balancing_biases + torch.eye(len(gate.balancing_biases))[-1] * 100,) + args[12:]
        for face in (moe_top1_static, moe_top1_gathered):
            assert face(*skip)[0].abs().max() == 0
        assert moe_top1_selected(x[:1], prev[:1], *skip[2:])[0].abs().max() == 0


def test_first_argmax_is_argmax_with_ties():
    x = torch.randn(3, 5, 40)
    x[0, 0, 7] = x[0, 0, 3] = 100.0  # a tie: the first index wins, as in torch.argmax
    assert torch.equal(first_argmax(x), x.argmax(-1)) and first_argmax(x)[0, 0] == 3


# ------------------------------------------------------------------------------------------ the artifact
def test_module_has_every_entry_and_external_weights(artifact):
    art = open_artifact(artifact)
    m = art.manifest
    assert m.formats == ("onnx", "mlir")
    fixed = {"decode", "verify", "draft", "step", "step_greedy", "step_sample", *FOLDED_FUNCTIONS}
    assert set(m.mlir.ops_per_entry) == {"prefill", "layers", "commit", "commit_accepted", *fixed,
                                         *map(batch1_twin, fixed)}
    assert set(m.mlir.state_entries) == {"commit", "commit_accepted", *FOLDED_FUNCTIONS}
    assert m.mlir.state_entries["commit_then_decode"].output_names == ["logits", "new_k", "new_v", "conv_rows", "omega"]
    assert m.mlir.state_entries["commit_then_draft"].output_names == ["logits"]
    text = (artifact / m.mlir.module).read_text()
    # weights are named external parameters, not inlined constants: the module is small
    assert '#flow.parameter.named<"model"::"model.embed_tokens.weight">' in text
    assert (artifact / m.mlir.module).stat().st_size < (artifact / m.weights).stat().st_size * 3
    assert "dense_resource<torch_tensor_1024_128" not in text
    assert "torch.aten.softmax" not in text and "torch.aten._softmax" not in text  # ops apart (registry._softmax)
    for target in ("cpu", *GPU_TARGETS):
        assert m.iree[target].flags[0] == "--iree-input-type=torch"
        # data-tiled matmuls on the CPU only (fp32 parameters here: packed once, at load)
        assert all(f in m.iree[target].flags for f in DATA_TILING_FLAGS) == (target == "cpu"), target
    assert m.versions["iree-base-compiler"] and m.versions["iree-turbine"]


def test_gpu_modules_contain_amd_code_objects_for_their_arch(artifact):
    m = open_artifact(artifact).manifest
    for target in GPU_TARGETS:
        archs = amd_archs_in(artifact / m.iree[target].vmfb)
        assert archs and set(archs) == {target}, (target, archs)
    assert amd_archs_in(artifact / m.iree["cpu"].vmfb) == []
    info = json.loads(CliRunner().invoke(main, ["inspect", str(artifact), "--json"]).stdout)
    assert all(info["iree"][t]["archs_ok"] and info["iree"][t]["amd_archs_found"] == [t] for t in GPU_TARGETS)
    assert info["iree"]["cpu"]["archs_ok"] and info["iree"]["cpu"]["bytes"] > 0


def test_iree_cpu_matches_eager_and_ort(artifact):
    art = open_artifact(artifact)
    report = validate_artifact(art, backend="iree")
    assert report["ok"], [c for c in report["entries"] + report["greedy"] + report["tidar"] if not c["ok"]]
    assert max(c["max_abs"] for c in report["entries"]) <= 1e-4
    entries = {c["entry"] for c in report["entries"]}
    assert entries == {"prefill", "decode", "verify", "draft", "step", "step_greedy", "step_sample"}
    cross = cross_check(art, ["ort", "iree"])
    assert cross and all(c["ok"] for c in cross), cross
    assert all(c["max_abs"]["logits"] <= 1e-4 for c in cross if "logits" in c["max_abs"])


def test_batch1_twins_compute_what_the_dynamic_entries_compute(artifact):
    """One sequence runs each fixed-length entry's batch-1 twin; it must give the dynamic function's outputs."""
    iree = open_session(artifact, backend="iree", state_on_device=False)
    backend = iree.backend
    forwards = {"decode", "verify", "draft", "step", "step_greedy", "step_sample"}
    assert backend.twins == forwards | FOLDED_FUNCTIONS  # the folded ones: test_commits_wait_for_the_next_forward
    cache = iree.new_cache(1, 40)
    cache.commit(iree.run("prefill", cache.inputs(np.array([[2, 17, 301, 44, 9, 12]]))))
    for entry in sorted(forwards):
        inputs = entry_inputs(iree, cache, entry, backend.entries[entry].tokens)
        twin = backend.run(entry, inputs)  # batch 1: the twin
        spec = backend.entries[entry]
        dynamic = getattr(backend.module, entry)(*[np.ascontiguousarray(inputs[n]) for n in spec.input_names])
        for name, want in zip(spec.output_names, dynamic if isinstance(dynamic, (list, tuple)) else [dynamic]):
            want, got = np.asarray(want.to_host() if hasattr(want, "to_host") else want), twin[name]
            assert got.shape == want.shape and got.dtype == want.dtype, (entry, name)
            if np.issubdtype(want.dtype, np.floating):
                scale = max(1.0, float(np.abs(want).max()))
                assert np.abs(got - want).max() <= 1e-5 * scale, (entry, name)
            else:
                assert np.array_equal(got, want), (entry, name)
    assert not hasattr(backend.module, batch1_twin("prefill"))  # a dynamic length keeps one function


def test_auto_device_is_one_thread_for_a_small_model(artifact, monkeypatch):
    from zaya_export.runtime import backends

    assert open_session(artifact, backend="iree").backend.device == "local-sync"  # a few MB of weights
    assert open_session(artifact, backend="iree", device="local-task").backend.device == "local-task"
    monkeypatch.setattr(backends, "SYNC_BELOW_BYTES", 0)  # as if the weights were large
    assert open_session(artifact, backend="iree").backend.device == "local-task"


def test_iree_greedy_tokens_equal_eager_and_ort_ar_and_tidar(artifact, model):
    iree, ort = open_session(artifact, backend="iree"), open_session(artifact, backend="ort")
    prompts = [[2, 17, 301, 44, 9], [5], [2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    for p in prompts:
        want = generate_greedy(model, [p], 20).tokens[0]
        assert generate(iree, [p], 20).tokens[0] == want == generate(ort, [p], 20).tokens[0]
        for fused in (False, True):
            assert generate_tidar(iree, [p], 20, fused=fused).tokens[0] == want
    batch = generate(iree, prompts, 12).tokens  # batch > 1 with left padding
    assert batch == [generate_greedy(model, [p], 12).tokens[0] for p in prompts]


def test_state_stays_on_the_device_and_commits_like_the_host_cache(artifact, model):
    import iree.runtime as rt

    iree = open_session(artifact, backend="iree")
    host = open_session(artifact, backend="iree", state_on_device=False)
    dev, ref = iree.new_cache(2, 24), host.new_cache(2, 24)
    assert isinstance(dev, DeviceKVCache) and isinstance(ref, KVCache)
    prompt, mask = np.array([[0, 0, 7, 9], [3, 4, 5, 6]]), np.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
    block = np.arange(2 * (model.config.diffusion_block_len + 1)).reshape(2, -1) + 11  # anchor + K drafts
    calls = [("prefill", prompt, mask, None), ("decode", prompt[:, -1:], None, None),
             ("verify", block, None, np.array([2, 0])), ("verify", block, None, np.array([1, 3]))]
    for entry, ids, m, counts in calls:
        out = iree.run(entry, dev.inputs(ids, m))
        # the state outputs never come to the host; logits do
        assert isinstance(out["new_k"], rt.DeviceArray) and isinstance(out["logits"], np.ndarray)
        want = host.run(entry, ref.inputs(ids, m))
        assert np.abs(out["logits"] - want["logits"]).max() <= 1e-5
        dev.commit(out, counts=counts, mask=m)
        ref.commit(want, counts=counts, mask=m)
        got = dev.to_host()
        assert np.array_equal(got.lengths, ref.lengths) and np.array_equal(got.valid, ref.valid)
        for b, n in enumerate(ref.lengths.tolist()):
            assert np.abs(got.k[:, b, :, :n] - ref.k[:, b, :, :n]).max() <= 1e-5
            assert np.abs(got.v[:, b, :, :n] - ref.v[:, b, :, :n]).max() <= 1e-5
        assert np.abs(got.conv - ref.conv).max() <= 1e-5 and np.abs(got.rho - ref.rho).max() <= 1e-5
    with pytest.raises(ValueError, match="cache full"):  # 8 committed + K+1 > 24
        dev.commit(iree.run("verify", dev.inputs(block)))
    # whole decodes: device state and host state make the same decisions, sampled TiDAR included
    sampler = SamplerConfig(temperature=0.8, top_k=20, seed=3)
    prompts = [[2, 17, 301, 44, 9], [5, 6]]
    for fused in (False, True):
        assert (generate_tidar(iree, prompts, 16, sampler=sampler, fused=fused).tokens
                == generate_tidar(host, prompts, 16, sampler=sampler, fused=fused).tokens)


def test_commits_wait_for_the_next_forward(artifact, model):
    """On the device, a commit runs inside the next forward where the module has that forward folded with it
    (``commit_then_decode``, ``commit_then_draft``), else as its own call before it; either way every forward
    sees the state the host cache gives it, and the state read back at the end is the host's."""
    iree = open_session(artifact, backend="iree")
    host = open_session(artifact, backend="iree", state_on_device=False)
    called: list[str] = []
    run = iree.backend.run
    iree.backend.run = lambda entry, inputs: called.append(entry) or run(entry, inputs)
    dev, ref = iree.new_cache(2, 40), host.new_cache(2, 40)
    prompt, mask = np.array([[0, 0, 7, 9], [3, 4, 5, 6]]), np.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
    block = np.arange(2 * (model.config.diffusion_block_len + 1)).reshape(2, -1) + 11
    calls = [("prefill", prompt, mask, None), ("decode", prompt[:, -1:], None, None),
             ("decode", prompt[:, :1], None, None), ("verify", block, None, np.array([2, 0])),
             ("draft", block, None, None), ("verify", block, None, np.array([1, 3])),
             ("decode", block[:, :1], None, None)]
    for entry, ids, m, counts in calls:
        out, want = iree.run(entry, dev.inputs(ids, m)), host.run(entry, ref.inputs(ids, m))
        assert np.abs(out["logits"] - want["logits"]).max() <= 1e-5 * max(1.0, float(np.abs(want["logits"]).max()))
        if "new_k" in want:
            dev.commit(out, counts=counts, mask=m)
            ref.commit(want, counts=counts, mask=m)
    assert called == ["prefill", "decode", "commit_then_decode", "decode", "commit_then_decode", "verify",
                      "commit", "verify", "draft", "commit_then_draft", "verify", "decode", "commit_then_decode"]
    got = dev.to_host()
    assert called[-1] == "commit"  # the last commit waited for a forward that never came: to_host ran it
    assert np.array_equal(got.lengths, ref.lengths) and np.array_equal(got.valid, ref.valid)
    for b, n in enumerate(ref.lengths.tolist()):
        assert np.abs(got.k[:, b, :, :n] - ref.k[:, b, :, :n]).max() <= 1e-5
    assert np.abs(got.conv - ref.conv).max() <= 1e-5 and np.abs(got.rho - ref.rho).max() <= 1e-5


def test_bisect_names_the_first_divergent_layer_and_op(model, artifact):
    base = Session.from_model(model)
    assert not bisect(base, open_session(artifact, backend="iree"), model)["diverged"]
    for layer, attr, region in ((1, "experts", "MoE"), (0, "o_proj", "attention")):
        broken = random_model(model.config, seed=5)
        with torch.no_grad():
            if attr == "experts":
                broken.model.layers[layer].mlp.experts.down_proj.mul_(1.01)
            else:
                broken.model.layers[layer].self_attn.o_proj.weight.mul_(1.01)
        result = bisect(base, Session.from_model(broken), model)
        assert result["diverged"] and result["first"]["layer"] == layer and region in result["first"]["region"]
        assert f"layer {layer} {region}" in describe(result)


def test_cli_three_way_validate_and_bench(artifact):
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(artifact), "--backend", "ort,iree", "--bisect", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["ok"] and len(out["reports"]) == 2 and {c["pair"] for c in out["cross"]} == {"ort-iree"}
    assert [b["backends"] for b in out["bisect"]] == [["torch", "ort"], ["torch", "iree"], ["ort", "iree"]]
    assert not any(b["diverged"] for b in out["bisect"])
    result = runner.invoke(main, ["bench", str(artifact), "--backend", "ort,iree,iree-host", "--prompt-len", "8",
                                  "--new-tokens", "4", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.stdout)
    assert bench["same_tokens"] and set(bench["speedup"]) == {"ort", "iree", "iree-host"}
    result = runner.invoke(main, ["run", str(artifact), "--backend", "iree", "--prompt-ids", "2,9,40",
                                  "--max-new-tokens", "6", "--mode", "tidar-fused", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["backend"] == "iree"
    # the cost curve and --mode auto on IREE (device-resident state, in-place commits)
    result = runner.invoke(main, ["bench", str(artifact), "--backend", "iree", "--entries", "--prompt-len", "8",
                                  "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    curve = json.loads(result.stdout)["iree"]
    assert {r["entry"] for r in curve["rows"]} >= {"prefill", "decode", "verify", "draft", "step_greedy", "commit"}
    assert curve["commit_folded"] is True  # the loops commit inside commit_then_decode / commit_then_draft
    result = runner.invoke(main, ["run", str(artifact), "--backend", "iree", "--prompt-ids", "2,9,40",
                                  "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    # which mode wins depends on this machine's load (a random model's output repeats itself, so lookup drafts
    # are accepted); the run follows the fastest prediction from IREE's own entry costs
    report = json.loads(result.stdout)
    predicted, chosen = report["auto"]["predicted"], report["auto"]["chosen"]
    assert report["auto"]["reason"] == "cost model" and set(predicted) == {"ar", "tidar", "tidar-fused"}
    fastest = max(p["tok_per_s"] for p in predicted.values())
    assert report["mode"] == chosen and predicted[chosen]["tok_per_s"] == fastest


def test_hip_without_driver_fails_clearly(artifact):
    with pytest.raises(InputError, match="hip.*not available|libamdhip64"):
        open_session(artifact, backend="iree", device="hip")
    result = CliRunner().invoke(main, ["run", str(artifact), "--backend", "iree", "--device", "hip",
                                       "--prompt-ids", "2,9"])
    assert result.exit_code == 2 and "hip" in result.stderr and "Traceback" not in result.output


def test_bad_mlir_requests_fail_clearly(artifact, tmp_path):
    ckpt = open_artifact(artifact).root.parent / "ckpt"
    with pytest.raises(ExportError, match="group-size"):
        export_artifact(ckpt, tmp_path / "a", quant="int8", group_size=48, formats=("onnx", "mlir"))
    with pytest.raises(ExportError, match="unsupported --format"):
        export_artifact(ckpt, tmp_path / "b", formats=("tflite",))
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "c"), "--format", "onnx,mlir",
                                       "--target", "cpu,gfx9000"])
    assert result.exit_code == 2 and "unknown IREE target" in result.stderr
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "d"), "--target", "cpu"])
    assert result.exit_code == 2 and "add mlir to --format" in result.stderr
    onnx_only = tmp_path / "onnx-only"
    export_artifact(ckpt, onnx_only, tidar="off", calibrate=0)  # the smallest ONNX-only artifact
    with pytest.raises(InputError, match="no IREE module"):
        open_session(onnx_only, backend="iree")
    assert not np.any([(tmp_path / n).exists() for n in ("a", "b", "c", "d")])


def test_bf16_weights_are_read_in_place_and_widened_in_the_module(model, tmp_path):
    """--dtype bf16 with MLIR: the parameters are bf16 globals over the one weight file, widened where they are
    read; IREE equals the eager model (on the bf16-rounded weights) and onnxruntime. AR entries only: the TiDAR
    ones read the same globals the same way (and their compile would double this test's time)."""
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "art"
    export_artifact(ckpt, out, dtype="bf16", formats=("onnx", "mlir"), calibrate=0, tidar="off")
    art = open_artifact(out)
    text = (out / art.manifest.mlir.module).read_text()
    assert ('#flow.parameter.named<"model"::"model.embed_tokens.weight"> : tensor<1024x128xbf16>' in text)
    bias = "model.layers.0.mlp.gate.balancing_biases"  # routing biases stay fp32 in the file and the module
    assert f'"model"::"{bias}"> : tensor<' in text and "xf32>" in text.split(f'"model"::"{bias}">')[1].split("\n")[0]
    assert text.count("arith.extf") >= text.count("xbf16> to tensor<")  > 50
    assert set(NARROW_PARAMETER_FLAGS) <= set(art.manifest.iree["cpu"].flags)
    assert not set(DATA_TILING_FLAGS) & set(art.manifest.iree["cpu"].flags)  # packing would run on every call
    report = validate_artifact(art, backend="iree")
    assert report["ok"], [c for c in report["entries"] + report["greedy"] + report["tidar"] if not c["ok"]]
    assert max(c["max_rel"] for c in report["entries"]) <= 1e-5  # fp32 compute on the stored values
    cross = cross_check(art, ["ort", "iree"])
    assert cross and all(c["ok"] for c in cross), cross


def test_store_parameters_retypes_every_read_or_refuses(tmp_path):
    path = tmp_path / "m.mlir"
    path.write_text(
        '  util.global private @__auto.w = #flow.parameter.named<"model"::"w"> : tensor<4x2xf32>\n'
        '  util.global private @__auto.s = #flow.parameter.named<"model"::"s"> : tensor<f32>\n'
        '    %__auto.w = util.global.load @__auto.w : tensor<4x2xf32>\n'
        '    %__auto.w_0 = util.global.load @__auto.w : tensor<4x2xf32>\n'
        '    %__auto.s = util.global.load @__auto.s : tensor<f32>\n')
    assert store_parameters(path, {"w": "F16", "s": "BF16"}) == 2
    text = path.read_text()
    assert "tensor<4x2xf16>\n" in text and "tensor<bf16>\n" in text
    assert "%__auto.w_0 = arith.extf %__auto.w_0.stored : tensor<4x2xf16> to tensor<4x2xf32>" in text
    assert "%__auto.s = arith.extf %__auto.s.stored : tensor<bf16> to tensor<f32>" in text
    assert store_parameters(path, {}) == 0  # fp32 (or absent): untouched
    path.write_text('  util.global private @__auto.w = #flow.parameter.named<"model"::"w"> : tensor<4xf32>\n'
                    '    %x = util.global.load immutable @__auto.w : tensor<4xf32>\n')
    with pytest.raises(RuntimeError, match="does not rewrite"):
        store_parameters(path, {"w": "BF16"})
