"""The offline demo: a VTAB-like suite and a pretrained micro-ViT, both made from data in our wheels.

Nothing is downloaded. The images come from scikit-learn (``load_digits``: 1797 8x8 digits)
and scikit-image (``lfw_subset``: 200 25x25 faces/non-faces; ``brick``/``grass``/``gravel``
512x512 texture photographs). :func:`materialize_demo` writes the tasks of ``suites/demo.yaml``
in the **VTAB-1k on-disk layout** (PNG + ``train800.txt`` ...), so the demo exercises the real
reader, check, cache and fingerprint code. It is deterministic (fixed seed, PNG bytes depend
only on pixels), so its fingerprints are stable across machines with the same Pillow/zlib.

Upstream / downstream split: the digits are divided once, by a fixed permutation, into a
900-image **downstream** pool (used by the ``digits``, ``digits_rotation`` and
``digits_position`` tasks) and the remaining 897 **upstream** images. The micro-ViT of
:func:`demo_backbone` was pretrained on 10-way classification of the upstream images only
(:mod:`petlbench.data.demo_pretrain`), so no demo evaluation image was seen in pretraining, much
as ImageNet-21k pretraining relates to VTAB's natural tasks. faces and textures are not used
upstream at all. Its weights ship in the package (:func:`demo_weights` returns the file after
checking its SHA-256), so they are the same bytes on every machine.

The data are built atomically (temporary folder, then rename) under ``<cache>/demo/``, where
``<cache>`` is ``$PETLBENCH_CACHE`` or ``~/.cache/petlbench`` (or an explicit folder). Only numpy
and Pillow make them (no torch, no threads), so they do not depend on the thread count either.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from petlbench.data.paths import cache_root
from petlbench.data.suites import Suite, Task, get_suite
from petlbench.errors import PetlbenchError

DEMO_SUITE = "demo"
DEMO_DATA_VERSION = "v1"
DEMO_SEED = 20240531
DOWNSTREAM_DIGITS = 900
SPLITS = ("train800", "val200", "test")

DEMO_ARCH = "vit_tiny_patch16_224"
DEMO_BACKBONE_KWARGS: dict[str, int] = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}
#: The shipped weights (``petlbench/data/<file>``) and their SHA-256, checked on every use; made by
#: ``scripts/make_demo_weights.py`` (:mod:`petlbench.data.demo_pretrain`), which prints both.
DEMO_WEIGHTS_VERSION = "v3"
DEMO_WEIGHTS_FILE = f"demo_vit_{DEMO_WEIGHTS_VERSION}.safetensors"
DEMO_WEIGHTS_SHA256 = "febe5b1c5ea2499a8f1493e9b51d954c9e4a78f87c57a1bc3f379d6d947327ea"

Sample = tuple[np.ndarray, int]  # (uint8 H x W grey image, label)


# ---------------------------------------------------------------------------- source images


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 digits as uint8 (0..16 scaled to 0..255) and labels.

    Reads the CSV that ships in the sklearn wheel directly (``load_digits`` reads the same
    file) because importing sklearn pulls in scipy.stats (0.8 s of CPU time, measured on a 2-core
    x86-64 machine); falls back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        raw, target = table[:, :64].reshape(-1, 8, 8), table[:, 64]
    else:  # pragma: no cover - other sklearn packaging
        from sklearn.datasets import load_digits

        d = load_digits()
        raw, target = d.images, d.target
    images = np.clip(np.rint(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images.setflags(write=False)
    return images, target.astype(np.int64)


def digits_partition() -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``load_digits()``: (downstream pool for demo tasks, disjoint upstream pool)."""
    perm = np.random.default_rng(DEMO_SEED).permutation(1797)
    return perm[:DOWNSTREAM_DIGITS], perm[DOWNSTREAM_DIGITS:]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def upstream_images() -> tuple[np.ndarray, np.ndarray]:
    """The pretraining source task: upstream digits as ``N x 32 x 32 x 3`` uint8, labels 0..9."""
    images, target = _digits()
    _, up = digits_partition()
    x = np.stack([_resize(images[i], 32) for i in up])
    return np.repeat(x[..., None], 3, axis=-1), target[up]


def _take(samples: list[Sample], sizes: dict[str, int], task: Task) -> dict[str, list[Sample]]:
    need = sum(sizes[s] for s in SPLITS)
    if need > len(samples):
        raise PetlbenchError(
            f"demo task {task.name!r} asks for {need} images but only {len(samples)} exist. "
            "Fix: lower its sizes in suites/demo.yaml."
        )
    out, start = {}, 0
    for s in SPLITS:
        out[s] = samples[start:start + sizes[s]]
        start += sizes[s]
    return out


def _stratified(samples: list[Sample], sizes: dict[str, int], classes: int, rng: np.random.Generator) -> dict[str, list[Sample]]:
    by_class = [[s for s in samples if s[1] == c] for c in range(classes)]
    for group in by_class:
        rng.shuffle(group)  # type: ignore[arg-type]
    out: dict[str, list[Sample]] = {}
    for s in SPLITS:
        per = [sizes[s] // classes + (1 if c < sizes[s] % classes else 0) for c in range(classes)]
        picked = [x for c in range(classes) for x in by_class[c][: per[c]]]
        by_class = [by_class[c][per[c]:] for c in range(classes)]
        order = rng.permutation(len(picked))
        out[s] = [picked[i] for i in order]
    return out


def _task_digits(task: Task, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, list[Sample]]:
    images, target = _digits()
    down, _ = digits_partition()
    return _take([(_resize(images[i], 32), int(target[i])) for i in down], sizes, task)


def _task_digits_rotation(task: Task, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, list[Sample]]:
    images, _ = _digits()
    down, _ = digits_partition()
    order = rng.permutation(down)
    ks = rng.integers(0, 4, size=len(order))
    return _take([(np.ascontiguousarray(np.rot90(_resize(images[i], 32), int(k))), int(k)) for i, k in zip(order, ks, strict=True)], sizes, task)


def _task_digits_position(task: Task, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, list[Sample]]:
    images, _ = _digits()
    down, _ = digits_partition()
    order = rng.permutation(down)
    samples = []
    for i in order:
        small = _resize(images[i], 12)
        b = int(rng.integers(0, task.classes))
        span = (32 - 12) // task.classes  # bins of equal width over the free horizontal range
        x0 = b * span + int(rng.integers(0, span))
        y0 = int(rng.integers(0, 32 - 12 + 1))
        canvas = np.zeros((32, 32), dtype=np.uint8)
        canvas[y0:y0 + 12, x0:x0 + 12] = small
        samples.append((canvas, b))
    return _take(samples, sizes, task)


def _skimage_data() -> Any:
    try:
        from skimage import data
    except ImportError as exc:
        raise PetlbenchError(
            f"the demo suite needs scikit-image for its face and texture images ({exc}). "
            "Fix: pip install scikit-image (a petlbench dependency)."
        ) from None
    return data


def _task_faces(task: Task, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, list[Sample]]:
    faces = np.clip(np.rint(_skimage_data().lfw_subset() * 255.0), 0, 255).astype(np.uint8)
    labels = [1 if i < 100 else 0 for i in range(len(faces))]  # first 100 are faces
    return _stratified([(f, y) for f, y in zip(faces, labels, strict=True)], sizes, task.classes, rng)


def _task_textures(task: Task, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, list[Sample]]:
    data = _skimage_data()
    sources = [data.brick(), data.grass(), data.gravel()][: task.classes]
    if len(sources) < task.classes:
        raise PetlbenchError(f"demo task 'textures' supports at most 3 classes, the YAML says {task.classes}.")
    band = 352  # train/val crops come from rows [0, 352), test crops from rows [352, 512)
    out: dict[str, list[Sample]] = {}
    for s in SPLITS:
        lo, hi = (band, 512) if s == "test" else (0, band)
        samples = []
        for j in range(sizes[s]):
            label = j % task.classes
            img = sources[label]
            side = int(rng.integers(32, 65))
            y = int(rng.integers(lo, hi - side + 1))
            x = int(rng.integers(0, img.shape[1] - side + 1))
            samples.append((_resize(np.ascontiguousarray(img[y:y + side, x:x + side]), 32), label))
        order = rng.permutation(len(samples))
        out[s] = [samples[i] for i in order]
    return out


_RECIPES: dict[str, Callable[[Task, dict[str, int], np.random.Generator], dict[str, list[Sample]]]] = {
    "digits": _task_digits,
    "digits_rotation": _task_digits_rotation,
    "digits_position": _task_digits_position,
    "faces": _task_faces,
    "textures": _task_textures,
}


# ---------------------------------------------------------------------------- materialisation


def _sizes(task: Task) -> dict[str, int]:
    sizes = {s: task.expected_size(s) for s in (*SPLITS, "train800val200")}
    if any(v is None for v in sizes.values()):
        raise PetlbenchError(f"demo task {task.name!r} must give sizes for {', '.join(sizes)} in its YAML.")
    if sizes["train800val200"] != sizes["train800"] + sizes["val200"]:  # type: ignore[operator]
        raise PetlbenchError(f"demo task {task.name!r}: train800val200 must equal train800 + val200 in its YAML.")
    return sizes  # type: ignore[return-value]


def _demo_hash(suite: Suite) -> str:
    text = Path(suite.path).read_bytes() if Path(suite.path).is_file() else suite.path.encode()
    return hashlib.sha256(text + f"|{DEMO_DATA_VERSION}|{DEMO_SEED}".encode()).hexdigest()[:10]


def _write_task(folder: Path, task: Task, rng: np.random.Generator) -> dict[str, int]:
    if task.name not in _RECIPES:
        raise PetlbenchError(f"the demo generator has no recipe for task {task.name!r}. Known: {', '.join(_RECIPES)}.")
    sizes = _sizes(task)
    return write_vtab1k_task(folder, _RECIPES[task.name](task, sizes, rng))


def write_vtab1k_task(folder: Path, splits: dict[str, list[Sample]]) -> dict[str, int]:
    """Write one task in the VTAB-1k on-disk layout (NOAH's export): ``images/<split>/NNNNNN.png``
    and ``<split>.txt`` of ``<relative path> <label>`` lines for train800, val200 and test, and
    train800val200 as train800 followed by val200. Images are uint8 H x W (grey) or H x W x 3.
    Returns the line count of every split file. Also used by ``benchmarks/gpu-evidence``."""
    lines: dict[str, list[str]] = {}
    for split in SPLITS:
        img_dir = folder / "images" / split
        img_dir.mkdir(parents=True)
        lines[split] = []
        for i, (img, label) in enumerate(splits[split]):
            rel = f"images/{split}/{i:06d}.png"
            Image.fromarray(img).save(folder / rel, format="PNG")
            lines[split].append(f"{rel} {label}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, text in lines.items():
        (folder / f"{split}.txt").write_text("".join(text), encoding="utf-8")
    return {s: len(v) for s, v in lines.items()}


def materialize_demo(cache_dir: str | Path | None = None) -> Path:
    """Build the demo data (once) and return its data root, ``<cache_dir>/<version>-<hash>/``.

    ``cache_dir`` defaults to ``<cache>/demo``. Built in a temporary sibling folder and renamed
    into place, so a crash never leaves a half-built root that a later call would trust.
    """
    suite = get_suite(DEMO_SUITE)
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "demo"
    final = base / f"{DEMO_DATA_VERSION}-{_demo_hash(suite)}"
    if (final / "MANIFEST.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=base))
    try:
        manifest: dict[str, Any] = {"suite": suite.name, "version": DEMO_DATA_VERSION, "seed": DEMO_SEED, "tasks": {}}
        for k, task in enumerate(suite.tasks):
            rng = np.random.default_rng([DEMO_SEED, k])
            manifest["tasks"][task.name] = _write_task(tmp / task.name, task, rng)
        (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "MANIFEST.json").is_file():  # not a concurrent build that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- demo backbone


def demo_backbone() -> tuple[str, dict[str, int]]:
    """The demo's micro-ViT: timm arch name and the kwargs that shrink it to 32x32 inputs (208k params)."""
    return DEMO_ARCH, dict(DEMO_BACKBONE_KWARGS)


def demo_weights() -> Path:
    """Path of the demo micro-ViT's pretrained backbone weights (``.safetensors``, no head), shipped
    in the package; checked against :data:`DEMO_WEIGHTS_SHA256` so a damaged install is one line,
    not different numbers."""
    path = Path(__file__).with_name(DEMO_WEIGHTS_FILE)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise PetlbenchError(f"the demo weights {path} cannot be read ({exc.strerror or exc}). "
                             "Fix: reinstall petlbench (the file ships in the package).") from None
    if digest != DEMO_WEIGHTS_SHA256:
        raise PetlbenchError(f"the demo weights {path} have SHA-256 {digest[:12]}..., not the recorded "
                             f"{DEMO_WEIGHTS_SHA256[:12]}... . Fix: reinstall petlbench, or if you remade them with "
                             "scripts/make_demo_weights.py, record the new SHA-256 in petlbench/data/demo.py.")
    return path
