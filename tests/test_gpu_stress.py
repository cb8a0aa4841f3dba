"""Launch stress, scripts/launch_stress.py: small cases (the ones racecheck once stopped
in, one per config) launched many times per forced kernel, each result bit-identical to
the first; a rare hang shows as a run that does not end in time.

Runs only under ``pytest -m stress``; skipped without a GPU. Settings (environment):
``SAMOYEDS_STRESS_LAUNCHES`` (launches per case, default 20000), ``SAMOYEDS_STRESS_TIMEOUT``
(seconds per kernel, default 120).
"""

from __future__ import annotations

import pytest

from script_runner import env_number, run_script, script

pytestmark = pytest.mark.stress

LAUNCHES = int(env_number("SAMOYEDS_STRESS_LAUNCHES", 20000))
TIMEOUT = env_number("SAMOYEDS_STRESS_TIMEOUT", 120)


@pytest.mark.parametrize("kernel", ["hopper", "stream"])
def test_repeated_launches(kernel, tmp_path):
    run = run_script([*script("launch_stress.py"), str(LAUNCHES), f"--kernel={kernel}"],
                     TIMEOUT, cwd=tmp_path)
    assert run.returncode is not None, (
        f"{kernel}: {LAUNCHES} launches per case did not end within {TIMEOUT:g} s (a hang?)"
        f"\n{run.tail()}")
    assert run.returncode == 0 and "STRESS_OK" in run.lines, (
        f"{kernel}: exit {run.returncode}\n{run.tail()}")
