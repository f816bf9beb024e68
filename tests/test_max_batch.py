"""``export --max-batch``: an artifact that serves at most N sequences at once. With 1, the IREE module holds only
the fixed-batch-1 function of each fixed-length entry (about half the MLIR build and IREE compile); the runtime
refuses a larger batch with a clear error, and ``validate`` checks every entry at batches within the limit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_model, small_config
from zaya_export.cli import EXPORT_MAX_BATCH, main
from zaya_export.errors import InputError
from zaya_export.exporter import ExportError, export_artifact
from zaya_export.models.checkpoint import save_checkpoint
from zaya_export.models.entries import batch1_twin
from zaya_export.models.io_table import MAX_BATCH
from zaya_export.runtime.artifact import open_artifact
from zaya_export.runtime.cost_curve import entry_inputs
from zaya_export.runtime.generate import generate, generate_greedy
from zaya_export.runtime.manifest import Manifest, ManifestError
from zaya_export.sources import open_session
from zaya_export.validate import SHAPES, cross_check, entry_shapes, validate_artifact


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(num_hidden_layers=2, layer_types=["hybrid", "hybrid_sliding"], sliding_window=8),
                        seed=11)


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    """An AR artifact (its decode, prefill and commits are what a TiDAR one adds verify/draft/step to)."""
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("maxb") / "ckpt")
    out = ckpt.parent / "artifact"
    export_artifact(ckpt, out, formats=("onnx", "mlir"), tidar="off", calibrate=0, max_batch=1)
    return out


def test_module_holds_only_the_batch1_functions_of_fixed_length_entries(artifact):
    m = open_artifact(artifact).manifest
    assert m.max_batch == 1
    # decode and the commit folded into it: twins only; a dynamic length (prefill, layers) and the commits keep
    # the one function that serves any batch
    assert set(m.mlir.ops_per_entry) == {"prefill", "layers", "commit", "commit_accepted",
                                         batch1_twin("decode"), batch1_twin("commit_then_decode")}
    assert json.loads((artifact / "manifest.json").read_text())["max_batch"] == 1


def test_one_sequence_runs_and_matches_eager_and_onnxruntime(artifact, model):
    art = open_artifact(artifact)
    report = validate_artifact(art, backend="iree")
    assert report["ok"], [c for c in report["entries"] + report["greedy"] if not c["ok"]]
    assert {c["shape"]["batch"] for c in report["entries"]} == {1}
    # the cache and length cases of the full shape list are all still checked, at batch 1
    assert {(c["shape"]["new"], c["shape"]["cached"]) for c in report["entries"] if c["entry"] == "prefill"} == \
        {(T, S) for _, T, S in SHAPES}
    cross = cross_check(art, ["ort", "iree"])
    assert cross and all(c["ok"] for c in cross), cross
    prompt = [2, 17, 301, 44, 9]
    want = generate_greedy(model, [prompt], 12, None).tokens[0]
    for backend in ("iree", "ort"):
        session = open_session(artifact, backend=backend)
        assert generate(session, [prompt], 12).tokens[0] == want, backend


def test_a_larger_batch_is_refused_clearly(artifact):
    for backend in ("iree", "ort", "torch"):
        session = open_session(artifact, backend=backend)
        with pytest.raises(InputError, match="at most 1 .*--max-batch 1"):
            session.new_cache(2, 16)
        with pytest.raises(InputError, match="--max-batch 1"):
            generate(session, [[2, 3], [4, 5]], 4)
    iree = open_session(artifact, backend="iree", state_on_device=False)
    cache = iree.new_cache(1, 16)
    cache.commit(iree.run("prefill", cache.inputs(np.array([[2, 17, 301]]))))
    two = {k: np.concatenate([v, v], axis=1 if k in ("past_k", "past_v", "conv_state", "rho_state") else 0)
           for k, v in entry_inputs(iree, cache, "decode", 1).items()}
    with pytest.raises(InputError, match="for one sequence only.*batch of 2"):
        iree.run("decode", two)


def test_validate_shapes_keep_every_case_within_the_limit():
    assert entry_shapes(None, MAX_BATCH) == sorted(SHAPES)
    assert entry_shapes(None, 1) == sorted({(1, T, S) for _, T, S in SHAPES})
    assert entry_shapes(8, 2) == sorted({(min(B, 2), 8, S) for B, _, S in SHAPES})
    assert all(B <= 2 for B, _, _ in entry_shapes(None, 2))


def test_bad_max_batch_is_refused_before_any_work(model, tmp_path):
    assert EXPORT_MAX_BATCH == MAX_BATCH  # the CLI's limit is the traced dims' limit
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    for bad in ("0", str(MAX_BATCH + 1), "two"):
        result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "a"), "--max-batch", bad])
        assert result.exit_code == 2 and "--max-batch" in result.stderr, bad
    with pytest.raises(ExportError, match="--max-batch must be in"):
        export_artifact(ckpt, tmp_path / "b", max_batch=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_manifest_max_batch_is_checked_and_defaults_for_older_artifacts(artifact):
    d = json.loads((artifact / "manifest.json").read_text())
    assert Manifest.from_json(dict(d)).max_batch == 1
    assert Manifest.from_json({k: v for k, v in d.items() if k != "max_batch"}).max_batch == MAX_BATCH
    assert "max_batch" not in Manifest.from_json({k: v for k, v in d.items() if k != "max_batch"}).to_json()
    for bad in (0, MAX_BATCH + 1, "1", True):
        with pytest.raises(ManifestError, match="max_batch"):
            Manifest.from_json({**d, "max_batch": bad})
    info = json.loads(CliRunner().invoke(main, ["inspect", str(artifact), "--json"]).stdout)
    assert info["max_batch"] == 1
