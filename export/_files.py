"""Temporary files for all-or-nothing writes (write beside the target, then os.replace)."""
from __future__ import annotations

import os
import tempfile


def temp_beside(path) -> tuple[int, str]:
    """(fd, temp path) of a new file in `path`'s directory, with the permissions open() would give a new file.

    mkstemp creates 0600 files; renamed over the target they would keep that mode, so it is set to 0666 & ~umask.
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return fd, tmp
