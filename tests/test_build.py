"""The built extension: its FFI targets, and (on CI) the CUDA part and the install.

SAMOYEDS_REQUIRE_CUDA=1 (set by .ci/run) makes a build without the CUDA handlers a test
failure instead of a silent CPU-only package. SAMOYEDS_REQUIRE_INSTALLED=1 (also set by
.ci/run) checks that the tests import the installed package, not the source tree.
"""

from __future__ import annotations

import os
import pathlib

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
