"""Hostile data folders (issue 11): split paths that climb out of the task folder, special files
(FIFOs, devices) listed as images, and split files nested deeper than the JSON parser recurses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from petlbench.data.check import check_suite
from petlbench.data.problems import DataError
from petlbench.data.readers import read_split

from .test_data_check import LINE


def _append(path: Path, line: str) -> int:
    """Append a split line and return its (1-based) line number."""
    text = path.read_text()
    path.write_text(text + line + "\n")
    return len(text.splitlines()) + 1


@pytest.mark.parametrize("rel", ["../dtd/images/test/000000.png", "../../../../etc/passwd",
                                 "images/../../dtd/images/test/000001.png", "..\\dtd\\x.png"])
def test_split_path_climbing_out_is_rejected(vtab_root: Path, rel: str) -> None:
    split = vtab_root / "cifar100" / "train800.txt"
    line = _append(split, f"{rel} 3")
    report = check_suite("vtab", vtab_root, ["cifar"], decode=False)
    errors = [p for p in report.errors if "climbs out" in p.cause]
    assert len(errors) == 1 and errors[0].line == line and errors[0].path == str(split)
    assert LINE.match(errors[0].format()), errors[0].format()
    with pytest.raises(DataError, match=r"train800\.txt:\d+: image path .* climbs out of the task folder\. Fix:"):
        read_split("vtab", "cifar", "train800", vtab_root)


def test_climbing_out_is_refused_before_a_run_starts(vtab_root: Path) -> None:
    """The sweep planner checks the data before anything trains; the climbing line stops it."""
    from petlbench.sweep import plan

    _append(vtab_root / "cifar100" / "train800val200.txt", "../dtd/images/test/000000.png 1")
    with pytest.raises(DataError, match="climbs out of the task folder"):
        plan("vtab", ["linear"], ["cifar"], data_root=str(vtab_root), pretrained="none",
             backbone="vit_tiny_patch16_224")


def test_paths_inside_the_task_folder_and_symlinks_stay_allowed(vtab_root: Path, tmp_path: Path) -> None:
    task = vtab_root / "cifar100"
    outside = tmp_path / "elsewhere" / "img.jpg"
    outside.parent.mkdir()
    outside.write_bytes((task / "images" / "test" / "000000.jpg").read_bytes())
    (task / "images" / "linked.jpg").symlink_to(outside)  # data kept on another disk: the user's choice
    _append(task / "train800.txt", "images/linked.jpg 4")
    _append(task / "train800.txt", "images/../images/test/000001.jpg 5")
    report = check_suite("vtab", vtab_root, ["cifar"], splits=["train800"])
    assert report.ok, [p.format() for p in report.errors]
    assert len(read_split("vtab", "cifar", "train800", vtab_root)) == 8
    from petlbench.data.readers import climbs_out

    assert not climbs_out("a/../b.jpg") and climbs_out("a/../../b.jpg") and climbs_out("..")


def test_fgvc_key_climbing_out_is_rejected(fgvc_root: Path) -> None:
    import json

    split = fgvc_root / "CUB_200_2011" / "train.json"
    data = json.loads(split.read_text())
    data["../../StanfordCars/car_ims/000001.jpg"] = 1
    split.write_text(json.dumps(data))
    report = check_suite("fgvc", fgvc_root, ["cub"], decode=False)
    assert any("climbs out" in p.cause and p.path == str(split) for p in report.errors)
    with pytest.raises(DataError, match="climbs out"):
        read_split("fgvc", "cub", "train", fgvc_root)


_CHECK_SCRIPT = textwrap.dedent("""
    import resource, sys
    from petlbench.data.check import check_suite
    vm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmSize:")) * 1024
    cap = vm + (2 << 30)  # a /dev/zero read fails with MemoryError instead of eating the machine's RAM
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    report = check_suite("vtab", sys.argv[1], ["cifar"], splits=["train800"], workers=2)
    for p in report.errors:
        print(p.format())
""")


def _check_in_subprocess(root: Path) -> list[str]:
    """``data check`` in a child with a memory cap and a timeout, so a regression fails, not hangs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT, str(root)], capture_output=True, text=True,
                              timeout=90, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("data check hung on a special file")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/proc/self/status").exists(), reason="Linux only")
def test_special_files_are_one_problem_line_each(vtab_root: Path) -> None:
    images = vtab_root / "cifar100" / "images" / "train800"
    (images / "000000.jpg").unlink()
    (images / "000000.jpg").symlink_to("/dev/zero")
    (images / "000001.jpg").unlink()
    os.mkfifo(images / "000001.jpg")
    (images / "000002.jpg").unlink()
    (images / "000002.jpg").mkdir()
    lines = _check_in_subprocess(vtab_root)
    assert len(lines) == 3, lines
    assert "000000.jpg is not a regular file but a character device" in lines[0]
    assert "000001.jpg is not a regular file but a FIFO (named pipe)" in lines[1]
    assert "000002.jpg is not a regular file but a folder" in lines[2]
    assert all(LINE.match(line) for line in lines), lines
    with pytest.raises(DataError, match="000000.jpg is not a regular file but a character device"):
        read_split("vtab", "cifar", "train800", vtab_root)  # the run's reader says the same, before decoding


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_split_file_that_is_a_fifo_is_one_problem(vtab_root: Path) -> None:
    split = vtab_root / "cifar100" / "val200.txt"
    split.unlink()
    os.mkfifo(split)
    report = check_suite("vtab", vtab_root, ["cifar"], decode=False)
    (problem,) = [p for p in report.errors if p.path == str(split)]
    assert problem.cause == "split file is not a regular file but a FIFO (named pipe)"
    with pytest.raises(DataError, match="not a regular file"):
        read_split("vtab", "cifar", "val200", vtab_root)


def test_deeply_nested_fgvc_split_is_an_invalid_split(fgvc_root: Path) -> None:
    split = fgvc_root / "CUB_200_2011" / "val.json"
    split.write_text("[" * 200_000)
    report = check_suite("fgvc", fgvc_root, ["cub"], decode=False)
    errors = [p for p in report.errors if p.path == str(split)]
    assert len(errors) == 1 and "invalid JSON" in errors[0].cause
    with pytest.raises(DataError, match=r"val\.json: invalid JSON"):
        read_split("fgvc", "cub", "val", fgvc_root)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
@pytest.mark.parametrize("native", [False, True])
def test_decoding_a_fifo_fails_at_once(tmp_path: Path, native: bool) -> None:
    """The decode cache's readers (decode-time resize and native resolution) refuse a special file
    swapped in after the split was checked."""
    import threading

    from petlbench.data.cache import _decode_native
    from petlbench.data.transforms import decode_image, transform_spec

    fifo = tmp_path / "img.jpg"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def decode() -> None:
        try:
            if native:
                _decode_native(fifo, (16, 16))
            else:
                decode_image(fifo, transform_spec("vtab_resize", 32))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=decode, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # unblock the reader before failing
        pytest.fail("decoding a FIFO blocked")
    assert isinstance(outcome[0], OSError) and "not a regular file but a FIFO" in str(outcome[0])
