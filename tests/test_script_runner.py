"""tests/script_runner.py, which the GPU checks (-m sanitize, soak, stress, multi_gpu) run
their scripts through, on the CPU: output kept in order, exit status, and a timeout that
kills the child's whole process group (a hang must not outlive the test)."""

from __future__ import annotations

import sys
import time

import pytest

from script_runner import env_number, run_script


def test_output_and_exit_status(tmp_path, capsys):
    run = run_script([sys.executable, "-c", "import sys\nprint('one')\n"
                      "print('two', file=sys.stderr)\nsys.exit(3)"], 60, cwd=tmp_path)
    assert run.returncode == 3
    assert run.lines == ["one", "two"]
    assert capsys.readouterr().out == "one\ntwo\n"  # echoed as it came


def test_timeout_kills_the_process_group(tmp_path):
    # The child starts a grandchild that would hold the output pipe open for a minute.
    child = ("import subprocess, sys, time\n"
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             "print('started', flush=True)\n"
             "time.sleep(60)")
    t0 = time.monotonic()
    run = run_script([sys.executable, "-c", child], 3, cwd=tmp_path)
    assert run.returncode is None
    assert run.lines == ["started"]
    assert time.monotonic() - t0 < 20


def test_env_number(monkeypatch):
    monkeypatch.setenv("SAMOYEDS_X", "")
    assert env_number("SAMOYEDS_X", 7) == 7
    monkeypatch.setenv("SAMOYEDS_X", "2.5")
    assert env_number("SAMOYEDS_X", 7) == 2.5
    monkeypatch.setenv("SAMOYEDS_X", "ten")
    with pytest.raises(ValueError, match="SAMOYEDS_X='ten' must be a number"):
        env_number("SAMOYEDS_X", 7)
