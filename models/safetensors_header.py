"""Validate a safetensors file's header against its size before any tensor is mapped.

The safetensors library rejects broken files too, but with messages that do not say which file or what is
wrong. Reading the header ourselves costs one small read and lets every error name the file, the tensor and
the byte counts (truncated download, header/size mismatch, overlapping tensors).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from zaya_export.errors import CheckpointError

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check the header of ``path``; raise :class:`CheckpointError` naming the problem."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path}: header length {n} exceeds the file size {size} (truncated or not a safetensors file)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON, or nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (isinstance(dtype, str) and start <= end
                  and all(type(x) is int and x >= 0 for x in (*shape, start, end)))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}")
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - start != want:
            raise CheckpointError(
                f"{path}: tensor {name!r} {dtype}{list(shape)} needs {want} bytes but its offsets span {end - start}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, start, end)
    data = size - 8 - n
    spans = sorted((i.start, i.end, name) for name, i in infos.items())
    cursor = 0
    for start, end, name in spans:
        if start != cursor:
            what = "overlaps the previous tensor" if start < cursor else "leaves a gap before it"
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} {what}")
        cursor = end
    if cursor > data:
        raise CheckpointError(f"{path}: truncated: tensors need {cursor} data bytes but the file holds {data}")
    if cursor < data:
        raise CheckpointError(f"{path}: header/size mismatch: {data - cursor} unexpected bytes after the tensors")
    return infos
