"""Read a safetensors file without torch: the JSON header once, then one tensor at a time with plain file
reads (no memory map whose touched pages would stay resident). Used by the GGUF writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeft.errors import UserError


class SafeTensorsFile:
    """One safetensors file read with plain file reads: header once, then one tensor at a time."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            n = int.from_bytes(self._f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                raise ValueError(f"header length {n}")
            self._header = json.loads(self._f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            self._f.close()
            raise UserError(f"{self.path}: not a safetensors file ({e}); re-save the model with "
                            "safe_serialization=True") from None
        self._header.pop("__metadata__", None)
        self._base = 8 + n

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return tuple(self._header[name]["shape"])

    def read_f32(self, name: str) -> np.ndarray:
        """Tensor `name` as a new float32 array."""
        info = self._header[name]
        dtype = self._DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"{self.path}: tensor {name} has dtype {info['dtype']}; the GGUF writer reads "
                            f"{', '.join(self._DTYPES)}")
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
