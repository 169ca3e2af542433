"""SCT, Salient Channel Tuning (Zhao et al., "SCT: A Simple Baseline for Parameter-Efficient
Fine-Tuning via Salient Channels", IJCV 2024).

As the official code does it (showlab/SCT ``models/vision_transformer_sct.py`` ChannelAdapter
and Block, ``train_model_sct.py`` getSalientChannels, ``run_model_sct.sh``; mode ``sct_attn``):
after each block's attention residual, the K most salient channels of the residual stream
``y = x + attn(norm1 x)`` get a learned K x K linear map, in place:

    y[..., S_l] <- y[..., S_l] + W_l y[..., S_l] + b_l          (S_l: K channel indices, ascending)

W_l is trunc-normal(std 0.02), b_l zero. K = 96 (``topN``, the VTAB preset; the default
``channels=0`` means width / 8, which is 96 on ViT-B). ViT-B/16: 12 * (96*96 + 96) =
111,744 parameters (0.11 M).

Saliency needs the task's training data (the calibration step, before the optimiser is built):
with the pre-trained model in eval mode and SCT switched off, for every block take ``y`` (the
input of norm2) on the patch tokens of every training image; per class c, the L2 norm over
(images of c, tokens) gives one value per channel; S_l are the K channels with the largest mean
of these over the classes. The indices are a buffer of ``petl`` (saved with the trainable state,
counted as no parameters). Until calibrated, S_l = the first K channels.

Presets: K = 96 on VTAB-1k. The paper recipe (``recipes``, ``--protocol paper``): the official
per-task learning rate, weight decay and label smoothing (``run_model_sct.sh``,
``configs/model_sct/vtab``), batch 64 (drop_last), 100 epochs, timm's cosine stepped once per epoch
(10 warm-up epochs), backbone stochastic depth 0.1, ImageNet mean/std, PyTorch's default head init. The configs' ``scale``/``scaleonx``
are not used by the shipped ChannelAdapter (its scaled forms are commented out), so neither here.
The calibration sees the run's training loader (VTAB: resized, not augmented, like the official
no-augmentation calibration loader).

Deliberate differences: the timm training augmentation the official configs switch on for some
tasks (``train_aug``) is not reproduced; ties in the saliency are broken by ``topk`` (the official threshold
``> sorted[dim-1-K]`` may select fewer than K channels on exact ties); ViT only here (the
official repository also has Swin and the ``sct_mlp``/``sct_qkv`` modes, not ported). The map
acts on the residual stream, so it cannot fold into a plain ViT's weights: not mergeable.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.backbone import CONVNEXT_NO_ATTENTION
from petlbench.errors import PetlbenchError

from ._recipes import PETL_VIT_DIFFERENCES, PETL_VIT_VTAB

# run_model_sct.sh (lr, weight decay) and configs/model_sct/vtab/*.yaml (label smoothing), by petlbench task name.
_TRAIN = {
    "cifar": (0.013, 1.0, 0.1), "caltech101": (0.006, 0.35, 0.1), "dtd": (0.0032, 0.04, 0.1),
    "oxford_flowers102": (0.05, 0.11, 0.1), "oxford_iiit_pet": (0.0007, 0.8, 0.1), "svhn": (0.075, 0.03, 0.1),
    "sun397": (0.0017, 0.01, 0.1), "patch_camelyon": (0.0072, 0.002, 0.1), "eurosat": (0.06, 0.001, 0.1),
    "resisc45": (0.01, 0.01, 0.1), "diabetic_retinopathy": (0.004, 0.0003, 0.1), "clevr_count": (0.0033, 0.01, 0.0),
    "clevr_dist": (0.0018, 0.005, 0.0), "dmlab": (0.009, 0.1, 0.0), "kitti": (0.0072, 0.0001, 0.1),
    "dsprites_loc": (0.003, 0.001, 0.0), "dsprites_ori": (0.01, 0.05, 0.0), "smallnorb_azi": (0.0062, 0.005, 0.0),
    "smallnorb_ele": (0.0011, 0.0005, 0.0),
}


class SalientChannels(nn.Module):
    def __init__(self, blocks: int, channels: int, prefix: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(blocks, channels, channels))
        for w in self.weight:
            nn.init.trunc_normal_(w, std=0.02)
        self.bias = nn.Parameter(torch.zeros(blocks, channels))
        self.register_buffer("index", torch.arange(channels).repeat(blocks, 1))
        self.register_buffer("calibrated", torch.tensor(False))
        self.prefix = prefix
        self.observe: dict[str, Any] | None = None  # set only while calibrating

    def branch(self, block: int, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``h + b`` is the residual stream after attention; return the new attention branch."""
        y = h + b
        if self.observe is not None:
            self._record(block, y)
            return b
        idx = self.index[block]
        delta = F.linear(y.index_select(-1, idx), self.weight[block].to(y.dtype), self.bias[block].to(y.dtype))
        return b.index_add(-1, idx, delta.to(b.dtype))

    def _record(self, block: int, y: torch.Tensor) -> None:
        obs = self.observe
        assert obs is not None
        energy = y[:, self.prefix:].double().pow(2).sum(dim=1)  # (batch, dim): squared L2 over the patch tokens
        obs["sumsq"][block].index_add_(0, obs["labels"], energy)


class SCT(Method):
    name = "sct"
    display_name = "SCT"
    summary = "SCT: a K x K linear on the K=96 most salient residual channels after each attention (calibrated)."
    paper = "Zhao et al., SCT: A Simple Baseline for Parameter-Efficient Fine-Tuning via Salient Channels, IJCV 2024"
    published = {"vtab": "SCT"}
    families = frozenset({"vit", "deit_distilled", "eva"})
    family_refusals = {
        "swin": "SCT selects one set of salient channels per block over the patch tokens after a class token; Swin "
                "has no class token and its stages differ in width",
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    needs_calibration = True
    bounded_by_width = frozenset({"channels"})
    hparams = {"channels": HParam(0, "K: salient channels tuned per block (topN); 0 = width/8, i.e. 96 on ViT-B",
                                  low=0)}
    presets = {"vtab": {"*": {"channels": 96}}}
    recipes = {
        "vtab": {
            "*": dict(PETL_VIT_VTAB),
            **{t: {"lr": lr, "weight_decay": wd, "label_smoothing": ls} for t, (lr, wd, ls) in _TRAIN.items()},
        }
    }
    recipe_source = {
        "vtab": "showlab/SCT: run_model_sct.sh (per-task --lr / --wd, --dpr 0.1, --topN 96, --eval True: train "
                "on train800val200, evaluate test), configs/model_sct/vtab/*.yaml (batch 64, 100 epochs, 10 warm-up "
                "epochs, per-task labelsmoothing and train_aug), train_model_sct.py (AdamW over the SCT + head "
                "tensors in one group, timm CosineLRScheduler(warmup_lr_init=1e-6, lr_min=1e-5) stepped "
                "scheduler.step(ep) after epoch ep, test evaluated when ep % 10 == 9 and the best kept, "
                "reset_classifier = a fresh nn.Linear), vtab.py (drop_last=True, Resize((224, 224)) bicubic, "
                "ImageNet mean/std); seed 42, one run.",
    }
    recipe_differences = {
        "vtab": "the timm augmentation (colour jitter 0.4 + RandAugment rand-m9-mstd0.5-inc1 on the resized "
                "image) that the configs switch on with train_aug for clevr_count, clevr_dist, "
                "diabetic_retinopathy, dmlab, dtd, eurosat, kitti, oxford_iiit_pet, patch_camelyon, resisc45 and "
                "svhn is not reproduced (petlbench has no RandAugment); " + PETL_VIT_DIFFERENCES,
        "fgvc": "no recipe: the SCT repository has VTAB-1k scripts only.",
    }

    @classmethod
    def published_as(cls, suite: str, config: Mapping[str, Any]) -> str | None:
        """The quoted row is topN = 96 on ViT-B/16 (0 = width/8 = 96 there)."""
        return super().published_as(suite, config) if config.get("channels") in (0, 96) else None

    def _channels(self, backbone: Backbone) -> int:
        return self.hp.channels or max(1, backbone.blocks[0].dim // 8)

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        tuner = SalientChannels(len(backbone.blocks), self._channels(backbone), backbone.num_prefix_tokens)
        petl["sct"] = tuner
        for blk in backbone.blocks:
            backbone.transform_branch(blk, "attn", functools.partial(tuner.branch, blk.index))

    @torch.no_grad()
    def calibrate(self, backbone: Backbone, petl: nn.ModuleDict, loader: Any, device: Any) -> None:
        """Pick each block's K most salient channels from the training images (see the module docstring)."""
        tuner: SalientChannels = petl["sct"]
        dim = backbone.blocks[0].dim
        classes = backbone.num_classes
        sumsq = torch.zeros(len(backbone.blocks), classes, dim, dtype=torch.float64, device=device)
        seen = torch.zeros(classes, dtype=torch.bool, device=device)
        model = backbone.model
        was_training = model.training
        model.eval()
        try:
            for images, labels in loader:
                labels = labels.to(device).long()
                tuner.observe = {"sumsq": sumsq, "labels": labels}
                model(images.to(device).float())
                seen[labels] = True
        finally:
            tuner.observe = None
            model.train(was_training)
        if not bool(seen.any()):
            raise PetlbenchError("method 'sct': the calibration loader yielded no training images. Fix: calibrate "
                                 "on the task's training split.")
        saliency = sumsq[:, seen].sqrt().mean(dim=1)  # (blocks, dim): mean over classes of the per-class L2 norm
        top = saliency.topk(tuner.index.shape[1], dim=1).indices.sort(dim=1).values
        tuner.index.copy_(top)
        tuner.calibrated.fill_(True)
