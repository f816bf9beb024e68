"""Read and write ZAYA1 checkpoints in Hugging Face layout.

Reading validates everything before a byte of weight is mapped: config, file set, safetensors headers, and
the tensor names/shapes/dtypes the config implies. Weights are then read through the safetensors library
(mmapped) straight into a model built on the meta device, so each tensor is materialised exactly once.
Pickle-based weights (``*.bin``, ``*.pt``...) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ZayaConfig
from .upstream import skip_bias_warning
from .zaya import ZayaForCausalLM

from . import legacy
from zaya_export.output_dir import MARKER, check_replaceable, writing
from zaya_export.errors import CheckpointError
from .safetensors_header import FLOAT_DTYPES, TensorInfo, read_header
from .safetensors_stream import Progress, TensorSlot, write_streamed

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
# Tensors a checkpoint may carry that the model does not use (accepted, then ignored).
_IGNORABLE = ("diffusion_output_layer.weight", "diffusion_markov_head.w1", "diffusion_markov_head.w2")
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_config(ckpt: Path) -> tuple[ZayaConfig, bool]:
    """The checkpoint's config, converted from the legacy layout if needed; returns (config, was_legacy)."""
    path = ckpt / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint directory needs config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not usable JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    was_legacy = legacy.is_legacy_config(data)
    try:
        if was_legacy:
            data = legacy.convert_legacy_config(data)
        return ZayaConfig.from_dict(data), was_legacy
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from None


def _weight_files(ckpt: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = ckpt / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except Exception:
            raise CheckpointError(f"{index}: corrupt index (needs a 'weight_map' object)") from None
        for name, fname in weight_map.items():
            _shard_name(index, name, fname)
        files = sorted({ckpt / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():  # a link is fine: the Hugging Face cache links snapshot files to its blobs
                raise CheckpointError(f"{f}: missing shard named in {INDEX_NAME}")
        return files, weight_map
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{ckpt}: only pickle weights found ({', '.join(pickles)}); they are refused, never unpickled "
                "(convert them to safetensors first)"
            )
        raise CheckpointError(f"{ckpt}: no *.safetensors weights found")
    if len(files) > 1:
        raise CheckpointError(f"{ckpt}: {len(files)} safetensors files but no {INDEX_NAME}")
    return files, None


def _shard_name(index: Path, tensor: object, fname: object) -> None:
    """A shard named by the index must be a plain ``*.safetensors`` file name in the checkpoint directory:
    no folder, no ``..``, no absolute path (an index must not make the loader read files elsewhere)."""
    if not isinstance(tensor, str) or not isinstance(fname, str):
        raise CheckpointError(f"{index}: weight_map entries must map tensor names to file names (strings)")
    if fname != Path(fname).name or fname in ("", ".", "..") or "\\" in fname or not fname.endswith(".safetensors"):
        raise CheckpointError(f"{index}: {tensor!r} maps to {fname!r}; shards must be *.safetensors files "
                              "in the checkpoint directory itself")


def _tensor_table(ckpt: Path) -> dict[str, TensorInfo]:
    files, weight_map = _weight_files(ckpt)
    table: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in table:
                raise CheckpointError(f"{f}: tensor {name!r} also stored in {table[name].file.name}")
            table[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in table or table[name].file.name != Path(fname).name:
                raise CheckpointError(f"{ckpt / INDEX_NAME}: maps {name!r} to {fname}, which does not hold it")
    return table


def expected_tensors(config: ZayaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a native checkpoint of ``config`` must store, with its shape."""
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def _check_layer_count(config: ZayaConfig, names: set[str], is_legacy: bool, ckpt: Path) -> None:
    """The layers the weights hold must be the layers the config names, checked from the tensor names alone
    before anything is built from the config (a config edited to a million layers fails here, at once)."""
    indices = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.match(n))}
    held = (max(indices) + 1) // (2 if is_legacy else 1) if indices else 0
    if held != config.num_hidden_layers:
        raise CheckpointError(f"{ckpt}: config.json says num_hidden_layers={config.num_hidden_layers} but the "
                              f"weights hold {held} layer(s)")


def _plan(config: ZayaConfig, table: dict[str, TensorInfo], ckpt: Path) -> dict[str, list[TensorInfo]]:
    """native name → source tensors (one, or several to stack), after every name/shape/dtype check."""
    names = set(table)
    is_legacy = legacy.is_legacy_layout(names)
    _check_layer_count(config, names, is_legacy, ckpt)
    if is_legacy:
        sources = legacy.legacy_sources(config.num_hidden_layers, config.num_experts, legacy.legacy_block_name(names))
    else:
        sources = {n: [n] for n in expected_tensors(config)}
    expected = expected_tensors(config)
    if not config.tie_word_embeddings:
        sources.setdefault("lm_head.weight", ["lm_head.weight"])
    missing = sorted({s for srcs in sources.values() for s in srcs} - names)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{ckpt}: missing tensors: {', '.join(missing[:3])}{more}")
    used = {s for srcs in sources.values() for s in srcs}
    extra = sorted(n for n in names - used if not n.endswith(_IGNORABLE)
                   and not (n == "lm_head.weight" and config.tie_word_embeddings))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(f"{ckpt}: unexpected tensors: {', '.join(extra[:3])}{more}")
    plan: dict[str, list[TensorInfo]] = {}
    for native, srcs in sources.items():
        infos = [table[s] for s in srcs]
        shape = infos[0].shape if len(infos) == 1 else (len(infos), *infos[0].shape)
        for info, src in zip(infos, srcs):
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {src!r} has dtype {info.dtype}, expected F32, F16 or BF16")
            if info.shape != infos[0].shape:
                raise CheckpointError(f"{info.file}: tensor {src!r} has shape {list(info.shape)}, unlike its siblings")
        if shape != expected[native]:
            raise CheckpointError(
                f"{infos[0].file}: tensor {srcs[0]!r} has shape {list(shape)}, expected {list(expected[native])}"
            )
        plan[native] = infos
    return plan


def checkpoint_plan(ckpt: Path, weights_dir: str | Path | None = None) -> tuple[ZayaConfig, dict[str, list[TensorInfo]]]:
    """The checked config and native tensor name → source tensors (one, or several to stack) of a checkpoint:
    every check of :func:`load_checkpoint` that needs no weight bytes."""
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a checkpoint directory")
    config, _ = read_config(ckpt)
    weights = ckpt if weights_dir is None else Path(weights_dir)
    return config, _plan(config, _tensor_table(weights), weights)


def load_checkpoint(path: str | Path, dtype: torch.dtype | str | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    weights_dir: str | Path | None = None) -> ZayaForCausalLM:
    """Load a checkpoint directory (native or legacy layout) into an eval-mode :class:`ZayaForCausalLM`.

    ``dtype`` (torch dtype or "fp32"/"fp16"/"bf16") defaults to the dtype the embedding is stored in.
    ``progress(done, total)`` is called after each tensor. ``weights_dir`` is where the safetensors live when
    not next to ``config.json`` (an artifact keeps them in ``onnx/``).
    """
    ckpt = Path(path)
    config, plan = checkpoint_plan(ckpt, weights_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or _TORCH_DTYPES[plan["model.embed_tokens.weight"][0].dtype]
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    try:
        for done, (native, infos) in enumerate(plan.items(), 1):
            parts = []
            for info in infos:
                if info.file not in handles:
                    handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
                parts.append(handles[info.file].get_tensor(info.name))
            tensor = parts[0] if len(parts) == 1 else torch.stack(parts)
            want = torch.float32 if native.endswith("balancing_biases") else dtype
            state[native] = checked_cast(tensor, infos[0], want)
            if progress:
                progress(done, len(plan))
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for data it cannot map
        raise CheckpointError(f"{ckpt}: cannot read weights ({exc})") from None
    finally:
        handles.clear()
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    note = skip_bias_warning(model)
    if note:
        warnings.warn(f"{ckpt}: {note}", stacklevel=2)
    return model.eval()


def checked_cast(tensor: torch.Tensor, info: TensorInfo, want: torch.dtype) -> torch.Tensor:
    """``tensor`` (read from ``info``) in dtype ``want``; :class:`CheckpointError` if it holds NaN/Inf or
    overflows ``want``. One cheap pass per tensor: NaN/Inf would poison every logit."""
    bad = count_nonfinite(tensor)
    if bad:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} holds {bad} NaN/Inf value(s)")
    out = tensor.to(want)
    if out.dtype != tensor.dtype and count_nonfinite(out):
        raise CheckpointError(f"{info.file}: tensor {info.name!r} overflows {want} (values beyond "
                              "its range); load it in a wider dtype")
    return out


_FINITE_CHUNK = 1 << 24  # elements checked at a time


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN/Inf values in ``tensor``, checked ``_FINITE_CHUNK`` elements at a time: ``isfinite`` of a whole
    8B embedding (537M elements) makes ~3 GB of temporaries (an ``abs`` copy and two bool masks)."""
    flat = tensor.reshape(-1)  # [n], a view of a contiguous tensor
    bad = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        finite = torch.isfinite(flat[start:start + _FINITE_CHUNK])
        if not bool(finite.all()):
            bad += int((~finite).sum())
    return bad


def save_checkpoint(model: ZayaForCausalLM, out: str | Path, *, tokenizer_json: str | None = None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``model`` in native HF layout (config.json, generation_config.json, safetensors, index when
    sharded, tokenizer.json). Atomic: files go to a temporary sibling directory that is renamed into place."""
    out = Path(out)
    check_replaceable(out, overwrite, "checkpoint")
    config = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        want = torch.float32 if name.endswith("balancing_biases") else (dtype or t.dtype)
        tensors[name] = t.detach().to(want).contiguous()
    shards = _shard(tensors, max_shard_bytes)
    with writing(out, overwrite, "checkpoint") as tmp:
        (tmp / MARKER).write_text(json.dumps({"kind": "checkpoint"}) + "\n")
        if len(shards) == 1:
            save_tensors(shards[0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_tensors(shard, tmp / fname)
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        write_companions(tmp, config, tensors["model.embed_tokens.weight"].dtype, tokenizer_json)
    return out


def save_streamed_checkpoint(config: ZayaConfig, out: str | Path, slots: list[TensorSlot],
                             produce: Callable[[TensorSlot], torch.Tensor], *, tokenizer_json: str | None = None,
                             max_shard_bytes: int | None = None, overwrite: bool = False,
                             progress: Progress | None = None) -> Path:
    """Write a checkpoint whose tensors come one at a time: ``produce(slot)`` is called once per slot, in the
    order of ``slots``, and the tensor is written and dropped before the next (an 8B model never sits in
    memory). Shards are consecutive runs of ``slots`` up to ``max_shard_bytes``. Atomic like
    :func:`save_checkpoint`."""
    out = Path(out)
    check_replaceable(out, overwrite, "checkpoint")
    shards: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in slots:
        if max_shard_bytes and shards[-1] and size + slot.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
    total = sum(s.nbytes for s in slots)
    done_before = 0

    def shard_progress(done: int, _: int) -> None:
        if progress:
            progress(done_before + done, total)

    with writing(out, overwrite, "checkpoint") as tmp:
        (tmp / MARKER).write_text(json.dumps({"kind": "checkpoint"}) + "\n")
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_streamed(tmp / fname, shard, produce, shard_progress, order=shard)
            done_before += sum(s.nbytes for s in shard)
            weight_map.update({s.name: fname for s in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        embed = next(s for s in slots if s.name == "model.embed_tokens.weight")
        write_companions(tmp, config, embed.dtype, tokenizer_json)
    return out


def write_companions(tmp: Path, config: ZayaConfig, dtype: torch.dtype, tokenizer_json: str | None) -> None:
    """config.json (naming the stored ``dtype``), generation_config.json and tokenizer.json of a checkpoint
    being written into ``tmp``; then the permissions a plain mkdir/open would give."""
    saved = ZayaConfig.from_dict(config.to_dict(), warn_unknown=False)
    saved.extra["dtype"] = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    saved.to_json_file(tmp / "config.json")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _make_readable(tmp)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.save_file``, with its I/O failures (a full disk, a file-size limit) raised as the
    :class:`OSError` they are, so that every writer reports them as one line and leaves the old output."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as exc:  # noqa: BLE001 - SafetensorError carries the OS error only in its text
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _make_readable(folder: Path) -> None:
    """mkdtemp creates 0700; give the finished checkpoint the permissions a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards
