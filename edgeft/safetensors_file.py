"""Read safetensors files without torch: edgeft's one reader of the format's header. Stdlib only at import
(numpy is imported when a tensor's values are read), so the device side can use it.

A file is an 8-byte little-endian header length, that many bytes of JSON (tensor name -> dtype, shape and
data_offsets relative to the end of the header, plus an optional __metadata__ entry), then the data.
`read_header` and `tensors` check the header (length, JSON, entries) and, asked to, that the file holds every
byte it lists; a file that fails is a one-line UserError naming it. `SafeTensorsFile` then reads one tensor at a
time with plain file reads (no memory map whose touched pages would stay resident); the GGUF writer uses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeft.errors import UserError

MAX_HEADER_BYTES = 100 << 20  # far above any real header; a larger length means a corrupt file
_FIX = "re-download or re-save the model (save_pretrained(dir, safe_serialization=True))"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry."""

    name: str
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # [start, end) in bytes, from the end of the header

    @property
    def numel(self) -> int:
        """Element count (1 for a scalar)."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def ndim(self) -> int:
        return len(self.shape)


def read_header(path: str | Path, *, complete: bool = False) -> dict[str, dict]:
    """Tensor name -> header entry (dtype, shape, data_offsets) of a safetensors file, __metadata__ left out.

    complete: also check that the file is long enough for every tensor the header lists (a truncated copy)."""
    path = Path(path)
    with open(path, "rb") as f:
        header, _ = _read_header(f, path, complete)
    return header


def tensors(path: str | Path) -> Iterator[TensorInfo]:
    """Every tensor of a safetensors file in header order, from its header only."""
    for name, e in read_header(path).items():
        yield TensorInfo(name, e["dtype"], tuple(e["shape"]), tuple(e["data_offsets"]))


def _read_header(f, path: Path, complete: bool = False) -> tuple[dict[str, dict], int]:
    """(checked tensor entries, offset of the data) of the open file `f`."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) != 8:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes, no header); {_FIX}")
    n = int.from_bytes(raw, "little")

    def corrupt(why: str) -> UserError:
        return UserError(f"{path}: not a readable safetensors file (corrupt safetensors header: {why}); {_FIX}")

    if not 2 <= n <= MAX_HEADER_BYTES:
        raise corrupt(f"a length of {n} bytes is implausible")
    if 8 + n > size:
        raise corrupt(f"its length, {n} bytes, runs past the end of the {size}-byte file")
    try:
        header = json.loads(f.read(n))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise corrupt(str(e)) from None
    if not isinstance(header, dict):
        raise corrupt("not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, e in header.items():
        try:
            ok = (isinstance(e["dtype"], str) and isinstance(e["shape"], list)
                  and all(isinstance(d, int) and d >= 0 for d in e["shape"])
                  and len(e["data_offsets"]) == 2 and all(isinstance(o, int) for o in e["data_offsets"])
                  and 0 <= e["data_offsets"][0] <= e["data_offsets"][1])
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise corrupt(f"bad entry for tensor {name}")
        end = max(end, e["data_offsets"][1])
    if complete and 8 + n + end > size:
        raise UserError(f"{path}: truncated ({size} bytes, the header lists {8 + n + end}); {_FIX}")
    return header, 8 + n


class SafeTensorsFile:
    """One safetensors file read with plain file reads: header once, then one tensor at a time."""

    _READABLE = ("F32", "F16", "BF16", "F64")  # dtypes read_f32 converts

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            self._header, self._base = _read_header(self._f, self.path)
        except BaseException:
            self._f.close()
            raise

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> str:
        """Stored dtype of tensor `name` (safetensors' name: F32, F16, BF16...)."""
        return self._header[name]["dtype"]

    def read_f32(self, name: str):
        """Tensor `name` as a new float32 numpy array."""
        import numpy as np

        info = self._header[name]
        if info["dtype"] not in self._READABLE:
            raise UserError(f"{self.path}: tensor {name} has dtype {info['dtype']}; the GGUF writer reads "
                            f"{', '.join(self._READABLE)}")
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}[info["dtype"]]
        start, end = info["data_offsets"]
        out = np.empty(tuple(info["shape"]), dtype=dtype)
        if out.nbytes != end - start:
            raise UserError(f"{self.path}: tensor {name} holds {end - start} bytes, its shape needs {out.nbytes}")
        self._f.seek(self._base + start)
        if self._f.readinto(memoryview(out.reshape(-1)).cast("B")) != out.nbytes:
            raise UserError(f"{self.path}: truncated inside tensor {name}; the file is incomplete")
        if dtype is np.uint16:  # bfloat16: the high half of a float32
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> SafeTensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
