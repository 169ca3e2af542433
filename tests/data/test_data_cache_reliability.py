"""The decode cache under a full disk and under kills: no SIGBUS, no half-written cache file, the
run goes on (decoded in memory, with a warning naming the folder), and temporaries do not leak."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from petlbench.data import cache as cache_mod
from petlbench.data.cache import load_images
from petlbench.data.readers import read_split
from petlbench.data.transforms import transform_spec

REPO = Path(__file__).resolve().parents[2]


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def split(vtab_root: Path):
    return read_split("vtab", "cifar", "test", vtab_root), transform_spec("vtab_resize", 32)


def test_full_disk_at_reservation_decodes_in_memory(split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index, spec = split
    expected = load_images(index, spec, persist=False)
    monkeypatch.setattr(os, "posix_fallocate", enospc)
    folder = tmp_path / "decoded"
    with pytest.warns(UserWarning, match=f"disk full at {folder}"):
        got = load_images(index, spec, cache_dir=folder)
    assert got.path is None and not got.hit and torch.equal(got.images, expected.images)
    assert list(folder.iterdir()) == []  # no half-written cache file, no temporary


class FillsUp:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (a disk filling up)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_full_disk_while_writing_leaves_nothing_behind(split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that cannot reserve space fills up halfway through: an OSError, not a SIGBUS."""
    index, spec = split
    monkeypatch.setattr(os, "posix_fallocate", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    monkeypatch.setattr(cache_mod, "_CHUNK_IMAGES", 2)
    monkeypatch.setattr(cache_mod, "open", lambda path, mode: FillsUp(open(path, mode), 4000), raising=False)
    folder = tmp_path / "decoded"
    with pytest.warns(UserWarning, match="disk full at"):
        got = load_images(index, spec, cache_dir=folder)
    assert got.path is None and len(got) == len(index)
    assert list(folder.iterdir()) == []
    monkeypatch.undo()
    again = load_images(index, spec, cache_dir=folder)  # space again: cached as usual
    assert again.path is not None and torch.equal(again.images, got.images)


def test_stale_temporaries_are_removed(split, tmp_path: Path) -> None:
    index, spec = split
    folder = tmp_path / "decoded"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = cache_mod._HOST
    key = "0" * 32
    leaked = folder / f".{key}.{dead.pid}@{host}.1234abcd.tmp.npy"  # killed earlier on this host
    old_format = folder / f".{key}.{dead.pid}.5678abcd.tmp.npy"  # an older petlbench: no host in the name
    abandoned = folder / f".{key}.{os.getppid()}@otherhost.9999abcd.tmp.npy"  # untouched for hours
    live = folder / f".{key}.{os.getppid()}@{host}.aaaa0000.tmp.npy"  # a running process's decode
    elsewhere = folder / f".{key}.{dead.pid}@otherhost.bbbb0000.tmp.npy"  # may be alive on its host
    users = folder / "notes.tmp.npy"  # not ours
    for p in (leaked, old_format, abandoned, live, elsewhere, users):
        p.write_bytes(b"x" * 10)
    hours_ago = time.time() - 3 * 3600
    os.utime(abandoned, (hours_ago, hours_ago))
    os.utime(old_format, (hours_ago, hours_ago))
    load_images(index, spec, cache_dir=folder)
    names = {p.name for p in folder.iterdir()}
    assert leaked.name not in names and old_format.name not in names and abandoned.name not in names
    assert {live.name, elsewhere.name, users.name} <= names


def test_sigterm_mid_decode_removes_the_temporary(vtab_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "decoded"
    script = textwrap.dedent(f"""
        import time
        from petlbench.data import cache
        from petlbench.data.readers import read_split
        from petlbench.data.transforms import transform_spec

        slow = cache._decode_one
        def decode_one(*args):
            time.sleep(0.3)
            return slow(*args)
        cache._decode_one = decode_one
        cache._CHUNK_IMAGES = 1
        index = read_split("vtab", "cifar", "train800val200", {str(vtab_root)!r})
        cache.load_images(index, transform_spec("vtab_resize", 32), cache_dir={str(folder)!r}, workers=1)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (folder.is_dir() and any(p.name.endswith(".tmp.npy") for p in folder.iterdir())):
            assert proc.poll() is None, "the decode ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM  # still terminated by SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(folder.iterdir()) == []
