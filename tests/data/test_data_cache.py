"""The decode-once cache: hits, keys, atomic files, memory mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from petlbench.data.cache import cache_key, cache_root, load_images, load_split
from petlbench.data.readers import read_split
from petlbench.data.transforms import transform_spec


def test_second_load_hits_the_cache(vtab_root: Path, tmp_path: Path) -> None:
    index = read_split("vtab", "cifar", "test", vtab_root)
    spec = transform_spec("vtab_resize", 32)
    first = load_images(index, spec, cache_dir=tmp_path / "c", workers=2)
    assert not first.hit and first.path is not None and first.path.is_file()
    assert first.path.with_suffix(".json").is_file()
    assert tuple(first.images.shape) == (5, 32, 32, 3) and first.images.dtype == torch.uint8
    second = load_images(index, spec, cache_dir=tmp_path / "c")
    assert second.hit and second.path == first.path and second.key == first.key
    assert torch.equal(first.images, second.images) and torch.equal(second.labels, torch.tensor(index.labels))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([first.path.name, first.path.with_suffix(".json").name])
    in_memory = load_images(index, spec, persist=False, workers=1)
    assert in_memory.path is None and torch.equal(in_memory.images, first.images)


def test_key_changes_with_split_file_root_and_size(vtab_root: Path, tmp_path: Path) -> None:
    spec = transform_spec("vtab_resize", 32)
    index = read_split("vtab", "cifar", "test", vtab_root)
    key = cache_key(index, spec)
    assert cache_key(index, transform_spec("vtab_resize", 48)) != key
    split = vtab_root / "cifar100" / "test.txt"
    split.write_text(split.read_text().replace(" ", "  ", 1))  # same entries, different bytes
    assert cache_key(read_split("vtab", "cifar", "test", vtab_root), spec) != key
    moved = tmp_path / "moved"
    vtab_root.rename(moved)
    assert cache_key(read_split("vtab", "cifar", "test", moved), spec) != key


def test_damaged_cache_file_is_rebuilt(vtab_root: Path, tmp_path: Path) -> None:
    index = read_split("vtab", "dtd", "val200", vtab_root)
    spec = transform_spec("vtab_resize", 16)
    first = load_images(index, spec, cache_dir=tmp_path)
    assert first.path is not None
    np.save(first.path, np.zeros((1, 2, 2, 3), dtype=np.uint8))
    again = load_images(index, spec, cache_dir=tmp_path)
    assert not again.hit and tuple(again.images.shape) == (3, 16, 16, 3)


def test_load_split_uses_suite_protocol_and_default_cache(vtab_root: Path, session_cache: Path) -> None:
    cached = load_split("vtab", "dtd", "test", vtab_root, image_size=24)
    assert cache_root() == session_cache
    assert cached.path is not None and cached.path.parent == session_cache / "decoded"
    assert cached.spec.name == "vtab_resize" and tuple(cached.images.shape[1:]) == (24, 24, 3)
    assert cached.num_classes == 47 and len(cached) == 5
