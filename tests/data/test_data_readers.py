"""Readers for the NOAH VTAB-1k layout and the VPT FGVC JSON layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from petlbench.data.readers import find_task_dir, read_split
from petlbench.data.roots import resolve_data_root
from petlbench.data.suites import get_suite
from petlbench.errors import PetlbenchError


def test_vtab_split_index(vtab_root: Path) -> None:
    idx = read_split("vtab", "cifar", "train800", vtab_root)
    assert len(idx) == 6
    assert idx.task_dir == vtab_root / "cifar100"  # found under its alias
    assert idx.source == vtab_root / "cifar100" / "train800.txt"
    assert idx.relpaths[0] == "images/train800/000000.jpg"
    assert idx.labels == tuple((k * 7) % 100 for k in range(6))
    assert idx.lines == tuple(range(1, 7))
    assert all(p.is_file() for p in idx.paths)
    assert idx.extensions == {".jpg": 6}
    assert (idx.suite, idx.task, idx.split, idx.num_classes) == ("vtab", "cifar", "train800", 100)
    assert len(idx.take(2)) == 2 and idx.take(2).labels == idx.labels[:2]


@pytest.mark.parametrize("task", ["cifar", "cifar100", "CIFAR_100"])
def test_vtab_all_splits_and_names(vtab_root: Path, task: str) -> None:
    sizes = [len(read_split("vtab", task, s, vtab_root)) for s in get_suite("vtab").splits]
    assert sizes == [6, 3, 9, 5]


def test_task_folder_probe_ignores_case_and_prefers_canonical(vtab_root: Path, make_vtab) -> None:
    (vtab_root / "dtd").rename(vtab_root / "DTD")
    assert find_task_dir(vtab_root, get_suite("vtab").resolve_task("dtd")).name == "DTD"
    make_vtab(vtab_root, "cifar", 100, sizes={"train800": 2})
    assert find_task_dir(vtab_root, get_suite("vtab").resolve_task("cifar")).name == "cifar"


def test_unknown_split_name(vtab_root: Path) -> None:
    with pytest.raises(PetlbenchError, match="unknown split of suite 'vtab' 'train'"):
        read_split("vtab", "cifar", "train", vtab_root)


def test_fgvc_class_map_from_train_is_reused(fgvc_root: Path) -> None:
    train = read_split("fgvc", "cub", "train", fgvc_root)
    assert train.image_root == fgvc_root / "CUB_200_2011" / "images"
    assert train.class_ids == (1, 2, 5)
    assert train.labels == (0, 0, 1, 1, 2, 2)
    val = read_split("fgvc", "cub", "val", fgvc_root)
    assert val.class_ids == (1, 2, 5)
    assert val.raw_labels == (5, 1) and val.labels == (2, 0)  # not the per-split map (which would give 1, 0)
    test = read_split("fgvc", "cub", "test", fgvc_root)
    assert test.labels == (1, 2, 0)
    assert test.lines == (None, None, None)


def test_fgvc_image_roots_are_probed(fgvc_root: Path) -> None:
    cars = read_split("fgvc", "cars", "train", fgvc_root)
    assert cars.image_root == fgvc_root / "StanfordCars"
    assert cars.relpaths[0].startswith("car_ims/") and cars.labels == (1, 0, 1, 0)
    birds = read_split("fgvc", "NABirds", "test", fgvc_root)  # folder is lower-case 'nabirds'
    assert birds.image_root == fgvc_root / "nabirds" / "images"
    dogs = read_split("fgvc", "dogs", "val", fgvc_root)
    assert dogs.image_root == fgvc_root / "StanfordDogs" / "Images"


def test_fgvc_flat_dogs_layout_also_works(fgvc_root: Path) -> None:
    dogs = fgvc_root / "StanfordDogs"
    for child in (dogs / "Images").iterdir():
        shutil.move(str(child), dogs / child.name)
    assert read_split("fgvc", "dogs", "train", fgvc_root).image_root == dogs


def test_demo_root_is_built_when_no_data_root(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_CACHE", str(demo_root.parent.parent))
    assert resolve_data_root("demo", None) == demo_root
    with pytest.raises(PetlbenchError, match="needs its data on disk"):
        resolve_data_root("vtab", None)
