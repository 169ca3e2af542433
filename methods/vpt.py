"""Visual Prompt Tuning (Jia et al., ECCV 2022): learnable prompt tokens.

Shallow: ``num_tokens`` prompts are inserted after the class token before block 0.
Deep: every block gets its own prompts, replacing the previous block's prompt outputs.
Prompts are removed again before the final norm, so pooling sees the original tokens.
As KMnP/vpt ``PromptedVisionTransformer`` (forward, init and counts equal): init U(-v, v) with
v = sqrt(6 / (3 * patch^2 + dim)); dropout on the prompts *after* expanding them to the batch, so
each image gets its own dropout mask. Dropout defaults follow VPT: 0.0 for shallow (its config
default; "we don't use dropout for VPT-shallow", demo.ipynb), 0.1 for deep (its paper runs).

Presets: VPT tunes the prompt length per task. ``vpt_deep`` carries the published per-task
lengths for VTAB-1k and FGVC as re-used by Adapter+ (visinf/adapter_plus
``conf/experiment/{vtab,fgvc}/vpt.yaml``); VPT's own hyperparameter files are on a drive that
could not be reached, but its demo.ipynb ("the hyperparameters are the same from our paper")
agrees on the three tasks it shows (dmlab 100, sun397 5, eurosat 100). No per-task lengths for
``vpt_shallow`` were found, so it has no presets (default 50 tokens).
Not defined for Swin here (windowed attention has no global token sequence), and not mergeable:
prompts add tokens, hence compute, at inference.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.backbone import CONVNEXT_NO_ATTENTION, ROPE_NO_EXTRA_TOKENS

from ._recipes import (
    VPT_DIFFERENCES,
    VPT_FGVC_SOURCE,
    VPT_LR_GRID,
    VPT_PROMPT_FGVC_LR_GRID,
    VPT_SGD,
    VPT_VTAB,
    VPT_VTAB_SOURCE,
    head_bias,
)


class Prompts(nn.Module):
    def __init__(self, layers: int, num_tokens: int, dim: int, prefix: int, patch: int, dropout: float) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(layers, num_tokens, dim))
        bound = math.sqrt(6.0 / (3 * patch * patch + dim))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = dropout
        self.prefix = prefix
        self.num_tokens = num_tokens

    def _layer(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts[layer].to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return F.dropout(prompts, self.dropout, self.training)  # after expand: one mask per image, as VPT

    def insert(self, tokens: torch.Tensor) -> torch.Tensor:
        """[prefix | patches] -> [prefix | prompts | patches]."""
        p = self.prefix
        return torch.cat([tokens[:, :p], self._layer(0, tokens), tokens[:, p:]], dim=1)

    def replace(self, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        """Swap the previous block's prompt outputs for this block's prompts (VPT-deep)."""
        p, t = self.prefix, self.num_tokens
        return torch.cat([tokens[:, :p], self._layer(layer, tokens), tokens[:, p + t:]], dim=1)

    def strip(self, tokens: torch.Tensor) -> torch.Tensor:
        p, t = self.prefix, self.num_tokens
        return torch.cat([tokens[:, :p], tokens[:, p + t:]], dim=1)


#: VPT-deep prompt lengths per task (see the module docstring for the source).
DEEP_VTAB_TOKENS = {
    "cifar": 10, "caltech101": 10, "dtd": 10, "oxford_flowers102": 1, "oxford_iiit_pet": 1, "svhn": 50,
    "sun397": 5, "patch_camelyon": 100, "eurosat": 100, "resisc45": 10, "diabetic_retinopathy": 1,
    "clevr_count": 100, "clevr_dist": 200, "dmlab": 100, "kitti": 100, "dsprites_loc": 100, "dsprites_ori": 100,
    "smallnorb_azi": 200, "smallnorb_ele": 200,
}
DEEP_FGVC_TOKENS = {"CUB_200_2011": 10, "NABirds": 50, "OxfordFlowers": 5, "StanfordCars": 200, "StanfordDogs": 100}


class _VPT(Method):
    families = frozenset({"vit", "deit_distilled"})
    family_refusals = {
        "eva": ROPE_NO_EXTRA_TOKENS,
        "swin": "VPT inserts prompt tokens into one token sequence; Swin attends within windows of the patch grid",
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    deep = False
    # KMnP/vpt's prompt runs: SGD, lr/wd grid on the validation split (configs/base-prompt.yaml: batch 128,
    # 100 epochs, 10 warm-up epochs); the classifier is kaiming-normal fan-out with bias -log(99).
    recipes = {
        "vtab": {"*": dict(VPT_VTAB)},
        "fgvc": {"*": {**VPT_SGD, "batch_size": 128, "tune_lr": VPT_PROMPT_FGVC_LR_GRID}},
    }
    recipe_source = {
        "vtab": VPT_VTAB_SOURCE.format(what="MODEL.TRANSFER_TYPE prompt, configs/base-prompt.yaml", grid=VPT_LR_GRID),
        "fgvc": VPT_FGVC_SOURCE.format(what="MODEL.TRANSFER_TYPE prompt, configs/base-prompt.yaml (batch 128)",
                                       grid=VPT_PROMPT_FGVC_LR_GRID),
    }
    recipe_differences = {"vtab": VPT_DIFFERENCES, "fgvc": VPT_DIFFERENCES}

    hparams = {
        "num_tokens": HParam(50, "prompt tokens per layer (VPT tunes this per task)", low=1),
        "dropout": HParam(0.0, "dropout on the prompt tokens, one mask per image (VPT: 0.0 shallow, 0.1 deep)",
                          low=0.0, high=0.99),
    }

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> list[nn.Parameter]:
        """VPT's SGD decays every trainable tensor (prompts included) except the classifier's bias."""
        return head_bias(backbone)

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        prompts = Prompts(
            layers=len(backbone.blocks) if self.deep else 1,
            num_tokens=self.hp.num_tokens,
            dim=backbone.blocks[0].dim,
            prefix=backbone.num_prefix_tokens,
            patch=backbone.patch_size,
            dropout=self.hp.dropout,
        )
        petl["prompts"] = prompts
        backbone.transform_output(backbone.token_site, prompts.insert)
        if self.deep:
            for blk in backbone.blocks[1:]:
                backbone.transform_input(blk.block, functools.partial(prompts.replace, blk.index))
        backbone.transform_input(backbone.final_norm, prompts.strip)


class VPTShallow(_VPT):
    name = "vpt_shallow"
    display_name = "VPT-Shallow"
    summary = "VPT-Shallow: learnable prompt tokens at the input of the first block."
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"
    published = {"vtab": "VPT-Shallow", "fgvc": "VPT-Shallow"}


class VPTDeep(_VPT):
    name = "vpt_deep"
    display_name = "VPT-Deep"
    summary = "VPT-Deep: learnable prompt tokens at the input of every block (VPT's per-task lengths as presets)."
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"
    deep = True
    hparams = {**_VPT.hparams, "dropout": HParam(0.1, _VPT.hparams["dropout"].help, low=0.0, high=0.99)}
    presets = {
        "vtab": {task: {"num_tokens": n} for task, n in DEEP_VTAB_TOKENS.items()},
        "fgvc": {task: {"num_tokens": n} for task, n in DEEP_FGVC_TOKENS.items()},
    }
    # demo.ipynb's final VTAB runs ("the hyperparameters are the same from our paper") use batch 64 for dmlab
    # and eurosat (base lr 1.0 / wd 0.001 found for both) and 128 for sun397 (base lr 25, wd 0.0001).
    recipes = {
        "vtab": {**_VPT.recipes["vtab"], "dmlab": {"batch_size": 64}, "eurosat": {"batch_size": 64}},
        "fgvc": _VPT.recipes["fgvc"],
    }
    published = {"vtab": "VPT-Deep", "fgvc": "VPT-Deep"}
