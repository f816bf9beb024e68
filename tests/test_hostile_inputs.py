"""The hostile-input corpus: bad, corrupt, foreign and malicious inputs against every command.

Each case asserts what a user must be able to rely on: exit code 2, exactly one ``error:`` line on stderr, no
traceback, and nothing of the user's deleted or changed (every protected tree is hashed before and after).
The cases run in-process (click's runner) so the corpus stays fast; the faults that need a real process
(kill -9, a file-size limit standing in for a full disk, two writers at once) are in ``test_faults.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from zaya_export.cli import main

Case = Callable[[Path, Path, Path], list[str]]  # (work dir, pristine ckpt copy, pristine artifact copy) → argv


def _tree_digest(*roots: Path) -> dict[str, str]:
    """Every file (and link target) under ``roots``: what "nothing changed" is checked against."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "link:" + str(p.readlink())
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("hostile")
    ckpt, art = base / "ckpt", base / "art"
    runner = CliRunner()
    result = runner.invoke(main, ["init", "--preset", "tiny", "--seed", "5", str(ckpt)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export", str(ckpt), "-o", str(art), "--tidar", "off"])
    assert result.exit_code == 0, result.output
    return ckpt, art


def _run_case(tmp_path: Path, pristine: tuple[Path, Path], case: Case) -> None:
    ckpt, art = tmp_path / "ckpt", tmp_path / "art"
    shutil.copytree(pristine[0], ckpt, symlinks=True)
    shutil.copytree(pristine[1], art, symlinks=True)
    argv = case(tmp_path, ckpt, art)
    before = _tree_digest(tmp_path)
    result = CliRunner().invoke(main, [str(a) for a in argv])
    after = _tree_digest(tmp_path)
    stderr = result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{argv}: raised {result.exception!r}\n{stderr}")
    assert "Traceback" not in stderr + result.stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == 2, f"{argv}: exit {result.exit_code}\n{stderr}{result.stdout}"
    assert len(errors) == 1, f"{argv}: expected one error line, got:\n{stderr}"
    assert lines == errors, stderr  # usage errors too: one line, no usage block
    assert before == after, f"{argv}: changed files: " + ", ".join(
        sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))


# ----------------------------------------------------------------------------------------------- checkpoint edits
def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        for key, value in changes.items():
            if key.startswith("rope."):
                for params in cfg["rope_parameters"].values():
                    params[key[5:]] = value
            else:
                cfg[key] = value
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return edit


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        (ckpt / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return edit


def _header(ckpt: Path) -> tuple[dict, bytes]:
    raw = (ckpt / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _put_header(ckpt: Path, header: dict | bytes, data: bytes) -> None:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)


def _edit_header(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        header, data = _header(ckpt)
        fn(header)
        _put_header(ckpt, header, data)
    return edit


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _poison(value: float, name: str = "model.embed_tokens.weight") -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        header, data = _header(ckpt)
        start = header[name]["data_offsets"][0]
        fmt = {"F32": "<f", "F16": "<e", "BF16": None}[header[name]["dtype"]]
        blob = bytearray(data)
        blob[start:start + 4] = struct.pack(fmt, value)
        _put_header(ckpt, header, bytes(blob))
    return edit


def _index(weight_map: object, drop_single: bool = False) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        header, _ = _header(ckpt)
        names = [k for k in header if k != "__metadata__"]
        wm = weight_map(names) if callable(weight_map) else weight_map
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return edit


def _truncate(nbytes: int) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        p = ckpt / "model.safetensors"
        p.write_bytes(p.read_bytes()[:nbytes])
    return edit


def _deep(n: int = 200_000) -> str:
    return "[" * n + "]" * n


def _remove(name: str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        (ckpt / name).unlink()
    return edit


def _overlap(header: dict) -> None:
    """Point one layer norm's bytes at another's (same size, so only the overlap itself is wrong)."""
    a, b = [k for k in header if k.endswith("input_layernorm.weight")][:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]


def _drop_tensor(header: dict) -> None:
    name = next(k for k in header if k.endswith("o_proj.weight"))
    del header[name]


def _reshape(header: dict) -> None:
    name = next(k for k in header if k.endswith("input_layernorm.weight"))
    header[name]["shape"] = [header[name]["shape"][0] // 2, 2]


CHECKPOINT_EDITS: dict[str, Callable[[Path], None]] = {
    "config missing": _remove("config.json"),
    "config not json": _write("config.json", "{not json"),
    "config nested 200k deep": _write("config.json", '{"a": ' + _deep() + "}"),
    "config a list": _write("config.json", "[1, 2]"),
    "config empty file": _write("config.json", ""),
    "config not utf-8": _write("config.json", b"\xff\xfe{}"),
    "rms_norm_eps NaN": _edit_config(rms_norm_eps=float("nan")),
    "rms_norm_eps Infinity": _edit_config(rms_norm_eps=float("inf")),
    "rms_norm_eps negative": _edit_config(rms_norm_eps=-1e-5),
    "rope_theta -1": _edit_config(**{"rope.rope_theta": -1}),
    "rope_theta abc": _edit_config(**{"rope.rope_theta": "abc"}),
    "rope_theta NaN": _edit_config(**{"rope.rope_theta": float("nan")}),
    "partial_rotary_factor 2": _edit_config(**{"rope.partial_rotary_factor": 2}),
    "rope_type yarn": _edit_config(**{"rope.rope_type": "yarn"}),
    "sliding_window true": _edit_config(sliding_window=True),
    "sliding_window -4": _edit_config(sliding_window=-4),
    "num_hidden_layers 1e6": _edit_config(num_hidden_layers=1_000_000, layer_types=None),
    "num_hidden_layers 10000": _edit_config(num_hidden_layers=10_000, layer_types=None),
    "num_hidden_layers 1": _edit_config(num_hidden_layers=1, layer_types=["hybrid"]),
    "num_hidden_layers float": _edit_config(num_hidden_layers=2.5),
    "vocab_size 0": _edit_config(vocab_size=0),
    "vocab_size string": _edit_config(vocab_size="many"),
    "hidden_size doubled": _edit_config(hidden_size=256),
    "model_type llama": _edit_config(model_type="llama"),
    "eos_token_id huge": _edit_config(eos_token_id=10**9),
    "eos_token_id list of str": _edit_config(eos_token_id=["a"]),
    "pad_token_id true": _edit_config(pad_token_id=True),
    "num_experts_per_tok 2": _edit_config(num_experts_per_tok=2),
    "hidden_act gelu": _edit_config(hidden_act="gelu"),
    "layer_types unknown": _edit_config(layer_types=["hybrid", "dense"]),
    "tie_word_embeddings string": _edit_config(tie_word_embeddings="yes"),
    "kv heads not dividing": _edit_config(num_key_value_heads=3),
    "weights truncated": _truncate(10_000),
    "weights 5 bytes": _truncate(5),
    "weights empty": _truncate(0),
    "header nested deep": lambda c: _put_header(c, ('{"a": ' + _deep() + "}").encode(), b""),
    "header not json": lambda c: _put_header(c, b"{oops", _header(c)[1]),
    "header a list": lambda c: _put_header(c, b"[1]", _header(c)[1]),
    "header length beyond file": lambda c: (c / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}"),
    "header dtype a list": _edit_header(lambda h: h[_first_tensor(h)].update(dtype=["F32"])),
    "header dtype unknown": _edit_header(lambda h: h[_first_tensor(h)].update(dtype="F128")),
    "header shape negative": _edit_header(lambda h: h[_first_tensor(h)].update(shape=[-1])),
    "header offsets a string": _edit_header(lambda h: h[_first_tensor(h)].update(data_offsets="0,4")),
    "header offsets overlap": _edit_header(_overlap),
    "header entry not an object": _edit_header(lambda h: h.update({_first_tensor(h): 3})),
    "missing tensor": _edit_header(_drop_tensor),
    "tensor wrong shape": _edit_header(_reshape),
    "NaN in embeddings": _poison(float("nan")),
    "Inf in embeddings": _poison(float("inf")),
    "-Inf in embeddings": _poison(float("-inf")),
    "pickle weights only": lambda c: ((c / "model.safetensors").rename(c / "pytorch_model.bin")),
    "no weights at all": _remove("model.safetensors"),
    "two shards, no index": lambda c: shutil.copy(c / "model.safetensors", c / "model-2.safetensors"),
    "index escapes with ../": _index(lambda names: {n: "../../x/model.safetensors" for n in names}),
    "index absolute path": _index(lambda names: {n: "/etc/passwd" for n in names}),
    "index to /etc/passwd via ..": _index(lambda names: {n: "../../../../../../etc/passwd" for n in names}),
    "index value an int": _index(lambda names: {n: 3 for n in names}),
    "index value a list": _index(lambda names: {n: ["model.safetensors"] for n in names}),
    "index names a folder": _index(lambda names: {n: "sub/model.safetensors" for n in names}),
    "index names a missing shard": _index(lambda names: {n: "model-9.safetensors" for n in names}),
    "index maps to the wrong shard": _index(lambda names: {n: "model.safetensors" for n in names[1:]} | {
        names[0]: "other.safetensors"}),
    "index weight_map a list": _index([1, 2]),
    "index not json": _write("model.safetensors.index.json", "{"),
    "index nested deep": _write("model.safetensors.index.json", _deep()),
}


@pytest.mark.parametrize("command", ["run", "export"])
@pytest.mark.parametrize("edit", list(CHECKPOINT_EDITS), ids=list(CHECKPOINT_EDITS))
def test_bad_checkpoint(tmp_path, pristine, edit, command):
    def case(work: Path, ckpt: Path, art: Path) -> list[str]:
        CHECKPOINT_EDITS[edit](ckpt)
        if command == "run":
            return ["run", ckpt, "--prompt-ids", "1,2", "--max-new-tokens", "2"]
        return ["export", ckpt, "-o", work / "out"]
    _run_case(tmp_path, pristine, case)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind


COMPANION_EDITS = {
    "tokenizer garbage": _write("tokenizer.json", "this is not a tokenizer"),
    "tokenizer nested deep": _write("tokenizer.json", _deep()),
    "tokenizer json of another kind": _write("tokenizer.json", '{"model": {"type": "Nope"}}'),
    "generation_config garbage": _write("generation_config.json", "[["),
    "generation_config a list": _write("generation_config.json", "[]"),
}


@pytest.mark.parametrize("edit", list(COMPANION_EDITS), ids=list(COMPANION_EDITS))
def test_bad_companion_file_refused_at_export(tmp_path, pristine, edit):
    def case(work: Path, ckpt: Path, art: Path) -> list[str]:
        COMPANION_EDITS[edit](ckpt)
        return ["export", ckpt, "-o", work / "out"]
    _run_case(tmp_path, pristine, case)


# ----------------------------------------------------------------------------------------------- bad options
RUN_OPTIONS = {
    "temperature nan": ["--temperature", "nan"],
    "temperature inf": ["--temperature", "inf"],
    "temperature negative": ["--temperature", "-1"],
    "temperature a word": ["--temperature", "hot"],
    "w nan": ["--w", "nan", "--mode", "tidar", "--sampler", "mix"],
    "w 2": ["--w", "2"],
    "top-p nan": ["--top-p", "nan"],
    "top-p 0": ["--top-p", "0"],
    "top-p 1.5": ["--top-p", "1.5"],
    "top-k -1": ["--top-k", "-1"],
    "seed -1": ["--seed", "-1"],
    "seed 2**70": ["--seed", str(2**70)],
    "max-new-tokens 0": ["--max-new-tokens", "0"],
    "max-new-tokens beyond the context": ["--max-new-tokens", "100000000"],
    "mix sampler in AR mode": ["--mode", "ar", "--sampler", "mix"],
    "unknown mode": ["--mode", "fast"],
    "unknown backend": ["--backend", "cuda"],
    "unknown dtype": ["--dtype", "fp8"],
    "tidar mode on an AR artifact": ["--mode", "tidar"],
    "iree on an ONNX-only artifact": ["--backend", "iree"],
}
PROMPTS = {
    "ids not integers": ["--prompt-ids", "a,b"],
    "id out of vocab": ["--prompt-ids", "99999999"],
    "negative id": ["--prompt-ids", "-1"],
    "empty ids": ["--prompt-ids", ","],
    "both prompt kinds": ["--prompt", "x", "--prompt-ids", "1"],
    "no prompt": [],
    "prompt longer than the context": ["--prompt-ids", ",".join(["1"] * 5000)],
    "huge id": ["--prompt-ids", str(2**80)],
}


@pytest.mark.parametrize("source", ["artifact", "checkpoint"])
@pytest.mark.parametrize("name", list(RUN_OPTIONS), ids=list(RUN_OPTIONS))
def test_bad_run_option(tmp_path, pristine, name, source):
    def case(work: Path, ckpt: Path, art: Path) -> list[str]:
        extra = RUN_OPTIONS[name]
        if source == "checkpoint" and name in ("tidar mode on an AR artifact", "iree on an ONNX-only artifact"):
            extra = ["--mode", "tidar", "--sampler", "mix", "--w", "-0.5"]
        return ["run", art if source == "artifact" else ckpt, "--prompt-ids", "1,2", *extra]
    _run_case(tmp_path, pristine, case)


@pytest.mark.parametrize("name", list(PROMPTS), ids=list(PROMPTS))
def test_bad_prompt(tmp_path, pristine, name):
    _run_case(tmp_path, pristine, lambda w, c, a: ["run", a, "--max-new-tokens", "2", *PROMPTS[name]])


OTHER_OPTIONS = {
    "export unknown format": lambda w, c, a: ["export", c, "-o", w / "o", "--format", "tflite"],
    "export unknown target": lambda w, c, a: ["export", c, "-o", w / "o", "--format", "onnx,mlir", "--target", "sm_1"],
    "export target without mlir": lambda w, c, a: ["export", c, "-o", w / "o", "--target", "cpu"],
    "export unknown dtype": lambda w, c, a: ["export", c, "-o", w / "o", "--dtype", "int3"],
    "export block-len 100000": lambda w, c, a: ["export", c, "-o", w / "o", "--tidar", "on", "--block-len", "100000"],
    "export block-len 0": lambda w, c, a: ["export", c, "-o", w / "o", "--tidar", "on", "--block-len", "0"],
    "export levels garbage": lambda w, c, a: ["export", c, "-o", w / "o", "--tidar", "on", "--levels", "x"],
    "export levels not from 0": lambda w, c, a: ["export", c, "-o", w / "o", "--tidar", "on", "--levels", "3,5"],
    "export dump-after unknown": lambda w, c, a: ["export", c, "-o", w / "o", "--dump-after", "everything"],
    "export missing checkpoint": lambda w, c, a: ["export", w / "nope", "-o", w / "o"],
    "export checkpoint is a file": lambda w, c, a: ["export", c / "config.json", "-o", w / "o"],
    "export an artifact": lambda w, c, a: ["export", a, "-o", w / "o"],
    "bench prompt-len 100000": lambda w, c, a: ["bench", a, "--prompt-len", "100000"],
    "bench unknown backend": lambda w, c, a: ["bench", a, "--backend", "tpu"],
    "bench unknown mode": lambda w, c, a: ["bench", a, "--modes", "warp"],
    "bench tidar on AR artifact": lambda w, c, a: ["bench", a, "--modes", "ar,tidar"],
    "bench w nan": lambda w, c, a: ["bench", a, "--w", "nan", "--modes", "ar"],
    "bench a checkpoint": lambda w, c, a: ["bench", c],
    "validate unknown backend": lambda w, c, a: ["validate", a, "--backend", "gpu"],
    "validate a checkpoint": lambda w, c, a: ["validate", c],
    "validate with a foreign checkpoint": lambda w, c, a: ["validate", a, "--checkpoint", w / "none"],
    "inspect a checkpoint": lambda w, c, a: ["inspect", c],
    "inspect nothing": lambda w, c, a: ["inspect", w / "nothing"],
    "init unknown preset": lambda w, c, a: ["init", "--preset", "huge", w / "o"],
    "init seed -1": lambda w, c, a: ["init", "--seed", "-1", w / "o"],
    "run missing source": lambda w, c, a: ["run", w / "nothing", "--prompt-ids", "1"],
    "run on a plain folder": lambda w, c, a: (w / "plain").mkdir() or ["run", w / "plain", "--prompt-ids", "1"],
    "train-demo max-minutes nan": lambda w, c, a: ["train-demo", w / "o", "--max-minutes", "nan"],
}


@pytest.mark.parametrize("name", list(OTHER_OPTIONS), ids=list(OTHER_OPTIONS))
def test_bad_option(tmp_path, pristine, name):
    _run_case(tmp_path, pristine, OTHER_OPTIONS[name])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- output paths
def _user_dir(work: Path) -> Path:
    user = work / "u"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    return user


OUTPUTS = {
    "export --force over a user folder": lambda w, c, a: ["export", c, "-o", _user_dir(w), "--force"],
    "init --force over a user folder": lambda w, c, a: ["init", "--force", _user_dir(w)],
    "init --force over a file": lambda w, c, a: [_file(w / "f"), "init", "--force", w / "f"][1:],
    "export --force over its own source": lambda w, c, a: ["export", c, "-o", c, "--force"],
    "export --force over the folder holding its source": lambda w, c, a: ["export", c, "-o", w, "--force"],
    "export --force over a checkpoint": lambda w, c, a: ["export", c, "-o", _copy(c, w / "c2"), "--force"],
    "init --force over an artifact's parent": lambda w, c, a: ["init", "--force", w],
    "export over an artifact without --force": lambda w, c, a: ["export", c, "-o", a],
    "init over a checkpoint without --force": lambda w, c, a: ["init", c],
    "export below a file": lambda w, c, a: [_file(w / "afile"), "export", c, "-o", w / "afile" / "art"][1:],
    "init below a file": lambda w, c, a: [_file(w / "afile"), "init", w / "afile" / "ck"][1:],
    "export into /proc": lambda w, c, a: ["export", c, "-o", "/proc/zaya-art"],
    "init into /proc": lambda w, c, a: ["init", "/proc/zaya-ck"],
    "export --force over a symlink to an artifact": lambda w, c, a: (w / "ln").symlink_to(a) or [
        "export", c, "-o", w / "ln", "--force"],
    "export --force over a user folder faking a manifest": lambda w, c, a: _fake_manifest(_user_dir(w)) or [
        "export", c, "-o", w / "u", "--force"],
}


def _file(path: Path) -> Path:
    path.write_text("x\n")
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _fake_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"format": "something-else"}')


@pytest.mark.parametrize("name", list(OUTPUTS), ids=list(OUTPUTS))
def test_output_path_refused_and_nothing_lost(tmp_path, pristine, name):
    _run_case(tmp_path, pristine, OUTPUTS[name])


# ----------------------------------------------------------------------------------------------- artifact tampering
def _manifest_edit(fn: Callable[[dict, Path], None], rehash: bool = False) -> Callable[[Path, Path], None]:
    def edit(work: Path, art: Path) -> None:
        m = json.loads((art / "manifest.json").read_text())
        fn(m, work)
        if rehash:
            m["files"] = {rel: hashlib.sha256((art / rel).read_bytes()).hexdigest() for rel in m["files"]
                          if (art / rel).is_file()}
        (art / "manifest.json").write_text(json.dumps(m))
    return edit


def _file_edit(rel: str, data: bytes | Callable[[bytes], bytes], rehash: bool) -> Callable[[Path, Path], None]:
    def edit(work: Path, art: Path) -> None:
        p = art / rel
        p.write_bytes(data(p.read_bytes()) if callable(data) else data)
        if rehash:
            _manifest_edit(lambda m, w: None, rehash=True)(work, art)
    return edit


def _other_artifact(work: Path) -> Path:
    other = work / "other"
    shutil.copytree(work / "art", other)
    return other


def _link_weights_outside(work: Path, art: Path) -> None:
    target = _other_artifact(work) / "onnx" / "weights.safetensors"
    (art / "onnx" / "weights.safetensors").unlink()
    (art / "onnx" / "weights.safetensors").symlink_to(target)


ARTIFACT_EDITS: dict[str, Callable[[Path, Path], None]] = {
    "manifest missing": lambda w, a: (a / "manifest.json").unlink(),
    "manifest not json": _file_edit("manifest.json", b"{", rehash=False),
    "manifest nested deep": _file_edit("manifest.json", _deep().encode(), rehash=False),
    "manifest a list": _file_edit("manifest.json", b"[]", rehash=False),
    "manifest files a list": _manifest_edit(lambda m, w: m.update(files=[])),
    "manifest without entry_points": _manifest_edit(lambda m, w: m.pop("entry_points")),
    "manifest versions a list": _manifest_edit(lambda m, w: m.update(versions=[])),
    "manifest schema 99": _manifest_edit(lambda m, w: m.update(schema_version=99)),
    "manifest foreign format": _manifest_edit(lambda m, w: m.update(format="other")),
    "manifest unknown field": _manifest_edit(lambda m, w: m.update(surprise=1)),
    "manifest weights ../": _manifest_edit(lambda m, w: (_other_artifact(w), m.update(
        weights="../other/onnx/weights.safetensors"))),
    "manifest weights absolute": _manifest_edit(lambda m, w: m.update(weights=str(w / "art/onnx/weights.safetensors"))),
    "manifest entry onnx ../": _manifest_edit(lambda m, w: (_other_artifact(w), m["entry_points"]["decode"].update(
        onnx="../other/onnx/decode.onnx"))),
    "manifest entry onnx absolute": _manifest_edit(lambda m, w: m["entry_points"]["decode"].update(
        onnx="/etc/passwd")),
    "manifest entry onnx unlisted": _manifest_edit(lambda m, w: m["entry_points"]["decode"].update(
        onnx="onnx/nothing.onnx")),
    "manifest eos edited": _manifest_edit(lambda m, w: m["config"].update(eos_token_id=7)),
    "manifest eos edited, re-hashed": _manifest_edit(lambda m, w: m["config"].update(eos_token_id=7), rehash=True),
    "manifest pass_log garbage": _manifest_edit(lambda m, w: m.update(pass_log={"model": 3})),
    "config.json fewer layers, re-hashed": lambda w, a: (_edit_config(num_hidden_layers=1, layer_types=["hybrid"])(a),
                                                         _manifest_edit(lambda m, w2: None, rehash=True)(w, a)),
    "config.json edited": lambda w, a: _edit_config(eos_token_id=7)(a),
    "weights flipped byte": _file_edit("onnx/weights.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1]),
                                       rehash=False),
    "weights truncated, re-hashed": _file_edit("onnx/weights.safetensors", lambda b: b[: len(b) // 2], rehash=True),
    "weights linked to another artifact": _link_weights_outside,
    "graph garbage": _file_edit("onnx/decode.onnx", b"garbage", rehash=False),
    "graph garbage, re-hashed": _file_edit("onnx/decode.onnx", b"\x08\x07garbage", rehash=True),
    "graph truncated, re-hashed": _file_edit("onnx/decode.onnx", lambda b: b[: len(b) // 3], rehash=True),
    "graph swapped for another entry, re-hashed": lambda w, a: (
        shutil.copy(a / "onnx" / "prefill.onnx", a / "onnx" / "decode.onnx"),
        _manifest_edit(lambda m, w2: None, rehash=True)(w, a)),
    "extra file": lambda w, a: (a / "onnx" / "evil.onnx").write_bytes(b"x"),
    "file missing": lambda w, a: (a / "config.json").unlink(),
    "tokenizer garbage, re-hashed": _file_edit("tokenizer.json", b"not a tokenizer", rehash=True),
}


@pytest.mark.parametrize("command", ["run", "validate", "inspect"])
@pytest.mark.parametrize("edit", list(ARTIFACT_EDITS), ids=list(ARTIFACT_EDITS))
def test_tampered_artifact(tmp_path, pristine, edit, command):
    argv = {"run": ["--prompt", "def f():", "--max-new-tokens", "2"], "validate": [], "inspect": []}[command]

    def case(work: Path, ckpt: Path, art: Path) -> list[str]:
        ARTIFACT_EDITS[edit](work, art)
        return [command, art, *argv]

    _run_case(tmp_path, pristine, case)


# ----------------------------------------------------------------------------------------------- fast errors
FAST = [
    ["run", "ART", "--temperature", "nan", "--prompt-ids", "1"],
    ["run", "ART"],
    ["run", "NOWHERE", "--prompt-ids", "1"],
    ["run", "ART", "--prompt-ids", "-3"],
    ["export", "CKPT", "-o", "ART"],
    ["export", "CKPT", "-o", "CKPT", "--force"],
    ["init", "CKPT"],
    ["bench", "ART", "--backend", "tpu"],
    ["bench", "ART", "--modes", "warp"],
    ["validate", "ART", "--backend", "gpu"],
    ["validate", "NOWHERE"],
]


@pytest.mark.parametrize("argv", FAST, ids=[" ".join(a) for a in FAST])
def test_bad_arguments_fail_before_the_heavy_imports(pristine, argv):
    """Argument and output-path errors come before torch (and onnxruntime) load, so they print in well under a
    second: checked by what got imported, not by a timing that could flake."""
    import subprocess
    import sys

    subs = {"ART": str(pristine[1]), "CKPT": str(pristine[0]), "NOWHERE": "/nonexistent/x"}
    code = ("import sys; from click.testing import CliRunner; from zaya_export.cli import main; "
            f"r = CliRunner().invoke(main, {[subs.get(a, a) for a in argv]!r}); "
            "print(r.exit_code, 'torch' in sys.modules, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["2", "False", "False"], out


def test_cli_backend_list_matches_bench():
    from zaya_export.bench import BACKENDS
    from zaya_export.cli import BENCH_BACKENDS

    assert BENCH_BACKENDS == BACKENDS
