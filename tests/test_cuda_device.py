"""On a real CUDA device (skipped without one; ``benchmarks/gpu-evidence`` runs these with
``pytest -m cuda``): a training step in the precision a GPU gets, and the merge, on the device."""

from __future__ import annotations

import pytest
import torch

from petlbench.engine import train_step
from petlbench.model import create_model, merge
from petlbench.precision import resolve_precision
from tests.conftest import TINY_VIT

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_a_training_step_changes_only_trainable_tensors_on_the_gpu() -> None:
    device = torch.device("cuda")
    arch, kwargs = TINY_VIT
    model = create_model(arch, "arc", 10, backbone_kwargs=kwargs).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in params]
    plan = resolve_precision("auto", device)
    x, y = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)
    loss = train_step(model, torch.optim.AdamW(params, lr=1e-2), params, x, y, device, plan)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_the_merged_model_computes_the_same_logits_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    # Full fp32 matmuls: TF32 (which a run's precision plan may switch on) rounds to ~1e-3.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    arch, kwargs = TINY_VIT
    model = create_model(arch, "arc", 10, backbone_kwargs=kwargs).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # not the zero-initialised identity
        x = torch.randn(4, 3, 32, 32, device=device)
        torch.testing.assert_close(merge(model).to(device).eval()(x), model(x), atol=2e-4, rtol=2e-4)
