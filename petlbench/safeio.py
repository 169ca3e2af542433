"""Files in shared folders: written atomically with the permissions ``open`` would give, read
only when they are regular files of a sane size, and outputs checked before the work.

A results folder is shared by people, machines and petlbench versions, and whatever sits in it
may be damaged or hostile:

- :func:`atomic_write` writes a temporary file next to the target (created like ``open`` creates
  a file: mode ``0666`` less the umask, so a group-shared folder gets group-readable files; the
  folder's default ACL applies too), fsyncs it and renames it into place. A reader sees the old
  file or the new one; a failed write (disk full, quota, a lost mount) leaves the old one intact.
- :func:`read_bounded` opens regular files only (a FIFO would block forever, a symlink to
  ``/dev/zero`` would be read until memory runs out) and refuses files larger than the caller's
  bound without reading them (a 3 GB sparse file named ``x.json``).
- :func:`check_output_file` says before a long computation that its output cannot be written
  (below a file, a folder in its place, a read-only folder), instead of losing the result after.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from petlbench.data.files import open_regular
from petlbench.errors import PetlbenchError


def create_new(path: Path) -> int:
    """Create ``path`` (which must not exist) for writing, with mode ``0666`` less the umask, as
    ``open`` would; returns the descriptor.

    ``tempfile.mkstemp`` makes ``0600`` files whatever the umask: a record written that way cannot
    be read by the group that shares the folder.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o666)


def temporary_beside(path: Path) -> tuple[int, Path]:
    """A new hidden file next to ``path`` (same folder, so a rename is atomic): (descriptor, path)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return create_new(tmp), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")  # pragma: no cover - 100 collisions


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace ``path`` by ``data`` (text is written as UTF-8) atomically; raises OSError.

    The temporary file is removed whatever happens, so a failure leaves ``path`` as it was.
    """
    path = Path(path)
    payload = data.encode("utf-8", errors="backslashreplace") if isinstance(data, str) else data
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


class TooLarge(OSError):
    """A file larger than anything petlbench writes there (never read)."""


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; raises OSError otherwise.

    Special files (FIFO, device, folder) raise OSError naming what they are; a file larger than
    ``limit`` raises :class:`TooLarge` before anything is read (and a file that grows while it is
    read is cut off after ``limit + 1`` bytes and refused the same way).
    """
    with open_regular(Path(path)) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise TooLarge(f"{_size_text(size)}, larger than any file petlbench writes there "
                           f"({_size_text(limit)} at most)")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"more than {_size_text(limit)}, larger than any file petlbench writes there")
    return data


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Make sure ``path`` can be written (creating its folder) before the work that produces it.

    ``option`` names the path in the one-line error (``--out``). A folder in the file's place,
    a folder below a file, and a folder that refuses new files (read-only, no permission) are
    refused; the check writes and removes a probe file, so it sees what a write would see.
    """
    path = Path(path).expanduser()
    fix = f"Fix: pass {option} a file in a folder you can write to."
    if path.is_dir():
        raise PetlbenchError(f"{option} {path} is a folder, not a file. {fix}")
    folder = path.parent
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        raise PetlbenchError(f"{option} {path} cannot be written: it lies below the file {above}. {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = temporary_beside(path)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise PetlbenchError(f"{option} {path} cannot be written ({exc.strerror or exc}). {fix}") from None
    return path


__all__ = ["TooLarge", "atomic_write", "check_output_file", "create_new", "read_bounded", "temporary_beside"]
