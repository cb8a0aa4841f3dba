"""The sharded layer equals the single-device layer on several real GPUs:
scripts/multi_gpu_equal.py (every data x expert x model mesh of all the GPUs that the
layer divides; moe_sharded, sparse and dense, and jit(sj.moe) without weight all-gathers).

Runs only under ``pytest -m multi_gpu``; skipped with fewer than 2 GPUs. Setting
(environment): ``SAMOYEDS_MULTI_TIMEOUT`` (seconds, default 240).
"""

from __future__ import annotations

import jax
import pytest

from script_runner import env_number, run_script, script

pytestmark = pytest.mark.multi_gpu

TIMEOUT = env_number("SAMOYEDS_MULTI_TIMEOUT", 240)


def test_sharded_equals_single_device(tmp_path):
    if len(jax.devices("gpu")) < 2:
        pytest.skip("needs at least 2 GPUs")
    # NVLink multicast stays off (NCCL reads this when the child's backend starts).
    run = run_script(script("multi_gpu_equal.py"), TIMEOUT, {"NCCL_NVLS_ENABLE": "0"},
                     cwd=tmp_path)
    assert run.returncode is not None, f"no result within {TIMEOUT:g} s\n{run.tail()}"
    mismatches = [line for line in run.lines if "MISMATCH" in line]
    assert run.returncode == 0, f"exit {run.returncode}; {mismatches}\n{run.tail()}"
