"""Decode each image once into a uint8 ``N x H x W x 3`` array, kept in memory or memory-mapped.

VTAB-1k training sets are 1000 images trained for ~100 epochs; decoding JPEGs and resizing
them every epoch (what the reference loaders do) costs more than the ViT step on a modern
GPU. Here the deterministic part of the protocol (:func:`~petlbench.data.transforms.prepare_image`)
runs once, on a thread pool (PIL releases the GIL while decoding and resizing), and the result
is stored as ``.npy`` under ``<cache>/decoded/`` so the next run memory-maps it instead.

The file name is a hash of the split file's bytes, the listed paths, the resolved image root,
the transform recipe and a format version, so editing a split file, moving the data or
changing the image size gives a new file. Writes are atomic (temporary file + ``os.replace``);
a crashed run never leaves a half-written cache that a later run would trust. Nothing is ever
written under the user's data root.

The cache root is ``$PETLBENCH_CACHE`` or ``~/.cache/petlbench`` (see :func:`cache_root`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from petlbench.data.fingerprint import stat_signature
from petlbench.data.paths import CACHE_ENV, cache_root
from petlbench.data.problems import Problem, raise_first
from petlbench.data.readers import SplitIndex, read_split
from petlbench.data.suites import Suite, Task, get_suite
from petlbench.data.transforms import TransformSpec, decode_image, transform_spec

__all__ = [
    "CACHE_ENV", "FORMAT_VERSION", "CachedSplit", "cache_key", "cache_root", "decode_into", "load_images",
    "load_split", "stat_signature",
]

FORMAT_VERSION = 1


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


@dataclass(frozen=True, eq=False)
class CachedSplit:
    """A decoded split: uint8 images (CPU, possibly memory-mapped) and int64 labels."""

    index: SplitIndex
    spec: TransformSpec
    images: torch.Tensor
    labels: torch.Tensor
    key: str
    path: Path | None
    hit: bool
    seconds: float

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return self.index.num_classes


def cache_key(index: SplitIndex, spec: TransformSpec) -> str:
    """Hash of what determines the decoded pixels: split file bytes, paths, image root, file stats, recipe."""
    h = hashlib.sha256(f"petlbench-decoded-v{FORMAT_VERSION}\n".encode())
    h.update(hashlib.sha256(index.source.read_bytes()).digest())
    h.update(hashlib.sha256("\n".join(index.relpaths).encode()).digest())
    h.update(str(index.image_root.resolve()).encode() + b"\n")
    h.update(stat_signature(index))
    h.update(json.dumps(spec.describe(), sort_keys=True).encode())
    return h.hexdigest()[:32]


def _decode_problem(index: SplitIndex, i: int, exc: BaseException) -> Problem:
    path, line = index.location(i)
    image = index.image_root / index.relpaths[i]
    if isinstance(exc, FileNotFoundError):
        cause, fix = f"image {image} does not exist", "restore the file or remove its line"
    elif isinstance(exc, UnidentifiedImageError):
        cause, fix = f"{image} is not an image file PIL can read", "replace it with the original image"
    elif isinstance(exc, OSError) and "truncated" in str(exc).lower():
        cause, fix = f"image {image} is truncated ({exc})", "re-download or re-extract it; the archive was cut short"
    else:
        cause, fix = f"image {image} cannot be decoded ({type(exc).__name__}: {exc})", "replace it with the original image"
    return Problem(path, cause, fix, line)


def decode_into(index: SplitIndex, spec: TransformSpec, out: np.ndarray, workers: int | None = None) -> None:
    """Decode every image of ``index`` into ``out[i]``; raise the first failure as a DataError."""

    def work(i: int) -> Problem | None:
        try:
            out[i] = decode_image(index.image_root / index.relpaths[i], spec)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            return _decode_problem(index, i, exc)
        return None

    n = len(index)
    workers = workers or default_workers()
    if workers <= 1 or n < 8:
        problems = [work(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="petlbench-decode") as pool:
            problems = list(pool.map(work, range(n), chunksize=max(1, n // (workers * 8))))
    raise_first([p for p in problems if p is not None])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _open_cached(path: Path, n: int, side: int) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="c")  # copy-on-write: writable view, the file never changes
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (n, side, side, 3):
        return None
    return arr


def load_images(
    index: SplitIndex,
    spec: TransformSpec,
    *,
    cache_dir: str | Path | None = None,
    persist: bool = True,
    workers: int | None = None,
) -> CachedSplit:
    """Decode a split once (or memory-map the cached decode) into a :class:`CachedSplit`.

    ``cache_dir`` defaults to ``cache_root() / "decoded"``; ``persist=False`` keeps the array
    in memory only (nothing written anywhere).
    """
    start = time.perf_counter()
    key = cache_key(index, spec)
    n, side = len(index), spec.stored_size
    labels = torch.tensor(index.labels, dtype=torch.int64)
    path: Path | None = None
    if persist:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "decoded"
        path = folder / f"{key}.npy"
        arr = _open_cached(path, n, side) if path.is_file() else None
        if arr is not None:
            return CachedSplit(index, spec, torch.from_numpy(arr), labels, key, path, True, time.perf_counter() - start)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            warnings.warn(f"cannot create cache folder {folder} ({exc}); decoding into memory only", stacklevel=2)
            path = None
    if path is None:
        arr = np.empty((n, side, side, 3), dtype=np.uint8)
        decode_into(index, spec, arr, workers)
        return CachedSplit(index, spec, torch.from_numpy(arr), labels, key, None, False, time.perf_counter() - start)

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy")
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
        decode_into(index, spec, mm, workers)
        mm.flush()
        del mm
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION, "key": key, "shape": [n, side, side, 3], "suite": index.suite,
        "task": index.task, "split": index.split, "source": str(index.source),
        "image_root": str(index.image_root), "spec": spec.describe(), "created": time.time(),
    }
    _atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    arr = _open_cached(path, n, side)
    if arr is None:  # pragma: no cover - only if the file vanished between the two lines
        raise OSError(f"cache file {path} could not be read back")
    return CachedSplit(index, spec, torch.from_numpy(arr), labels, key, path, False, time.perf_counter() - start)


def load_split(
    suite: Suite | str,
    task: Task | str,
    split: str,
    data_root: str | Path,
    *,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    persist: bool = True,
    workers: int | None = None,
) -> CachedSplit:
    """Read, validate and decode one split with the suite's protocol transform."""
    suite = get_suite(suite)
    index = read_split(suite, task, split, data_root)
    spec = transform_spec(suite.transform, image_size or suite.image_size)
    return load_images(index, spec, cache_dir=cache_dir, persist=persist, workers=workers)
