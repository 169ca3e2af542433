"""Reading image files safely: only regular files are ever opened.

A split may list anything: a symlink to ``/dev/zero`` would be read until memory runs out and a
FIFO would block forever. Every reader of image bytes (``data check``, fingerprints, the decode
cache) goes through :func:`open_regular`; :func:`file_problem` says in words what is wrong.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file (missing, a FIFO, a device, a folder), or None.

    Only regular files are ever opened: a symlink to ``/dev/zero`` would be read until memory
    runs out and a FIFO would block forever.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return f"is not a regular file but {_kind(mode)}"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; raises OSError (with a cause) for anything else.

    Opened non-blocking (a FIFO swapped in after a check cannot hang the open) and checked on
    the open descriptor, so there is no window between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file but {_kind(mode)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path) as fh:
        return fh.read()


__all__ = ["file_problem", "open_regular", "read_regular_file"]
