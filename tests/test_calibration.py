"""The calibration step of the plugin API (methods that choose what trains from task data).

Exercised through the example plugin examples/petlbench-gradshift (quoted in the README), installed
as a distribution exactly as pip would leave it.
"""

from __future__ import annotations

import sys

import pytest
import torch

import petlbench
from petlbench import PetlbenchError, registry
from petlbench.model import calibrate
from tests.conftest import TINY_VIT
from tests.test_plugins import ROOT, install_fake_dist

EXAMPLE = ROOT / "examples" / "petlbench-gradshift"


@pytest.fixture
def gradshift(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points", None)
    install_fake_dist(tmp_path, "petlbench_gradshift", EXAMPLE / "petlbench_gradshift",
                      "[petlbench.methods]\ngradshift = petlbench_gradshift:GradShift\n")
    yield "gradshift"
    registry._entry_points = None
    for mod in [m for m in sys.modules if m.startswith("petlbench_gradshift")]:
        del sys.modules[mod]
    registry.unregister_method("gradshift")


def loader(images: torch.Tensor, batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images, torch.tensor([0, 1, 2]))] * batches


def build(method: str, **hp) -> petlbench.PETLModel:
    arch, kw = TINY_VIT
    return petlbench.create_model(arch, method, 4, backbone_kwargs=kw, **hp)


def test_calibration_chooses_saves_and_counts_honestly(gradshift, images, tmp_path) -> None:
    torch.manual_seed(3)
    model = build(gradshift, k=3)
    assert model.method.needs_calibration and model.calibration is None
    assert petlbench.count_params(model).trainable_without_head == 0  # nothing chosen yet
    done = calibrate(model, loader(images), "cpu")
    assert done == model.calibration and done["batches"] == 2 and done["images"] == 6
    masks = [s.mask for s in model.petl["shifts"]]
    assert all(int(m.sum()) == 3 for m in masks)
    counts = petlbench.count_params(model)
    assert counts.trainable_without_head == 2 * 3  # the chosen entries, not the full tensors
    assert counts.trainable == counts.head + 6
    assert counts.trainable_bytes == sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) + 2 * 32
    # training changes only chosen entries
    with torch.no_grad():
        for s in model.petl["shifts"]:
            s.shift.add_(torch.randn_like(s.shift))
    path = petlbench.save_trainable(model, tmp_path / "task.safetensors")
    torch.manual_seed(3)
    fresh = build(gradshift, k=3)  # never calibrated: the saved masks rebuild it without data
    meta = petlbench.load_trainable(fresh, path)
    assert meta["calibration"] == {"images": 6, "batches": 2}
    assert fresh.calibration is not None
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(model.petl["shifts"], fresh.petl["shifts"], strict=True))
    assert petlbench.count_params(fresh).trainable_without_head == 6
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(images), fresh(images))
        assert torch.allclose(petlbench.merge(model).eval()(images), model(images), atol=1e-5)


def test_calibration_without_training_data_is_one_clear_line(gradshift) -> None:
    model = build(gradshift)
    for empty in ([], None):
        with pytest.raises(PetlbenchError, match="no training batches") as err:
            calibrate(model, empty)
        assert "\n" not in str(err.value) and "Fix:" in str(err.value)

    def nothing():
        yield from ()

    with pytest.raises(PetlbenchError, match="saw no training batch"):
        calibrate(model, nothing())


def test_methods_without_calibration_are_untouched(images) -> None:
    model = build("lora")
    assert calibrate(model, []) is None and model.calibration is None


def test_width_bound_is_checked_generically(gradshift) -> None:
    with pytest.raises(PetlbenchError, match="'k'=64 is larger than the width") as err:
        build(gradshift, k=64)
    assert "\n" not in str(err.value)


def test_spt_saves_its_plan_once(images) -> None:
    """SPT's per-layer indices are rebuilt from the plan: the state holds (and counts) the plan only."""
    torch.manual_seed(0)
    model = build("spt_lora", budget=0.003, sweep_step=0.003 / 40, drop_path=0.0)
    calibrate(model, loader(images), "cpu")
    buffers = model.calibration_buffers()
    assert buffers and all(k.startswith("petl.plan.") for k in buffers)
    assert any(len(d.w_index) for d in model.petl["linear"].values())  # sparse entries exist, not saved twice
    counts = petlbench.count_params(model)
    assert counts.trainable_bytes == (sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
                                      + sum(b.numel() * b.element_size() for b in buffers.values()))


# ------------------------------------------------------------------ the runner
def test_runner_calibrates_before_training_and_records_it(demo_cache, tmp_path) -> None:
    from petlbench.runner import execute_spec
    from petlbench.sweep import plan
    from tests.test_runner import FAST_SETS

    spec = plan("demo", ["spt_lora"], ["digits"], [0], output=str(tmp_path),
                sets={**FAST_SETS, "budget": 0.01, "sweep_step": 0.00025, "calib_images": 64}).specs[0]
    record = execute_spec(spec)
    assert record["status"] == "ok", record["error"]
    calib = record["config"]["calibration"]
    assert calib["images"] == 64 and calib["batches"] == 2  # batch 32, stops once calib_images are read
    assert record["config"]["train"]["head_init"] == "timm"
    assert 0 < record["params"]["trainable_without_head"] <= 2 * 10_000


def test_tune_protocol_calibrates_every_trial(demo_cache, tmp_path, monkeypatch) -> None:
    """Each trial is a fresh model: it is calibrated on the tuning split before its optimiser."""
    import petlbench.model as model_module
    from petlbench.runner import execute_spec
    from petlbench.sweep import plan
    from tests.test_runner import FAST_SETS

    seen: list[int] = []
    real = model_module.calibrate

    def spy(model, loader, device=None):
        seen.append(len(loader))
        return real(model, loader, device)

    monkeypatch.setattr(model_module, "calibrate", spy)
    spec = plan("demo", ["spt_lora"], ["digits"], [0], output=str(tmp_path), protocol="tune",
                sets={**FAST_SETS, "tune_lr": "1e-3", "tune_weight_decay": "0", "budget": 0.01, "sweep_step": 0.00025,
                      "calib_images": 32}).specs[0]
    record = execute_spec(spec)
    assert record["status"] == "ok", record["error"]
    assert len(seen) == 2  # one tuning trial, then the final model
    assert record["config"]["calibration"]["images"] == 32


def test_head_init_schemes() -> None:
    from petlbench.model import init_head

    head = torch.nn.Linear(8, 5)
    init_head(head, "zeros")
    assert not head.weight.any() and not head.bias.any()
    init_head(head, "vpt")
    assert torch.allclose(head.bias, torch.full((5,), -4.59511985013459))
    assert 0.2 < float(head.weight.detach().std()) * (5 ** 0.5) < 2.0  # kaiming-normal, fan-out = 5
    before = head.weight.clone()
    init_head(head, "timm")  # timm's own initialisation is kept: nothing redrawn
    assert torch.equal(head.weight, before)
    arc = petlbench.get_method("arc")
    from petlbench.config import resolve_train

    # The official heads are part of the methods' paper recipes; the harmonised protocols use one head for all.
    assert resolve_train({}, arc, "vtab", "cifar", {}, protocol="paper")["head_init"] == "zeros"
    assert resolve_train({}, petlbench.get_method("vpt_deep"), "fgvc", "NABirds", {},
                         protocol="paper")["head_init"] == "vpt"
    assert resolve_train({}, petlbench.get_method("lora"), "vtab", "cifar", {}, protocol="paper")["head_init"] == "timm"
    assert resolve_train({}, arc, "vtab", "cifar", {}, protocol="vtab1k")["head_init"] == "timm"
