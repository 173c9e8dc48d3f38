"""edgeft.safetensors_file: the one header reader, its checks and its one-line errors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgeft import safetensors_file as st
from edgeft.errors import UserError


def _write(path, tensors: dict, metadata: dict | None = None):
    header, blobs, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, a in tensors.items():
        b = a.tobytes()
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def _hdr(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def test_header_and_tensors(tmp_path):
    f = _write(tmp_path / "m.safetensors", {"w": np.ones((3, 4), np.float16), "b": np.zeros(4, np.float32)},
               metadata={"format": "pt"})
    assert list(st.read_header(f)) == ["w", "b"]  # __metadata__ left out
    infos = list(st.tensors(f))
    assert [(t.name, t.dtype, t.shape, t.numel, t.ndim) for t in infos] == [
        ("w", "F16", (3, 4), 12, 2), ("b", "F32", (4,), 4, 1)]
    with st.SafeTensorsFile(f) as sf:
        assert sf.keys() == ["w", "b"] and sf.shape("w") == (3, 4)
        assert np.array_equal(sf.read_f32("w"), np.ones((3, 4), np.float32))


@pytest.mark.parametrize("data, words", [
    (b"\x01\x02", ["truncated safetensors file"]),
    (struct.pack("<Q", 1 << 40) + b"{}", ["corrupt safetensors header", "implausible"]),
    (struct.pack("<Q", 16) + b"{not json", ["corrupt safetensors header"]),  # length past the end
    (_hdr(b"{not json"), ["not a readable safetensors", "corrupt safetensors header"]),
    (_hdr(b"[]"), ["not a JSON object"]),
    (_hdr(b'{"w": {"a": 1}}'), ["bad entry for tensor w"]),
])
def test_corrupt_headers_are_one_line_user_errors(tmp_path, data, words):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(data)
    for read in (st.read_header, lambda p: list(st.tensors(p)), st.SafeTensorsFile):
        with pytest.raises(UserError) as e:
            read(f)
        msg = str(e.value)
        assert str(f) in msg and "\n" not in msg and all(w in msg for w in words), msg


def test_truncated_data_is_caught_from_the_header(tmp_path):
    f = _write(tmp_path / "m.safetensors", {"w": np.ones((8, 8), np.float32)})
    f.write_bytes(f.read_bytes()[:-10])
    assert list(st.read_header(f)) == ["w"]  # the header alone is whole
    with pytest.raises(UserError, match=r"truncated \(\d+ bytes, the header lists \d+\)"):
        st.read_header(f, complete=True)
