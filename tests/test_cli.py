"""The command line: listing, parameter accounting, and one clear line for every user mistake."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from petlbench.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_list_methods() -> None:
    result = run("list", "methods")
    assert result.exit_code == 0
    for name in ("arc", "arc_att", "repadapter", "lora", "vpt_deep"):
        assert name in result.output
    rows = json.loads(run("list", "methods", "--json").output)
    assert {r["name"]: r["mergeable"] for r in rows}["adapter"] is False
    assert {r["name"]: r["display_name"] for r in rows}["repadapter"] == "RepAdapter"
    assert "(RepAdapter)" in result.output


def test_list_backbones() -> None:
    result = run("list", "backbones", "--filter", "*patch16_224")
    assert result.exit_code == 0
    names = result.output.split()
    assert "vit_base_patch16_224" in names and "deit_base_patch16_224" in names
    # distilled DeiT is a family of its own now (two tokens, two heads): listed, not refused
    assert "deit_base_distilled_patch16_224" in run("list", "backbones").output.split()


def test_params_json() -> None:
    result = run("params", "--method", "arc", "--backbone", "vit_base_patch16_224", "--num-classes", "100", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("trainable", "head", "trainable_without_head", "extra_after_merge", "backbone"):
        assert isinstance(data[key], int)
    assert data["trainable_without_head"] == 96_432 and data["trainable"] == 173_332
    assert data["backbone"] == 85_798_656 and data["extra_after_merge"] == 0


def test_params_table_with_presets() -> None:
    result = run("params", "-m", "repadapter", "--suite", "vtab", "--task", "svhn", "-c", "10")
    assert result.exit_code == 0, result.output
    assert "scale=10.0" in result.output and "239,808" in result.output


def test_params_uses_the_suites_real_class_counts() -> None:
    """`params --suite demo` once said "(100 classes)" on ViT-B/16: it counts on the demo's own
    micro-ViT, with each task's head (the report's Params column is their mean)."""
    result = run("params", "-m", "arc", "--suite", "demo")
    assert result.exit_code == 0, result.output
    assert "vit_tiny_patch16_224, suite demo: each task's own head (5 tasks)" in result.output
    assert "100 classes" not in result.output
    faces = next(line for line in result.output.splitlines() if line.split()[:1] == ["faces"])
    assert faces.split()[:4] == ["faces", "2", "7,442", "130"]  # 2 classes: 64 x 2 weights + 2 biases
    assert "mean over the 5 tasks: trainable (incl. head) 7,611" in result.output
    one = run("params", "-m", "arc", "--suite", "demo", "--task", "digits")
    assert one.exit_code == 0 and "(10 classes of task digits)" in one.output
    plain = run("params", "-m", "arc", "--backbone-arg", "depth=1")
    assert "(100 classes: the default of --num-classes)" in plain.output
    data = json.loads(run("params", "-m", "arc", "--suite", "demo", "--json").output)
    assert [t["num_classes"] for t in data["tasks"]] == [10, 2, 3, 4, 4] and data["arch"] == "vit_tiny_patch16_224"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["params", "-m", "arcc"], "Did you mean 'arc'"),
        (["params", "-m", "arc", "-b", "vit_bse_patch16_224"], "Did you mean 'vit_base_patch16_224'"),
        (["params", "-m", "lora", "--set", "rnk=4"], "Did you mean 'rank'"),
        (["params", "-m", "lora", "--set", "rank=0"], "'rank' must be >= 1, got 0"),
        (["params", "-m", "lora", "--set", "rank=eight"], "'rank' must be an int"),
        (["params", "-m", "repadapter", "--set", "scale=-1"], "'scale' must be > 0.0, got -1.0"),
        (["params", "-m", "repadapter", "--set", "variant=rep"], "must be one of repblock, repattn"),
        (["params", "-m", "lora", "--set", "rank"], "is not key=value"),
        (["params", "-m", "arc", "--pretrained", "/nonexistent/ViT-B_16.npz"], "does not exist"),
        (["params", "-m", "vpt_deep", "-b", "swin_base_patch4_window7_224"], "not defined on swin"),
        (["bench", "-m", "lora", "-b", "vit_bse_patch16_224"], "Did you mean 'vit_base_patch16_224'"),
        (["bench", "-m", "lora", "--backbone-arg", "depth=[1"], "not a valid YAML value"),
        (["bench", "-m", "lora", "--backbone-arg", "img_size=abc"], "--backbone-arg: "),
        (["params", "-m", "lora", "--backbone-arg", "img_size=abc"], "--backbone-arg: "),
        (["params", "-m", "lora", "--suite", "vtab", "--backbone-arg", "img_size=32"],
         "does not take the suite's 224x224 inputs"),
        (["bench", "-m", "lroa"], "Did you mean 'lora'"),
        (["run", "-s", "demo", "-m", "arc", "--pack", "0"], "--pack '0' is not a number of runs"),
        (["run", "-s", "demo", "-m", "arc", "--dry-run", "--set", "lr=abc"], "--set: training setting 'lr' must be"),
        # launcher options are checked before the plan, so --dry-run rejects them too
        (["run", "-s", "demo", "-m", "arc", "--dry-run", "--device", "gpu"], "unknown device 'gpu'"),
        (["run", "-s", "demo", "-m", "arc", "--dry-run", "--device", "cuda:x"], "is not cuda:<index>"),
        (["run", "-s", "demo", "-m", "arc", "--dry-run", "--launcher", "slurm", "--device", "cuda",
          "--slurm-gpus-per-task", "0"], "the jobs get no GPU"),
    ],
)
def test_user_errors_are_one_line(args: list[str], needle: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0]


def test_a_bad_setting_is_reported_before_the_demo_data_are_built(tmp_path, monkeypatch) -> None:
    """With an empty cache, `--set lr=abc` is one line and nothing is built first (it used to build
    the demo data, print that it did, and only then reject the setting)."""
    monkeypatch.setenv("PETLBENCH_CACHE", str(tmp_path / "cache"))
    result = run("run", "-s", "demo", "-m", "arc", "--dry-run", "--set", "lr=abc")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "training setting 'lr' must be" in lines[0], result.output
    assert not (tmp_path / "cache").exists()


def test_console_script_is_installed() -> None:
    import shutil
    import subprocess

    exe = shutil.which("petlbench")
    assert exe, "pip install must provide the `petlbench` console script"
    proc = subprocess.run([exe, "params", "-m", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown method 'nope'")
    assert "Traceback" not in proc.stderr


def test_params_says_when_the_count_depends_on_calibration() -> None:
    result = run("params", "-m", "spt_lora")
    assert result.exit_code == 0, result.output
    assert "before calibration" in result.output
    assert "before calibration" not in run("params", "-m", "lora").output
