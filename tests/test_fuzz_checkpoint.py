"""A CI-sized run of scripts/fuzz_checkpoint.py without atheris: random inputs drive the
same entry points (the converter's reader through ``convert``, and ``load_checkpoint``)
from mutated and raw bytes; every input must succeed with a valid result or be refused
with a ConversionError (the script's docstring lists what counts as a finding)."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "fuzz_checkpoint.py")
LOAD_INPUTS, CONVERT_INPUTS = 400, 60


@pytest.fixture(scope="module")
def fuzz():
    pytest.importorskip("safetensors")
    spec = importlib.util.spec_from_file_location("fuzz_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_the_reader_and_the_loader(fuzz, tmp_path, rng, seed):
    corpus = fuzz.Corpus(str(tmp_path))
    counts = {"load": 0, "convert": 0}
    t0 = time.perf_counter()
    while counts["load"] < LOAD_INPUTS or counts["convert"] < CONVERT_INPUTS:
        data = rng.bytes(int(rng.integers(1, 256)))
        target = "convert" if data[0] % 4 == 0 else "load"
        if counts[target] >= (CONVERT_INPUTS if target == "convert" else LOAD_INPUTS):
            continue
        counts[target] += 1
        try:
            fuzz.one_input(data, corpus)
        except Exception as err:
            raise AssertionError(f"seed={seed}: finding on input {data.hex()}: "
                                 f"{type(err).__name__}: {err}") from err
    print(f"{counts} inputs in {time.perf_counter() - t0:.1f} s")
