"""All-or-nothing file writes: temporaries beside the targets, then os.replace."""
from __future__ import annotations

import contextlib
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


def write_all(files: dict[str, bytes]) -> None:
    """All files or none: write temporaries beside the targets, then rename them; failures remove what was written."""
    temps: dict[str, str] = {}
    done: list[str] = []
    for dest in files:
        if os.path.isdir(dest):
            raise IsADirectoryError(f"cannot write {dest}: it is a directory")
    try:
        for dest, data in files.items():
            fd, tmp = temp_beside(dest)
            temps[dest] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for dest, tmp in temps.items():
            os.replace(tmp, dest)
            done.append(dest)
    except BaseException:
        for dest, tmp in temps.items():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for dest in done:
            with contextlib.suppress(OSError):
                os.unlink(dest)
        raise


def atomic_write(path, data: bytes) -> None:
    """Write bytes to path through a temp file in the same directory and os.replace; on any error nothing is left."""
    write_all({os.fspath(path): data})
