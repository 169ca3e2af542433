"""SSF, Scaling & Shifting Features (Lian et al., NeurIPS 2022).

A per-channel ``x * gamma + beta`` after every operation: the patch embedding, each block's
norm1, qkv, proj, norm2, fc1 and fc2, and the final norm. gamma ~ N(1, 0.02), beta ~ N(0, 0.02)
as in the paper's code. Each one folds exactly into the layer it follows (a Linear's rows, a
LayerNorm's affine, the patch-embedding conv's output channels), so SSF merges.
ViT-B/16: 205,824 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.layers import fold_output


class ScaleShift(nn.Module):
    def __init__(self, dim: int, std: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=std)
        nn.init.normal_(self.shift, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # channels-last
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _sites(backbone: Backbone) -> list[tuple[str, nn.Module, nn.Module, int]]:
    """(name, hooked module, layer the scale/shift folds into, channels), in a fixed order."""
    bb = backbone
    embed_target = bb.patch_norm if bb.patch_norm is not None else bb.patch_proj
    sites = [("embed", bb.patch_embed, embed_target, bb.patch_proj.out_channels)]
    for b in bb.blocks:
        for role in ("norm1", "qkv", "proj", "norm2", "fc1", "fc2"):
            layer = getattr(b, role)
            width = layer.out_features if isinstance(layer, nn.Linear) else b.dim
            sites.append((f"{b.index}_{role}", layer, layer, width))
    if isinstance(bb.final_norm, nn.LayerNorm):
        sites.append(("final_norm", bb.final_norm, bb.final_norm, bb.final_norm.normalized_shape[0]))
    return sites


class SSF(Method):
    name = "ssf"
    display_name = "SSF"
    summary = "SSF: learnable per-channel scale and shift after every operation."
    paper = "Lian et al., Scaling & Shifting Your Features, NeurIPS 2022"
    mergeable = True
    hparams = {"init_std": HParam(0.02, "std of the N(1, std) scale / N(0, std) shift init", low=0.0)}

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        ssf = nn.ModuleDict()
        for name, module, _, width in _sites(backbone):
            ssf[name] = ScaleShift(width, self.hp.init_std)
            backbone.transform_output(module, ssf[name])
        petl["ssf"] = ssf

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for name, _, target, _ in _sites(backbone):
            fold_output(target, petl["ssf"][name].scale, petl["ssf"][name].shift)
