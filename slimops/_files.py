"""Atomic file writes, shared by checkpoints (slimops.train) and latency tables
(slimops.deploy): a file is replaced whole or not at all, even when the process is killed.

The content goes to a temporary file in the target's directory (a rename is atomic only
within one file system), which is flushed and fsync'ed before ``os.replace`` renames it over
the target; the directory is fsync'ed after, so the rename itself survives a power cut. A
write that fails removes its temporary file; ``remove_stale_temporaries`` removes those that
killed processes left behind.
"""
from __future__ import annotations

import glob
import os
import tempfile
from typing import Callable, IO, List

# Temporary files are named "<target>.tmp<random>": one pattern to find the leftovers.
_TMP_INFIX = ".tmp"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then atomically replace
    ``path`` with it. On any exception the temporary file is removed and ``path`` is
    unchanged."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + _TMP_INFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(path: str) -> List[str]:
    """Remove the temporary files that interrupted atomic writes of ``path`` left behind
    (``<path>.tmp*``); returns the removed names. Call it only while no other process is
    writing ``path``."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + _TMP_INFIX + "*"):
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed
