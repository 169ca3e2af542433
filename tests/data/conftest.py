"""Fixtures for the data-layer tests: tiny VTAB-1k and FGVC folders made of real image crops.

The images are crops of scikit-image's photographs (astronaut, coffee, chelsea, rocket) and
sklearn digits, written as JPEG and PNG at test time, so decoding, resizing and hashing run on
real image statistics rather than noise. Every test gets its own ``tmp_path``; the petlbench
cache points at a per-session temporary folder so nothing is written under ``~/.cache``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SMALL_VTAB_SIZES = {"train800": 6, "val200": 3, "train800val200": 9, "test": 5}


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("petlbench-cache")


@pytest.fixture(autouse=True)
def _isolated_env(session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_CACHE", str(session_cache))
    monkeypatch.delenv("PETLBENCH_SUITE_PATH", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real RGB photographs from the scikit-image wheel."""
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


@pytest.fixture(scope="session")
def crops(photos: list[np.ndarray]) -> list[np.ndarray]:
    """60 deterministic crops of varied, non-square sizes (so every resize path is exercised)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(60):
        img = photos[i % len(photos)]
        h, w = int(rng.integers(28, 72)), int(rng.integers(28, 72))
        y, x = int(rng.integers(0, img.shape[0] - h)), int(rng.integers(0, img.shape[1] - w))
        out.append(np.ascontiguousarray(img[y:y + h, x:x + w]))
    return out


def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=90)
    else:
        img.save(path, format="PNG")


MakeVtab = Callable[..., Path]


@pytest.fixture
def make_vtab(crops: list[np.ndarray]) -> MakeVtab:
    """Write a NOAH-layout task folder ``root/folder`` and return the data root."""

    def make(
        root: Path, folder: str = "cifar100", classes: int = 100, sizes: dict[str, int] | None = None,
        ext: str = ".jpg", offset: int = 0,
    ) -> Path:
        sizes = sizes or SMALL_VTAB_SIZES
        task_dir = root / folder
        k = offset
        for split, n in sizes.items():
            lines = []
            for i in range(n):
                rel = f"images/{split}/{i:06d}{ext}"
                save_image(task_dir / rel, crops[k % len(crops)])
                lines.append(f"{rel} {(k * 7) % classes}\n")
                k += 1
            (task_dir / f"{split}.txt").write_text("".join(lines))
        return root

    return make


@pytest.fixture
def vtab_root(tmp_path: Path, make_vtab: MakeVtab) -> Path:
    """Two VTAB tasks: cifar under its alias folder ``cifar100`` (JPEG) and ``dtd`` (PNG)."""
    root = tmp_path / "vtab-1k"
    make_vtab(root, "cifar100", 100)
    make_vtab(root, "dtd", 47, ext=".png", offset=20)
    return root


def _write_json(path: Path, mapping: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mapping))


@pytest.fixture
def fgvc_root(tmp_path: Path, crops: list[np.ndarray]) -> Path:
    """CUB (images/ root, 1-based class folders), Stanford Cars (car_ims/ keys), NABirds, Dogs (Images/)."""
    root = tmp_path / "fgvc"
    k = 0

    def add(ds: str, image_root: str, keys_by_split: dict[str, list[tuple[str, int]]]) -> None:
        nonlocal k
        for split, items in keys_by_split.items():
            for key, _cid in items:
                target = root / ds / image_root / key
                if not target.exists():
                    save_image(target, crops[k % len(crops)])
                    k += 1
            _write_json(root / ds / f"{split}.json", dict(items))

    cub = {
        "train": [(f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg", c) for c in (1, 2, 5) for i in range(2)],
        "val": [(f"{c:03d}.Bird_{c}/Bird_{c}_v.jpg", c) for c in (5, 1)],
        "test": [(f"{c:03d}.Bird_{c}/Bird_{c}_t.jpg", c) for c in (2, 5, 1)],
    }
    add("CUB_200_2011", "images", cub)
    cars = {
        "train": [(f"car_ims/{i:06d}.jpg", 10 + i % 2) for i in range(1, 5)],
        "val": [("car_ims/000005.jpg", 11)],
        "test": [("car_ims/000006.jpg", 10), ("car_ims/000007.jpg", 11)],
    }
    add("StanfordCars", ".", cars)
    birds = {
        "train": [(f"{c:04d}/b{c}{i}.jpg", c) for c in (295, 296) for i in range(2)],
        "val": [("0295/bv.jpg", 295)],
        "test": [("0296/bt.jpg", 296)],
    }
    add("nabirds", "images", birds)
    dogs = {
        "train": [(f"n0208{c}-Dog/n0208{c}_{i}.jpg", c) for c in (1, 2) for i in range(2)],
        "val": [("n02081-Dog/n02081_v.jpg", 1)],
        "test": [("n02082-Dog/n02082_t.jpg", 2)],
    }
    add("StanfordDogs", "Images", dogs)
    return root


@pytest.fixture(scope="session")
def demo_root(session_cache: Path) -> Path:
    """The demo suite, materialised once per session."""
    from petlbench.data.demo import materialize_demo

    return materialize_demo(session_cache / "demo")
