"""Shared test setup: per-test random seeds, CPU pinning, and the GPU skip helpers
(tests/helpers.py holds the shared inputs, references and tolerances).

Seeds: every run draws a fresh base seed (or takes ``SAMOYEDS_TEST_SEED``) and each test
derives its own seed from it and its node id; hypothesis tests are seeded with the base
seed. The base seed is printed in the pytest header; a test's seed is printed in its
captured output (shown on failure) and tests put it in their assertion messages. Rerun a
failing run with ``SAMOYEDS_TEST_SEED=<base>``.

Devices: tests run with the CPU as JAX's default device (the CPU suite checks the C++
handler even on a machine with a GPU), except tests marked ``gpu`` or with one of the
long GPU checks' marks (``soak``, ``sanitize``, ``stress``, ``multi_gpu``; pyproject.toml
leaves those out of a run that does not ask for them), which are skipped cleanly when
``jax.devices()`` has no GPU.
"""

from __future__ import annotations

import os

# 8 virtual CPU devices for tests/test_sharding.py (meshes 8x1, 2x4, 1x8); must be set
# before jax initialises its backends. Other tests use CPU device 0 and are unaffected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
# No GPU memory reserved up front: the long GPU checks run their programs in child
# processes (tests/script_runner.py), which need the memory too.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import BASE_SEED, has_gpu, seed_for  # noqa: E402


def pytest_report_header(config):
    import samoyeds_jax
    from samoyeds_jax import _samoyeds

    return [
        f"samoyeds_jax: {os.path.dirname(samoyeds_jax.__file__)} "
        f"(HAS_CUDA={_samoyeds.HAS_CUDA}, jax {jax.__version__}, "
        f"devices {[d.platform for d in jax.devices()]})",
        f"samoyeds base seed: {BASE_SEED} (reproduce with SAMOYEDS_TEST_SEED={BASE_SEED})",
    ]


def pytest_collection_modifyitems(config, items):
    # SAMOYEDS_TEST_SHARD=i/n keeps every n-th collected test from the i-th: several
    # pytest processes then share one GPU machine's cores (scripts/gpu_check.sh tests).
    shard = os.environ.get("SAMOYEDS_TEST_SHARD")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        keep = [it for j, it in enumerate(items) if j % n == i]
        config.hook.pytest_deselected(items=[it for j, it in enumerate(items) if j % n != i])
        items[:] = keep
    # Hypothesis draws from the run's base seed too, so SAMOYEDS_TEST_SEED replays it.
    import hypothesis

    for item in items:
        obj = getattr(item, "obj", None)
        if obj is not None and hypothesis.is_hypothesis_test(obj):
            hypothesis.seed(BASE_SEED)(obj)


GPU_MARKS = ("gpu", "soak", "sanitize", "stress", "multi_gpu")


def _on_gpu(item) -> bool:
    return any(item.get_closest_marker(mark) is not None for mark in GPU_MARKS)


def pytest_runtest_setup(item):
    if _on_gpu(item) and not has_gpu():
        pytest.skip("needs a CUDA GPU: jax.devices() has no 'gpu' platform")


@pytest.fixture
def requires_gpu():
    """Skip unless a GPU is visible; returns the first GPU device."""
    if not has_gpu():
        pytest.skip("needs a CUDA GPU: jax.devices() has no 'gpu' platform")
    return jax.devices("gpu")[0]


@pytest.fixture(autouse=True)
def _cpu_by_default(request):
    if _on_gpu(request.node):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def seed(request) -> int:
    s = seed_for(request.node.nodeid)
    print(f"seed={s} (base SAMOYEDS_TEST_SEED={BASE_SEED}) for {request.node.nodeid}")
    return s


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)
