"""Convpass (Jie & Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", 2022).

A convolutional bypass in parallel with the attention and the MLP of every block, as the official
code does it (JieShibo/PETL-ViT ``convpass/vtab/convpass.py``, ``train.py``, ``configs/``):

    x' = x + attn(norm1 x) + s * C_a(norm1 x);   out = x' + mlp(norm2 x') + s * C_m(norm2 x')
    C(u) = up(dropout(act(conv3x3(act(down(u))))))

with ``act`` QuickGELU (u * sigmoid(1.702 u)), ``down``: dim -> 8 (xavier-uniform, zero bias),
``up``: 8 -> dim (zero weight and bias, so the model starts as the pre-trained one), a 3x3
convolution with padding 1 on the token grid, dropout 0.1. On ViT the class token (every prefix
token) is convolved as a 1x1 image with the same padded kernel, i.e. only the kernel's centre
tap and the bias reach it. The conv starts as the identity (zero kernel, centre tap = I) or
xavier-uniform (``xavier_init``); its bias is zero. ``positions=attn`` is Convpass-attn (the
attention bypass only). The paper's per-task scale s and conv init (``configs/convpass*/``) are
the VTAB presets.
ViT-B/16: 12 * 2 * (768*8 + 8 + 8*8*9 + 8 + 8*768 + 768) = 327,552 (0.33 M).

The paper recipe (``recipes``, used by ``--protocol paper``) is the official ``train.py``: AdamW lr
1e-3, wd 1e-4, batch 64 (drop_last), 100 epochs, timm's cosine stepped once per epoch (warm-up 10
epochs from 1e-6, floor 1e-5), backbone stochastic depth 0.1, ImageNet mean/std, PyTorch's default
head init. That script reports the best test accuracy over evaluations every 10 epochs, i.e. the
published row is test-selected (``--protocol paper-best-test`` reproduces that).

Swin (the official ``Convpass_swin``): no class token, the grid is the window-free H x W map.
The grid is always the one the backbone produced for the input at hand (the patch embedding's
H x W on ViT, the block's map on Swin), so non-square and dynamic input sizes convolve over
the real neighbours, never over a square guess.
Deliberate differences: on ViT the bypass is added inside the sub-layer's stochastic depth, so it
shares the sub-layer's drop-path mask (the official code draws a second, independent one); on
Swin the attention bypass is added after the stochastic depth (never dropped). Both match the
official forward exactly in eval mode. The official identity init hard-codes an 8x8 identity;
here it is the identity of the chosen ``dim``. Not mergeable (QuickGELU and the conv).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.backbone import CONVNEXT_NO_ATTENTION, TokenGrid
from petlbench.layers import quick_gelu

from ._recipes import PETL_VIT_DIFFERENCES, PETL_VIT_VTAB

# (scale, xavier_init) per VTAB task, from the official configs/convpass and configs/convpass_attn.
_CONVPASS = {
    "caltech101": (1.0, False), "cifar": (0.1, False), "clevr_count": (1.0, False), "clevr_dist": (0.1, True),
    "diabetic_retinopathy": (1.0, False), "dmlab": (10.0, False), "dsprites_loc": (100.0, True),
    "dsprites_ori": (0.1, True), "dtd": (0.01, True), "eurosat": (10.0, False), "kitti": (10.0, True),
    "oxford_flowers102": (0.1, True), "oxford_iiit_pet": (1.0, True), "patch_camelyon": (10.0, False),
    "resisc45": (10.0, False), "smallnorb_azi": (100.0, True), "smallnorb_ele": (1.0, True),
    "sun397": (0.1, False), "svhn": (100.0, True),
}
_CONVPASS_ATTN = {
    "caltech101": 100.0, "cifar": 0.1, "clevr_count": 10.0, "clevr_dist": 1.0, "diabetic_retinopathy": 0.1,
    "dmlab": 10.0, "dsprites_loc": 10.0, "dsprites_ori": 1.0, "dtd": 0.1, "eurosat": 10.0, "kitti": 10.0,
    "oxford_flowers102": 1.0, "oxford_iiit_pet": 1.0, "patch_camelyon": 10.0, "resisc45": 100.0,
    "smallnorb_azi": 100.0, "smallnorb_ele": 1.0, "sun397": 0.1, "svhn": 100.0,
}


class ConvBypass(nn.Module):
    def __init__(self, dim: int, hidden: int, scale: float, xavier_init: bool, dropout: float, prefix: int,
                 grid: TokenGrid) -> None:
        super().__init__()
        # The token grid of the current input, shared by all bypasses (held in a tuple so that it is
        # not registered as a child of each; it lives in ``petl`` and copies with the model).
        self.grids = (grid,)
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.up = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.prefix = prefix  # ViT class/register tokens; 0 on Swin
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if xavier_init:
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(hidden)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _mix(self, z: torch.Tensor) -> torch.Tensor:
        """3x3 conv over the token grid; z is (B, N, hidden) for ViT or (B, H, W, hidden) for Swin."""
        if z.dim() == 4:
            return self.conv(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        b, n, c = z.shape
        p = self.prefix
        h, w = self.grids[0].hw(n - p, "convpass")
        grid = self.conv(z[:, p:].reshape(b, h, w, c).permute(0, 3, 1, 2))
        grid = grid.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if p == 0:
            return grid
        # A prefix token alone on a zero-padded 1x1 map: only the centre tap and the bias reach it.
        prefix = F.linear(z[:, :p], self.conv.weight[:, :, 1, 1], self.conv.bias)
        return torch.cat([prefix, grid], dim=1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = self._mix(quick_gelu(self.down(u)))
        return self.up(self.dropout(quick_gelu(z))) * self.scale

    def on_grid(self, u: torch.Tensor) -> torch.Tensor:
        """Swin MLP input: (B, L, C) tokens of the block's H x W map (any aspect ratio)."""
        b, n, c = u.shape
        h, w = self.grids[0].hw(n, "convpass")
        return self(u.reshape(b, h, w, c)).reshape(b, n, c)

    def beside_attention(self, norm: nn.LayerNorm, h: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """Swin attention bypass on the residual stream ``h`` (B, H, W, C), in parallel with the windowed attention."""
        return branch + self(F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps))


class Convpass(Method):
    name = "convpass"
    families = frozenset({"vit", "swin"})
    family_refusals = {
        "deit_distilled": "Convpass reshapes the tokens after the class token into the patch grid, and this implementation "
                          "knows that prefix for the vit family only (distilled DeiT has a second token)",
        "eva": "Convpass reshapes the tokens after the class token into the patch grid, and this implementation knows "
               "that prefix for the vit family only",
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    display_name = "Convpass"
    summary = "Convpass: QuickGELU bottleneck with a 3x3 conv on the token grid, parallel to attention and MLP."
    paper = "Jie & Deng, Convolutional Bypasses Are Better Vision Transformer Adapters, arXiv 2207.07039"
    published = {"vtab": "Convpass"}
    bounded_by_width = frozenset({"dim"})
    hparams = {
        "dim": HParam(8, "bottleneck channels (the conv's width)", low=1),
        "scale": HParam(1.0, "scale s of the bypass output (the paper tunes it per task)", low=0.0,
                        low_exclusive=True),
        "xavier_init": HParam(False, "xavier-uniform conv kernel instead of the identity"),
        "dropout": HParam(0.1, "dropout before the up-projection (official: 0.1)", low=0.0, high=0.99),
        "positions": HParam("attn_mlp", "attn_mlp: Convpass; attn: Convpass-attn", choices=("attn_mlp", "attn")),
    }
    recipes = {"vtab": {"*": dict(PETL_VIT_VTAB)}}
    recipe_source = {
        "vtab": "JieShibo/PETL-ViT: convpass/vtab/train.py (AdamW(adapter + head tensors, lr 1e-3, wd 1e-4), timm "
                "CosineLRScheduler(t_initial=100, warmup_t=10, lr_min=1e-5, warmup_lr_init=1e-6) stepped "
                "scheduler.step(ep) after epoch ep, create_model(drop_path_rate=0.1), reset_classifier (PyTorch's "
                "default nn.Linear init), test evaluated when ep % 10 == 9 and the best kept), convpass/vtab/vtab.py "
                "(train800val200, batch 64, drop_last=True, Resize((224, 224)) bicubic, ImageNet mean/std), "
                "convpass/vtab/run.sh; per-task scale and conv init from configs/convpass*/ (hyperparameter "
                "presets); seed 42, one run.",
    }
    recipe_differences = {
        "vtab": PETL_VIT_DIFFERENCES,
        "fgvc": "no recipe: the Convpass repository has VTAB-1k (and few-shot) scripts only.",
    }

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: dict[str, Any]) -> dict[str, Any]:
        if suite != "vtab" or task is None:
            return {}
        if current.get("positions", "attn_mlp") == "attn":
            return {"scale": _CONVPASS_ATTN[task], "xavier_init": True} if task in _CONVPASS_ATTN else {}
        if task not in _CONVPASS:
            return {}
        scale, xavier = _CONVPASS[task]
        return {"scale": scale, "xavier_init": xavier}

    @classmethod
    def published_as(cls, suite: str, config: Mapping[str, Any]) -> str | None:
        """The quoted rows are Convpass (attention and MLP bypasses, dim 8), not Convpass-attn."""
        if config.get("positions") != "attn_mlp" or config.get("dim") != 8:
            return None
        return super().published_as(suite, config)

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        vit = backbone.family == "vit"
        prefix = backbone.num_prefix_tokens if vit else 0
        positions = ("attn", "mlp") if self.hp.positions == "attn_mlp" else ("attn",)
        # The patch grid: ViT, the patch embedding's (one for all blocks); Swin, each block's input map.
        grids = nn.ModuleList(TokenGrid() for _ in (range(1) if vit else backbone.blocks))
        petl["grid"] = grids
        if vit:
            backbone.track_grid(grids[0])
        elif "mlp" in positions:
            for blk, grid in zip(backbone.blocks, grids, strict=True):
                backbone.transform_input(blk.block, grid.observe)
        for pos in positions:
            bypasses = nn.ModuleList(
                ConvBypass(b.dim, self.hp.dim, self.hp.scale, self.hp.xavier_init, self.hp.dropout, prefix,
                           grids[0 if vit else b.index])
                for b in backbone.blocks
            )
            petl[pos] = bypasses
            for blk, bypass in zip(backbone.blocks, bypasses, strict=True):
                if vit:
                    backbone.add_parallel(blk.attn if pos == "attn" else blk.mlp, bypass)
                elif pos == "mlp":
                    backbone.add_parallel(blk.mlp, bypass.on_grid)
                else:
                    backbone.transform_branch(blk, "attn", functools.partial(bypass.beside_attention, blk.norm1))
