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
from petlbench.backbone import EVA_NO_QKV
from petlbench.layers import fold_output

from ._recipes import SSF_FGVC_INPUT, SSF_VTAB_INPUT, TIMM_TRAIN_LOOP


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


# dongzelian/SSF train_scripts/vit/vtab/<task>/train_ssf.sh: (lr, weight decay, drop path), by petlbench task name.
_SSF_VTAB = {
    "caltech101": (1e-3, 5e-2, 0.1), "cifar": (5e-3, 5e-5, 0.0), "clevr_count": (2e-3, 5e-2, 0.1),
    "clevr_dist": (5e-2, 5e-2, 0.1), "diabetic_retinopathy": (5e-3, 5e-5, 0.2), "dmlab": (5e-3, 5e-5, 0.1),
    "dsprites_loc": (1e-2, 5e-5, 0.0), "dsprites_ori": (5e-3, 5e-5, 0.2), "dtd": (5e-3, 5e-5, 0.0),
    "eurosat": (3e-3, 5e-2, 0.2), "oxford_flowers102": (5e-3, 5e-5, 0.0), "kitti": (1e-2, 5e-5, 0.0),
    "patch_camelyon": (5e-3, 5e-5, 0.0), "oxford_iiit_pet": (5e-3, 5e-5, 0.0), "resisc45": (2e-3, 5e-5, 0.1),
    "smallnorb_azi": (2e-2, 5e-5, 0.1), "smallnorb_ele": (5e-3, 5e-2, 0.2), "sun397": (5e-3, 5e-5, 0.0),
    "svhn": (1e-2, 5e-5, 0.0),
}
# train_scripts/vit/fgvc/<dataset>/train_ssf.sh: (lr, weight decay, drop path, --model-ema-decay, and the
# training split where it is not the official train split = VPT's train + val; see recipe_differences).
_SSF_FGVC = {
    "CUB_200_2011": (1e-2, 5e-2, 0.0, 0.9998, {}), "NABirds": (2e-4, 5e-2, 0.1, 0.9998, {}),
    "OxfordFlowers": (1e-2, 5e-2, 0.1, 0.999, {"train_split": "protocol"}),
    "StanfordCars": (2e-2, 5e-2, 0.0, 0.9998, {}), "StanfordDogs": (2.5e-4, 5e-2, 0.0, 0.9998, {}),
}
# train.py (timm's training script): AdamW with timm's parameter groups (every 1-D tensor and bias without
# decay), 2 GPUs x batch 32 (so 64 per step, 15 steps per VTAB epoch), 100 epochs + timm's 10 cool-down epochs,
# cosine stepped once per epoch from 1e-7 over 10 warm-up epochs to 1e-8, the model's own mean/std (0.5),
# evaluation after every epoch, best kept.
_SSF_COMMON = {
    **TIMM_TRAIN_LOOP, "decay_groups": "no_1d", "batch_size": 64, "normalization": "backbone",
    "selection": "best-test", "eval_every": 1,
}


class SSF(Method):
    name = "ssf"
    families = frozenset({"vit", "deit_distilled", "swin"})
    family_refusals = {
        "eva": EVA_NO_QKV,
        "convnext": "SSF's ConvNeXt sites (after each convolution, norm and linear, as in the SSF paper's "
                    "ConvNeXt code) are not implemented, and its transformer sites do not exist there",
    }
    display_name = "SSF"
    published = {"vtab": "SSF", "fgvc": "SSF"}
    summary = "SSF: learnable per-channel scale and shift after every operation."
    paper = "Lian et al., Scaling & Shifting Your Features, NeurIPS 2022"
    mergeable = True
    hparams = {"init_std": HParam(0.02, "std of the N(1, std) scale / N(0, std) shift init", low=0.0)}
    recipes = {
        "vtab": {"*": {**_SSF_COMMON, **SSF_VTAB_INPUT},
                 **{t: {"lr": lr, "weight_decay": wd, "drop_path_rate": dp} for t, (lr, wd, dp) in _SSF_VTAB.items()}},
        "fgvc": {"*": {**_SSF_COMMON, **SSF_FGVC_INPUT},
                 **{t: {"lr": lr, "weight_decay": wd, "drop_path_rate": dp, "ema_decay": ema, **split}
                    for t, (lr, wd, dp, ema, split) in _SSF_FGVC.items()}},
    }
    recipe_source = {
        "vtab": "dongzelian/SSF: train_scripts/vit/vtab/<task>/train_ssf.sh (2 GPUs x --batch-size 32, --epochs 100, "
                "--opt adamw, per-task --lr / --weight-decay / --drop-path, --warmup-lr 1e-7 --warmup-epochs 10 "
                "--min-lr 1e-8, --no-aug --direct-resize, --mixup 0 --cutmix 0 --smoothing 0, --amp), train.py "
                "(timm's: --cooldown-epochs 10 default, scheduler.step(epoch + 1) after each epoch, evaluation after "
                "every epoch, the best metric kept), optim_factory.py (1-D tensors and biases without decay: the SSF "
                "scales/shifts and the head bias), data/vtab.py (train800val200 -> test), model default config (mean "
                "/ std 0.5, bicubic Resize((224, 224))); one run.",
        "fgvc": "dongzelian/SSF: train_scripts/vit/fgvc/<dataset>/train_ssf.sh (2 GPUs x batch 32, per-dataset lr / "
                "wd / drop path / --model-ema-decay, --simple-aug; the timm defaults --mixup 0.8 --cutmix 1.0 "
                "--smoothing 0.1 --train-interpolation random --scale 0.08 1), data/transforms_factory.py "
                "(RandomResizedCrop(224) + flip; eval Resize(int(224 / 0.9) = 248, bicubic) + CenterCrop(224)), "
                "data/cub2011.py, nabirds.py, stanford_dogs.py (the official train split = VPT's train + val), "
                "train.py (the EMA model is the one evaluated, every epoch, best kept).",
    }
    recipe_differences = {
        "vtab": "AMP fp16 officially (petlbench's precision setting here); the 2-GPU data "
                "parallel split (2 x 32 with a per-GPU drop_last) is one batch of 64 here; the published number is "
                "the best test epoch of 110, reproduced only by --protocol paper-best-test.",
        "fgvc": "timm's prefetcher applies RandomErasing(p=0.25, per-pixel) to every training batch (its --reprob "
                "default), which petlbench does not reproduce; OxfordFlowers and StanfordCars are read by SSF from an ImageFolder with train/ and val/ "
                "folders whose content the repository does not show: Cars is taken as the official train split "
                "(VPT's train + val), Flowers as VPT's train split; AMP and the 2-GPU split as on VTAB; best EMA test "
                "epoch only under --protocol paper-best-test.",
    }

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

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> list[nn.Parameter]:
        """The official optimiser exempts every scale and shift (the recipe's no_1d rule also exempts the head bias)."""
        return list(petl["ssf"].parameters())

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
