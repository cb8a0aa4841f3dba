"""Publishing the output atomically: it appears whole under its name, or not at all.

The output is written to a temporary file in its own directory and linked to its name at
the end; on any error the temporary file is removed. An existing output is never replaced.
SIGTERM and SIGHUP are handled like SIGINT while a conversion runs (the temporary file is
removed), and the temporary files that a killed run (SIGKILL, a crash) left are removed
by the next run in that directory: their names carry the writing process's id and host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import tempfile
import threading
from typing import BinaryIO, Iterator

from samoyeds_jax.checkpoint.schema import ConversionError


class Interrupted(KeyboardInterrupt):
    """A conversion stopped by SIGINT, SIGTERM or SIGHUP (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_output(path: str) -> None:
    """Refuse an output that exists already or whose directory does not."""
    if os.path.lexists(path):
        raise ConversionError(f"output {path!r} already exists; refusing to overwrite it")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ConversionError(f"output directory {out_dir!r} does not exist")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


# .<output name>.samoyeds-<pid>-<host>.<random>.tmp
_TEMP = re.compile(r"^\..*\.samoyeds-(\d{1,10})-([0-9a-f]{8})\.[^.]+\.tmp$", re.S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True    # someone else's process, or not a pid we can ask about: keep it
    return True


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove the temporary outputs that dead processes of this host left in
    ``directory``; returns their names."""
    host, removed = _host(), []
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            m = _TEMP.match(name)
            if m and m.group(2) == host and int(m.group(1)) != os.getpid() and \
                    not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
                    removed.append(name)
    return removed


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` inside the block (once:
    later ones are ignored while it unwinds). Only in the main thread and only for
    signals still at Python's defaults; the previous handlers come back at the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = []

    def handler(signum, frame):
        if not hit:
            hit.append(signum)
            raise Interrupted(signum)

    defaults = {signal.SIGINT: signal.default_int_handler}
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is defaults.get(sig, signal.SIG_DFL):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s content to; published as ``path`` (synced, with
    the umask's permissions) when the block ends without an error, removed otherwise."""
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(directory)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.samoyeds-{os.getpid()}-{_host()}.",
        suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as dst:
            yield dst
            dst.flush()
            os.fsync(dst.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes it 0600
        _publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _publish(tmp: str, out: str) -> None:
    """Rename tmp to out without ever replacing an existing out."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ConversionError(f"output {out!r} appeared during the conversion; refusing to "
                              f"overwrite it") from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(out):
            raise ConversionError(f"output {out!r} appeared during the conversion") from None
        os.replace(tmp, out)
        return
    os.unlink(tmp)
