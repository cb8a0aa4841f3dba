"""Fuzzing of the files samoyeds_jax reads: the converter's reader and the loader.

  pip install atheris && python scripts/fuzz_checkpoint.py -max_total_time=60

A tiny Mixtral-named checkpoint (two shards, an index and config.json) is written and
converted once. Each input picks a target from its first byte:

* ``load``: the converted file with a few bytes overwritten, a run of bytes replaced, a
  header field set to a hostile value, a truncation, or arbitrary bytes, read by
  ``sj.load_checkpoint`` (with and without ``verify``);
* ``convert``: one of the input files mutated the same ways (index entries set to hostile
  file names, config.json fields to hostile values), converted by ``convert``.

A finding is anything but: success (a loaded weight passes ``sj.validate``; a converted
file loads and verifies) or a ``ConversionError``. Also findings: a mutated converted file
that loads with ``verify=True`` (every byte is covered by a checksum), a file left in the
output directory after a refusal, an exception of another type, a crash or a hang.

``tests/test_fuzz_checkpoint.py`` drives :func:`one_input` with random bytes for a few
seconds in CI (no atheris needed); atheris adds coverage guidance.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np

D, F, E = 64, 64, 4
SHARDS = ("model-00001.safetensors", "model-00002.safetensors")
HOSTILE_NAMES = ["../outside.safetensors", "/etc/hostname", "", ".", "..", "a/../../b",
                 "model-00001.safetensors/x", "x" * 5000, "\x00", "link.safetensors"]
HOSTILE_VALUES = [-1, -2**63, 2**64, 2**31, 0, 1, 7, 10**30, 1.5, True, None, "", "F32",
                  "Q7", [], [1, 2, 3], [-4, 4], [0, 2**62], {}, {"a": 1}, "x" * 300]


class Bytes:
    """The input's bytes as a sequence of choices (a tiny FuzzedDataProvider)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def int(self, lo: int, hi: int) -> int:
        """An int in [lo, hi]."""
        span = hi - lo + 1
        v = 0
        for _ in range(max(1, (span.bit_length() + 7) // 8)):
            v = v << 8 | self.byte()
        return lo + v % span

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        return self.take(max(0, len(self.data) - self.pos))


class Corpus:
    """The seed files, written once into ``workdir``."""

    def __init__(self, workdir: str):
        from safetensors.numpy import save_file

        from samoyeds_jax.checkpoint import convert, load_checkpoint

        self.workdir = workdir
        rng = np.random.default_rng(0)
        t = {"model.embed_tokens.weight": rng.standard_normal((8, D)).astype(np.float16)}
        p = "model.layers.0.block_sparse_moe."
        t[p + "gate.weight"] = rng.standard_normal((E, D)).astype(np.float16)
        for j in range(E):
            t[p + f"experts.{j}.w1.weight"] = rng.standard_normal((F, D)).astype(np.float16)
            t[p + f"experts.{j}.w3.weight"] = rng.standard_normal((F, D)).astype(np.float16)
            t[p + f"experts.{j}.w2.weight"] = rng.standard_normal((D, F)).astype(np.float16)
        extra = {"model.norm.weight": rng.standard_normal((D,)).astype(np.float16),
                 "model.extra_int_buffer": np.arange(6, dtype=np.int32)}
        self.src = os.path.join(workdir, "src")
        os.makedirs(self.src)
        save_file(t, os.path.join(self.src, SHARDS[0]))
        save_file(extra, os.path.join(self.src, SHARDS[1]))
        wm = {n: SHARDS[0] for n in t} | {n: SHARDS[1] for n in extra}
        with open(os.path.join(self.src, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": wm}, fh)
        with open(os.path.join(self.src, "config.json"), "w") as fh:
            json.dump({"model_type": "mixtral", "num_experts_per_tok": 2,
                       "num_local_experts": E, "hidden_act": "silu"}, fh)
        with open(os.path.join(workdir, "outside.safetensors"), "wb") as fh:
            fh.write(_safetensors({"model.stolen": {"dtype": "U8", "shape": [4],
                                                    "data_offsets": [0, 4]}}, b"ABCD"))
        out = os.path.join(workdir, "seed.safetensors")
        convert(self.src, out, pattern="1:2", sub_row=32, progress=False, verbose=False)
        with open(out, "rb") as fh:
            self.converted = fh.read()
        self.layers = _arrays(load_checkpoint(out, load_other=False)[0])
        self.files = {name: open(os.path.join(self.src, name), "rb").read()
                      for name in sorted(os.listdir(self.src))}


def _arrays(layers: dict) -> dict:
    """Every loaded array's bytes, by layer and name (SparseWeights by part)."""
    import jax

    return {(i, str(path)): np.asarray(a).tobytes() for i, params in layers.items()
            for path, a in jax.tree_util.tree_leaves_with_path(params)}


def _safetensors(header, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _mutate(p: Bytes, blob: bytes, file_names: bool = False) -> bytes:
    """One mutation of ``blob`` (a safetensors or JSON file); ``file_names``: its JSON
    values may become hostile file names (an index)."""
    blob = bytearray(blob)
    mode = p.int(0, 5)
    if mode == 0 and blob:                # a few bytes anywhere
        for _ in range(p.int(1, 8)):
            blob[p.int(0, len(blob) - 1)] = p.byte()
    elif mode == 1 and blob:              # a run of bytes
        start = p.int(0, len(blob) - 1)
        chunk = p.take(p.int(1, 64))
        blob[start:start + len(chunk)] = chunk
    elif mode == 2:                       # truncated
        blob = blob[:p.int(0, len(blob))]
    elif mode == 3:                       # a field of the JSON (or safetensors header)
        return _mutate_json(p, bytes(blob), file_names)
    elif mode == 4:                       # the header length word of a safetensors file
        blob[:8] = struct.pack("<Q", p.pick([0, 1, 7, 2**31, 2**63, len(blob),
                                              len(blob) - 8, p.int(0, 2**16)]))
    else:                                 # arbitrary bytes
        return p.rest()
    return bytes(blob)


def _mutate_json(p: Bytes, blob: bytes, file_names: bool) -> bytes:
    is_st = not blob.lstrip().startswith(b"{")
    try:
        if is_st:
            (n,) = struct.unpack("<Q", blob[:8])
            doc, data = json.loads(blob[8:8 + n]), blob[8 + n:]
        else:
            doc, data = json.loads(blob), b""
    except (ValueError, struct.error):
        return blob
    # Walk down to a random dict or list and set one of its members.
    node = doc
    for _ in range(p.int(0, 3)):
        kids = list(node.values()) if isinstance(node, dict) else node
        kids = [k for k in kids if isinstance(k, (dict, list)) and k]
        if not kids:
            break
        node = p.pick(kids)
    if isinstance(node, dict) and node:
        key = p.pick(sorted(node))
        node[key] = p.pick(HOSTILE_NAMES if file_names and p.int(0, 1) else HOSTILE_VALUES)
    elif isinstance(node, list) and node:
        node[p.int(0, len(node) - 1)] = p.pick(HOSTILE_VALUES)
    text = json.dumps(doc).encode()
    return _safetensors(doc, data) if is_st else text


def fuzz_load(p: Bytes, corpus: Corpus, path: str) -> None:
    import samoyeds_jax as sj
    from samoyeds_jax.checkpoint import ConversionError

    blob = _mutate(p, corpus.converted)
    verify = p.int(0, 1) == 0
    with open(path, "wb") as fh:
        fh.write(blob)
    load_other = p.int(0, 1) == 0
    try:
        layers, _, _ = sj.load_checkpoint(path, top_k=2, load_other=load_other, verify=verify)
    except ConversionError:
        return
    if verify and blob != corpus.converted:
        if load_other:
            raise AssertionError("a corrupted converted file loaded with verify=True")
        # Only tensors that were not read may differ: what was read is the seed's.
        if _arrays(layers) != corpus.layers:
            raise AssertionError("a corrupted tensor loaded with verify=True")
    for params in layers.values():
        for name in ("gate_up", "down"):
            sj.validate(params[name], name)   # what loaded must be a well-formed weight


def fuzz_convert(p: Bytes, corpus: Corpus, scratch: str) -> None:
    import samoyeds_jax as sj
    from samoyeds_jax.checkpoint import ConversionError, convert

    src, out_dir = os.path.join(scratch, "src"), os.path.join(scratch, "out")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(src)
    os.makedirs(out_dir)
    for name, blob in corpus.files.items():
        with open(os.path.join(src, name), "wb") as fh:
            fh.write(blob)
    os.symlink(os.path.join(corpus.workdir, "outside.safetensors"),
               os.path.join(src, "link.safetensors"))
    target = p.pick(sorted(corpus.files))
    blob = _mutate(p, corpus.files[target], file_names=target.endswith("index.json"))
    with open(os.path.join(src, target), "wb") as fh:
        fh.write(blob)
    out = os.path.join(out_dir, "o.safetensors")
    try:
        convert(src, out, pattern="1:2", sub_row=32, progress=False, verbose=False)
    except ConversionError:
        if os.listdir(out_dir):
            raise AssertionError(f"a refused conversion left {os.listdir(out_dir)}") from None
        return
    if os.listdir(out_dir) != ["o.safetensors"]:
        raise AssertionError(f"the output directory holds {os.listdir(out_dir)}")
    layers, _, other = sj.load_checkpoint(out)
    if "model.stolen" in other:
        raise AssertionError("a tensor from outside the checkpoint directory was copied")
    for params in layers.values():
        for name in ("gate_up", "down"):
            sj.validate(params[name], name)


def one_input(data: bytes, corpus: Corpus) -> None:
    """One fuzz input (see the module docstring); raises on a finding."""
    p = Bytes(data)
    if p.int(0, 3) == 0:
        fuzz_convert(p, corpus, os.path.join(corpus.workdir, "scratch"))
    else:
        fuzz_load(p, corpus, os.path.join(corpus.workdir, "case.safetensors"))


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        import samoyeds_jax  # noqa: F401
        import samoyeds_jax.checkpoint  # noqa: F401
    corpus = Corpus(tempfile.mkdtemp(prefix="samoyeds_fuzz_"))
    atheris.Setup(sys.argv, lambda data: one_input(data, corpus))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
