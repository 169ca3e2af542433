"""A run's identity includes the code of its method, and `petlbench run` says what it does.

A plugin re-run after a version bump is a new run (not "already done"); an edited plugin with
the same version is kept, with a hint. Plus the CLI papercuts of the run command: --task a,b,
--pretrained none on the demo, --backbone-arg checked against the suite's input size at plan
time, --dry-run with resolved hyperparameters and where they came from, first-use messages
and a Ctrl-C summary.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import petlbench
from petlbench import registry, sweep
from petlbench.cli import main
from petlbench.records import base_record, write_record

FAST = {"epochs": 1, "warmup_epochs": 0, "limit_train": 16, "limit_eval": 16}


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    """A cache of our own, so the first test sees a first use (the demo data is built once, ~5 s)."""
    cache = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("PETLBENCH_CACHE")
    os.environ["PETLBENCH_CACHE"] = cache
    yield cache
    if old is None:
        os.environ.pop("PETLBENCH_CACHE", None)
    else:
        os.environ["PETLBENCH_CACHE"] = old


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_first_use_says_what_it_builds_then_stays_quiet(tmp_path):
    args = ["run", "--suite", "demo", "--method", "linear", "--task", "digits", "--pretrained", "none",
            "--output", str(tmp_path), "--dry-run"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "demo: first use: writing the demo data (5 tasks" in first.stderr and "demo: data ready in" in first.stderr
    again = run(*args)
    assert again.exit_code == 0 and "first use" not in again.stderr


def test_demo_weights_ship_with_the_package(fresh_cache, tmp_path):
    """The demo backbone is not pretrained on first use (which took a quarter of a minute and gave
    other bytes with another thread count): the shipped file, the same SHA-256 on every machine."""
    from petlbench.data.demo import DEMO_WEIGHTS_SHA256

    result = run("run", "--suite", "demo", "--method", "linear", "--task", "digits", "--output", str(tmp_path),
                 "--dry-run")
    assert result.exit_code == 0, result.output
    assert "pretrain" not in result.stderr and f"(sha256 {DEMO_WEIGHTS_SHA256[:12]})" in result.stderr
    assert not (Path(fresh_cache) / "weights").exists()


def test_dry_run_lists_resolved_settings_with_their_source(tmp_path):
    result = run("run", "--suite", "demo", "--method", "lora,linear", "--task", "digits,faces", "--pretrained",
                 "none", "--set", "epochs=2", "--set", "rank=4", "--output", str(tmp_path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "4 runs (0 already done)" in result.stderr and "weights random init" in result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("todo  demo/") for line in lines) == 4  # --task digits,faces: both tasks
    lora = lines[lines.index(next(x for x in lines if "demo/digits/lora/seed0" in x)) + 1]
    assert "method: rank=4 [set], alpha=8.0" in lora
    assert "epochs=2 [set]" in lora and "lr=0.005 [suite]" in lora
    assert not list(tmp_path.rglob("*.json"))


def test_backbone_arg_is_checked_against_the_suite_at_plan_time(tmp_path):
    result = run("run", "--suite", "demo", "--method", "lora", "--pretrained", "none", "--backbone-arg",
                 "img_size=64", "--output", str(tmp_path / "res"))
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith("demo:")]
    assert len(lines) == 1 and "does not take the suite's 32x32 inputs" in lines[0]
    assert "Fix: pass --backbone-arg img_size=32" in lines[0]
    assert not (tmp_path / "res").exists()
    bad = run("run", "--suite", "demo", "--method", "lora", "--pretrained", "none", "--backbone-arg",
              "img_size=abc", "--output", str(tmp_path / "res"))
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "error: --backbone-arg: " in bad.output


def test_ctrl_c_says_what_finished_and_what_did_not(tmp_path, monkeypatch):
    def interrupted(plan_, todo, *args, **kwargs):
        record = base_record(todo[0], "ok")
        write_record(todo[0].record_path, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "execute", interrupted)
    result = run("run", "--suite", "demo", "--method", "linear", "--task", "digits,faces,textures", "--pretrained",
                 "none", "--output", str(tmp_path), "--quiet")
    assert result.exit_code == 130, result.output
    assert "of the 3 run(s) this sweep had to make, 1 finished and 2 did not" in result.stderr
    assert "finished  demo/digits/linear/seed0  ok" in result.stderr
    assert "not done  demo/faces/linear/seed0" in result.stderr and "not done  demo/textures/linear/seed0" in result.stderr


def test_builtin_methods_are_identified_by_the_petlbench_version():
    assert registry.method_code("lora") == {"distribution": "petlbench", "version": petlbench.__version__}
    prov = registry.method_provenance("lora")
    assert prov["display_name"] == "LoRA" and len(prov["source_sha256"]) == 64


PLUGIN = '''from petlbench import Method


class VBump(Method):
    name = "vbump"
    display_name = "VBump"
    summary = "head only"

    def trainable(self, backbone, petl):
        return backbone.head_parameters()
'''


def _install(site: Path, version: str) -> None:
    for old in site.glob("vbump_plugin-*.dist-info"):
        shutil.rmtree(old)
    dist = site / f"vbump_plugin-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vbump-plugin\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text("[petlbench.methods]\nvbump = vbump_plugin:VBump\n")
    registry._entry_points = None
    registry._registered.pop("vbump", None)
    registry._dist_of.pop("vbump", None)


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "vbump_plugin").mkdir(parents=True)
    (site / "vbump_plugin" / "__init__.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    yield site
    registry._entry_points = None
    registry._registered.pop("vbump", None)
    registry._dist_of.pop("vbump", None)
    sys.modules.pop("vbump_plugin", None)


def _finish(spec) -> None:
    """Write the record a finished run leaves (the method's code in its provenance), without training."""
    record = _ok_record(spec)
    record["provenance"]["method_code"] = registry.method_provenance(spec.method)
    write_record(spec.record_path, record)


def _ok_record(spec) -> dict:
    """An ok record with what `petlbench report` needs of one (else the sweep runs it again)."""
    record = base_record(spec, "ok")
    record["metrics"] = {"top1": 50.0}
    record["params"] = {"trainable": 10}
    return record


def test_plugin_rerun_after_a_version_bump_is_rerun(plugin_site, tmp_path):
    _install(plugin_site, "1.0")
    out = str(tmp_path / "res")
    first = sweep.plan("demo", ["vbump"], ["digits"], [0], pretrained="none", output=out, sets=FAST)
    (spec,) = first.specs
    assert spec.method_code == {"distribution": "vbump-plugin", "version": "1.0"}
    _finish(spec)
    assert sweep.pending(first) == [] and sweep.resume_notes(first) == []

    _install(plugin_site, "1.1")
    bumped = sweep.plan("demo", ["vbump"], ["digits"], [0], pretrained="none", output=out, sets=FAST)
    (new,) = bumped.specs
    assert new.method_code["version"] == "1.1" and new.run_id != spec.run_id
    assert sweep.pending(bumped) == [new]  # not "already done": the old record is another version's
    (note,) = sweep.resume_notes(bumped)
    assert "is now vbump-plugin 1.1; its finished runs made by vbump-plugin 1.0 are run again" in note
    assert spec.record_path.is_file()  # the old record stays (the report shows it as its own row)


def test_edited_plugin_with_the_same_version_is_kept_with_a_hint(plugin_site, tmp_path):
    _install(plugin_site, "2.0")
    plan = sweep.plan("demo", ["vbump"], ["digits"], [0], pretrained="none", output=str(tmp_path), sets=FAST)
    _finish(plan.specs[0])
    (plugin_site / "vbump_plugin" / "__init__.py").write_text(PLUGIN + "\n# tweaked\n")
    assert sweep.pending(plan) == []
    (note,) = sweep.resume_notes(plan)
    assert "source file changed since 1 finished run(s) were made" in note and "--force" in note
    assert sweep.resume_notes(plan, force=True) == []


def test_a_record_carries_identity_method_code_and_concurrency(tmp_path):
    from petlbench.runner import execute_spec

    (spec,) = sweep.plan("demo", ["linear"], ["faces"], [0], pretrained="none", output=str(tmp_path),
                         sets=FAST).specs
    record = execute_spec(spec)
    assert record["status"] == "ok", record["error"]
    code = {"distribution": "petlbench", "version": petlbench.__version__}
    assert record["identity"] == spec.identity() and record["identity"]["method_code"] == code
    assert record["config"]["method_code"] == code
    assert record["provenance"]["method_code"]["display_name"] == "Linear probing"
    assert record["efficiency"]["concurrency"]["parallel_runs"] == 1
    assert record["efficiency"]["concurrency"]["torch_threads"] >= 1
    assert record["efficiency"]["latency_ratio_spread"] >= 0


def test_dry_run_names_presets(tmp_path):
    from petlbench import HParam, Method, register_method, unregister_method

    class Presetted(Method):
        name = "presetted_probe"
        hparams = {"k": HParam(1, "a knob", low=1)}
        presets = {"demo": {"digits": {"k": 3}}}
        train_presets = {"demo": {"*": {"lr": 0.01}}}

        def trainable(self, backbone, petl):
            return backbone.head_parameters()

    register_method(Presetted)
    try:
        # A plugin's old `train_presets` is its paper recipe: applied under --protocol paper only.
        plan = sweep.plan("demo", ["presetted_probe"], ["digits", "faces"], [0], pretrained="none",
                          output=str(tmp_path), sets={"epochs": 2}, protocol="paper")
        digits, faces = (sweep.describe(plan, s) for s in plan.specs)
        assert digits.startswith("method: k=3 [preset]; train: epochs=2 [set], batch_size=32 [suite], lr=0.01 [recipe]")
        assert faces.startswith("method: k=1; train:")  # no preset for faces: the default, untagged
        assert any("declared as `train_presets`" in note for note in sweep.recipe_notes(plan))
        harmonised = sweep.plan("demo", ["presetted_probe"], ["digits"], [0], pretrained="none",
                                output=str(tmp_path), sets={"epochs": 2})
        (spec,) = harmonised.specs
        assert spec.train["lr"] == 0.005  # the suite's: one recipe for every method
        assert sweep.describe(harmonised, spec).startswith(
            "method: k=3 [preset]; train: epochs=2 [set], batch_size=32 [suite], lr=0.005 [suite]")
        code = registry.method_code("presetted_probe")  # registered from a test module: no distribution
        assert code["distribution"] is None and code["module"] == __name__ and len(code["source_sha256"]) == 64
    finally:
        unregister_method("presetted_probe")


def test_runs_finished_on_data_at_another_path_are_kept_with_a_note(tmp_path):
    """The data path is not part of a run's identity (moved data is not redone), so resuming into a
    folder whose runs read data elsewhere says so instead of silently calling them done."""
    plan = sweep.plan("demo", ["lora"], ["digits"], [0], pretrained="none", output=str(tmp_path), sets=FAST)
    (spec,) = plan.specs
    record = _ok_record(spec)
    record["provenance"]["method_code"] = registry.method_provenance("lora")
    record["provenance"]["data_root"] = spec.data_root
    write_record(spec.record_path, record)
    assert sweep.pending(plan) == [] and sweep.resume_notes(plan) == []  # same data path: nothing to say

    record["provenance"]["data_root"] = str(tmp_path / "other-vtab")
    write_record(spec.record_path, record)
    assert sweep.pending(plan) == []  # still done: a moved data folder must not redo weeks of runs
    (note,) = sweep.resume_notes(plan)
    assert "finished runs made on data at" in note and "other-vtab" in note and "--force" in note
    assert sweep.resume_notes(plan, force=True) == []
