"""The cost model behind ``run --mode auto`` and ``bench``: the measured cost curve (every entry, prefill over
token counts, the commit), predictions from it and an acceptance histogram, the export's calibration (what it
holds, refusals of a bad one), the mode ``auto`` picks, and ``bench --entries`` (table, JSON, plot)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_model, small_config
from zaya_export.cli import main
from zaya_export.exporter import export_artifact
from zaya_export.models.checkpoint import save_checkpoint
from zaya_export.runtime.artifact import ArtifactError, open_artifact, write_manifest
from zaya_export.runtime.calibration import CALIBRATION_FILE, Calibration
from zaya_export.runtime.cost_curve import CostCurve, measure, token_counts
from zaya_export.runtime.costmodel import auto_mode, choose, mean_accepted, predict
from zaya_export.runtime.session import Session

K = 4


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model = random_model(small_config(diffusion_block_len=K), seed=5)
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("cost") / "ckpt")
    out = ckpt.parent / "artifact"
    export_artifact(ckpt, out, levels=(0, 2, K))
    return out


def _curve(decode=2.0, verify=3.0, draft=3.0, step=5.0, commit=0.1) -> CostCurve:
    return CostCurve("ort", {}, prefill={1: 2.0, 8: 4.0}, entries={"decode": decode, "verify": verify,
                     "draft": draft, "step": step, "step_greedy": step},
                     tokens={"decode": 1, "verify": K + 1, "draft": K + 1, "step": 4 * (K + 1),
                             "step_greedy": 4 * (K + 1)}, commit={1: commit, K + 1: commit})


def test_token_counts():
    assert token_counts(1) == [1]
    assert token_counts(68) == [1, 2, 4, 8, 16, 32, 64, 68]
    assert token_counts(64) == [1, 2, 4, 8, 16, 32, 64]


def test_predictions_follow_the_step_arithmetic():
    curve = _curve()
    hist = [0] * K + [10]  # every step accepts all K drafts
    p = predict(curve, {"tidar": hist, "tidar-fused": [10] + [0] * K}, prompt_len=8, new_tokens=33)
    assert mean_accepted(hist) == K and mean_accepted([0] * (K + 1)) == 0.0
    # AR: prefill 4 ms, then 32 decode steps of 2.1 ms
    assert p["ar"].tok_per_s == pytest.approx(33 / (4.0 + 32 * 2.1) * 1e3)
    assert p["ar"].tokens_per_forward == pytest.approx(33 / 33)
    # two-forward TiDAR: the first draft, then 32/(K+1) steps of verify + draft + commit
    assert p["tidar"].step_ms == pytest.approx(6.1) and p["tidar"].tokens_per_step == K + 1
    assert p["tidar"].tok_per_s == pytest.approx(33 / (4.0 + 3.0 + 32 / (K + 1) * 6.1) * 1e3)
    # fused with nothing accepted: one token per 5.1 ms step, slower than AR
    assert p["tidar-fused"].tok_per_s < p["ar"].tok_per_s
    assert choose(p).mode == "tidar"
    assert choose(predict(curve, {"tidar": [10] + [0] * K}, 8, 33)).mode == "ar"


def test_noise_below_decode_cannot_pick_tidar_without_acceptance():
    """A shared CPU can time a multi-token forward (or a TiDAR loop's host work) below a one-token decode's; the
    model counts each at least as much as decode's, so with nothing accepted AR wins however the noise fell."""
    curve = _curve(decode=2.0, verify=0.5, draft=0.5, step=0.7)
    curve.host.update({"ar": 3.0, "tidar": 0.2, "tidar-fused": 0.2})
    nothing = [10] + [0] * K
    p = predict(curve, {"tidar": nothing, "tidar-fused": nothing}, prompt_len=8, new_tokens=33)
    assert p["tidar"].step_ms == pytest.approx(2.0 + 2.0 + 3.0) and p["tidar-fused"].step_ms == pytest.approx(5.0)
    assert choose(p).mode == "ar"
    everything = [0] * K + [10]  # with every draft accepted the floored costs still let TiDAR win
    assert choose(predict(curve, {"tidar": everything}, prompt_len=8, new_tokens=33)).mode == "tidar"


def test_prefill_extrapolates_and_ties_go_to_ar():
    curve = _curve(verify=1.0, draft=1.0)
    long = predict(curve, {}, prompt_len=16, new_tokens=2)["ar"]  # prefill 16: 4 + 8 * (2/7) ms
    assert long.tok_per_s == pytest.approx(2 / (4.0 + 8 * 2 / 7 + 2.1) * 1e3)
    same = {"ar": long, "tidar": type(long)("tidar", 1, 1, 1, long.tok_per_s)}
    assert choose(same).mode == "ar"


def test_export_writes_a_calibration(artifact):
    art = open_artifact(artifact)
    cal = art.calibration
    assert cal is not None and cal.source == "random ids" and cal.prompts == 4 and cal.new_tokens == 64
    assert set(cal.acceptance) == {"tidar", "tidar-fused"}
    for hist in cal.acceptance.values():
        assert len(hist) == K + 1 and sum(hist) > 0


@pytest.mark.parametrize("bad", [
    {"acceptance": {"tidar": [1] * K}, "prompts": 1, "new_tokens": 1, "source": "x"},  # wrong length
    {"acceptance": {"tidar": [1] * K + [-1]}, "prompts": 1, "new_tokens": 1, "source": "x"},
    {"acceptance": {"tidar": [True] * (K + 1)}, "prompts": 1, "new_tokens": 1, "source": "x"},
    {"acceptance": {"ar": [1] * (K + 1)}, "prompts": 1, "new_tokens": 1, "source": "x"},
    {"acceptance": {}, "prompts": -1, "new_tokens": 1, "source": "x"},
    {"acceptance": {}, "prompts": 1, "new_tokens": 1, "source": "x", "extra": 1},
    [1, 2],
])
def test_bad_calibration_is_refused(bad):
    with pytest.raises(ValueError):
        Calibration.from_json(bad, K)


def test_rehashed_bad_calibration_is_refused_at_use(artifact, tmp_path):
    import shutil

    from zaya_export.runtime.artifact import sha256

    copy = tmp_path / "a"
    shutil.copytree(artifact, copy)
    (copy / CALIBRATION_FILE).write_text(json.dumps({"acceptance": {"tidar": [1]}, "prompts": 1,
                                                     "new_tokens": 1, "source": "x"}))
    art = open_artifact(copy, verify=False)
    art.manifest.files[CALIBRATION_FILE] = sha256(copy / CALIBRATION_FILE)
    write_manifest(copy, art.manifest)
    with pytest.raises(ArtifactError, match="invalid calibration"):
        open_artifact(copy).calibration
    result = CliRunner().invoke(main, ["run", str(copy), "--prompt-ids", "5,6,7"])
    assert result.exit_code == 2 and "invalid calibration" in result.output


def test_cost_curve_times_every_entry(artifact):
    session = Session.from_artifact(open_artifact(artifact), "ort")
    curve = measure(session, context=8, repeats=2)
    assert set(curve.entries) == {"decode", "verify", "draft", "step", "step_greedy", "step_sample"}
    assert curve.tokens["verify"] == K + 1 and curve.tokens["step"] == (K + 1) * 4
    assert sorted(curve.prefill) == token_counts((K + 1) * 4) and sorted(curve.commit) == [1, K // 2 + 1, K + 1]
    assert all(ms > 0 for ms in [*curve.entries.values(), *curve.prefill.values(), *curve.commit.values()])
    assert set(curve.threads.values()) == {session.backend.entry_threads("decode")}  # one shared pool
    rows = curve.rows()
    assert [r["vs_decode"] for r in rows if r["entry"] == "decode"] == [1.0]


def test_auto_follows_the_calibration(artifact):
    art = open_artifact(artifact)
    session = Session.from_artifact(art, "ort")
    # timed on this machine, the choice is the fastest prediction (which one depends on the machine's load)
    mode, predicted, why = auto_mode(session, art.calibration, 8, 64, greedy=True)
    assert why == "cost model" and set(predicted) == {"ar", "tidar", "tidar-fused"}
    assert mode == choose(predicted).mode
    # drafts almost never accepted (a random model's drafter alone): where a multi-token forward costs 1.5
    # decodes and more, as on any real model, TiDAR cannot pay
    nothing = Calibration({"tidar": [50] + [1] + [0] * (K - 1), "tidar-fused": [50] + [1] + [0] * (K - 1)}, 4, 64,
                          "test")
    assert auto_mode(session, nothing, 8, 64, greedy=True, curve=_curve())[0] == "ar"
    # drafts always accepted, on a machine where a (K+1)-token forward costs 1.5 decodes: TiDAR pays. (The
    # measured curve is not used here: on a loaded machine one timing spike can flip any decision.)
    perfect = Calibration({"tidar": [0] * K + [10], "tidar-fused": [0] * K + [10]}, 1, 64, "test")
    mode, predicted, why = auto_mode(session, perfect, 8, 64, greedy=True, curve=_curve(verify=3.0, draft=3.0))
    assert mode in ("tidar", "tidar-fused") and predicted[mode].tok_per_s > predicted["ar"].tok_per_s
    assert why == "cost model"
    # the same acceptance where multi-token forwards cost 4 decodes each: AR stays faster
    slow = _curve(verify=8.0, draft=8.0, step=40.0)
    assert auto_mode(session, perfect, 8, 64, greedy=True, curve=slow)[0] == "ar"
    assert auto_mode(session, None, 8, 64, greedy=True)[0] == "ar"
    assert auto_mode(session, None, 8, 64, greedy=True, w=0.5)[0] == "tidar"  # mixing is a TiDAR sampler


def test_run_auto_reports_its_choice(artifact):
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt-ids", "5,6,7", "--max-new-tokens", "8",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    predicted = report["auto"]["predicted"]
    assert set(predicted) == {"ar", "tidar", "tidar-fused"} and report["auto"]["reason"] == "cost model"
    # which mode is fastest depends on this machine's load; the run follows the fastest prediction
    chosen = report["auto"]["chosen"]
    assert report["mode"] == chosen and predicted[chosen]["tok_per_s"] == max(p["tok_per_s"] for p in predicted.values())
    assert len(report["tokens"]) == 8 and (report["forwards"] == 8 if chosen == "ar" else report["forwards"] <= 8)
    # a TiDAR mode asked for explicitly still runs
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt-ids", "5,6,7", "--max-new-tokens", "8",
                                       "--mode", "tidar", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["mode"] == "tidar"


def test_bench_entries_table_json_and_plot(artifact, tmp_path):
    plot = tmp_path / "not-yet" / "entries.png"  # a folder that does not exist yet is made
    result = CliRunner().invoke(main, ["bench", str(artifact), "--entries", "--prompt-len", "8", "--repeats", "1",
                                       "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "verify" in result.output and "x decode" in result.output and "host/tidar" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(main, ["bench", str(artifact), "--entries", "--prompt-len", "8", "--repeats", "1",
                                       "--json"])
    rows = json.loads(result.output)["ort"]["rows"]
    assert {r["entry"] for r in rows} >= {"prefill", "decode", "verify", "draft", "step", "commit"}
    assert set(json.loads(result.output)["ort"]["host_ms_per_step"]) == {"ar", "tidar", "tidar-fused"}
    assert json.loads(result.output)["ort"]["commit_folded"] is False  # onnxruntime commits on the host
    for args in (["--plot", str(plot)], ["--entries", "--modes", "ar"]):
        bad = CliRunner().invoke(main, ["bench", str(artifact), *args])
        assert bad.exit_code == 2 and "error:" in bad.output


def test_bench_modes_prints_predictions(artifact):
    result = CliRunner().invoke(main, ["bench", str(artifact), "--modes", "ar,tidar,tidar-fused", "--prompt-len",
                                       "8", "--new-tokens", "16", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)["ort"]
    for mode, row in res["modes"].items():
        assert row["predicted_tok_per_s"] > 0 and np.isfinite(row["prediction_error"])
    assert res["auto"]["reason"] == "cost model" and res["auto"]["chosen"] in res["modes"]
    # this random model's greedy output repeats itself at once: lookup drafts are accepted, its drafter's are not
    assert res["lookup"] and res["modes"]["tidar"]["mean_accepted"] >= 2
    result = CliRunner().invoke(main, ["bench", str(artifact), "--modes", "tidar", "--prompt-len", "8",
                                       "--new-tokens", "16", "--repeats", "1", "--no-lookup", "--json"])
    res = json.loads(result.output)["ort"]
    assert not res["lookup"] and res["modes"]["tidar"]["mean_accepted"] < 1


def test_bench_interleaves_every_backend_and_mode_per_repeat(artifact, monkeypatch):
    """A drifting machine speed must land on every row alike: one warm-up round, then each repeat runs every
    (backend, mode) once, instead of one backend's repeats back to back."""
    import zaya_export.bench as bench

    calls, real_ar, real_tidar = [], bench.generate, bench.generate_tidar

    def ar(session, *args, **kwargs):
        calls.append((session.backend.name, "ar"))
        return real_ar(session, *args, **kwargs)

    def tidar(session, *args, fused, **kwargs):
        calls.append((session.backend.name, "tidar-fused" if fused else "tidar"))
        return real_tidar(session, *args, fused=fused, **kwargs)

    monkeypatch.setattr(bench, "generate", ar)
    monkeypatch.setattr(bench, "generate_tidar", tidar)
    res = bench.bench_matrix(open_artifact(artifact), ("ort", "torch"), 8, 12, repeats=2, modes=("ar", "tidar"))
    keys = [("ort", "ar"), ("ort", "tidar"), ("torch", "ar"), ("torch", "tidar")]
    assert calls[:12] == keys * 3
    assert res["ort"]["backend"] == "ort" and res["torch"]["modes"]["ar"]["speedup_vs_eager_ar"] == 1.0
    assert res["ort"]["modes"]["tidar"]["speedup_vs_ar"] > 0


def test_host_time_per_step_leaves_the_forwards_out(artifact):
    """loop_cost: the loop's own time per step, measured in a real generation, must not grow when every forward
    takes 20 ms longer (each forward is timed where it runs and taken out); the cost model then adds it to a
    step's forwards in place of the commit."""
    import time

    from zaya_export.runtime.loop_cost import host_ms_per_step

    session = Session.from_artifact(open_artifact(artifact), "ort")
    prompt = list(range(5, 21))
    base = {m: host_ms_per_step(session, m, prompt, new_tokens=12) for m in ("ar", "tidar", "tidar-fused")}
    run = session.backend.run

    def slow(entry, inputs):
        time.sleep(0.02)
        return run(entry, inputs)

    session.backend.run = slow
    slowed = {m: host_ms_per_step(session, m, prompt, new_tokens=12) for m in ("ar", "tidar", "tidar-fused")}
    for mode in base:
        assert 0 < slowed[mode] < base[mode] + 10.0, (mode, base[mode], slowed[mode])
    curve = _curve()
    curve.host["tidar"] = 0.7
    hist = [0] * K + [10]
    p = predict(curve, {"tidar": hist}, prompt_len=8, new_tokens=33)
    assert p["tidar"].step_ms == pytest.approx(3.0 + 3.0 + 0.7)  # host time replaces the 0.1 ms commit
    assert p["ar"].step_ms == pytest.approx(2.0 + 0.1)  # not measured for AR: the commit
