"""SSF, Scaling & Shifting Features (Lian et al., NeurIPS 2022).

A per-channel ``x * gamma + beta`` after every operation, at the sites of the official code
(dongzelian/SSF ``models/vision_transformer.py`` and ``models/swin_transformer.py``): the patch
embedding, each block's norm1, qkv, proj, norm2, fc1 and fc2, and the final norm; on Swin also
after the patch-embedding convolution *before* its norm, and after the norm of every
patch-merging layer. gamma ~ N(1, 0.02), beta ~ N(0, 0.02) as in the paper's code. Each one folds
exactly into the layer it follows (a Linear's rows, a LayerNorm's affine, the patch-embedding
conv's output channels), so SSF merges.
ViT-B/16: 205,824 parameters (equal to the official code, 1.3e-6); Swin-B: 274,432 (official count).

Other ViT variants, by the same rule ("after every operation, the norms included"):

- pre-norm ViTs (CLIP): also after ``norm_pre``, the LayerNorm before block 0 (+2 x width).
- the last site follows the last LayerNorm before the head wherever it sits: the final norm, or
  ``fc_norm`` on MAE-style average-pooled ViTs (whose final norm is an Identity). The official
  code's site after ``self.norm`` would there scale the tokens before pooling and before
  ``fc_norm``, which no plain model can hold; after ``fc_norm`` it folds into its affine.
- layers without a bias: a bias-less patch embedding (CLIP) takes the shift in the position
  embedding of the patch positions (added right after it); a qkv/proj/fc built without a bias
  gets one when merged, and the merged model is the timm model built with ``qkv_bias=True``
  (``proj_bias=True``), recorded with the run. With neither a bias nor a position embedding after
  the patch embedding, SSF runs and is deployed unmerged.
- SigLIP's attention-pool head is not adapted (it is no SSF site; it stays frozen).
"""

from __future__ import annotations

import torch
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.layers import fold_output


class ScaleShift(nn.Module):
    def __init__(self, dim: int, std: float, channels_first: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=std)
        nn.init.normal_(self.shift, std=std)
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale.to(x.dtype), self.shift.to(x.dtype)
        if self.channels_first:  # a conv output (B, C, H, W)
            scale, shift = scale[:, None, None], shift[:, None, None]
        return x * scale + shift


def _sites(backbone: Backbone) -> list[tuple[str, nn.Module, nn.Module, int, bool]]:
    """(name, hooked module, layer the scale/shift folds into, channels, channels-first), in a fixed order."""
    bb = backbone
    width = bb.patch_proj.out_channels
    sites = []
    if bb.patch_norm is not None:  # Swin: before the patch-embedding norm too (the conv output)
        sites.append(("embed_proj", bb.patch_proj, bb.patch_proj, width, True))
    embed_target = bb.patch_norm if bb.patch_norm is not None else bb.patch_proj
    sites.append(("embed", bb.patch_embed, embed_target, width, False))
    if bb.norm_pre is not None:  # pre-norm ViT (CLIP): after the LayerNorm before block 0
        sites.append(("pre_norm", bb.norm_pre, bb.norm_pre, bb.norm_pre.normalized_shape[0], False))
    for b in bb.blocks:
        for role in ("norm1", "qkv", "proj", "norm2", "fc1", "fc2"):
            layer = getattr(b, role)
            channels = layer.out_features if isinstance(layer, nn.Linear) else b.dim
            sites.append((f"{b.index}_{role}", layer, layer, channels, False))
    for i, norm in enumerate(bb.downsample_norms):
        sites.append((f"merge{i}_norm", norm, norm, norm.normalized_shape[0], False))
    last = bb.last_norm  # the final norm, or fc_norm after an average pool (MAE)
    if last is not None:
        sites.append(("final_norm", last, last, last.normalized_shape[0], False))
    return sites


class SSF(Method):
    name = "ssf"
    display_name = "SSF"
    published = {"vtab": "SSF", "fgvc": "SSF"}
    summary = "SSF: learnable per-channel scale and shift after every operation."
    paper = "Lian et al., Scaling & Shifting Your Features, NeurIPS 2022"
    mergeable = True
    hparams = {"init_std": HParam(0.02, "std of the N(1, std) scale / N(0, std) shift init", low=0.0)}

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        ssf = nn.ModuleDict()
        for name, module, _, width, channels_first in _sites(backbone):
            ssf[name] = ScaleShift(width, self.hp.init_std, channels_first)
            backbone.transform_output(module, ssf[name])
        petl["ssf"] = ssf
        embed = next(target for name, _, target, _, _ in _sites(backbone) if name == "embed")
        if getattr(embed, "bias", None) is None and backbone.patch_position_embedding is None:
            self.mergeable = False
            self.unmerged_reason = ("the patch embedding has no bias and no position embedding follows it, so the "
                                    "shift after it has nowhere to go in a plain model")

    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        if not self.mergeable:
            super().merge(backbone, petl)
        for name, _, target, _, _ in _sites(backbone):
            scale, shift = petl["ssf"][name].scale, petl["ssf"][name].shift
            if name == "embed" and getattr(target, "bias", None) is None:  # bias-less patch embedding (CLIP)
                fold_output(target, scale, None)
                pos = backbone.patch_position_embedding
                pos.copy_((pos.double() + shift.double()).to(pos.dtype))
            else:
                fold_output(target, scale, shift)
