"""compute-sanitizer over scripts/sanitize_case.py (every config and dtype, tail sizes,
empty experts, long K, the wide 2:4 blocks), once per tool and forced kernel choice: the
run must end with exit status 0 (the sanitizer exits 9 on any finding).

Runs only under ``pytest -m sanitize``; skipped without a GPU or without
``compute-sanitizer`` on the PATH. Settings (environment):

* ``SAMOYEDS_SANITIZE_RUNS``: space-separated ``kernel:splits`` runs of the forward
  kernels, or ``backward`` for the backward kernels through ``jax.grad`` (default
  ``auto:0 hopper:0 stream:0 stream:8 warp:8 backward``);
* ``SAMOYEDS_SANITIZE_TOOLS``: the tools (default ``memcheck racecheck initcheck
  synccheck``);
* ``SAMOYEDS_SANITIZE_TIMEOUT``: seconds per run (default 150);
* ``SAMOYEDS_SANITIZE_RACECHECK_PATH``: a package installed (``pip install --target``)
  from a build with ``CUDAFLAGS=-DSAMOYEDS_NO_SETMAXNREG``, which racecheck runs import:
  racecheck stalls at random cases when warps reallocate registers with setmaxnreg.
  Without it, racecheck of the choices that can run the prefill kernel is skipped
  (``scripts/gpu_check.sh sanitize`` builds one).
"""

from __future__ import annotations

import os
import shutil

import pytest

import samoyeds_jax as sj
from script_runner import env_number, run_script, script

pytestmark = pytest.mark.sanitize

RUNS = (os.environ.get("SAMOYEDS_SANITIZE_RUNS")
        or "auto:0 hopper:0 stream:0 stream:8 warp:8 backward")
TOOLS = os.environ.get("SAMOYEDS_SANITIZE_TOOLS") or "memcheck racecheck initcheck synccheck"
TIMEOUT = env_number("SAMOYEDS_SANITIZE_TIMEOUT", 150)
_RACECHECK = os.environ.get("SAMOYEDS_SANITIZE_RACECHECK_PATH")
RACECHECK_PATH = os.path.abspath(_RACECHECK) if _RACECHECK else ""
SETMAXNREG_CHOICES = ("auto", "hopper")  # the prefill kernel reallocates registers


def _choice(run: str) -> sj.ops.KernelChoice | None:
    """The forced forward kernel of a run; None for the backward run."""
    if run == "backward":
        return None
    kernel, sep, splits = run.partition(":")
    if not sep or not splits.isdigit():
        raise ValueError(f"SAMOYEDS_SANITIZE_RUNS: {run!r} must be kernel:splits, "
                         f"e.g. stream:8")
    try:
        return sj.ops.KernelChoice(kernel, int(splits))
    except ValueError as err:
        raise ValueError(f"SAMOYEDS_SANITIZE_RUNS: {run!r}: {err}") from None


def _run_id(choice):
    return "backward" if choice is None else f"{choice.kernel}:{choice.splits}"


CASES = [pytest.param(tool, choice, id=f"{tool}-{_run_id(choice)}")
         for choice in map(_choice, RUNS.split()) for tool in TOOLS.split()]


@pytest.mark.parametrize("tool,choice", CASES)
def test_sanitizer_finds_nothing(tool, choice, tmp_path):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on the PATH")
    # One allocation per buffer: an access past a buffer's end is caught at its edge.
    env = {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
    if tool == "racecheck" and RACECHECK_PATH:
        env["PYTHONPATH"] = RACECHECK_PATH
    elif tool == "racecheck" and choice is not None and choice.kernel in SETMAXNREG_CHOICES:
        pytest.skip("racecheck of the prefill kernel needs SAMOYEDS_SANITIZE_RACECHECK_PATH "
                    "(a build without setmaxnreg)")
    print(f"\n--- {_run_id(choice)} {tool}", flush=True)
    # Only our kernels ("samoyeds" is in every one's name), not XLA's.
    mode = (["--backward"] if choice is None
            else [f"--kernel={choice.kernel}", f"--splits={choice.splits}"])
    run = run_script([sanitizer, "--tool", tool, "--kernel-name", "kns=samoyeds",
                      "--error-exitcode", "9", *script("sanitize_case.py"), "-v", *mode],
                     TIMEOUT, env, cwd=tmp_path)
    started = [line for line in run.lines if line.startswith("case ")]
    if run.returncode is None:
        pytest.fail(f"{tool} timed out after {TIMEOUT:g} s; the last case started: "
                    f"{started[-1] if started else 'none'}\n{run.tail()}")
    assert run.returncode == 0, f"compute-sanitizer {tool} exit {run.returncode}:\n{run.tail()}"
    if "PYTHONPATH" in env:
        package = [line for line in started if line.startswith("case package ")]
        assert package and package[0].split()[-1].startswith(RACECHECK_PATH + os.sep), (
            f"racecheck did not import the build in {RACECHECK_PATH}: {package}")
