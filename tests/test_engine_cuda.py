"""The CUDA paths of a run, exercised on CPU with monkeypatched CUDA queries: every call on the
run's own device, training and evaluation memory peaks apart, and the precision each GPU gets."""

from __future__ import annotations

import contextlib

import pytest
import torch

from petlbench import engine
from petlbench.memory import PhasePeaks
from petlbench.model import create_model
from petlbench.precision import apply_matmul_precision, resolve_precision
from tests.conftest import TINY_VIT


class FakeCuda:
    """Records what the code asks of torch.cuda: the current device and the peak counters."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] = (9, 0),
                 available: bool = True) -> None:
        self.current = 0
        self.set_calls: list[int] = []
        self.peak = 0
        if available:  # (the optimiser's own CUDA checks must not see a fake GPU in a CPU training)
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", self._set)
        monkeypatch.setattr(torch.cuda, "device", self._device)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake H100")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: self.peak)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: self.peak + 7)

    def _set(self, index: int) -> None:
        self.set_calls.append(int(index))
        self.current = int(index)

    @contextlib.contextmanager
    def _device(self, index: int):
        before, self.current = self.current, int(index)
        try:
            yield
        finally:
            self.current = before

    def _reset(self, device=None) -> None:
        self.peak = 0

    def use(self, nbytes: int) -> None:
        self.peak = max(self.peak, nbytes)


def test_a_run_executes_on_its_own_device(monkeypatch, tmp_path) -> None:
    from petlbench import runner
    from petlbench.sweep import plan

    fake = FakeCuda(monkeypatch)
    fake.current = 0
    seen = {}

    def fake_run(spec, device, on_epoch, record, **kwargs) -> None:  # what the run's body sees
        seen["device"], seen["current"] = device, fake.current

    monkeypatch.setattr(runner, "_run", fake_run)
    spec = plan("demo", ["linear"], ["digits"], [0], output=str(tmp_path), sets={"epochs": 1}).specs[0]
    rec = runner.execute_spec(spec, device="cuda:1")
    assert rec["status"] == "ok", rec["error"]
    assert seen == {"device": torch.device("cuda", 1), "current": 1}
    assert fake.set_calls == [1]  # not switched back: selecting cuda:0 again would create its context
    fake.current = 2  # `cuda` alone names the current device explicitly
    assert runner._device("cuda") == torch.device("cuda", 2)
    with engine.on_device(torch.device("cuda", 3)):
        assert fake.current == 3
    with engine.on_device(torch.device("cuda")):  # no index: stays on the current one
        assert fake.current == 3
    with engine.on_device(torch.device("cpu")):
        assert fake.current == 3 and fake.set_calls == [1, 3, 3]


def test_training_and_evaluation_peaks_are_apart(monkeypatch) -> None:
    """The run uses 500 bytes while training and 900 while evaluating; each phase says its own."""
    fake = FakeCuda(monkeypatch, available=False)
    real_step, real_eval = engine.train_step, engine.evaluate

    def step(*args, **kwargs):
        fake.use(500)
        return real_step(*args, **kwargs)

    def evaluate(*args, **kwargs):
        fake.use(900)
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", step)
    monkeypatch.setattr(engine, "evaluate", evaluate)
    monkeypatch.setattr(engine, "on_device", lambda d: contextlib.nullcontext())
    arch, kw = TINY_VIT
    model = create_model(arch, "lora", 3, backbone_kwargs=kw)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    loader = engine.FeatureLoader(x, y, 4, True, 0, False)
    loader.random_crop = loader.flip = False
    cfg = {"precision": "fp32", "epochs": 2, "batch_size": 4, "compile": False, "lr": 1e-3, "weight_decay": 0.0,
           "warmup_epochs": 0, "warmup_lr": 0.0, "min_lr": 0.0, "label_smoothing": 0.0, "grad_clip": 0.0,
           "drop_last": False, "eval_batch_size": 4}
    peaks = PhasePeaks(torch.device("cuda", 0))
    engine.train(model, loader, {"test": engine.FeatureLoader(x, y, 4, False, 0, False)}, cfg, torch.device("cpu"),
                 eval_every=1, peaks=peaks)
    assert (peaks.get("train"), peaks.get("eval")) == (500, 900)
    assert peaks.get("train", "reserved") == 507
    assert PhasePeaks(torch.device("cpu")).get("train") is None


@pytest.mark.parametrize("capability, requested, autocast, scaler, tf32", [
    ((9, 0), "auto", "bf16", False, True),   # H100: native bf16
    ((8, 0), "fp32", None, False, True),     # A100 fp32: TF32 tensor cores
    ((7, 0), "auto", "fp16", True, False),   # V100: no native bf16 -> fp16 with loss scaling
    ((7, 5), "fp32", None, False, False),    # T4: no TF32
    ((7, 0), "bf16", "bf16", False, False),  # asked for explicitly: honoured, and the reason says emulated
])
def test_precision_follows_the_device(monkeypatch, capability, requested, autocast, scaler, tf32) -> None:
    FakeCuda(monkeypatch, capability)
    plan = resolve_precision(requested, torch.device("cuda", 0))
    assert (plan.autocast, plan.grad_scaler, plan.tf32) == (autocast, scaler, tf32)
    assert plan.requested == requested and plan.reason
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        apply_matmul_precision(plan, torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    cpu = resolve_precision("auto", torch.device("cpu"))
    assert cpu.autocast is None and not cpu.tf32 and cpu.name == "fp32"


def test_fp16_with_a_grad_scaler_trains() -> None:
    arch, kw = TINY_VIT
    model = create_model(arch, "lora", 3, backbone_kwargs=kw)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    plan = resolve_precision("fp16", torch.device("cpu"))
    assert plan.autocast == "fp16"
    loss = engine.train_step(model, opt, params, x, y, torch.device("cpu"), plan, grad_clip=1.0, scaler=scaler)
    assert torch.isfinite(loss) and scaler.get_scale() > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
