"""The built extension: its FFI targets, and (on CI) the CUDA part and the install.

SAMOYEDS_REQUIRE_CUDA=1 (set by .ci/run) makes a build without the CUDA handlers a test
failure instead of a silent CPU-only package. SAMOYEDS_REQUIRE_INSTALLED=1 (also set by
.ci/run) checks that the tests import the installed package, not the source tree.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

import samoyeds_jax
from samoyeds_jax import _samoyeds

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_target_and_format_facts_are_exported():
    assert "samoyeds_ragged_dot" in _samoyeds.cpu_targets()
    assert isinstance(_samoyeds.HAS_CUDA, bool)
    major, minor = _samoyeds.FFI_API_VERSION
    assert major >= 0 and minor >= 0


@pytest.mark.skipif(os.environ.get("SAMOYEDS_REQUIRE_CUDA") != "1",
                    reason="set SAMOYEDS_REQUIRE_CUDA=1 to require the CUDA handlers")
def test_cuda_handlers_were_built():
    assert _samoyeds.HAS_CUDA is True, (
        "samoyeds_jax was built without its CUDA handlers (no nvcc on the PATH at build time?)")
    assert "samoyeds_ragged_dot" in _samoyeds.cuda_targets()


@pytest.mark.skipif(os.environ.get("SAMOYEDS_REQUIRE_INSTALLED") != "1",
                    reason="set SAMOYEDS_REQUIRE_INSTALLED=1 to require the installed package")
def test_tests_import_the_installed_package():
    pkg = pathlib.Path(samoyeds_jax.__file__).resolve().parent
    assert pkg != REPO / "samoyeds_jax", (
        f"samoyeds_jax was imported from the source tree {pkg}, not the installed package")
    assert "site-packages" in pkg.parts or "dist-packages" in pkg.parts, pkg


@pytest.mark.skipif(os.environ.get("SAMOYEDS_REQUIRE_CUDA") != "1" or shutil.which("nvcc") is None,
                    reason="set SAMOYEDS_REQUIRE_CUDA=1 (with nvcc on the PATH) to build them")
def test_benchmark_binaries_compile(tmp_path):
    """The CUDA microbenchmarks (the kernel harness with its variants, its timeline build,
    the read floor) run only on the GPU machine: CI is where a change that breaks their
    build shows first."""
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "build.sh"), str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("harness", "harness_timeline", "stream_floor"):
        assert (tmp_path / name).stat().st_size > 0, name


def _sass(function: str, body: list[str]) -> str:
    lines = [f"\t\tFunction : {function}"]
    lines += [f"        /*{16 * i:04x}*/                   {ins} ;   /* 0x0 */"
              for i, ins in enumerate(body)]
    return "\n".join(lines)


def test_sass_check_counts_serialized_wgmmas_and_spills():
    # scripts/sass_check.py backs gpu_check.sh's claim "0 serialized wgmma pairs, 0 spills".
    import importlib.util
    spec = importlib.util.spec_from_file_location("sass_check", REPO / "scripts" / "sass_check.py")
    sass_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass_check)
    wgmma = "HGMMA.SP.64x128x32.F32.BF16 R24, gdesc[UR4], R24, R97, 0x0, gsb0"
    wait0 = "WARPGROUP.DEPBAR.LE gsb0, 0x0"
    listing = "\n".join([
        "",
        _sass("_ZN8samoyeds4cuda21RaggedDotHopperKernelIserial", [
            wgmma, wait0, wgmma, wait0, wgmma, "WARPGROUP.DEPBAR.LE gsb0, 0x1", "STL [R1], R9",
            "LDL R6, [R1]"]),
        _sass("_ZN8samoyeds4cuda21RaggedDotHopperKernelIoverlap", [
            wgmma, "R2UR UR4, R94", wgmma, wgmma, "WARPGROUP.DEPBAR.LE gsb0, 0x1", wait0]),
        _sass("_ZN8samoyeds4cuda19RaggedDotWarpKernelIwarp", [
            "HMMA.SP.16816.F32.BF16 R4, R8, R12, R4, R2, 0x0", "EXIT"]),
        _sass("_Z5otherv", ["EXIT"]),
    ])
    rows = sass_check.summarize(listing)
    assert rows == [
        "  RaggedDotHopperKernelIserial SP-MMA=3 LDL/STL=2 serialized-wgmma-pairs=2",
        "  RaggedDotHopperKernelIoverlap SP-MMA=3 LDL/STL=0 serialized-wgmma-pairs=0",
        "  RaggedDotWarpKernelIwarp SP-MMA=1 LDL/STL=0",
    ]
