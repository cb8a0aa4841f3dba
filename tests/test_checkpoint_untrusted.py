"""The converter and the loader on hostile files: every input is untrusted.

Each hostile input is refused by ``samoyeds-convert`` with exit status 2 and one line on
stderr naming the file (and the tensor), no traceback, and nothing left in the output
directory; signals stop a conversion the same way. A converted file carries checksums that
``sj.load_checkpoint`` verifies, so a corrupted byte is refused with the tensor's name.
The tiny checkpoints come from tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

import samoyeds_jax as sj
from samoyeds_jax import checkpoint as ck
from samoyeds_jax.checkpoint import safetensors_io
from test_checkpoint import ARGS, BF16, hf_checkpoint, hf_config, write_model

EXTRA = "model.extra.weight"        # a tensor of a shard that holds no expert weights


def st_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header dict (written as given) and data bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def two_shards(tmp_path, rng, shard2: bytes, weight_map_extra: dict | None = None):
    """A Mixtral checkpoint: shard 1 holds every real tensor, shard 2 (given bytes) the
    tensor EXTRA only; the index names both."""
    src = write_model(tmp_path, hf_checkpoint("mixtral", rng, BF16, layers=1),
                      hf_config("mixtral"), shards=1)
    os.rename(src / "model.safetensors", src / "model-00001.safetensors")
    (src / "model-00002.safetensors").write_bytes(shard2)
    with safetensors_io.Reader() as r:
        names = r.header(str(src / "model-00001.safetensors"))[0]
    wm = {n: "model-00001.safetensors" for n in names}
    wm.update(weight_map_extra if weight_map_extra is not None
              else {EXTRA: "model-00002.safetensors"})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return src


def refused(src, tmp_path, capsys, *words, args=ARGS):
    """samoyeds-convert refuses src: exit 2, one stderr line holding every word, no
    traceback, nothing written."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    code = ck.main(["--input", str(src), "--output", str(out / "o.safetensors"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("samoyeds-convert: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert os.listdir(out) == [], os.listdir(out)
    return lines[0]


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
HOSTILE_SHARDS = {
    # case: (shard bytes, words of the refusal)
    "negative_offset": (st_bytes({EXTRA: {**F32_4, "data_offsets": [-4, 12]}}, bytes(16)),
                        ["model-00002.safetensors", EXTRA, "data_offsets"]),
    "overlapping": (st_bytes({EXTRA: F32_4, "model.other": {**F32_4, "data_offsets": [8, 24]}},
                             bytes(24)), ["model-00002.safetensors", "overlapping"]),
    "hole": (st_bytes({EXTRA: F32_4, "model.other": {**F32_4, "data_offsets": [20, 36]}},
                      bytes(36)), ["model-00002.safetensors", "a hole"]),
    "size_overflows": (st_bytes({EXTRA: {**F32_4, "shape": [2**39, 2**39, 2**39, 64]}},
                                bytes(16)), ["model-00002.safetensors", EXTRA, "bytes"]),
    "unknown_dtype": (st_bytes({EXTRA: {**F32_4, "dtype": "Q7"}}, bytes(16)),
                      ["model-00002.safetensors", EXTRA, "unknown dtype 'Q7'"]),
    "bool_shape": (st_bytes({EXTRA: {**F32_4, "shape": [True, 4]}}, bytes(16)),
                   ["model-00002.safetensors", EXTRA, "shape"]),
    "truncated": (st_bytes({EXTRA: {**F32_4, "data_offsets": [0, 16]}}, bytes(10)),
                  ["model-00002.safetensors", EXTRA, "truncated"]),
    "trailing_bytes": (st_bytes({EXTRA: F32_4}, bytes(20)), ["model-00002.safetensors"]),
    "header_longer_than_file": (st_bytes({EXTRA: F32_4}, bytes(16), length=1 << 40),
                                ["model-00002.safetensors", "header length"]),
    "header_deeply_nested": (st_bytes(b"[" * 200_000, b""), ["model-00002.safetensors",
                                                             "not valid JSON"]),
    "header_duplicate_key": (st_bytes(b'{"%s": %s, "%s": %s}' % (
        EXTRA.encode(), json.dumps(F32_4).encode(), EXTRA.encode(), json.dumps(F32_4).encode()),
        bytes(16)), ["model-00002.safetensors", "duplicate key"]),
    "header_not_utf8": (st_bytes(b'{"\xff\xfe": 1}', b""), ["model-00002.safetensors",
                                                            "not valid JSON"]),
    "name_with_newline": (st_bytes({EXTRA + "\nx": F32_4}, bytes(16)),
                          ["model-00002.safetensors", "not printable"]),
    "metadata_not_strings": (st_bytes({"__metadata__": {"a": [1]}, EXTRA: F32_4}, bytes(16)),
                             ["model-00002.safetensors", "__metadata__"]),
    "entry_extra_field": (st_bytes({EXTRA: {**F32_4, "x": 1}}, bytes(16)),
                          ["model-00002.safetensors", EXTRA, "exactly"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SHARDS))
def test_hostile_shard_headers_are_refused(case, tmp_path, rng, capsys):
    """A shard that holds no expert weights is still checked before a byte is copied."""
    shard, words = HOSTILE_SHARDS[case]
    refused(two_shards(tmp_path, rng, shard), tmp_path, capsys, *words)


def test_shard_paths_stay_inside_the_checkpoint(tmp_path, rng, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    secret.write_bytes(st_bytes({EXTRA: F32_4}, np.arange(4, dtype="<f4").tobytes()))
    good = st_bytes({EXTRA: F32_4}, bytes(16))
    for fname, words in (("../elsewhere/secret.safetensors", ["outside the checkpoint"]),
                         (str(secret), ["outside the checkpoint"]),
                         ("link.safetensors", ["resolves to", "outside the checkpoint"]),
                         (7, ["is not a file name"])):
        case_dir = tmp_path / f"case{len(os.listdir(tmp_path))}"
        case_dir.mkdir()
        src = two_shards(case_dir, rng, good, {EXTRA: fname})
        if fname == "link.safetensors":
            os.symlink(secret, src / "link.safetensors")
        refused(src, case_dir, capsys, "model.safetensors.index.json", EXTRA, *words)
    # Links inside the directory are fine, and so is the Hugging Face hub cache layout
    # (snapshots/<revision>/<file> -> ../../blobs/<hash>).
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.parent.mkdir()
    src = two_shards(repo / "snapshots", rng, good)
    os.rename(src, snap)
    for name in ("model-00001.safetensors", "model-00002.safetensors"):
        os.rename(snap / name, repo / "blobs" / (name + ".blob"))
        os.symlink(os.path.join("..", "..", "blobs", name + ".blob"), snap / name)
    out = tmp_path / "hub.safetensors"
    assert ck.main(["--input", str(snap), "--output", str(out), *ARGS]) == 0
    assert EXTRA in sj.load_checkpoint(str(out))[2]


def test_malformed_index_and_config_are_refused(tmp_path, rng, capsys):
    good = st_bytes({EXTRA: F32_4}, bytes(16))
    src = two_shards(tmp_path, rng, good)
    index = src / "model.safetensors.index.json"
    for doc, words in (([1, 2], ["weight_map"]), ({"weight_map": ["a"]}, ["weight_map"]),
                       ({"weight_map": {}}, ["weight_map"]),
                       ({"weight_map": {EXTRA: "."}}, ["is missing"])):
        index.write_text(json.dumps(doc))
        refused(src, tmp_path, capsys, "model.safetensors.index.json", *words)
    index.write_bytes(b"\xff\xfe{")
    refused(src, tmp_path, capsys, "model.safetensors.index.json", "not valid JSON")
    # config.json fields the converter reads must have their JSON types.
    single = write_model(tmp_path, hf_checkpoint("mixtral", rng, BF16, layers=1),
                         name="single")
    for cfg, field in (({"hidden_act": ["silu"]}, "hidden_act"),
                       ({"num_experts_per_tok": "2"}, "num_experts_per_tok"),
                       ({"num_experts_per_tok": True}, "num_experts_per_tok"),
                       ({"n_shared_experts": 10**30}, "n_shared_experts")):
        (single / "config.json").write_text(json.dumps(cfg))
        refused(single, tmp_path, capsys, "config.json", field)


def test_absurd_expert_ids_allocate_nothing(tmp_path, rng, capsys):
    """Layer and expert numbers are parsed and bounded before anything is sized by them."""
    t = hf_checkpoint("mixtral", rng, BF16, layers=1)
    for bad, words in (("10000000000", ["expert number", "10000000000"]),
                       ("0007", ["leading zeros"]),
                       ("1000000", ["experts [4, 5] are missing"])):
        case = dict(t)
        name = f"model.layers.0.block_sparse_moe.experts.{bad}.w1.weight"
        case[name] = t["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
        d = tmp_path / f"id{bad}"
        d.mkdir()
        src = write_model(d, case, hf_config("mixtral"))
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            line = refused(src, d, capsys, *words)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 64 << 20, f"{bad}: peak {peak / 2**20:.0f} MiB"
        assert time.perf_counter() - t0 < 30 and len(line) < 1000, line[:300]


# --- signals and temporaries -------------------------------------------------------------

_SLOW_CONVERT = """
import os, signal, sys, time
# The stop signals at their defaults, as a shell gives a foreground command (a test run
# under nohup would pass SIGHUP ignored), except those named in the variable.
ignore = os.environ["SLOW_CONVERT_IGNORE"].split()
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN if sig.name in ignore else signal.SIG_DFL)
from samoyeds_jax.checkpoint import cli, converter
def slow(*args, **kwargs):
    print("converting", flush=True)
    time.sleep(120)
converter._convert_layer = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def _start_slow_conversion(src, out, ignore=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               SLOW_CONVERT_IGNORE=" ".join(sig.name for sig in ignore))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, "--input", str(src),
                             "--output", str(out), *ARGS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()          # the conversion has started writing
    assert line.strip() == "converting", (line, proc.stderr.read() if proc.poll() else "")
    return proc


def test_signals_stop_a_conversion_and_leave_nothing(tmp_path, rng):
    """SIGTERM and SIGHUP behave like SIGINT: the partial output is removed, one line,
    exit 128 + signal; a signal the caller ignores stays ignored; a temporary that
    SIGKILL left is removed by the next run."""
    src = write_model(tmp_path, hf_checkpoint("mixtral", rng, BF16, layers=1),
                      hf_config("mixtral"))
    out = tmp_path / "out"
    out.mkdir()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        proc = _start_slow_conversion(src, out / "o.safetensors")
        assert len(os.listdir(out)) == 1          # the hidden temporary
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert err.strip() == f"samoyeds-convert: stopped by {sig.name}; nothing was written"
        assert os.listdir(out) == []
    # A signal the caller ignores (`nohup samoyeds-convert ...`) stays ignored.
    proc = _start_slow_conversion(src, out / "o.safetensors", ignore=(signal.SIGHUP,))
    proc.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
    proc.kill()
    proc.communicate(timeout=60)
    assert len(os.listdir(out)) == 1              # SIGKILL cannot clean up
    ck.convert(str(src), str(out / "other.safetensors"), "1:2", 32, progress=False,
               verbose=False)
    assert os.listdir(out) == ["other.safetensors"]


# --- integrity of converted files --------------------------------------------------------

@pytest.fixture
def converted(tmp_path, rng):
    src = write_model(tmp_path, hf_checkpoint("mixtral", rng, BF16, layers=1),
                      hf_config("mixtral"))
    out = tmp_path / "sparse.safetensors"
    ck.convert(str(src), str(out), "1:2", 32, progress=False, verbose=False)
    return out


def _tensor_nbytes(path, name):
    with safetensors_io.Reader() as r:
        return r.header(str(path))[0][name].nbytes


def _corrupt(path, name, edit):
    """Apply ``edit`` to tensor ``name``'s bytes in place (a uint8 array)."""
    with safetensors_io.Reader() as r:
        ent = r.header(str(path))[0][name]
    blob = bytearray(path.read_bytes())
    data = np.frombuffer(blob, np.uint8, ent.nbytes, ent.offset).copy()
    edit(data)
    blob[ent.offset:ent.offset + ent.nbytes] = data.tobytes()
    path.write_bytes(bytes(blob))


def test_corrupted_bytes_are_refused_with_the_tensors_name(converted, rng):
    layers, _, other = sj.load_checkpoint(str(converted))
    values = "model.layers.0.moe.down.values"
    # One bit of one byte flipped (the byte changes whatever its value).
    at = int(rng.integers(_tensor_nbytes(converted, values)))
    _corrupt(converted, values, lambda d: d.__setitem__(at, d[at] ^ 0x10))
    with pytest.raises(ck.ConversionError, match=f"tensor '{values}': checksum mismatch"):
        sj.load_checkpoint(str(converted))
    # verify=False: the documented opt-out reads it (a valid weight, other values).
    sj.load_checkpoint(str(converted), verify=False)


def test_swapped_sub_row_indices_are_refused(converted):
    """Two valid sub-row indices swapped: still a valid weight, but another one."""
    name = "model.layers.0.moe.gate_up.indices"

    def swap(d):
        i = int(np.flatnonzero(d != d[0])[0])
        d[0], d[i] = d[i], d[0]

    _corrupt(converted, name, swap)
    _, _, _ = sj.load_checkpoint(str(converted), verify=False)          # a valid weight
    with pytest.raises(ck.ConversionError, match=f"tensor '{name}': checksum mismatch"):
        sj.load_checkpoint(str(converted), load_other=False)


def test_corrupted_header_and_old_files(converted, tmp_path):
    blob = converted.read_bytes()
    edited = blob.replace(b'top_k\\": 2', b'top_k\\": 3')
    assert edited != blob and len(edited) == len(blob)
    bad = tmp_path / "bad_header.safetensors"
    bad.write_bytes(edited)
    with pytest.raises(ck.ConversionError, match="bad_header.safetensors: header: checksum"):
        sj.load_checkpoint(str(bad))
    # A file written before checksums were recorded (format_version 1): refused by
    # default, loaded with verify=False.
    with safetensors_io.Reader() as r:
        entries, meta = r.header(str(converted))
        plan = [(n, e.dtype, e.shape) for n, e in sorted(entries.items(),
                                                          key=lambda kv: kv[1].offset)]
        old_meta = {k: v for k, v in meta.items() if k != "checksums"}
        old_meta["format_version"] = "1"
        w = safetensors_io.Writer(plan, old_meta)
        old = tmp_path / "old.safetensors"
        with open(old, "wb") as dst:
            w.begin(dst)
            for n, _, _ in plan:
                w.copy(n, r.chunks(entries[n], n))
            w.finish()
    with pytest.raises(ck.ConversionError, match="format_version 1 records no checksums.*"
                                                 "verify=False"):
        sj.load_checkpoint(str(old))
    a, _, _ = sj.load_checkpoint(str(old), verify=False)
    b, _, _ = sj.load_checkpoint(str(converted))
    np.testing.assert_array_equal(np.asarray(a[0]["down"].values),
                                  np.asarray(b[0]["down"].values))


def test_hostile_calibration_files_are_refused(tmp_path, rng, capsys):
    import zipfile

    src = write_model(tmp_path, hf_checkpoint("mixtral", rng, BF16, layers=1),
                      hf_config("mixtral"))
    key = "layers.0.inputs"
    calib = tmp_path / "calib.npz"
    header = np.lib.format.header_data_from_array_1_0
    cases = {
        "pickled objects": lambda: np.savez(calib, **{key: np.array([{}], dtype=object)}),
        "not a zip": lambda: calib.write_bytes(b"PK\x03\x04 garbage"),
        "shape past the data": lambda: _npz_member(
            calib, key, header(np.zeros((2**20, 64), np.float32)), bytes(64)),
        "decompression bomb": lambda: _npz_member(
            calib, key, header(np.zeros((2**16, 64), np.float32)), bytes(2**16 * 64 * 4),
            zipfile.ZIP_DEFLATED),
    }
    for why, make in cases.items():
        make()
        refused(src, tmp_path, capsys, "calib.npz", args=[*ARGS, "--calibration", str(calib)])


def _npz_member(path, key, header: dict, data: bytes, compression=None):
    """An .npz whose member ``key`` has the given .npy header and data bytes."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w", compression or zipfile.ZIP_STORED) as z:
        z.writestr(key + ".npy", buf.getvalue() + data)
