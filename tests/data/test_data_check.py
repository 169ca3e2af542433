"""`data check`: the report, the collected problems, and the click command."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from petlbench.data.check import check_suite
from petlbench.data.cli import data
from petlbench.data.fingerprint import fingerprint_split
from petlbench.data.readers import read_split

LINE = re.compile(r"^(?P<path>/[^:]+)(:(?P<line>\d+))?: (?P<cause>.+?)\. Fix: .+\.$")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_good_data_passes_with_size_warnings(vtab_root: Path) -> None:
    before = _snapshot(vtab_root)
    report = check_suite("vtab", vtab_root, ["cifar100", "dtd"])
    assert report.ok and not report.errors
    assert [t.task for t in report.tasks] == ["cifar", "dtd"]
    cifar = report.tasks[0]
    assert cifar.folder == "cifar100" and cifar.extensions == {".jpg": 23}
    assert cifar.splits["train800"].found == 6 and cifar.splits["train800"].expected == 800
    assert len(report.warnings) >= 8  # every split differs from the published size
    table = report.format_table()
    assert "cifar100" in table and "6*" in table and "differs from the published" in table
    fps = report.fingerprints()
    assert fps["dtd"]["test"] == fingerprint_split(read_split("vtab", "dtd", "test", vtab_root))
    assert _snapshot(vtab_root) == before  # nothing written in the user's data
    assert report.to_dict()["ok"] is True


def test_all_problems_are_collected_with_lines(vtab_root: Path) -> None:
    task = vtab_root / "cifar100"
    (task / "images" / "test" / "000000.jpg").unlink()
    jpg = task / "images" / "test" / "000001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    (task / "images" / "test" / "000002.jpg").write_text("not an image")
    lines = (task / "test.txt").read_text().splitlines(keepends=True)
    lines[3] = "images/test/000003.jpg 250\n"
    (task / "test.txt").write_text("".join(lines))
    (task / "val200.txt").unlink()
    report = check_suite("vtab", vtab_root, ["cifar"])
    errors = [p.format() for p in report.errors]
    assert len(errors) == 5, errors
    assert all(LINE.match(e) for e in errors), errors
    joined = "\n".join(errors)
    assert f"{task / 'test.txt'}:1: image" in joined and "does not exist" in joined
    assert f"{task / 'test.txt'}:2: image" in joined and "truncated" in joined
    assert f"{task / 'test.txt'}:3: image" in joined and "not an image file" in joined
    assert f"{task / 'test.txt'}:4: label 250 is outside [0, 100)" in joined
    assert f"{task / 'val200.txt'}: split file is missing" in joined
    assert report.tasks[0].status == "5 errors"


def test_missing_task_is_reported_not_raised(vtab_root: Path) -> None:
    report = check_suite("vtab", vtab_root, ["cifar", "kitti"])
    assert [t.status for t in report.tasks][1] == "MISSING"
    assert len(report.errors) == 1 and "no folder for task 'vtab/kitti'" in report.errors[0].cause


def test_fgvc_check(fgvc_root: Path) -> None:
    report = check_suite("fgvc", fgvc_root, ["cub", "cars", "nabirds", "dogs"])
    assert report.ok, [p.format() for p in report.errors]
    assert any("only 3 of 200 classes" in p.cause for p in report.warnings)


def test_cli_ok_and_errors(vtab_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(data, ["check", "--suite", "vtab", "--data-root", str(vtab_root), "-t", "cifar", "-t", "dtd",
                              "--fingerprints", "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert "cifar100" in ok.output and "fingerprint vtab/dtd/test " in ok.output and "0 errors" in ok.output
    assert (tmp_path / "r.json").is_file()

    (vtab_root / "dtd" / "images" / "val200" / "000001.png").unlink()
    bad = runner.invoke(data, ["check", "--suite", "vtab", "--data-root", str(vtab_root), "--task", "dtd"])
    assert bad.exit_code == 1
    problem = [ln for ln in bad.output.splitlines() if "does not exist" in ln]
    assert problem == [f"{vtab_root / 'dtd' / 'val200.txt'}:2: image {vtab_root / 'dtd' / 'images' / 'val200' / '000001.png'} "
                       "does not exist. Fix: restore the file or remove its line; a partial download or extraction is the usual cause."]
    assert "1 error," in bad.output


def test_cli_user_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(data, ["check", "--suite", "vtb", "--data-root", str(tmp_path)])
    assert unknown.exit_code == 2 and "unknown suite 'vtb'. Did you mean 'vtab'" in unknown.output
    task = runner.invoke(data, ["check", "--suite", "vtab", "--data-root", str(tmp_path), "--task", "cifra"])
    assert task.exit_code == 2 and "unknown task 'cifra'" in task.output
    missing = runner.invoke(data, ["check", "--suite", "vtab", "--data-root", str(tmp_path / "nope"), "-t", "dtd"])
    assert missing.exit_code == 1 and f"{tmp_path / 'nope'}: data root does not exist. Fix:" in missing.output
    no_root = runner.invoke(data, ["check", "--suite", "fgvc"])
    assert no_root.exit_code == 2 and "needs its data on disk" in no_root.output


def test_cli_demo_suite_needs_no_data_root(demo_root: Path) -> None:
    result = CliRunner().invoke(data, ["check", "--suite", "demo", "--no-decode"])
    assert result.exit_code == 0, result.output
    assert str(demo_root) in result.output and "digits_rotation" in result.output


def test_cli_suites_listing() -> None:
    runner = CliRunner()
    listing = runner.invoke(data, ["suites"])
    assert listing.exit_code == 0 and "vtab" in listing.output and "fgvc" in listing.output
    one = runner.invoke(data, ["suites", "vtab"])
    assert one.exit_code == 0 and "oxford_iiit_pet" in one.output and "aliases: oxford_pet" in one.output
