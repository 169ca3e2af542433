"""A complete third-party petlbench method in one file (IA3-style output scaling)."""

import torch
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.layers import fold_output


class Scale(nn.Module):
    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), init))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale.to(y.dtype)


class OutScale(Method):
    name = "outscale"
    display_name = "OutScale"
    summary = "Learnable per-channel scaling of every qkv and fc1 output."
    paper = "in the spirit of (IA)^3, Liu et al., NeurIPS 2022"
    mergeable = True
    hparams = {"init": HParam(1.0, "initial value of every scale", low=0.0, low_exclusive=True)}

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for blk in backbone.blocks:
            for role in ("qkv", "fc1"):
                layer = getattr(blk, role)
                petl[f"{role}{blk.index}"] = Scale(layer.out_features, self.hp.init)
                backbone.transform_output(layer, petl[f"{role}{blk.index}"])

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for blk in backbone.blocks:
            for role in ("qkv", "fc1"):
                fold_output(getattr(blk, role), petl[f"{role}{blk.index}"].scale, None)
