"""Every kind of bad input gives one DataError line with path (and line), cause and fix, before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from petlbench.data.cache import load_images
from petlbench.data.problems import DataError
from petlbench.data.readers import read_split
from petlbench.data.transforms import transform_spec


def _raises(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "Fix:" in message and "\n" not in message
    assert message.startswith(err.value.path)
    return err.value


def _edit_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text
    path.write_text("".join(lines))


def test_missing_data_root(tmp_path: Path) -> None:
    err = _raises(read_split, "vtab", "cifar", "test", tmp_path / "nowhere")
    assert "data root does not exist" in str(err) and "--data-root" in str(err)


def test_data_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "is a file" in str(_raises(read_split, "vtab", "cifar", "test", tmp_path / "file"))


def test_missing_task_folder_lists_what_is_there(vtab_root: Path) -> None:
    (vtab_root / "dtd").rename(vtab_root / "dtdd")
    err = _raises(read_split, "vtab", "dtd", "test", vtab_root)
    msg = str(err)
    assert err.path == str(vtab_root)
    assert "no folder for task 'vtab/dtd'" in msg and "found: cifar100, dtdd" in msg and "did you mean 'dtdd'" in msg


def test_missing_task_folder_one_level_down(tmp_path: Path, make_vtab) -> None:
    make_vtab(tmp_path / "data" / "vtab-1k", "dtd", 47)
    err = _raises(read_split, "vtab", "dtd", "test", tmp_path / "data")
    assert f"pass --data-root {tmp_path / 'data' / 'vtab-1k'}" in str(err)


def test_missing_split_file(vtab_root: Path) -> None:
    (vtab_root / "cifar100" / "val200.txt").unlink()
    err = _raises(read_split, "vtab", "cifar", "val200", vtab_root)
    assert err.path.endswith("val200.txt") and "split file is missing" in str(err)
    assert "found test.txt, train800.txt, train800val200.txt" in str(err)


def test_missing_image_names_the_line(vtab_root: Path) -> None:
    (vtab_root / "cifar100" / "images" / "test" / "000002.jpg").unlink()
    err = _raises(read_split, "vtab", "cifar", "test", vtab_root)
    assert err.line == 3 and str(err).startswith(f"{vtab_root / 'cifar100' / 'test.txt'}:3: image ")
    assert "does not exist" in str(err)


def test_truncated_image_fails_at_decode(vtab_root: Path, tmp_path: Path) -> None:
    img = vtab_root / "cifar100" / "images" / "test" / "000001.jpg"
    img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
    index = read_split("vtab", "cifar", "test", vtab_root)  # exists: the reader only stats
    err = _raises(load_images, index, transform_spec("vtab_resize", 32), cache_dir=tmp_path / "c")
    assert err.line == 2 and "truncated" in str(err)
    assert not list((tmp_path / "c").glob("*.npy")) and not list((tmp_path / "c").glob(".*tmp*"))


def test_non_image_file_fails_at_decode(vtab_root: Path) -> None:
    (vtab_root / "cifar100" / "images" / "test" / "000004.jpg").write_text("<html>not an image</html>")
    index = read_split("vtab", "cifar", "test", vtab_root)
    err = _raises(load_images, index, transform_spec("vtab_resize", 32), persist=False)
    assert err.line == 5 and "not an image file" in str(err)


@pytest.mark.parametrize(
    ("line", "cause"),
    [
        ("images/test/000000.jpg 100\n", "label 100 is outside [0, 100)"),
        ("images/test/000000.jpg -1\n", "label -1 is outside [0, 100)"),
        ("images/test/000000.jpg 3 extra\n", "malformed line"),
        ("images/test/000000.jpg\n", "malformed line"),
        ("images/test/000000.jpg 3.5\n", "label '3.5' is not an integer"),
        ("images/test/000000.jpg cat\n", "label 'cat' is not an integer"),
        ("/abs/000000.jpg 3\n", "is absolute"),
    ],
)
def test_bad_lines(vtab_root: Path, line: str, cause: str) -> None:
    split = vtab_root / "cifar100" / "test.txt"
    _edit_line(split, 4, line)
    err = _raises(read_split, "vtab", "cifar", "test", vtab_root)
    assert err.line == 4 and cause in str(err) and str(err).startswith(f"{split}:4: ")


def test_several_problems_are_counted(vtab_root: Path) -> None:
    split = vtab_root / "cifar100" / "test.txt"
    _edit_line(split, 2, "a.jpg x\n")
    _edit_line(split, 3, "b.jpg 1000\n")
    err = _raises(read_split, "vtab", "cifar", "test", vtab_root)
    assert err.line == 2 and "1 more problem in this split" in str(err)


def test_empty_split(vtab_root: Path) -> None:
    (vtab_root / "cifar100" / "val200.txt").write_text("\n\n")
    assert "split file is empty" in str(_raises(read_split, "vtab", "cifar", "val200", vtab_root))


def test_fgvc_keys_resolving_nowhere(fgvc_root: Path) -> None:
    cars = fgvc_root / "StanfordCars"
    (cars / "car_ims").rename(cars / "cars_train")
    err = _raises(read_split, "fgvc", "cars", "train", fgvc_root)
    msg = str(err)
    assert err.path == str(cars / "train.json")
    assert "image key 'car_ims/000001.jpg' resolves under none of the probed roots" in msg
    assert f"{cars}/" in msg and f"{cars / 'images'}/" in msg and "car_ims.tgz" in msg


def test_fgvc_id_unseen_in_train(fgvc_root: Path) -> None:
    path = fgvc_root / "CUB_200_2011" / "val.json"
    path.write_text(json.dumps({"001.Bird_1/Bird_1_v.jpg": 1, "009.Bird_9/x.jpg": 9}))
    msg = str(_raises(read_split, "fgvc", "cub", "val", fgvc_root))
    assert "class id 9 (1 image, first '009.Bird_9/x.jpg') does not appear in train.json" in msg


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"001.Bird_1/Bird_1_v.jpg": "one"}', "class id 'one' of key '001.Bird_1/Bird_1_v.jpg' is not an integer"),
        ("{}", "split file is empty"),
    ],
)
def test_fgvc_bad_json(fgvc_root: Path, content: str, cause: str) -> None:
    (fgvc_root / "CUB_200_2011" / "val.json").write_text(content)
    assert cause in str(_raises(read_split, "fgvc", "cub", "val", fgvc_root))


def test_fgvc_missing_image(fgvc_root: Path) -> None:
    (fgvc_root / "CUB_200_2011" / "images" / "002.Bird_2" / "Bird_2_t.jpg").unlink()
    msg = str(_raises(read_split, "fgvc", "cub", "test", fgvc_root))
    assert "Bird_2_t.jpg does not exist" in msg


def test_fgvc_more_classes_than_the_suite_says(fgvc_root: Path) -> None:
    path = fgvc_root / "StanfordDogs" / "train.json"
    mapping = json.loads(path.read_text())
    key = next(iter(mapping))
    path.write_text(json.dumps({f"{key}": 1, **{f"{key}?{i}": 100 + i for i in range(120)}}))
    assert "121 distinct class ids" in str(_raises(read_split, "fgvc", "dogs", "train", fgvc_root))


def test_data_root_pointing_at_a_task_folder(vtab_root: Path) -> None:
    err = _raises(read_split, "vtab", "dtd", "test", vtab_root / "dtd")
    assert f"pass its parent {vtab_root} as --data-root" in str(err)
