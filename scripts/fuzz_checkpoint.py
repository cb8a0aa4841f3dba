"""Bounded fuzzing of the converted-checkpoint loader (sj.load_checkpoint) with atheris.

  pip install atheris && python scripts/fuzz_checkpoint.py -max_total_time=60

A tiny Mixtral-named checkpoint is converted once; each input then corrupts its bytes
(the safetensors header and JSON metadata, the tensor data: indices, metadata words)
or replaces the file outright. The loader must either load a SparseWeight that passes
sj.validate or refuse with its own ConversionError / ValueError; anything else (another
exception type, a crash, a hang) is a finding.
"""

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import numpy as np
    from safetensors.numpy import save_file

    import samoyeds_jax as sj
    from samoyeds_jax.checkpoint import ConversionError, convert

D, F, E = 64, 64, 4


def _seed_checkpoint(workdir: str) -> bytes:
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((8, D)).astype(np.float16)}
    p = "model.layers.0.block_sparse_moe."
    t[p + "gate.weight"] = rng.standard_normal((E, D)).astype(np.float16)
    for j in range(E):
        t[p + f"experts.{j}.w1.weight"] = rng.standard_normal((F, D)).astype(np.float16)
        t[p + f"experts.{j}.w3.weight"] = rng.standard_normal((F, D)).astype(np.float16)
        t[p + f"experts.{j}.w2.weight"] = rng.standard_normal((D, F)).astype(np.float16)
    src = os.path.join(workdir, "src")
    os.makedirs(src)
    save_file(t, os.path.join(src, "model.safetensors"))
    out = os.path.join(workdir, "sparse.safetensors")
    convert(src, out, pattern="1:2", sub_row=32, top_k=2, progress=False, verbose=False)
    with open(out, "rb") as fh:
        return fh.read()


WORK = tempfile.mkdtemp(prefix="samoyeds_fuzz_")
SEED = _seed_checkpoint(WORK)
TARGET = os.path.join(WORK, "case.safetensors")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    blob = bytearray(SEED)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:  # overwrite a few bytes anywhere (header, metadata JSON, tensor data)
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            blob[fdp.ConsumeIntInRange(0, len(blob) - 1)] = fdp.ConsumeInt(1) & 0xFF
    elif mode == 1:  # corrupt the tensor data region (past the header) in a run
        start = fdp.ConsumeIntInRange(8, len(blob) - 1)
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
        blob[start:start + len(chunk)] = chunk
    elif mode == 2:  # truncate
        blob = blob[:fdp.ConsumeIntInRange(0, len(blob))]
    else:  # an arbitrary file
        blob = bytearray(fdp.ConsumeBytes(fdp.remaining_bytes()))
    with open(TARGET, "wb") as fh:
        fh.write(blob)
    try:
        layers, _, _ = sj.load_checkpoint(TARGET, top_k=2, load_other=False)
    except (ConversionError, ValueError):
        return
    for params in layers.values():
        for name in ("gate_up", "down"):
            sj.validate(params[name], name)  # what loaded must be a well-formed weight


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
