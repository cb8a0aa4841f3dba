"""Reading and writing safetensors files: the one reader and the one writer.

Every byte the converter and the loader take from a file they were given (safetensors
headers, tensors and raw tensor bytes, index and ``config.json`` files, ``.npz``
calibration inputs) goes through a :class:`Reader`, and the output is written by a
:class:`Writer` in one pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import sys
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from samoyeds_jax.checkpoint.schema import ConversionError

# safetensors dtype -> numpy dtype name, numpy dtype name -> safetensors dtype, item sizes.
ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
             "U8": "uint8", "U32": "uint32", "I8": "int8", "I32": "int32", "I64": "int64"}
NP_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint8": "U8",
            "uint32": "U32"}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
             "F4": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
             "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_COPY_CHUNK = 64 << 20


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie in a safetensors file."""

    file: str
    dtype: str             # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int            # absolute byte offset of the data in `file`
    nbytes: int


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of safetensors dtype ``dtype`` and ``shape``."""
    return int(np.prod(tuple(shape), dtype=np.int64)) * _ITEMSIZE[dtype]


class Reader:
    """Reads input files; a context manager that closes the handles it opened.

    Tensors are read through ``safetensors.safe_open`` (one handle per file), headers and
    raw tensor bytes directly.
    """

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def header(self, path: str) -> tuple[dict[str, Entry], dict[str, str]]:
        """The tensors (name -> :class:`Entry`) and the ``__metadata__`` of a safetensors
        file; ConversionError if it is not one."""
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ConversionError(f"{path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", head)
                size = os.fstat(f.fileno()).st_size
                if n > min(size - 8, 1 << 30):
                    raise ConversionError(f"{path}: not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{path}: not a safetensors file (bad header)") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: not a safetensors file (bad header)")
        meta = header.pop("__metadata__", None) or {}
        entries = {}
        for name, info in header.items():
            try:
                b, e = info["data_offsets"]
                entries[name] = Entry(path, info["dtype"],
                                      tuple(int(s) for s in info["shape"]),
                                      8 + n + int(b), int(e) - int(b))
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: bad header entry for tensor {name!r}") from None
        return entries, meta

    def tensor(self, entry: Entry, name: str) -> np.ndarray:
        """Tensor ``name`` (at ``entry``) as a numpy array."""
        from safetensors import safe_open

        h = self._handles.get(entry.file)
        if h is None:
            h = self._stack.enter_context(safe_open(entry.file, framework="numpy"))
            self._handles[entry.file] = h
        return h.get_tensor(name)

    def chunks(self, entry: Entry) -> Iterator[bytes]:
        """The raw bytes of one tensor, in chunks; ConversionError if the file ends early."""
        with open(entry.file, "rb") as src:
            src.seek(entry.offset)
            left = entry.nbytes
            while left:
                chunk = src.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise ConversionError(f"{entry.file}: truncated (tensor data ends early)")
                yield chunk
                left -= len(chunk)

    def json(self, path: str) -> Any:
        """A JSON file, parsed (OSError and json.JSONDecodeError propagate)."""
        with open(path) as f:
            return json.load(f)

    def npz(self, path: str) -> Any:
        """An ``.npz`` file (no pickles), open until the reader closes."""
        return self._stack.enter_context(np.load(path, allow_pickle=False))


class Writer:
    """Writes one safetensors file: the header of the planned tensors, then each tensor's
    bytes in plan order (an array, or raw bytes copied from an input file).

    Args:
      plan: ``(name, safetensors dtype, shape)`` of every tensor, in file order.
      metadata: the ``__metadata__`` strings.
    """

    def __init__(self, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for name, dt, shape in plan:
            nb = nbytes(dt, shape)
            header[name] = {"dtype": dt, "shape": list(shape),
                            "data_offsets": [offset, offset + nb]}
            offset += nb
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        self._header = hbytes + b" " * (-len(hbytes) % 8)
        self._plan = plan
        self._next = 0
        self._dst: BinaryIO | None = None
        self.size = 8 + len(self._header) + offset

    def begin(self, dst: BinaryIO) -> None:
        self._dst = dst
        dst.write(struct.pack("<Q", len(self._header)))
        dst.write(self._header)

    def _take(self, name: str) -> tuple[str, str, tuple[int, ...]]:
        planned = self._plan[self._next]
        if planned[0] != name:
            raise AssertionError(f"writing {name!r}, planned {planned[0]!r} next")
        self._next += 1
        return planned

    def array(self, name: str, a: np.ndarray) -> None:
        """Write tensor ``name`` from an array of exactly the planned dtype and shape."""
        _, dt, shape = self._take(name)
        a = np.asarray(a)
        if a.dtype.name != ST_DTYPES[dt] or tuple(a.shape) != tuple(shape):
            raise AssertionError(f"{name}: produced {a.dtype} {a.shape}, planned {dt} {shape}")
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
            a = a.astype(a.dtype.newbyteorder("<"))
        self._dst.write(a.reshape(-1).view(np.uint8).data)

    def copy(self, name: str, chunks: Iterable[bytes]) -> None:
        """Write tensor ``name`` from raw bytes (e.g. :meth:`Reader.chunks`)."""
        self._take(name)
        for chunk in chunks:
            self._dst.write(chunk)

    def finish(self) -> None:
        """Check that every planned tensor was written and the file has its planned size."""
        if self._next != len(self._plan):
            raise AssertionError(f"{len(self._plan) - self._next} planned tensors not written")
        self._dst.flush()
        if self._dst.tell() != self.size:
            raise AssertionError("output size does not match its header")
