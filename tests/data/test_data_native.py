"""Splits stored at native resolution and resized on the device give today's inputs within a
stated tolerance: at most 2 of 255 levels on any pixel, under 0.1 level on average (PIL's
bicubic resize at decode time is the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from petlbench.data import cache as cache_mod
from petlbench.data.cache import load_images
from petlbench.data.loader import DeviceLoader
from petlbench.data.readers import read_split
from petlbench.data.transforms import transform_spec

from .conftest import save_image

MAX_LEVELS = 2.0  # per pixel, in uint8 levels
MEAN_LEVELS = 0.1


def write_task(root: Path, photos: list[np.ndarray], sizes: list[tuple[int, int]], n: int = 12) -> Path:
    """A VTAB task folder of real photo crops, image i resized (PIL, Lanczos) to sizes[i % len]."""
    task = root / "cifar100"
    lines = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = photos[i % len(photos)][40 + 7 * i: 240 + 7 * i, 60 + 5 * i: 260 + 5 * i]
        small = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.Resampling.LANCZOS))
        rel = f"images/train800val200/{i:06d}.jpg"
        save_image(task / rel, small)
        lines.append(f"{rel} {i % 10}\n")
    (task / "train800val200.txt").write_text("".join(lines))
    return root


def levels(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs() * 255.0  # normalisation "none": inputs are x / 255
    return float(d.max()), float(d.mean())


@pytest.mark.parametrize("size", [(20, 20), (24, 16), (32, 28)])
def test_native_split_matches_decode_time_resize(tmp_path: Path, photos, size: tuple[int, int],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_task(tmp_path / "vtab", photos, [size])
    index = read_split("vtab", "cifar", "train800val200", root)
    spec = transform_spec("vtab_resize", 32)
    native = load_images(index, spec, cache_dir=tmp_path / "cache")
    assert tuple(native.images.shape) == (12, *size, 3) and native.device_resize == 32
    assert native.path is not None and native.path.stat().st_size < 12 * 32 * 32 * 3  # smaller than today's file
    assert load_images(index, spec, cache_dir=tmp_path / "cache").hit
    monkeypatch.setattr(cache_mod, "native_size", lambda *_: None)  # today's decode-time resize
    resized = load_images(index, spec, persist=False)
    assert tuple(resized.images.shape) == (12, 32, 32, 3) and resized.device_resize is None
    kwargs = dict(train=True, batch_size=5, normalization="none", shuffle=True, seed=3)
    a = list(DeviceLoader.for_split(native, **kwargs))
    b = list(DeviceLoader.for_split(resized, **kwargs))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == xb.shape == (len(ya), 3, 32, 32) and torch.equal(ya, yb)
        worst, mean = levels(xa, xb)
        assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS, (worst, mean)


def test_device_resize_matches_pil_on_noise() -> None:
    """Worst case for a bicubic kernel (every pixel an edge): still within the tolerance of PIL."""
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (64, 64), (96, 96), (17, 40)]:
        raw = (rng.random((3, h, w, 3)) * 255).astype(np.uint8)
        loader = DeviceLoader(torch.from_numpy(raw), torch.zeros(3, dtype=torch.int64), batch_size=3,
                              normalization="none", resize=112)
        x, _ = next(iter(loader))
        pil = np.stack([np.asarray(Image.fromarray(r).resize((112, 112), Image.Resampling.BICUBIC)) for r in raw])
        worst, mean = levels(x.permute(0, 2, 3, 1), torch.from_numpy(pil).double() / 255.0)
        assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS, (h, w, worst, mean)


def test_mixed_sizes_are_stored_resized_once(tmp_path: Path, photos, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split whose images differ in size is cached at the model's size, and the next load finds
    that file without trying the native decode again."""
    root = write_task(tmp_path / "vtab", photos, [(20, 20), (20, 20), (24, 24)])
    index = read_split("vtab", "cifar", "train800val200", root)
    spec = transform_spec("vtab_resize", 32)
    first = load_images(index, spec, cache_dir=tmp_path / "cache")
    assert tuple(first.images.shape) == (12, 32, 32, 3) and first.device_resize is None
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]  # no temporaries
    calls = []
    monkeypatch.setattr(cache_mod, "_write_npy", lambda *a: calls.append(a))
    again = load_images(index, spec, cache_dir=tmp_path / "cache")
    assert again.hit and not calls and torch.equal(again.images, first.images)


def test_fgvc_and_large_images_keep_the_decode_time_resize(tmp_path: Path, photos) -> None:
    root = write_task(tmp_path / "vtab", photos, [(40, 40)])  # larger than the 32x32 input
    index = read_split("vtab", "cifar", "train800val200", root)
    assert cache_mod.native_size(index, transform_spec("vtab_resize", 32)) is None
    assert cache_mod.native_size(index, transform_spec("vtab_resize", 64)) == (40, 40)
    assert cache_mod.native_size(index, transform_spec("fgvc_crop", 64)) is None


@pytest.mark.parametrize("fgvc", [False, True])
def test_resident_split_is_resized_once_not_every_epoch(monkeypatch: pytest.MonkeyPatch, fgvc: bool) -> None:
    """A resident native-resolution split is resized at its first epoch and kept: later epochs (the
    test split at every eval) resize nothing, and give the batches of a per-batch resize."""
    from petlbench.data import loader as loader_mod

    raw = torch.from_numpy((np.random.default_rng(1).random((7, 20, 24, 3)) * 255).astype(np.uint8))
    kwargs = dict(batch_size=3, normalization="imagenet", resize=32, shuffle=True, seed=3)
    if fgvc:
        kwargs.update(crop=28, random_crop=True, flip=True)
    calls = []
    resized = DeviceLoader._resized
    monkeypatch.setattr(DeviceLoader, "_resized", lambda self, b: calls.append(len(b)) or resized(self, b))
    once = DeviceLoader(raw, torch.arange(7), **kwargs)
    epochs = [list(once) for _ in range(3)]
    assert calls == [3, 3, 1]  # the split in batch-sized chunks, at the first epoch only
    monkeypatch.setattr(loader_mod, "_RESIDENT_MAX_BYTES", 0)  # resized split does not fit: per batch
    per_batch = DeviceLoader(raw, torch.arange(7), **kwargs)
    for epoch in epochs:
        for (xa, ya), (xb, yb) in zip(epoch, per_batch, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(calls) == 3 + 3 * 3
