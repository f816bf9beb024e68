"""Write a safetensors file one tensor at a time, and read one tensor of a file without mapping the rest.

``safetensors.save_file`` takes every tensor at once, so writing an 8B model with it means holding the whole
model in memory. The format only needs the header up front: names, dtypes and shapes are known before any
value is (from a meta-device model or a checkpoint's headers), so the header is written first and each tensor
is produced, converted, written and dropped in turn. The working set is one tensor (plus its converted copy).

Reading goes through ``readinto`` on a plain file, not an mmap: pages of a mapped file that were touched count
as resident memory until the mapping closes, so mapping an 18 GB checkpoint and reading it through would show
as 18 GB of RSS even though nothing is kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_header import DTYPE_BYTES, TensorInfo

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of a file to be written: its name, stored dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[SAFETENSORS_DTYPES[self.dtype]]


Progress = Callable[[int, int], None]  # (bytes written, bytes in total)


def layout(slots: Iterable[TensorSlot]) -> list[TensorSlot]:
    """The order tensors are stored in: widest dtype first, then by name (as ``safetensors.save_file`` does),
    so every tensor's offset is aligned to its element size once the header is padded to 8 bytes."""
    return sorted(slots, key=lambda s: (-DTYPE_BYTES[SAFETENSORS_DTYPES[s.dtype]], s.name))


def write_streamed(path: Path, slots: list[TensorSlot], produce: Callable[[TensorSlot], torch.Tensor],
                   progress: Progress | None = None, order: list[TensorSlot] | None = None,
                   metadata: dict[str, str] | None = None) -> dict[str, tuple[int, int, str]]:
    """Write ``slots`` to ``path``; ``produce(slot)`` returns each tensor (any float dtype: converted here),
    called once per slot in ``order`` (default: the storage order), so a sequential generator can fill the file
    in its own order. Returns name → (absolute byte offset, length, safetensors dtype), the form ONNX external
    data needs. I/O failures (full disk, file-size limit) raise the :class:`OSError` they are."""
    stored = layout(slots)
    offsets, cursor, header = {}, 0, {}
    for s in stored:
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [cursor, cursor + s.nbytes]}
        cursor += s.nbytes
    raw = json.dumps({"__metadata__": metadata or {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    total, done = cursor, 0
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(data_start + total)  # full size up front (sparse): tensors may arrive in any order
        for s in order or stored:
            tensor = produce(s)
            if tuple(tensor.shape) != s.shape:
                raise ValueError(f"{s.name}: produced shape {list(tensor.shape)}, expected {list(s.shape)}")
            data = tensor.detach().to(s.dtype).contiguous().view(torch.uint8).reshape(-1)  # [nbytes]
            del tensor
            begin = header[s.name]["data_offsets"][0]
            f.seek(data_start + begin)
            f.write(memoryview(data.numpy()))
            offsets[s.name] = (data_start + begin, s.nbytes, SAFETENSORS_DTYPES[s.dtype])
            del data
            done += s.nbytes
            if progress:
                progress(done, total)
    return offsets


def read_tensor(info: TensorInfo, rows: int | None = None) -> torch.Tensor:
    """One tensor of a checked safetensors file (``read_header``), read into fresh memory: [*info.shape], or
    only its first ``rows`` rows (along dim 0) without reading the rest."""
    shape = list(info.shape)
    nbytes = info.end - info.start
    if rows is not None and shape and rows < shape[0]:
        nbytes = nbytes // shape[0] * rows
        shape[0] = rows
    data_start = info.file.stat().st_size - _data_length(info.file)
    buf = torch.empty(nbytes, dtype=torch.uint8)  # [nbytes]
    with info.file.open("rb") as f:
        f.seek(data_start + info.start)
        if f.readinto(memoryview(buf.numpy())) != nbytes:
            raise OSError(f"{info.file}: short read of tensor {info.name!r}")
    return buf.view(TORCH_DTYPES[info.dtype]).reshape(shape)


def _data_length(path: Path) -> int:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


def status_progress(status: Callable[[str], None], label: str) -> Progress:
    """A :data:`Progress` that shows ``label: <bytes, rate, ETA>`` through ``status``, at most twice a second
    (and once at the end), not once per tensor."""
    start = last = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal last
        if time.perf_counter() - last >= 0.5 or done == total:
            last = time.perf_counter()
            status(f"{label}: {eta_text(done, total, start)}")

    return progress


def eta_text(done: int, total: int, start: float) -> str:
    """``3.2/18.8 GB, 210 MB/s, ETA 1m14s``: the bytes-and-time line of a streamed write."""
    elapsed = max(time.perf_counter() - start, 1e-6)
    rate = done / elapsed
    left = (total - done) / rate if rate > 0 else float("inf")
    eta = "?" if not math.isfinite(left) else f"{int(left // 60)}m{int(left % 60):02d}s"
    return f"{done / 1e9:.2f}/{total / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, ETA {eta}"
