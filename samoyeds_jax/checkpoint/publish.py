"""Publishing the output atomically: it appears whole under its name, or not at all.

The output is written to a temporary file in its own directory and linked to its name at
the end; on any error the temporary file is removed. An existing output is never replaced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator

from samoyeds_jax.checkpoint.schema import ConversionError


def check_output(path: str) -> None:
    """Refuse an output that exists already or whose directory does not."""
    if os.path.lexists(path):
        raise ConversionError(f"output {path!r} already exists; refusing to overwrite it")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ConversionError(f"output directory {out_dir!r} does not exist")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s content to; published as ``path`` (synced, with
    the umask's permissions) when the block ends without an error, removed otherwise."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as dst:
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
