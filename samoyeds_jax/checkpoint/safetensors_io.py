"""Reading and writing safetensors files: the one reader and the one writer.

Every byte the converter and the loader take from a file they were given (safetensors
headers, tensors and raw tensor bytes, index and ``config.json`` files, ``.npz``
calibration inputs) goes through a :class:`Reader`, and the output is written by a
:class:`Writer` in one pass.

Every input is untrusted. The reader refuses, with a :class:`ConversionError` naming the
file (and the tensor), before anything is allocated from what the file claims:

* a header longer than the file or than :data:`MAX_HEADER_BYTES`, JSON that is not an
  object of well-formed entries (duplicate keys, nesting too deep, bad UTF-8 included);
* an unknown dtype, a shape that is not a list of non-negative integers, a byte size that
  does not match ``data_offsets``;
* ``data_offsets`` outside the file, overlapping, or leaving holes (the safetensors rule:
  the tensors cover the data exactly);
* file names from an index that leave the checkpoint directory (absolute, ``..``, or a
  symlink resolving elsewhere; see :meth:`Reader.member`);
* JSON files past :data:`MAX_JSON_BYTES`; ``.npz`` members that are not plain numeric
  arrays of the size their zip entry declares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import struct
import sys
import zipfile
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from samoyeds_jax.checkpoint.schema import ConversionError

# safetensors dtype -> numpy dtype name, numpy dtype name -> safetensors dtype.
ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
             "U8": "uint8", "U32": "uint32", "I8": "int8", "I32": "int32", "I64": "int64",
             "BOOL": "bool", "I16": "int16", "U16": "uint16", "U64": "uint64",
             "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
             "F8_E8M0": "float8_e8m0fnu"}
NP_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint8": "U8",
            "uint32": "U32"}
# Bits per element of every safetensors dtype (what a file may hold and the converter
# copies through); any other dtype string is refused.
_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4,
         "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
         "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}
_COPY_CHUNK = 64 << 20
MAX_HEADER_BYTES = 100 << 20      # the safetensors library's own limit
MAX_JSON_BYTES = 64 << 20         # index and config.json files
MAX_RANK = 16
MAX_NAME_CHARS = 1024
MAX_DIM = 1 << 40                 # far past any real tensor's axis; keeps numpy in range
# A compressed .npz member may declare at most this many bytes per stored byte.
MAX_NPZ_RATIO = 64
DIGEST = "sha256"


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes lie in a safetensors file."""

    file: str
    dtype: str             # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int            # absolute byte offset of the data in `file`
    nbytes: int


def nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of safetensors dtype ``dtype`` and ``shape`` (exact integers)."""
    return math.prod(shape) * _BITS[dtype] // 8


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(raw: bytes, where: str) -> Any:
    """JSON from untrusted bytes: duplicate keys, bad UTF-8 and deep nesting refused."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:   # JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"{where}: not valid JSON ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: str, name: str, info: Any, base: int, data_len: int) -> Entry:
    """One header entry, checked against the file (``base``: where the data starts)."""
    def bad(why: str) -> ConversionError:
        return ConversionError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad("a header entry must hold exactly dtype, shape and data_offsets")
    dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dt, str) or dt not in _BITS:
        raise bad(f"unknown dtype {str(dt)[:40]!r} (known: {', '.join(sorted(_BITS))})")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or \
            not all(_is_int(s) and 0 <= s < MAX_DIM for s in shape):
        raise bad(f"shape must be a list of at most {MAX_RANK} integers in [0, 2**40), got "
                  f"{str(shape)[:80]}")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) \
            or not 0 <= offs[0] <= offs[1]:
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got "
                  f"{str(offs)[:80]}")
    if offs[1] > data_len:
        raise bad(f"data_offsets {offs} end past the file's {data_len} data bytes "
                  f"(truncated or corrupt)")
    bits = math.prod(shape) * _BITS[dt]
    if bits % 8 or bits // 8 != offs[1] - offs[0]:
        raise bad(f"{dt}{shape} is {bits / 8:g} bytes but data_offsets {offs} hold "
                  f"{offs[1] - offs[0]}")
    return Entry(path, dt, tuple(shape), base + offs[0], offs[1] - offs[0])


class Reader:
    """Reads input files; a context manager that closes the handles it opened.

    Headers, tensors and raw tensor bytes are read directly, at offsets the header check
    has bounded to the file; one handle per file.
    """

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self._files: dict[str, BinaryIO] = {}

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._files.clear()
        self._stack.close()

    def _open(self, path: str) -> BinaryIO:
        f = self._files.get(path)
        if f is None:
            try:
                f = self._stack.enter_context(open(path, "rb"))
            except OSError as err:
                raise ConversionError(f"{path}: cannot open: {err.strerror or err}") from None
            self._files[path] = f
        return f

    # --- where files may be ---------------------------------------------------------

    def member(self, directory: str, name: Any, source: str) -> str:
        """The path of file ``name`` (read from ``source``, e.g. an index) inside
        ``directory``; ConversionError unless it stays there.

        ``name`` must be a relative path without ``..`` components, and the file must
        resolve (symlinks followed) inside the directory. The one exception is the
        Hugging Face hub cache, whose snapshot files link to the repository's ``blobs``
        directory: a checkpoint directory ``<repo>/snapshots/<revision>`` may link into
        ``<repo>/blobs``.
        """
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ConversionError(f"{source}: file name {str(name)[:80]!r} is not a file "
                                  f"name")
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or \
                os.path.splitdrive(name)[0]:
            raise ConversionError(f"{source}: file {name!r} is outside the checkpoint "
                                  f"directory (absolute or with '..')")
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        if not any(_inside(real, root) for root in _roots(directory)):
            raise ConversionError(f"{source}: file {name!r} resolves to {real!r}, outside "
                                  f"the checkpoint directory {os.path.realpath(directory)!r}")
        return path

    # --- safetensors ----------------------------------------------------------------

    def header(self, path: str) -> tuple[dict[str, Entry], dict[str, str]]:
        """The tensors (name -> :class:`Entry`) and the ``__metadata__`` of a safetensors
        file; ConversionError if it is not a well-formed one."""
        entries, meta, _ = self.header_bytes(path)
        return entries, meta

    def header_bytes(self, path: str) -> tuple[dict[str, Entry], dict[str, str], bytes]:
        """:meth:`header`, and the header's raw JSON bytes."""
        f = self._open(path)
        f.seek(0)
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n < 2 or n > size - 8 or n > MAX_HEADER_BYTES:
            raise ConversionError(f"{path}: not a safetensors file (header length {n}; the "
                                  f"file has {size} bytes, the limit is {MAX_HEADER_BYTES})")
        raw = f.read(n)
        if len(raw) != n:
            raise ConversionError(f"{path}: truncated header")
        header = parse_json(raw, f"{path}: header")
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: not a safetensors file (the header is not a "
                                  f"JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ConversionError(f"{path}: __metadata__ must map names to strings")
        data_len = size - 8 - n
        for name in header:
            if len(name) > MAX_NAME_CHARS or not name.isprintable():
                raise ConversionError(f"{path}: tensor name {name[:80]!r} is longer than "
                                      f"{MAX_NAME_CHARS} characters or not printable")
        entries = {name: _entry(path, name, info, 8 + n, data_len)
                   for name, info in header.items()}
        # The tensors cover the data exactly: no overlap, no hole, nothing after.
        end, last = 0, None
        for name, ent in sorted(entries.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
            begin = ent.offset - 8 - n
            if begin != end:
                raise ConversionError(
                    f"{path}: tensor {name!r}: data_offsets begin at {begin}, but the "
                    f"previous tensor{f' {last!r}' if last else ''} ends at {end} "
                    f"({'overlapping' if begin < end else 'a hole between them'})")
            end, last = begin + ent.nbytes, name
        if end != data_len:
            raise ConversionError(f"{path}: the tensors' data ends at byte {end} of "
                                  f"{data_len} (trailing bytes or a truncated header)")
        return entries, meta, raw

    def raw(self, entry: Entry, name: str) -> np.ndarray:
        """The bytes of tensor ``name`` (at ``entry``) as a uint8 array."""
        f = self._open(entry.file)
        buf = np.empty(entry.nbytes, np.uint8)
        f.seek(entry.offset)
        if f.readinto(memoryview(buf)) != entry.nbytes:
            raise ConversionError(f"{entry.file}: tensor {name!r}: the file ends early "
                                  f"(truncated)")
        return buf

    def tensor(self, entry: Entry, name: str, digest: str | None = None) -> np.ndarray:
        """Tensor ``name`` (at ``entry``) as a numpy array; with ``digest`` (hex), its
        bytes must hash to it."""
        if entry.dtype not in ST_DTYPES:
            raise ConversionError(f"{entry.file}: tensor {name!r}: dtype {entry.dtype} cannot "
                                  f"be read as an array here")
        buf = self.raw(entry, name)
        if digest is not None:
            check_digest(buf, digest, f"{entry.file}: tensor {name!r}")
        dt = np.dtype(_numpy_dtype(ST_DTYPES[entry.dtype])).newbyteorder("<")
        a = buf.view(dt).reshape(entry.shape)
        return a if dt.isnative else a.astype(dt.newbyteorder("="))

    def chunks(self, entry: Entry, name: str = "") -> Iterator[bytes]:
        """The raw bytes of one tensor, in chunks; ConversionError if the file ends early."""
        f = self._open(entry.file)
        pos, left = entry.offset, entry.nbytes
        while left:
            f.seek(pos)
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise ConversionError(f"{entry.file}: tensor {name!r}: the file ends early "
                                      f"(truncated)")
            yield chunk
            pos += len(chunk)
            left -= len(chunk)

    # --- other inputs ---------------------------------------------------------------

    def json(self, path: str) -> Any:
        """A JSON file, parsed; ConversionError naming the file if it is not one."""
        f = self._open(path)
        f.seek(0)
        raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise ConversionError(f"{path}: larger than {MAX_JSON_BYTES} bytes")
        return parse_json(raw, path)

    def npz(self, path: str) -> "NpzInputs":
        """An ``.npz`` file (no pickles): its keys and checked arrays."""
        try:
            z = self._stack.enter_context(zipfile.ZipFile(self._open(path)))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise ConversionError(f"{path}: not an .npz file ({err})") from None
        return NpzInputs(path, z)


class NpzInputs:
    """The arrays of an ``.npz`` file, each checked before it is allocated."""

    def __init__(self, path: str, z: zipfile.ZipFile):
        self.path = path
        self._z = z
        self._members = {}
        for info in z.infolist():
            if info.filename.endswith(".npy"):
                self._members[info.filename[:-4]] = info
        self.files = sorted(self._members)

    def __getitem__(self, key: str) -> np.ndarray:
        info = self._members[key]
        where = f"{self.path}: array {key!r}"
        if info.compress_type != zipfile.ZIP_STORED and \
                info.file_size > MAX_NPZ_RATIO * max(info.compress_size, 1 << 16):
            raise ConversionError(f"{where}: declares {info.file_size} bytes from "
                                  f"{info.compress_size} compressed (a decompression bomb?)")
        try:
            with self._z.open(info) as f:
                read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
                if read_header is None:
                    raise ConversionError(f"{where}: unsupported .npy format version")
                shape, fortran, dtype = read_header(f, max_header_size=1 << 16)
                if dtype.hasobject or dtype.kind not in "biuf" or len(shape) > MAX_RANK:
                    raise ConversionError(f"{where}: {dtype}{list(shape)} is not a numeric "
                                          f"array")
                size = math.prod(shape) * dtype.itemsize
                if size > info.file_size:
                    raise ConversionError(f"{where}: {dtype}{list(shape)} needs {size} "
                                          f"bytes; the file holds {info.file_size}")
                data = f.read(size + 1)
        except ConversionError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
            raise ConversionError(f"{where}: cannot read ({err})") from None
        if len(data) != size:
            raise ConversionError(f"{where}: holds {len(data)} data bytes, expected {size}")
        a = np.frombuffer(data, dtype).reshape(shape[::-1] if fortran else shape)
        return a.T if fortran else a


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _numpy_dtype(name: str) -> Any:
    if name.startswith(("bfloat16", "float8")):
        import ml_dtypes

        return getattr(ml_dtypes, name)
    return np.dtype(name)


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _roots(directory: str) -> list[str]:
    """Where files of a checkpoint directory may resolve to (see :meth:`Reader.member`)."""
    real = os.path.realpath(directory)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


def digest_of(data: Any) -> str:
    """The hex digest (:data:`DIGEST`) of bytes or a buffer."""
    return hashlib.new(DIGEST, data).hexdigest()


def check_digest(data: Any, want: str, what: str) -> None:
    """ConversionError naming ``what`` unless ``data`` hashes to ``want``."""
    got = digest_of(data)
    if got != want:
        raise ConversionError(f"{what}: checksum mismatch ({DIGEST} {got[:16]}..., "
                              f"recorded {str(want)[:16]}...): the file is corrupt")


class Writer:
    """Writes one safetensors file: the header of the planned tensors, then each tensor's
    bytes in plan order (an array, or raw bytes copied from an input file).

    With ``checksums`` (a metadata key), the header records a :data:`DIGEST` of every
    tensor's bytes and of the header itself, as the JSON string
    ``{"algorithm": ..., "header": ..., "tensors": {name: ...}}`` under that key: written
    as zeros first, filled in by :meth:`finish` (same length), the header's digest taken
    with its own field still zeros (:func:`header_digest`).

    Args:
      plan: ``(name, safetensors dtype, shape)`` of every tensor, in file order.
      metadata: the ``__metadata__`` strings.
      checksums: the metadata key of the checksums, or None for none.
    """

    def __init__(self, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str],
                 checksums: str | None = None):
        self._layout = {}
        offset = 0
        for name, dt, shape in plan:
            nb = nbytes(dt, shape)
            self._layout[name] = {"dtype": dt, "shape": list(shape),
                                  "data_offsets": [offset, offset + nb]}
            offset += nb
        self._metadata = dict(metadata)
        self._checksums = checksums
        self._digests = {name: _ZERO_DIGEST for name, _, _ in plan}
        self._header = self._encode_header(_ZERO_DIGEST)
        self._plan = plan
        self._next = 0
        self._dst: BinaryIO | None = None
        self.size = 8 + len(self._header) + offset

    def _encode_header(self, header_digest: str) -> bytes:
        meta = dict(self._metadata)
        if self._checksums is not None:
            meta[self._checksums] = json.dumps(
                {"algorithm": DIGEST, "header": header_digest, "tensors": self._digests},
                separators=(",", ":"))
        hbytes = json.dumps({"__metadata__": meta, **self._layout},
                            separators=(",", ":")).encode()
        return hbytes + b" " * (-len(hbytes) % 8)

    def begin(self, dst: BinaryIO) -> None:
        self._dst = dst
        self._start = dst.tell()
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
        data = a.reshape(-1).view(np.uint8).data
        self._digests[name] = digest_of(data)
        self._dst.write(data)

    def copy(self, name: str, chunks: Iterable[bytes]) -> None:
        """Write tensor ``name`` from raw bytes (e.g. :meth:`Reader.chunks`)."""
        self._take(name)
        h = hashlib.new(DIGEST)
        for chunk in chunks:
            h.update(chunk)
            self._dst.write(chunk)
        self._digests[name] = h.hexdigest()

    def finish(self) -> None:
        """Check that every planned tensor was written and the file has its planned size;
        write the checksums into the header."""
        if self._next != len(self._plan):
            raise AssertionError(f"{len(self._plan) - self._next} planned tensors not written")
        self._dst.flush()
        if self._dst.tell() - self._start != self.size:
            raise AssertionError("output size does not match its header")
        if self._checksums is None:
            return
        header = self._encode_header(_ZERO_DIGEST)
        header = self._encode_header(digest_of(header))
        if len(header) != len(self._header):
            raise AssertionError("the header changed length when its checksums were filled in")
        self._dst.seek(self._start + 8)
        self._dst.write(header)
        self._dst.seek(0, os.SEEK_END)
        self._dst.flush()


_ZERO_DIGEST = "0" * hashlib.new(DIGEST).digest_size * 2


def header_digest(raw: bytes, recorded: str, what: str) -> None:
    """ConversionError unless the header bytes ``raw`` hash to ``recorded`` with that
    digest's own field zeroed (as :class:`Writer` computed it)."""
    if not isinstance(recorded, str) or len(recorded) != len(_ZERO_DIGEST) or \
            raw.count(recorded.encode()) != 1:
        raise ConversionError(f"{what}: the recorded header checksum is malformed (the file "
                              f"is corrupt)")
    check_digest(raw.replace(recorded.encode(), _ZERO_DIGEST.encode()), recorded,
                 f"{what}: header")
