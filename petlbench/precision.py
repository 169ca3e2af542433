"""Which arithmetic a run really uses, decided once per run from the request and the device.

``precision`` is a request (``auto``, ``fp32``, ``bf16``, ``fp16``); what a run gets depends on
the device: bf16 autocast only where the GPU computes bf16 natively (compute capability 8.0+,
Ampere and later; older GPUs emulate it slowly), fp16 autocast with a gradient scaler on older
GPUs, and TF32 tensor-core matmuls for fp32 on Ampere+ (10 mantissa bits in the products, fp32
accumulation: the setting every PyTorch training recipe on those GPUs uses). The resolved plan
is recorded with every run, so a number always says which arithmetic produced it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The resolved arithmetic of a run (``autocast`` is None for plain fp32)."""

    requested: str
    autocast: str | None  # "bf16", "fp16" or None
    grad_scaler: bool  # fp16 needs loss scaling: its exponent range underflows small gradients
    tf32: bool  # fp32 matmuls/convolutions on TF32 tensor cores
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.autocast or "")

    @property
    def name(self) -> str:
        """What the arithmetic is, in one word (for latency timing and tables)."""
        return self.autocast or ("tf32" if self.tf32 else "fp32")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def context(self, device: torch.device) -> AbstractContextManager:
        """The autocast region a forward runs in."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device.type) if self.grad_scaler else None


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The plan for ``requested`` on ``device`` (see the module docstring for the rules)."""
    if device.type != "cuda":
        if requested == "auto":
            return Precision("auto", None, False, False, f"fp32 on {device.type}")
        scaler = False  # CPU fp16/bf16 autocast: gradients stay fp32-accumulated, no scaler needed
        return Precision(requested, None if requested == "fp32" else requested, scaler, False,
                         f"{requested} as requested on {device.type}")
    ampere = _capability(device) >= (8, 0)
    if requested == "auto":
        if ampere:
            return Precision("auto", "bf16", False, True, "bf16 autocast: native bf16 on compute capability 8.0+")
        return Precision("auto", "fp16", True, False,
                         "fp16 autocast with a gradient scaler: this GPU has no native bf16 (compute capability < 8.0)")
    if requested == "fp32":
        why = "fp32 with TF32 tensor-core matmuls (compute capability 8.0+)" if ampere else "fp32 (no TF32 before 8.0)"
        return Precision("fp32", None, False, ampere, why)
    if requested == "bf16":
        why = "bf16 autocast" + ("" if ampere else " (emulated: this GPU has no native bf16; expect it to be slow)")
        return Precision("bf16", "bf16", False, ampere, why)
    return Precision(requested, "fp16", True, ampere, "fp16 autocast with a gradient scaler")


def apply_matmul_precision(plan: Precision, device: torch.device) -> None:
    """Set the process-wide TF32 switches for ``plan`` (each run sets them, so runs sharing a
    process never inherit another run's setting)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = plan.tf32
    torch.backends.cudnn.allow_tf32 = plan.tf32
