"""The randomized soak, scripts/soak.py, on the GPU: random shapes of every config, fresh
activations, routings and SEL on every call against float64, a probe re-run for
determinism, threads on different compiled programs, device memory growth. The soak's
seed is the test's, so ``SAMOYEDS_TEST_SEED`` replays it.

Runs only under ``pytest -m soak``; skipped without a GPU. Settings (environment):
``SAMOYEDS_SOAK_SECONDS`` (the soak's budget, default 60), ``SAMOYEDS_SOAK_JSON`` (where
its full record goes; default the test's temporary directory).
"""

from __future__ import annotations

import json
import os

import pytest

from script_runner import env_number, run_script, script

pytestmark = pytest.mark.soak

SECONDS = env_number("SAMOYEDS_SOAK_SECONDS", 60)
STARTUP = 180  # seconds past the budget: imports, backend start, the last checks


def test_soak(seed, tmp_path):
    record_path = os.environ.get("SAMOYEDS_SOAK_JSON") or str(tmp_path / "soak.json")
    if os.path.exists(record_path):
        os.remove(record_path)  # a record left by an earlier run must not be read as this one's
    run = run_script([*script("soak.py"), f"--seconds={SECONDS:g}", f"--seed={seed}",
                      f"--json_out={record_path}"], SECONDS + STARTUP, cwd=tmp_path)
    assert run.returncode is not None, (
        f"seed={seed}: the soak did not end within {SECONDS + STARTUP:g} s\n{run.tail()}")
    failures = []
    if os.path.exists(record_path):
        with open(record_path) as fh:
            failures = json.load(fh)["failures"]
    assert run.returncode == 0, (f"seed={seed}: the soak exited {run.returncode}; "
                                 f"failures {failures}\n{run.tail()}")
