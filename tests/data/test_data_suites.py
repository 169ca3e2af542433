"""Suite registry: built-in YAML facts, aliases, user/entry-point suites, validation errors."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from petlbench.data import suites as suites_mod
from petlbench.data.suites import get_suite, list_suites, load_suite_file, name_key
from petlbench.errors import PetlbenchError, did_you_mean

# methods.md §3.2: class counts and (unverified, commonly cited) test sizes.
VTAB = {
    "Natural": {"cifar": (100, 10000), "caltech101": (102, 6084), "dtd": (47, 1880), "oxford_flowers102": (102, 6149),
                "oxford_iiit_pet": (37, 3669), "svhn": (10, 26032), "sun397": (397, 21750)},
    "Specialized": {"patch_camelyon": (2, 32768), "eurosat": (10, 5400), "resisc45": (45, 6300),
                    "diabetic_retinopathy": (5, 42670)},
    "Structured": {"clevr_count": (8, 15000), "clevr_dist": (6, 15000), "dmlab": (6, 22735), "kitti": (4, 711),
                   "dsprites_loc": (16, 73728), "dsprites_ori": (16, 73728), "smallnorb_azi": (18, 12150),
                   "smallnorb_ele": (9, 12150)},
}
FGVC = {"CUB_200_2011": (200, 5394, 600, 5794), "NABirds": (555, 21536, 2393, 24633),
        "OxfordFlowers": (102, 1020, 1020, 6149), "StanfordDogs": (120, 10800, 1200, 8580),
        "StanfordCars": (196, 7329, 815, 8041)}


def test_builtin_suites_are_listed() -> None:
    assert {"vtab", "fgvc", "demo"} <= set(list_suites())


def test_vtab_matches_published_facts() -> None:
    s = get_suite("vtab")
    assert (s.layout, s.image_size, s.transform) == ("vtab1k", 224, "vtab_resize")
    assert list(s.groups) == ["Natural", "Specialized", "Structured"]
    assert len(s.tasks) == 19
    for group, tasks in VTAB.items():
        assert list(s.groups[group]) == list(tasks)
        for name, (classes, test) in tasks.items():
            t = s.resolve_task(name)
            assert (t.group, t.classes, t.id) == (group, classes, f"vtab/{name}")
            assert dict(t.sizes) == {"train800": 800, "val200": 200, "train800val200": 1000, "test": test}
    assert s.split_for("train") == "train800val200" and s.split_for("tune_val") == "val200"


def test_fgvc_matches_published_facts() -> None:
    s = get_suite("fgvc")
    assert (s.layout, s.image_size, s.transform, s.splits) == ("fgvc_json", 224, "fgvc_crop", ("train", "val", "test"))
    for name, (classes, train, val, test) in FGVC.items():
        t = s.resolve_task(name)
        assert t.classes == classes
        assert dict(t.sizes) == {"train": train, "val": val, "test": test}
    assert s.resolve_task("cub").image_roots[0] == "images"
    assert s.resolve_task("cars").image_roots[0] == "."


def test_demo_suite_shape() -> None:
    s = get_suite("demo")
    assert (s.layout, s.image_size, s.generator) == ("vtab1k", 32, "demo")
    assert list(s.groups) == ["Natural", "Specialized", "Structured"]


@pytest.mark.parametrize(
    ("suite", "alias", "name"),
    [
        ("vtab", "cifar100", "cifar"), ("vtab", "cifar_100", "cifar"), ("vtab", "CIFAR-100", "cifar"),
        ("vtab", "oxford_pet", "oxford_iiit_pet"), ("vtab", "pets", "oxford_iiit_pet"), ("vtab", "pet", "oxford_iiit_pet"),
        ("vtab", "flowers102", "oxford_flowers102"), ("vtab", "flowers", "oxford_flowers102"),
        ("vtab", "clevr_distance", "clevr_dist"), ("vtab", "smallnorb_azimuth", "smallnorb_azi"),
        ("vtab", "dsprites_xpos", "dsprites_loc"), ("vtab", "retinopathy", "diabetic_retinopathy"),
        ("vtab", "sun", "sun397"), ("vtab", "resisc", "resisc45"), ("vtab", "pcam", "patch_camelyon"),
        ("vtab", "vtab/cifar100", "cifar"), ("vtab1k", "dmlab", "dmlab"),
        ("fgvc", "cub", "CUB_200_2011"), ("fgvc", "cub200", "CUB_200_2011"), ("fgvc", "nabirds", "NABirds"),
        ("fgvc", "flowers", "OxfordFlowers"), ("fgvc", "dogs", "StanfordDogs"), ("fgvc", "stanford_dogs", "StanfordDogs"),
        ("fgvc", "cars", "StanfordCars"), ("fgvc", "stanford_cars", "StanfordCars"),
        ("demo", "rotation", "digits_rotation"),
    ],
)
def test_aliases_resolve(suite: str, alias: str, name: str) -> None:
    assert get_suite(suite).resolve_task(alias).name == name


@pytest.mark.parametrize("suite", ["vtab", "fgvc", "demo"])
def test_no_alias_maps_to_two_tasks(suite: str) -> None:
    s = get_suite(suite)
    owners: dict[str, str] = {}
    for t in s.tasks:
        for key in {name_key(n) for n in t.names}:
            assert owners.setdefault(key, t.name) == t.name, key


def test_unknown_task_uses_did_you_mean() -> None:
    s = get_suite("vtab")
    with pytest.raises(PetlbenchError) as err:
        s.resolve_task("cifra")
    choices = [n for t in s.tasks for n in t.names]
    assert str(err.value) == did_you_mean("cifra", choices, "task")
    assert "Did you mean 'cifar'" in str(err.value)


def test_unknown_suite_uses_did_you_mean() -> None:
    with pytest.raises(PetlbenchError, match=r"unknown suite 'vtb'\. Did you mean 'vtab'"):
        get_suite("vtb")


def test_wrong_suite_prefix_is_an_error() -> None:
    with pytest.raises(PetlbenchError, match="names suite 'fgvc'"):
        get_suite("vtab").resolve_task("fgvc/cub")


MINI = """\
name: {name}
layout: vtab1k
image_size: 64
transform: vtab_resize
groups:
  G:
    - name: a
      classes: 3
      aliases: [alpha]
"""


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_user_suite_from_extra_dir_env_var_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "a", "mini", MINI.format(name="mini"))
    assert get_suite("mini", extra_dirs=[tmp_path / "a"]).resolve_task("alpha").name == "a"
    _write(tmp_path / "b", "other", MINI.format(name="other"))
    monkeypatch.setenv("PETLBENCH_SUITE_PATH", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert {"mini", "other"} <= set(list_suites())
    assert get_suite(str(tmp_path / "b" / "other.yaml")).name == "other"


def test_missing_suite_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PetlbenchError, match="suite directory from extra dir does not exist"):
        get_suite("vtab", extra_dirs=[tmp_path / "nope"])


def test_entry_point_suites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "plugin_suites_pkg"
    _write(pkg, "plug", MINI.format(name="plug"))
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="plug", value="plugin_suites_pkg", group="petlbench.suites")
    monkeypatch.setattr(suites_mod, "_entry_points", lambda: [ep])
    assert get_suite("plug").resolve_task("a").classes == 3

    bad = importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz", group="petlbench.suites")
    monkeypatch.setattr(suites_mod, "_entry_points", lambda: [bad])
    assert "vtab" in list_suites()  # a broken plugin leaves the other suites working (issue 18) ...
    with pytest.raises(PetlbenchError, match="suite plugin 'broken' .*ModuleNotFoundError"):
        get_suite("plug")  # ... and is named when a suite is not found


def test_duplicate_suite_name_names_both_files(tmp_path: Path) -> None:
    path = _write(tmp_path, "vtab_copy", MINI.format(name="vtab"))
    with pytest.raises(PetlbenchError) as err:
        list_suites([tmp_path])
    assert str(path) in str(err.value) and "vtab.yaml" in str(err.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("name: bad\n", "", "field 'name' is missing"),
        ("classes: 3", "classes: abc", "field 'groups.G.a.classes' must be an integer >= 2"),
        ("classes: 3", "clases: 3", "field 'groups.G[0].clases' is not a known field"),
        ("layout: vtab1k", "layout: tfds", "field 'layout' is 'tfds'"),
        ("transform: vtab_resize", "transform: resize", "field 'transform' is 'resize'"),
        ("aliases: [alpha]", "aliases: [alpha]\n      sizes: {train: 5}", "field 'groups.G.a.sizes.train' is not a split"),
        ("aliases: [alpha]", "aliases: [alpha]\n    - name: b\n      classes: 2\n      aliases: [ALPHA]",
         "field 'groups.G.b.aliases' reuses the name 'alpha' of task 'a'"),
        ("image_size: 64", "image_size: [64", "invalid YAML"),
    ],
)
def test_validation_errors_name_file_and_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    text = MINI.format(name="bad")
    assert old in text
    path = _write(tmp_path, "bad", text.replace(old, new))
    with pytest.raises(PetlbenchError) as err:
        load_suite_file(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "Fix:" in message
    assert "\n" not in message


def test_public_names_resolve() -> None:
    import petlbench.data as pd

    assert sorted(pd.__all__) == sorted(pd._EXPORTS)
    for name in pd.__all__:
        assert getattr(pd, name) is not None


def test_suite_train_defaults_are_checked_as_training_settings_naming_the_file(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from petlbench.cli import main

    good = MINI.format(name="withdefaults") + "train_defaults:\n  epochs: 3\n  lr: 0.01\n"
    assert dict(load_suite_file(_write(tmp_path, "good", good)).train_defaults) == {"epochs": 3, "lr": 0.01}
    with pytest.raises(PetlbenchError, match="train_defaults.epochs' must be a number"):
        load_suite_file(_write(tmp_path, "nested", MINI.format(name="n") + "train_defaults:\n  epochs: [3]\n"))
    for text, expected in (("epoch: 3", "'epoch'"), ("epochs: zero", "'epochs' must be")):
        path = _write(tmp_path, "typo", MINI.format(name="typo") + f"train_defaults:\n  {text}\n")
        assert load_suite_file(path).train_defaults  # the loader does not know the settings ...
        result = CliRunner().invoke(main, ["run", "--suite", str(path), "--method", "linear", "--pretrained", "none",
                                           "--data-root", str(tmp_path), "--output", str(tmp_path / "r"), "--dry-run"])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output  # ... planning a run does, in one line
        assert f"suite file {path}: train_defaults" in lines[0] and expected in lines[0], lines[0]
