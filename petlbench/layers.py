"""Small reusable pieces for method plugins: exact folding of linear maps into timm layers, and
the activations several official codebases share.

All folds compute in float64 and cast back, so merged and unmerged models agree to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from petlbench.errors import PetlbenchError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``, used by NOAH's and Convpass's adapters."""
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    """:func:`quick_gelu` as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


@torch.no_grad()
def init_vit_linear(layer: nn.Linear) -> None:
    """What timm's ``_init_vit_weights`` draws for an ``nn.Linear`` when a model's constructor ends
    with ``init_weights('')`` (``self.apply(_init_vit_weights)``, no module names), as NOAH's and
    SPT's ViTs do *after* building their LoRA/adapter modules: weight trunc-normal std 0.02 (bounds
    +-2 absolute, i.e. in effect N(0, 0.02)), bias zero. Whatever init a module wrote before is gone."""
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def ensure_bias(layer: nn.Module, what: str) -> nn.Parameter:
    """``layer``'s bias, for a shift to fold into. An ``nn.Linear`` built without one first gets a
    zero bias (the same function): a plain model with a bias there is the timm model built with
    that layer's bias argument (``qkv_bias``/``proj_bias``, :meth:`Backbone.bias_argument`);
    :func:`petlbench.merge` completes and records that change. Other layers without a bias
    (a bias-less patch embedding, a LayerNorm without affine) cannot take one: one clear line."""
    bias = getattr(layer, "bias", None)
    if isinstance(bias, nn.Parameter):
        return bias
    if isinstance(layer, nn.Linear):
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype,
                                              device=layer.weight.device))
        return layer.bias
    raise PetlbenchError(
        f"cannot merge into {what}: the layer has no bias, so the method's shift has nowhere to go in a plain "
        "model of this architecture. Fix: deploy unmerged, or use a backbone with a bias there."
    )


@torch.no_grad()
def fold_input(linear: nn.Linear, matrix: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """Make ``linear(x)`` compute ``linear(x @ matrix.T + shift)``.

    ``matrix`` is (in, in) in PyTorch orientation (``y = x @ matrix.T``); None means identity.
    W' = W @ matrix, b' = b + W @ shift.
    """
    w = linear.weight.double()
    if shift is not None:
        bias = ensure_bias(linear, "a linear layer")
        bias.copy_((bias.double() + w @ shift.double()).to(bias.dtype))
    if matrix is not None:
        linear.weight.copy_((w @ matrix.double()).to(linear.weight.dtype))


@torch.no_grad()
def fold_output(layer: nn.Module, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """Make ``layer(x)`` compute ``layer(x) * scale + shift`` along the output channel.

    Works for nn.Linear (rows of the weight), nn.Conv2d (output channels) and nn.LayerNorm
    (its elementwise affine). A layer without a bias needs one only for a shift (see
    :func:`ensure_bias`); a scale alone folds into the weight.
    """
    if isinstance(layer, nn.LayerNorm):
        if layer.weight is None:
            raise PetlbenchError("cannot merge into a LayerNorm without elementwise affine parameters.")
        weight = layer.weight
        shape = (-1,)
    elif isinstance(layer, (nn.Linear, nn.Conv2d)):
        weight = layer.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
    else:
        raise PetlbenchError(f"cannot fold a scale/shift into a {type(layer).__name__}.")
    bias = ensure_bias(layer, type(layer).__name__) if shift is not None else getattr(layer, "bias", None)
    if scale is not None:
        weight.copy_((weight.double() * scale.double().reshape(shape)).to(weight.dtype))
    if bias is None:
        return
    b = bias.double()
    if scale is not None:
        b = b * scale.double()
    if shift is not None:
        b = b + shift.double()
    bias.copy_(b.to(bias.dtype))


@torch.no_grad()
def add_to_weight_rows(linear: nn.Linear, start: int, delta: torch.Tensor) -> None:
    """Add ``delta`` (rows x in) to ``linear.weight[start:start + rows]`` (e.g. the q or v block of qkv)."""
    rows = delta.shape[0]
    block = linear.weight[start:start + rows]
    block.copy_((block.double() + delta.double()).to(block.dtype))
