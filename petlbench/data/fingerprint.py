"""Data fingerprints: one SHA-256 per split over exactly what the model is given.

Mirrors of VTAB-1k differ silently (JPEG re-encodes, truncated archives, unstratified splits;
anchors.md §6), so every result records which bytes it was trained and tested on. The hash
covers, for each entry in order of its relative path: the relative path, the 0-based label
used for training, and the SHA-256 of the image file's **exact bytes** (all of them: hashing
1000 images takes well under a second, so no sampling proxy is needed). Absolute paths and
folder names are not part of it, so the same data at two roots, or under an alias folder
(``cifar`` vs ``cifar100``), gives the same fingerprint, while changing one image byte or one
label changes it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from petlbench.data.files import open_regular
from petlbench.data.paths import cache_root
from petlbench.data.problems import Problem, raise_first
from petlbench.data.readers import SplitIndex, read_split
from petlbench.data.suites import Suite, Task, get_suite

FINGERPRINT_VERSION = "petlbench-data-fingerprint-v1"
_CHUNK = 1 << 20


def stat_signature(index: SplitIndex) -> bytes:
    """Digest of every image's size and modification time: cheap (no reads), and it changes when a
    file is replaced in place, so caches keyed by it never serve stale pixels or fingerprints."""
    h = hashlib.sha256()
    for path in index.paths:
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.digest()


def file_sha256(path: str | Path) -> bytes:
    """SHA-256 digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open_regular(Path(path)) as f:  # never a FIFO or a device
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def fingerprint_split(index: SplitIndex, *, workers: int | None = None) -> str:
    """Hex SHA-256 of (sorted relative paths, labels, image bytes) of one split."""
    order = sorted(range(len(index)), key=lambda i: index.relpaths[i])
    paths = [index.image_root / index.relpaths[i] for i in order]

    def digest(k: int) -> bytes | Problem:
        try:
            return file_sha256(paths[k])
        except OSError as exc:
            path, line = index.location(order[k])
            return Problem(path, f"image {paths[k]} cannot be read ({exc.strerror or exc})", "restore the file", line)

    workers = workers or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="petlbench-hash") as pool:
        digests = list(pool.map(digest, range(len(paths)), chunksize=64))
    raise_first([d for d in digests if isinstance(d, Problem)])
    by_index: list[bytes] = [b""] * len(index)
    for i, d in zip(order, digests, strict=True):
        assert isinstance(d, bytes)
        by_index[i] = d
    return digest_split(index, by_index)


def cached_fingerprint(index: SplitIndex, cache_dir: str | Path | None = None) -> str:
    """:func:`fingerprint_split`, remembered on disk per (split file, image root, file sizes and
    mtimes), so a sweep hashes each unchanged split's bytes once rather than once per run."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    h.update(hashlib.sha256(index.source.read_bytes()).digest())
    h.update(str(index.image_root.resolve()).encode() + b"\n" + "\n".join(index.relpaths).encode())
    h.update(stat_signature(index))
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "fingerprints"
    memo = folder / f"{h.hexdigest()[:32]}.txt"
    try:
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    except OSError:
        pass
    value = fingerprint_split(index)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(value + "\n")
        os.replace(tmp, memo)
    except OSError:  # a read-only cache only costs speed
        pass
    return value


def digest_split(index: SplitIndex, file_digests: list[bytes]) -> str:
    """Combine per-file SHA-256 digests (in index order) into the split fingerprint."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for i in sorted(range(len(index)), key=lambda i: index.relpaths[i]):
        h.update(index.relpaths[i].encode("utf-8") + b"\0" + str(index.labels[i]).encode() + b"\0" + file_digests[i])
    return h.hexdigest()


def fingerprint_task(
    suite: Suite | str,
    task: Task | str,
    data_root: str | Path,
    splits: Iterable[str] | None = None,
    *,
    workers: int | None = None,
) -> dict[str, str]:
    """Fingerprints of a task's splits (all of the suite's splits by default), keyed by split."""
    suite = get_suite(suite)
    task = suite.resolve_task(task)
    return {
        split: fingerprint_split(read_split(suite, task, split, data_root), workers=workers)
        for split in (splits or suite.splits)
    }


def combine_fingerprints(fingerprints: dict[str, str]) -> str:
    """One hex digest over several named fingerprints (e.g. all splits of a task)."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for name in sorted(fingerprints):
        h.update(f"{name}={fingerprints[name]}\n".encode())
    return h.hexdigest()
