"""Data fingerprints: stable across roots and folder aliases, sensitive to bytes and labels."""

from __future__ import annotations

import shutil
from pathlib import Path

from petlbench.data.fingerprint import combine_fingerprints, fingerprint_split, fingerprint_task
from petlbench.data.readers import read_split


def test_same_data_two_roots_same_fingerprint(vtab_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere"
    shutil.copytree(vtab_root, copy)
    (copy / "cifar100").rename(copy / "cifar")  # alias folder name does not matter either
    a = fingerprint_task("vtab", "cifar", vtab_root)
    b = fingerprint_task("vtab", "cifar", copy)
    assert a == b and len(a) == 4 and all(len(v) == 64 for v in a.values())
    assert len(set(a.values())) == 4
    assert combine_fingerprints(a) == combine_fingerprints(dict(reversed(list(b.items()))))


def test_line_order_does_not_matter(vtab_root: Path) -> None:
    before = fingerprint_split(read_split("vtab", "cifar", "test", vtab_root))
    split = vtab_root / "cifar100" / "test.txt"
    split.write_text("".join(reversed(split.read_text().splitlines(keepends=True))))
    assert fingerprint_split(read_split("vtab", "cifar", "test", vtab_root)) == before


def test_one_byte_or_one_label_changes_it(vtab_root: Path) -> None:
    before = fingerprint_split(read_split("vtab", "cifar", "test", vtab_root))
    img = vtab_root / "cifar100" / "images" / "test" / "000003.jpg"
    data = bytearray(img.read_bytes())
    data[-3] ^= 1
    img.write_bytes(bytes(data))
    after_byte = fingerprint_split(read_split("vtab", "cifar", "test", vtab_root))
    assert after_byte != before
    split = vtab_root / "cifar100" / "test.txt"
    lines = split.read_text().splitlines(keepends=True)
    path, label = lines[0].split()
    lines[0] = f"{path} {(int(label) + 1) % 100}\n"
    split.write_text("".join(lines))
    assert fingerprint_split(read_split("vtab", "cifar", "test", vtab_root)) not in (before, after_byte)


def test_fgvc_fingerprint_stable_across_roots(fgvc_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(fgvc_root, copy)
    assert fingerprint_task("fgvc", "cub", fgvc_root) == fingerprint_task("fgvc", "cub", copy)


def test_cached_fingerprint_is_remembered_and_invalidated(tmp_path) -> None:
    """Computed once per unchanged split; replacing an image in place (new size/mtime) recomputes it."""
    import os

    from petlbench.data.fingerprint import cached_fingerprint, fingerprint_split
    from petlbench.data.readers import SplitIndex

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(bytes([i]) * 10)
    split = tmp_path / "split.txt"
    split.write_text("".join(f"{i}.png {i}\n" for i in range(3)))
    index = SplitIndex(suite="demo", task="digits", split="test", layout="vtab1k", num_classes=3, task_dir=tmp_path,
                       image_root=images, source=split, relpaths=tuple(f"{i}.png" for i in range(3)),
                       labels=(0, 1, 2), raw_labels=(0, 1, 2), lines=(1, 2, 3))
    memo = tmp_path / "memo"
    first = cached_fingerprint(index, memo)
    assert first == fingerprint_split(index) and len(list(memo.iterdir())) == 1
    assert cached_fingerprint(index, memo) == first
    (images / "1.png").write_bytes(b"changed!")
    os.utime(images / "1.png", ns=(1, 1))
    assert cached_fingerprint(index, memo) != first
