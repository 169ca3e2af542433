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

**Native resolution.** Under the VTAB protocol (a square bicubic resize, no crop) a split whose
images all have one size no larger in area than the model's input (CIFAR and SVHN at 32x32,
dSprites and EuroSAT at 64x64, Camelyon and smallNORB at 96x96) is stored at that size and
resized per batch on the device (:meth:`~petlbench.data.loader.DeviceLoader._resized`, PIL's
two-pass bicubic, within 2 of 255 levels per pixel of the PIL resize; tests/data/test_data_native.py).
That keeps such test sets small enough to stay on the GPU and the cache a fraction of the
224x224 size. Splits of mixed sizes, larger images and the FGVC recipe are resized at decode time.

**Whole images (FGVC training).** A training split of the FGVC crop or of random resized
crops keeps every image whole at its aspect ratio (:class:`~petlbench.data.transforms.Storage`
``short_side``), laid out in fixed-size slots (:mod:`petlbench.data.slots`); the per-image table
is cached next to the pixels as ``<key>.layout.npy``, written before them, and both are checked
against each other on every read. The sizes come from the image headers, read once before
decoding, so the file's exact size is reserved up front. Evaluation splits of the FGVC recipes
store the final centre crop.

**Full disks and interruptions.** The file's space is reserved (``posix_fallocate``) before any
decoding and the pixels are written with plain writes, never through a writable memory map, so
a full disk is an ``ENOSPC`` error and not a SIGBUS: the split is then decoded in memory with a
warning saying "disk full at <folder>", and the partial file is removed. Temporaries are removed
on SIGTERM, and those left by a killed process (SIGKILL, power loss) are removed by the next
load in that folder: a temporary whose process no longer runs on this host, or that nobody has
written to for an hour.

The cache root is ``$PETLBENCH_CACHE`` or ``~/.cache/petlbench`` (see :func:`cache_root`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from petlbench.data.files import open_regular
from petlbench.data.fingerprint import stat_signature
from petlbench.data.paths import CACHE_ENV, cache_root
from petlbench.data.problems import Problem, raise_first
from petlbench.data.readers import SplitIndex, read_split
from petlbench.data.slots import SlotLayout, plan_layout
from petlbench.data.suites import Suite, Task, get_suite
from petlbench.data.transforms import Storage, TransformSpec, decode_image, transform_spec

__all__ = [
    "CACHE_ENV", "FORMAT_VERSION", "CachedSplit", "cache_key", "cache_root", "decode_into", "image_sizes",
    "load_images", "load_split", "stat_signature",
]

FORMAT_VERSION = 1


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def as_storage(what: Storage | TransformSpec) -> Storage:
    """A Storage, or a TransformSpec's training storage (the split a loader trains on)."""
    return what.storage(True) if isinstance(what, TransformSpec) else what


@dataclass(frozen=True, eq=False)
class CachedSplit:
    """A decoded split: uint8 images (CPU, possibly memory-mapped) and int64 labels.

    ``images`` is ``N x H x W x 3``, or for a whole-image store (``layout`` set) the slot array of
    :mod:`petlbench.data.slots`; ``storage`` says which recipe role it was stored for."""

    index: SplitIndex
    spec: TransformSpec
    images: torch.Tensor
    labels: torch.Tensor
    key: str
    path: Path | None
    hit: bool
    seconds: float
    storage: Storage | None = None
    layout: SlotLayout | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def stored(self) -> Storage:
        return self.storage if self.storage is not None else self.spec.storage(True)

    @property
    def device_resize(self) -> int | None:
        """The side the loader resizes to on the device, for a split stored at native resolution."""
        if self.layout is not None or self.stored.kind != "square":
            return None
        side = self.stored.size
        return None if tuple(self.images.shape[1:3]) == (side, side) else side

    def describe(self) -> dict[str, Any]:
        """What is stored and what it costs, for records."""
        out: dict[str, Any] = {"layout": self.stored.kind, "images": len(self), "bytes": int(self.images.numel()),
                               "shape": list(self.images.shape)}
        if self.layout is not None:
            out.update(slots=self.layout.num_slots, slot=[self.layout.slot_height, self.layout.slot_width],
                       overlap=self.layout.overlap)
        return out


def cache_key(index: SplitIndex, spec: Storage | TransformSpec, native: bool = False) -> str:
    """Hash of what determines the decoded pixels: split file bytes, paths, image root, file stats,
    storage recipe (:meth:`Storage.key`), and whether the pixels are stored at native resolution
    (resized on the device)."""
    h = hashlib.sha256(f"petlbench-decoded-v{FORMAT_VERSION}\n".encode())
    for source in index.sources:
        h.update(hashlib.sha256(source.read_bytes()).digest())
    h.update(hashlib.sha256("\n".join(index.relpaths).encode()).digest())
    h.update(str(index.image_root.resolve()).encode() + b"\n")
    h.update(stat_signature(index))
    h.update(json.dumps(as_storage(spec).key(), sort_keys=True).encode())
    if native:  # resized-at-decode keys stay what they were, so existing caches stay valid
        h.update(b"native\n")
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


class _NotUniform(Exception):
    """An image of a split being stored at native resolution has another size than the first."""


def _decode_native(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Open and fully decode one image as RGB at its own size; ``size`` is (height, width)."""
    with open_regular(path) as fh, Image.open(fh) as img:  # never a FIFO or a device (as decode_image)
        img.load()
        if (img.height, img.width) != size:
            raise _NotUniform(path)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def native_size(index: SplitIndex, spec: Storage | TransformSpec) -> tuple[int, int] | None:
    """(height, width) to store ``index`` at, if the recipe allows a device-side resize (a square
    bicubic store) and the first image is no larger in area than the model's input (every other
    image is checked while decoding)."""
    storage = as_storage(spec)
    side = storage.size
    if storage.kind != "square" or storage.interpolation != "bicubic" or not len(index):
        return None
    try:
        with open_regular(index.paths[0]) as fh, Image.open(fh) as img:  # reads the header only
            size = (int(img.height), int(img.width))
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None  # the decode reports it, with its file and line
    if size == (side, side) or size[0] * size[1] > side * side:
        return None  # same pixels as a decode-time resize, or more bytes than it
    return size


def _decode_one(index: SplitIndex, spec: Storage | TransformSpec, i: int, size: tuple[int, int] | None) -> np.ndarray:
    path = index.image_root / index.relpaths[i]
    return _decode_native(path, size) if size is not None else decode_image(path, as_storage(spec))


def decode_into(
    index: SplitIndex, spec: Storage | TransformSpec, out: np.ndarray, workers: int | None = None,
    *, native: tuple[int, int] | None = None, start: int = 0,
) -> None:
    """Decode images ``start .. start + len(out)`` of ``index`` into ``out``; raise the first failure
    as a DataError (:class:`_NotUniform` when a native-size image differs from ``native``)."""

    def put(k: int) -> None:
        out[k] = _decode_one(index, spec, start + k, native)

    _for_each_image(index, len(out), start, workers, put)


def _for_each_image(
    index: SplitIndex, n: int, start: int, workers: int | None, work_on: Any,
) -> list[Any]:
    """``work_on(k)`` for images ``start + k``, k < n, on a thread pool; returns the results in order
    and raises the first failure as a DataError with its file and line."""

    def work(k: int) -> Any:
        try:
            return work_on(k)
        except _NotUniform:
            raise
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            return _decode_problem(index, start + k, exc)

    workers = workers or default_workers()
    if workers <= 1 or n < 8:
        results = [work(k) for k in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="petlbench-decode") as pool:
            results = list(pool.map(work, range(n), chunksize=max(1, n // (workers * 8))))
    raise_first([p for p in results if isinstance(p, Problem)])
    return results


def _header_size(path: Path) -> tuple[int, int]:
    with open_regular(path) as fh, Image.open(fh) as img:  # reads the header only
        return int(img.height), int(img.width)


def image_sizes(index: SplitIndex, workers: int | None = None) -> np.ndarray:
    """Every image's (height, width) from its header (nothing decoded): N x 2 int64."""
    sizes = _for_each_image(index, len(index), 0, workers,
                            lambda k: _header_size(index.image_root / index.relpaths[k]))
    return np.asarray(sizes, dtype=np.int64).reshape(len(index), 2)


def decode_slots(
    index: SplitIndex, storage: Storage, layout: SlotLayout, out: np.ndarray, start: int, stop: int,
    workers: int | None = None,
) -> None:
    """Decode images ``start .. stop`` into their slots; ``out`` holds exactly those images' slots."""
    base = int(layout.table[start, 0]) if stop > start else 0

    def put(k: int) -> None:
        i = start + k
        first = int(layout.table[i, 0]) - base
        layout.put(out[first: first + int(layout.table[i, 1])], i, _decode_one(index, storage, i, None))

    _for_each_image(index, stop - start, start, workers, put)


# ---------------------------------------------------------------------------- temporaries

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]+))?\.(?P<rand>[0-9a-f]{8})\.tmp(?:\.npy)?$")
#: A temporary nobody wrote to for this long is abandoned, whichever host made it (a live decode
#: writes every few seconds).
STALE_TMP_S = 3600.0

_live_tmps: set[Path] = set()
_tmp_lock = threading.Lock()
_previous_sigterm: Any = None


def _tmp_path(final: Path) -> Path:
    """``.<name>.<pid>@<host>.<rand>.tmp[.npy]`` next to ``final``: owner and host are in the name."""
    suffix = ".tmp.npy" if final.suffix == ".npy" else ".tmp"
    stem = final.stem if final.suffix == ".npy" else final.name
    return final.with_name(f".{stem}.{os.getpid()}@{_HOST}.{uuid.uuid4().hex[:8]}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the temporaries of processes that died mid-write (killed, power loss); returns them.

    A temporary is stale if its process no longer runs on this host, or if nobody has written to
    it for :data:`STALE_TMP_S` (the only safe test for one made on another host of a shared disk).
    """
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is None:
            continue
        path = Path(entry.path)
        with _tmp_lock:
            if path in _live_tmps:
                continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        host, pid = m.group("host"), int(m.group("pid"))
        dead_here = host == _HOST and pid != os.getpid() and not _pid_alive(pid)
        if dead_here or age > STALE_TMP_S:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def _on_sigterm(signum: int, frame: Any) -> None:
    """Remove this process's temporaries, then do what SIGTERM did before (default: terminate)."""
    with _tmp_lock:
        paths = list(_live_tmps)
        _live_tmps.clear()
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _temporary(final: Path) -> Iterator[Path]:
    """A temporary path for ``final``, removed on error, on exit and on SIGTERM (the main thread
    installs the handler; it chains to whatever handler was there)."""
    global _previous_sigterm
    tmp = _tmp_path(final)
    installed = False
    with _tmp_lock:
        _live_tmps.add(tmp)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        installed = True
    try:
        yield tmp
    finally:
        with _tmp_lock:
            _live_tmps.discard(tmp)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if installed:
            signal.signal(signal.SIGTERM, _previous_sigterm)
            _previous_sigterm = None


def _atomic_write_text(path: Path, text: str) -> None:
    with _temporary(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


# ---------------------------------------------------------------------------- writing the cache file

_CHUNK_IMAGES = 256


def _reserve(fd: int, nbytes: int) -> None:
    """Claim the file's blocks now, so a full disk fails here (ENOSPC) rather than later."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            return  # the filesystem cannot reserve; the plain writes below still fail cleanly
        raise


@contextlib.contextmanager
def _npy_file(tmp: Path, shape: tuple[int, ...]) -> Iterator[Any]:
    """An open ``.npy`` file of uint8 ``shape``: header written, its space reserved; the caller
    writes the pixels in order with plain writes (an ENOSPC is then an OSError, never a SIGBUS
    from a memory map), and the file is flushed to disk on exit."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with open(tmp, "xb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.flush()
        _reserve(f.fileno(), f.tell() + int(np.prod(shape)))
        yield f
        f.flush()
        os.fsync(f.fileno())


def _write_npy(
    tmp: Path, index: SplitIndex, spec: Storage | TransformSpec, shape: tuple[int, ...],
    native: tuple[int, int] | None, workers: int | None,
) -> None:
    """Write ``index`` decoded as a ``.npy`` file, in chunks of images."""
    with _npy_file(tmp, shape) as f:
        chunk = np.empty((min(_CHUNK_IMAGES, shape[0]), *shape[1:]), dtype=np.uint8)
        for start in range(0, shape[0], _CHUNK_IMAGES):
            part = chunk[: min(_CHUNK_IMAGES, shape[0] - start)]
            decode_into(index, spec, part, workers, native=native, start=start)
            f.write(memoryview(part).cast("B"))


def _write_slots(tmp: Path, index: SplitIndex, storage: Storage, layout: SlotLayout, workers: int | None) -> None:
    """Write ``index`` decoded into its slots as a ``.npy`` file, in chunks of images."""
    n = len(index)
    with _npy_file(tmp, layout.shape) as f:
        for start in range(0, n, _CHUNK_IMAGES):
            stop = min(n, start + _CHUNK_IMAGES)
            slots = int(layout.table[stop - 1, 0] + layout.table[stop - 1, 1] - layout.table[start, 0])
            part = np.empty((slots, *layout.shape[1:]), dtype=np.uint8)
            decode_slots(index, storage, layout, part, start, stop, workers)
            f.write(memoryview(part).cast("B"))


def _disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _open_cached(path: Path, n: int, size: tuple[int, int]) -> np.ndarray | None:
    try:
        arr = np.load(path, mmap_mode="c")  # copy-on-write: writable view, the file never changes
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.shape != (n, *size, 3):
        return None
    return arr


def _open_slots(path: Path, table_path: Path, n: int, storage: Storage) -> tuple[np.ndarray, SlotLayout] | None:
    """The cached slot array and its table, if both are there and describe each other."""
    try:
        arr = np.load(path, mmap_mode="c")
        table = np.load(table_path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3 or table.dtype != np.int64:
        return None
    layout = SlotLayout(table, int(arr.shape[1]), int(arr.shape[2]), storage.overlap)
    return (arr, layout) if layout.check(n, arr.shape) else None


def _fixed_side(storage: Storage) -> int:
    return storage.crop if storage.kind == "center_crop" else storage.size


def _in_memory(index: SplitIndex, spec: Storage | TransformSpec, native: tuple[int, int] | None,
               workers: int | None) -> np.ndarray:
    side = _fixed_side(as_storage(spec))
    if native is not None:
        arr = np.empty((len(index), *native, 3), dtype=np.uint8)
        try:
            decode_into(index, spec, arr, workers, native=native)
            return arr
        except _NotUniform:
            pass
    arr = np.empty((len(index), side, side, 3), dtype=np.uint8)
    decode_into(index, spec, arr, workers)
    return arr


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    try:
        _atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    except OSError as exc:  # the description is for people; the array is what is read back
        warnings.warn(f"could not write {path.with_suffix('.json')} ({exc})", stacklevel=3)


def _meta(index: SplitIndex, spec: TransformSpec, storage: Storage, key: str, shape: tuple[int, ...]) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION, "key": key, "shape": list(shape), "suite": index.suite,
        "task": index.task, "split": index.split, "source": [str(s) for s in index.sources],
        "image_root": str(index.image_root), "spec": spec.describe(), "storage": storage.describe(),
        "created": time.time(),
    }


def _cache_folder(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "decoded"


def _disk_full_warning(folder: Path, index: SplitIndex, nbytes: int) -> None:
    warnings.warn(
        f"disk full at {folder}: the decoded {index.task}/{index.split} split needs "
        f"{nbytes / 1e9:.2f} GB there. Decoding it into memory instead; free space "
        f"or set {CACHE_ENV} to a larger disk to cache it.", stacklevel=3,
    )


def load_images(
    index: SplitIndex,
    spec: TransformSpec,
    *,
    train: bool = True,
    cache_dir: str | Path | None = None,
    persist: bool = True,
    workers: int | None = None,
) -> CachedSplit:
    """Decode a split once (or memory-map the cached decode) into a :class:`CachedSplit`, stored
    for ``spec``'s training recipe (``train``) or its evaluation recipe (:meth:`TransformSpec.storage`).

    ``cache_dir`` defaults to ``cache_root() / "decoded"``; ``persist=False`` keeps the array
    in memory only (nothing written anywhere). A full disk is not an error: the split is then
    decoded in memory, with a warning naming the folder.
    """
    start = time.perf_counter()
    storage = spec.storage(train)
    labels = torch.tensor(index.labels, dtype=torch.int64)
    if storage.kind == "short_side":
        return _load_slots(index, spec, storage, labels, start, cache_dir=cache_dir, persist=persist, workers=workers)
    n, side = len(index), _fixed_side(storage)
    native = native_size(index, storage)

    def done(arr: np.ndarray, key: str, path: Path | None, hit: bool) -> CachedSplit:
        return CachedSplit(index, spec, torch.from_numpy(arr), labels, key, path, hit, time.perf_counter() - start,
                           storage)

    resized_key = cache_key(index, storage)
    native_key = cache_key(index, storage, native=True) if native is not None else None

    def in_memory(size: tuple[int, int] | None) -> CachedSplit:  # keyed by what it holds (native or resized)
        arr = _in_memory(index, storage, size, workers)
        return done(arr, native_key if native_key and arr.shape[1:3] == native else resized_key, None, False)

    if not persist:
        return in_memory(native)

    folder = _cache_folder(cache_dir)
    candidates = ([(native_key, native)] if native_key and native else []) + [(resized_key, (side, side))]
    for key, size in candidates:  # a split found not uniform is cached resized: look there too
        path = folder / f"{key}.npy"
        arr = _open_cached(path, n, size) if path.is_file() else None
        if arr is not None:
            return done(arr, key, path, True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"cannot create cache folder {folder} ({exc}); decoding into memory only", stacklevel=2)
        return in_memory(native)
    remove_stale_temporaries(folder)

    for key, size in candidates:
        path = folder / f"{key}.npy"
        stored_native = size if size != (side, side) else None
        try:
            with _temporary(path) as tmp:
                _write_npy(tmp, index, storage, (n, *size, 3), stored_native, workers)
                os.replace(tmp, path)
        except _NotUniform:
            continue  # mixed sizes after all: store it resized
        except OSError as exc:
            if not _disk_full(exc):
                raise
            _disk_full_warning(folder, index, n * size[0] * size[1] * 3)
            return in_memory(stored_native)
        _write_meta(path, {**_meta(index, spec, storage, key, (n, *size, 3)), "native_resolution": stored_native is not None})
        arr = _open_cached(path, n, size)
        if arr is None:  # pragma: no cover - only if the file vanished between the two lines
            raise OSError(f"cache file {path} could not be read back")
        return done(arr, key, path, False)
    raise AssertionError("unreachable: the resized candidate never raises _NotUniform")  # pragma: no cover


def plan_slots(index: SplitIndex, storage: Storage, workers: int | None = None) -> SlotLayout:
    """The slot layout of ``index`` stored as ``storage`` (image headers read, nothing decoded)."""
    sizes = image_sizes(index, workers)
    stored = np.asarray([storage.stored_shape(int(h), int(w)) for h, w in sizes], dtype=np.int64).reshape(-1, 2)
    return plan_layout(stored, sizes, storage.overlap)


def _load_slots(
    index: SplitIndex, spec: TransformSpec, storage: Storage, labels: torch.Tensor, start: float, *,
    cache_dir: str | Path | None, persist: bool, workers: int | None,
) -> CachedSplit:
    """:func:`load_images` for a whole-image store: the slot array and its per-image table."""
    n = len(index)
    key = cache_key(index, storage)

    def done(arr: np.ndarray, layout: SlotLayout, path: Path | None, hit: bool) -> CachedSplit:
        return CachedSplit(index, spec, torch.from_numpy(arr), labels, key, path, hit, time.perf_counter() - start,
                           storage, layout)

    def in_memory(layout: SlotLayout | None = None) -> CachedSplit:
        layout = layout or plan_slots(index, storage, workers)
        arr = np.empty(layout.shape, dtype=np.uint8)
        decode_slots(index, storage, layout, arr, 0, n, workers)
        return done(arr, layout, None, False)

    if not persist:
        return in_memory()
    folder = _cache_folder(cache_dir)
    path, table_path = folder / f"{key}.npy", folder / f"{key}.layout.npy"
    if path.is_file() and table_path.is_file():
        found = _open_slots(path, table_path, n, storage)
        if found is not None:
            return done(*found, path, True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warnings.warn(f"cannot create cache folder {folder} ({exc}); decoding into memory only", stacklevel=2)
        return in_memory()
    remove_stale_temporaries(folder)
    layout = plan_slots(index, storage, workers)
    try:
        with _temporary(table_path) as tmp:  # the table first: pixels without it are never read
            np.save(tmp, layout.table, allow_pickle=False)
            os.replace(tmp, table_path)
        with _temporary(path) as tmp:
            _write_slots(tmp, index, storage, layout, workers)
            os.replace(tmp, path)
    except OSError as exc:
        if not _disk_full(exc):
            raise
        _disk_full_warning(folder, index, layout.nbytes)
        return in_memory(layout)
    _write_meta(path, {**_meta(index, spec, storage, key, layout.shape), "slot_table": table_path.name})
    found = _open_slots(path, table_path, n, storage)
    if found is None:  # pragma: no cover - only if the files vanished or changed meanwhile
        raise OSError(f"cache file {path} could not be read back")
    return done(*found, path, False)


def load_split(
    suite: Suite | str,
    task: Task | str,
    split: str,
    data_root: str | Path,
    *,
    image_size: int | None = None,
    train: bool = True,
    cache_dir: str | Path | None = None,
    persist: bool = True,
    workers: int | None = None,
) -> CachedSplit:
    """Read, validate and decode one split with the suite's protocol transform (its training or
    evaluation storage)."""
    suite = get_suite(suite)
    index = read_split(suite, task, split, data_root)
    spec = transform_spec(suite.transform, image_size or suite.image_size)
    return load_images(index, spec, train=train, cache_dir=cache_dir, persist=persist, workers=workers)
