"""Running a program of scripts/ as a child process, for the GPU checks that need one
(the sanitizer wraps the process; a hang must be killed, not wait forever; NCCL reads its
settings when the backend starts): the output echoed as it comes and kept, the whole
process group killed at a timeout. Also the numeric settings these checks read from the
environment."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def script(name: str) -> list[str]:
    """The command line that runs ``scripts/<name>`` with this Python."""
    return [sys.executable, os.path.join(SCRIPTS, name)]


def env_number(name: str, default: float) -> float:
    """The environment variable ``name`` as a number (``default`` when unset or empty)."""
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be a number") from None


@dataclasses.dataclass
class ScriptRun:
    returncode: int | None  # None: killed at the timeout
    lines: list[str]

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


def run_script(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> ScriptRun:
    """Runs ``argv`` in its own process group with ``env`` over this process's
    environment, echoing its output (stdout and stderr together) line by line; after
    ``timeout`` seconds the whole group is killed and the returncode is None."""
    child_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=child_env, cwd=cwd,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the sanitizer's or the script's children too
        proc.wait()
        returncode = None
    reader.join(30)  # a child that left the group may still hold the pipe
    return ScriptRun(returncode, lines)
