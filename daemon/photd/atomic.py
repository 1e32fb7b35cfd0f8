"""Atomic file output: every file photd writes appears complete or not at all.

DESIGN.md: "every output is written to a temporary name in the same folder,
flushed, then renamed into place". One implementation for the processed
frames, masters, catalog cache, plots and summaries.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: flush the directory entry to disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, rename into place.

    Parameters
    ----------
    path : path
        Destination; its folder is created if missing.
    write : callable
        Writes the content to the binary file object it is given.

    Returns
    -------
    Path
        ``path``. On any exception the temporary file is removed and the old
        ``path`` (if any) is left untouched.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # os.open with mode 0o666 lets the umask decide the permissions, as for any
    # file the user writes (mkstemp would force 0600).
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return out


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` for UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))
