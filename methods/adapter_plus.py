"""Adapter+ and the adapter placement family of Steitz & Roth, "Adapters Strike Back", CVPR 2024.

One bottleneck ``f(u) = drop_path(up(dropout(GELU(down(norm(u)))))) * scaling`` per block, placed
on the residual stream as the official code does it (visinf/adapter_plus
``adapter_plus/vit_adapter.py`` AdapterBlock, ``conf/adapter/*.yaml``, ``conf/experiment/**``).
With ``x`` the block input, ``a`` the attention branch, ``y = x + a`` and ``m`` the MLP branch
(both after the block's stochastic depth):

=============  ==========================================  =========================================
placement      block output                                official ``config``
=============  ==========================================  =========================================
post           y + m + f(y + m)                             ``post`` (Adapter+)
pfeiffer       y + m + f(y + m), with ``norm``              ``pfeiffer`` (the same site as post)
pre            y' + MLP(y'),  y' = y + f(y)                 ``pre``
intermediate   y + m + f(m)                                 ``intermediate``
houlsby        x + a + f_a(a), then the same on the MLP     ``houlsby`` (a second adapter on attn)
parallel       y + m + f(y)                                 ``parallel``
=============  ==========================================  =========================================

``variant`` picks a published configuration (its values apply under explicit overrides):
``adapter_plus`` (post, learned per-channel scaling, Houlsby init, no norm: the paper's method),
``houlsby`` (+ LayerNorm tuning, as in its ablation config), ``pfeiffer`` (BERT init, LayerNorm
in the adapter), ``adaptformer`` (Adapter+'s re-implementation: parallel, scale 0.1, LoRA init,
GELU; the ReLU original is the ``adaptformer`` method), and the position ablations ``pre``,
``post``, ``intermediate``, ``parallel`` (scale 1, Houlsby init). Every variant keeps the
official defaults: bottleneck 8, bias, no dropout, stochastic depth 0.1 on the adapter output.

Initialisation: ``houlsby`` trunc-normal(std 0.01, +-2 std) for both projections, zero biases
(the paper's value; Houlsby's code uses 0.001); ``lora`` kaiming-uniform down with a uniform
bias, zero up; ``bert`` N(0, 0.02) weights, zero biases. Scaling: ``channel`` (ones(dim),
learned), ``learned`` (one learned scalar) or ``fixed`` (``scale``).

Presets: VTAB-1k bottleneck 8 (the 77.6 row); ``task_dims=1-4|1-8|1-32`` selects the per-task
bottlenecks of the official ``adapter_plus_dim1-*`` configs; FGVC uses the per-task dims of
``fgvc/adapter_plus_dim1-32`` (the 90.7 row). The paper recipe (``recipes``, ``--protocol paper``)
follows ``conf/train``: AdamW lr 1e-3, wd 1e-4 (1-D tensors exempt), batch 64, 100 epochs, 10
warm-up epochs from lr/100, cosine to lr/1000, backbone stochastic depth 0.1, one evaluation at
epoch 100; FGVC trains on train + val with random resized crops.
ViT-B/16, Adapter+ dim 8: 12 * (768*8 + 8 + 8*768 + 768 + 768) = 165,984 (the paper prints
about 0.2 M, read off its figure).

Deliberate differences: the official code is ViT-only (timm ``Block``); on Swin the same
block-level placements are used without a published reference. GELU makes the adapter
non-linear, so it cannot be merged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method

PLACEMENTS = ("post", "pfeiffer", "pre", "intermediate", "houlsby", "parallel")

_BASE = {"scaling": "fixed", "scale": 1.0, "init": "houlsby", "norm": False, "train_layernorm": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "adapter_plus": {**_BASE, "placement": "post", "scaling": "channel"},
    "houlsby": {**_BASE, "placement": "houlsby", "train_layernorm": True},
    "pfeiffer": {**_BASE, "placement": "pfeiffer", "norm": True, "init": "bert"},
    "adaptformer": {**_BASE, "placement": "parallel", "scale": 0.1, "init": "lora"},
    **{p: {**_BASE, "placement": p} for p in ("pre", "post", "intermediate", "parallel")},
}

# Official names -> petlbench task names.
_VTAB_DIMS_OFFICIAL = {
    "1-4": (1, 4, 2, 1, 4, 4, 1, 4, 2, 4, 2, 4, 2, 4, 4, 4, 4, 4, 4),
    "1-8": (1, 4, 2, 1, 8, 8, 1, 8, 2, 8, 8, 4, 8, 8, 8, 8, 4, 8, 8),
    "1-32": (1, 4, 2, 1, 8, 16, 1, 16, 2, 32, 32, 4, 8, 8, 8, 32, 4, 32, 8),
}
VTAB_TASKS = ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
              "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab",
              "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele")
VTAB_DIMS = {k: dict(zip(VTAB_TASKS, v, strict=True)) for k, v in _VTAB_DIMS_OFFICIAL.items()}
FGVC_DIMS = {"NABirds": 2, "StanfordCars": 32, "StanfordDogs": 1, "CUB_200_2011": 2, "OxfordFlowers": 1}

# conf/train/default.yaml, conf/train/optimizer/adamw.yaml, conf/config.yaml (see AdapterPlus.recipe_source).
_PLUS_RECIPE = {
    "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "no_1d", "batch_size": 64, "epochs": 100,
    "schedule": "iter", "warmup_epochs": 10, "warmup_lr": 1e-5, "min_lr": 1e-6, "drop_path_rate": 0.1,
    "label_smoothing": 0.0, "grad_clip": 0.0, "normalization": "backbone", "head_init": "timm", "selection": "final",
}


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth, rescaled by the keep probability (timm's DropPath)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class BottleneckPlus(nn.Module):
    def __init__(self, dim: int, hp: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if hp.norm else None
        self.down = nn.Linear(dim, hp.bottleneck)
        self.up = nn.Linear(hp.bottleneck, dim)
        self.dropout = hp.dropout
        self.drop_path = hp.drop_path
        if hp.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(dim))
        elif hp.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scaling", torch.tensor(float(hp.scale)), persistent=False)
        if hp.init == "houlsby":
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=0.01, a=-0.02, b=0.02)
                nn.init.zeros_(lin.bias)
        elif hp.init == "lora":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(dim)
            nn.init.uniform_(self.down.bias, -bound, bound)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:  # bert
            for lin in (self.down, self.up):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            u = self.norm(u)
        z = F.dropout(F.gelu(self.down(u)), self.dropout, self.training)
        return drop_path(self.up(z), self.drop_path, self.training) * self.scaling.to(u.dtype)

    # fn(h, b) for Backbone.transform_branch: h = residual stream entering the sub-layer, b = its branch
    def on_stream(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b + self(h + b)

    def on_branch(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b + self(b)

    def parallel(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b + self(h)


class AdapterPlus(Method):
    name = "adapter_plus"
    families = frozenset({"vit", "deit_distilled", "eva", "swin"})
    family_refusals = {
        "convnext": "Adapter+ acts on the residual branches of pre-norm attention and MLP blocks; a ConvNeXt block "
                    "has one convolutional branch, normalised after its convolution",
    }
    display_name = "Adapter+"
    summary = "Adapter+: post-block bottleneck adapter with per-channel scaling; Houlsby/Pfeiffer/... via placement."
    paper = "Steitz & Roth, Adapters Strike Back, CVPR 2024"
    # The paper's means (VTAB-1k 77.6 mean of groups, FGVC 90.7) are known, but no per-task rows are in the shipped
    # reference CSV yet; declare {"vtab": "Adapter+", "fgvc": "Adapter+"} once they are (published_as is ready).
    published: dict[str, str] = {}
    bounded_by_width = frozenset({"bottleneck"})
    hparams = {
        "variant": HParam("adapter_plus", "a published configuration (sets the options below unless you set them)",
                          choices=tuple(VARIANTS)),
        "placement": HParam("post", "where the adapter sits in each block (see the module docstring)",
                            choices=PLACEMENTS),
        "bottleneck": HParam(8, "hidden size of the adapter", low=1),
        "scaling": HParam("channel", "channel: learned per-channel scale; learned: one scalar; fixed: `scale`",
                          choices=("channel", "learned", "fixed")),
        "scale": HParam(1.0, "the fixed scale (scaling=fixed)", low=0.0, low_exclusive=True),
        "init": HParam("houlsby", "projection init", choices=("houlsby", "lora", "bert")),
        "norm": HParam(False, "learnable LayerNorm on the adapter input (Pfeiffer)"),
        "dropout": HParam(0.0, "dropout on the bottleneck activations", low=0.0, high=0.99),
        "drop_path": HParam(0.1, "stochastic depth on the adapter output (official: 0.1)", low=0.0, high=0.99),
        "train_layernorm": HParam(False, "also train every LayerNorm of the backbone (the Houlsby ablation)"),
        "task_dims": HParam("", "VTAB: per-task bottlenecks of the official adapter_plus_dim<range> config",
                            choices=("", "1-4", "1-8", "1-32")),
    }
    recipes = {
        "vtab": {"*": {**_PLUS_RECIPE, "drop_last": True, "interpolation": "bilinear"}},
        "fgvc": {"*": {**_PLUS_RECIPE, "drop_last": False, "train_split": "train+val", "train_crop": "random_resized",
                       "eval_resize": 256, "interpolation": "random"}},
    }
    recipe_source = {
        "vtab": "visinf/adapter_plus: conf/config.yaml (vit_base_patch16_224.orig_in21k, vit.drop_path 0.1), "
                "conf/train/default.yaml + optimizer/adamw.yaml (AdamW lr 1e-3, wd 1e-4, 100 epochs, warm-up 10, "
                "lr_start_factor 100, lr_factor 1000, label smoothing 0), conf/experiment/vtab/adapter_plus_dim8.yaml "
                "(train on trainval, val_split test, val_every_n_epoch 100: one test evaluation at the end, seeds 18, "
                "45, 25), modeling/adaptermodel.py (add_weight_decay: 1-D tensors, *.bias and *.scaling without "
                "decay; LinearWarmupCosineAnnealingLR stepped with the finished epoch's index), data/vtab.py + "
                "tf_dataset.py (TFDS images, tf.image.resize to 224 x 224 (bilinear), the model's mean/std 0.5, "
                "batch 64, drop_last=True), train.py (one GPU, bf16).",
        "fgvc": "visinf/adapter_plus: conf/experiment/fgvc/adapter_plus_dim1-32.yaml (trainval = train + val JSON, "
                "val_split test, val_every_n_epoch 100, seeds 18, 45, 25), data/fgvc.py (RandomResizedCrop(224, "
                "scale 0.08-1, random interpolation) + flip; eval Resize(floor(224 / 0.875) = 256, bicubic) + "
                "CenterCrop(224); no drop_last), the same optimiser, schedule and model settings as VTAB.",
    }
    recipe_differences = {
        suite: "The schedule is pl_bolts' LinearWarmupCosineAnnealingLR (warm-up over 9 steps reaching lr at "
               "epoch index 9, cosine over epochs 10..100 from lr to lr/1000) stepped once per epoch with a "
               "one-epoch delay; petlbench runs the same warm-up/cosine shape per iteration without the delay "
               "(schedule iter: total learning rate -1 %, at most 15 % of the peak off in one epoch; timm_epoch "
               "would keep the delay but not the shape: -11 %). " + extra + " bf16 as officially; the mean of 3 "
               "seeds is petlbench's --seeds."
        for suite, extra in (
            ("vtab", "VTAB images are read from TFDS and resized by tf.image.resize (bilinear, no antialiasing) "
                     "officially, from the NOAH-format JPEGs with PIL bilinear here."),
            ("fgvc", "the official FGVC test set is evaluated once, after the last epoch (selection final)."),
        )
    }

    @classmethod
    def preset(cls, suite: str | None, task: str | None, current: dict[str, Any]) -> dict[str, Any]:
        out = dict(VARIANTS[current.get("variant", "adapter_plus")])
        if suite == "vtab":
            out["bottleneck"] = 8
            dims = current.get("task_dims", "")
            if dims and task in VTAB_DIMS[dims]:
                out["bottleneck"] = VTAB_DIMS[dims][task]
        elif suite == "fgvc" and task in FGVC_DIMS:
            out["bottleneck"] = FGVC_DIMS[task]
        return out

    @classmethod
    def published_as(cls, suite: str, config: Mapping[str, Any]) -> str | None:
        """Only Adapter+ itself has published rows (VTAB: bottleneck 8; FGVC: the per-task dims 1-32)."""
        plus = {k: v for k, v in VARIANTS["adapter_plus"].items() if k != "scale"}
        if any(config.get(k) != v for k, v in plus.items()):
            return None
        if suite == "vtab" and (config.get("bottleneck") != 8 or config.get("task_dims")):
            return None
        return super().published_as(suite, config)

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        place = self.hp.placement
        mlp = nn.ModuleList(BottleneckPlus(b.dim, self.hp) for b in backbone.blocks)
        petl["mlp"] = mlp
        if place == "houlsby":
            attn = nn.ModuleList(BottleneckPlus(b.dim, self.hp) for b in backbone.blocks)
            petl["attn"] = attn
        for i, blk in enumerate(backbone.blocks):
            f = mlp[i]
            if place in ("post", "pfeiffer"):
                backbone.transform_branch(blk, "mlp", f.on_stream)
            elif place == "pre":
                backbone.transform_branch(blk, "attn", f.on_stream)
            elif place == "intermediate":
                backbone.transform_branch(blk, "mlp", f.on_branch)
            elif place == "parallel":
                backbone.transform_branch(blk, "mlp", f.parallel)
            else:  # houlsby
                backbone.transform_branch(blk, "attn", attn[i].on_branch)
                backbone.transform_branch(blk, "mlp", f.on_branch)

    def trainable(self, backbone: Backbone, petl: nn.ModuleDict) -> Iterable[nn.Parameter]:
        yield from petl.parameters()
        yield from backbone.head_parameters()
        if self.hp.train_layernorm:
            for norm in backbone.layernorms:
                yield from norm.parameters()
