"""The dispatcher-level memory counter: exact on known allocations, sees autograd's saved
tensors and frees of tensors that existed before it started."""

from __future__ import annotations

import torch

from petlbench.engine import train_step
from petlbench.memory import TensorMemory, storage_bytes, training_state
from petlbench.model import create_model
from tests.conftest import TINY_VIT


def test_counts_allocations_and_frees_exactly() -> None:
    held = [torch.zeros(1000)]  # 4,000 bytes alive before the measurement
    with TensorMemory(held) as mem:
        a = torch.zeros(2000)  # 8,000
        a.add_(1)  # in place: no new storage
        view = a.view(40, 50)  # a view: same storage
        assert mem.current == 12_000
        held.clear()  # the pre-existing tensor is freed inside the measurement
        b = torch.ones(500)  # 2,000
        assert (mem.current, mem.peak) == (10_000, 12_000)
        del a, view, b
        assert mem.current == 0
    assert storage_bytes([torch.zeros(10)[2:], torch.zeros(3)]) == 52


def test_sees_tensors_autograd_saves() -> None:
    x = torch.randn(64, 64)
    w1 = torch.randn(64, 64, requires_grad=True)

    def alive_after_forward(w2_trainable: bool) -> int:
        w2 = torch.randn(64, 64, requires_grad=w2_trainable)
        with TensorMemory([x, w1, w2]) as mem:
            out = (x @ w1) @ w2  # x @ w1 is saved for w2's gradient only if w2 trains
            alive = mem.current
            out.sum().backward()
        return alive

    assert alive_after_forward(True) - alive_after_forward(False) == 64 * 64 * 4


def test_peft_step_needs_less_than_full_fine_tuning() -> None:
    arch, kw = TINY_VIT
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    peaks = {}
    for method in ("full", "lora", "linear"):
        torch.manual_seed(0)
        model = create_model(arch, method, 10, backbone_kwargs=kw).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params)
        train_step(model, opt, params, x, y, torch.device("cpu"), "fp32")  # AdamW state exists from here on
        with TensorMemory(training_state(model, opt, x, y)) as mem:
            train_step(model, opt, params, x, y, torch.device("cpu"), "fp32")
        peaks[method] = mem.peak
        if method == "full":  # parameters, gradients and both AdamW moments, at least
            assert peaks[method] > 4 * storage_bytes(list(model.parameters()))
            assert len(training_state(model, opt)) >= 4 * len(params)  # + AdamW's step counters
    assert peaks["linear"] < peaks["lora"] < peaks["full"]
