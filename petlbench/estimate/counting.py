"""Counted work (exact, device-independent): every aten op of one training step and of one
evaluation batch with its FLOPs and the bytes its kernel moves, recorded on the ``meta`` device
(no compute, so ViT-B/16 is counted in seconds on any machine), attention counted as the fused
kernels a GPU runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
               "flash_attention_forward", "flash_attention_backward",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
               "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"}


@dataclass
class OpCounts:
    """Counted work of one call: per-op (name, FLOPs, bytes, optimiser phase) and totals."""

    ops: list[tuple[str, int, int, bool]] = field(default_factory=list)

    @property
    def n_ops(self) -> int:
        return len(self.ops)

    @property
    def flops(self) -> int:
        return sum(f for _, f, _, _ in self.ops)

    @property
    def bytes(self) -> int:
        return sum(b for _, _, b, _ in self.ops)

    def summary(self) -> dict[str, Any]:
        mm = [o for o in self.ops if o[0] in _MATMUL_OPS]
        return {"ops": self.n_ops, "kernels": sum(not o[0].endswith("(no data)") for o in self.ops),
                "flops": self.flops, "bytes": self.bytes, "matmul_ops": len(mm),
                "matmul_flops": sum(f for _, f, _, _ in mm)}


# Ops that move no data (views, reshapes of the same storage, allocations): host work, no kernel.
_NO_TRAFFIC = {"_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
               "new_empty_strided", "zeros_like", "_to_copy_meta"}


def _nbytes(*tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tree_leaves(tensors):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class _Recorder(TorchDispatchMode):
    """Records every aten op with its FLOPs (torch's formulas) and the bytes its kernel moves
    (every tensor operand read or written once; zero for views and allocations)."""

    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts
        self.optimizer_phase = False

    def record(self, name: str, flops: int, nbytes: int) -> None:
        self.counts.ops.append((name, flops, nbytes, self.optimizer_phase))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = packet.__name__
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        moves = not (func.is_view or name in _NO_TRAFFIC)
        self.record(name if moves else f"{name} (no data)", flops, _nbytes(args, kwargs, out) if moves else 0)
        return out


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention counted as the fused (flash) kernels a GPU runs, instead of
    the math path ``meta`` falls back to (which materialises every N x N score matrix)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rec: _Recorder) -> torch.Tensor:
        ctx.rec = rec
        ctx.save_for_backward(q, k, v)
        out = torch.empty_like(q)
        flops = 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        ctx.flops = flops
        rec.record("flash_attention_forward", flops, _nbytes(q, k, v, out))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # recomputes the scores and runs five matmuls where the forward ran two
        ctx.rec.record("flash_attention_backward", int(2.5 * ctx.flops), _nbytes(q, k, v, grad, grad, dq, dk, dv))
        return dq, dk, dv, None


class _FlashAttention(torch.overrides.TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` (plain calls, as timm's ViT makes) to :class:`_FusedAttention`."""

    def __init__(self, rec: _Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = not kwargs.get("attn_mask") and len(args) == 3 and not kwargs.get("dropout_p")
        if func is nn.functional.scaled_dot_product_attention and plain:
            return _FusedAttention.apply(*args, self.rec)
        return func(*args, **kwargs)


def _step_fn(model: nn.Module, batch: int, classes: int, size: int, device: torch.device, grad_clip: float
             ) -> tuple[Callable[[_Recorder | None], None], Callable[[], None]]:
    """(train step, eval forward): the engine's step order (zero_grad, forward, fp32 cross-entropy,
    backward, clip, AdamW) without autocast, which ``meta`` does not support (its casts are
    modelled separately). The step tells a recorder when the optimiser phase starts and ends."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    def step(rec: _Recorder | None = None) -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        if rec is not None:
            rec.optimizer_phase = True
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if rec is not None:
            rec.optimizer_phase = False

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        model(x).argmax(dim=-1)

    return step, forward


def count(model: nn.Module, batch: int, eval_batch: int, classes: int, size: int, grad_clip: float,
          eval_model: nn.Module | None = None) -> dict[str, OpCounts]:
    """Counted ops of one steady-state train step (AdamW state exists) and one eval batch, on
    ``meta``; the eval batch on ``eval_model`` when given (the merged model, as the engine evaluates)."""
    device = torch.device("meta")
    step, _ = _step_fn(model, batch, classes, size, device, grad_clip)
    step()  # creates the optimiser state
    train = OpCounts()
    with _Recorder(train) as rec, _FlashAttention(rec):
        step(rec)
    _, forward = _step_fn(eval_model if eval_model is not None else model, eval_batch, classes, size, device,
                          grad_clip)
    evals = OpCounts()
    with _Recorder(evals) as rec, _FlashAttention(rec):
        forward()
    return {"train_step": train, "eval_batch": evals}


def _linear_weights(model: nn.Module) -> tuple[int, int]:
    """(count, parameters) of the Linear weights autocast casts to bf16 in each forward."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return len(linears), sum(m.weight.numel() for m in linears)
