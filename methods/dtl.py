"""DTL and DTL+ (Fu et al., "DTL: Disentangled Transfer Learning for Visual Recognition", AAAI 2024).

A compact side network that never touches the frozen blocks' insides, as the official code does
it (heekhero/DTL ``models/vision_transformer.py``, ``train_vit_vtab.py``,
``train_scripts/vit/vtab/*``). With x_i the input of block i:

    R_j = sum_{i <= j, i in lora_blocks} B_i A_i x_i            (rank-r maps, A: dim -> r, B: r -> dim)
    after block j in add_blocks:  x <- x + F(swish(R_j)),  swish(u) = u * sigmoid(beta u)

F is the identity for DTL; DTL+ adds a depth-wise k x k convolution (no bias, "same" padding,
PyTorch's default init) over the patch-token grid, the class token passing unchanged. A is
kaiming-uniform(a=sqrt 5), B zero, so the model starts as the pre-trained one. The sum R runs
within a stage (on Swin, where the width changes, the official code restarts it at every stage).
Official defaults: ViT-B/16 r = 2, lora_blocks 0-11, add_blocks 6-11; Swin-B r = 4, lora_blocks
4-23, add_blocks 14-23; beta = 100. Here ``rank=0`` means that per-family value, and the default
blocks follow one rule that gives exactly those: lora = the blocks of the last two stages (all of
a ViT), add = the second half of the lora blocks. A lora block with no later add block in its
stage could never reach the output and is left out; DTL+ convs exist only for stages that add.

The classifier input changes too: on ViT, DTL averages the *patch* tokens of the last block and
then applies the pre-trained final LayerNorm (``norm(mean(x[:, 1:]))``), instead of the class
token after the norm. This is installed here (on the final norm's input) and recorded as the
run's pooling, ``mean_patch_tokens_then_norm``. Swin keeps its own pooling (norm, then average),
as in the official Swin code, and so does an MAE-style ViT (``global_pool='avg'`` with
``fc_norm``), whose own pooling already is the mean of the patch tokens followed by the final
norm. Other pools (SigLIP's attention-pool head, norm-then-mean) are refused before training.
DTL+ convolves over the patch grid the backbone produced (non-square and dynamic sizes too).
ViT-B/16, r = 2: 12 * 2 * 2 * 768 = 36,864 (0.04 M); DTL+ adds 768 * k * k.

Presets: the DTL+ kernel size per VTAB task. The paper recipe (``recipes``, ``--protocol paper``)
is the official per-task ViT-B/16 VTAB scripts (lr, stochastic depth; batch 32, 100 epochs + 10
cool-down epochs, 10 warm-up epochs, weight decay 0.05 with the head's bias exempt, one evaluation
at the end). Recipes cannot depend on the backbone, so a Swin run gets the ViT values unless
overridden (the official Swin-B scripts, ``train_scripts/swin/vtab``, use other learning rates and
stochastic depth). Deliberate differences: the official Swin code builds a DTL+ conv for every
stage, used or not; swish and the conv are non-linear, so DTL cannot be merged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method
from petlbench.backbone import TokenGrid
from petlbench.errors import PetlbenchError

from ._recipes import TIMM_TRAIN_LOOP, head_bias

POOLING = "mean_patch_tokens_then_norm"

# Official VTAB scripts (train_scripts/vit/vtab/<task>/train_dtl*.sh): (lr, drop_path[, fusion_size]).
_DTL = {
    "caltech101": (1e-3, 0.0), "cifar": (3e-4, 0.1), "clevr_count": (1e-3, 0.2), "clevr_dist": (5e-4, 0.2),
    "diabetic_retinopathy": (1e-4, 0.1), "dmlab": (8e-4, 0.2), "dsprites_loc": (1e-2, 0.0),
    "dsprites_ori": (8e-3, 0.0), "dtd": (3e-4, 0.1), "eurosat": (8e-3, 0.0), "oxford_flowers102": (8e-3, 0.2),
    "kitti": (8e-3, 0.1), "patch_camelyon": (8e-3, 0.1), "oxford_iiit_pet": (3e-4, 0.1), "resisc45": (8e-3, 0.1),
    "smallnorb_azi": (3e-3, 0.2), "smallnorb_ele": (1e-3, 0.2), "sun397": (5e-4, 0.1), "svhn": (8e-3, 0.2),
}
_DTL_PLUS = {
    "caltech101": (5e-4, 0.0, 3), "cifar": (5e-4, 0.1, 3), "clevr_count": (8e-4, 0.2, 5),
    "clevr_dist": (1e-3, 0.2, 4), "diabetic_retinopathy": (1e-4, 0.1, 5), "dmlab": (5e-3, 0.2, 3),
    "dsprites_loc": (8e-3, 0.1, 4), "dsprites_ori": (8e-4, 0.2, 5), "dtd": (3e-4, 0.1, 5),
    "eurosat": (3e-3, 0.1, 3), "oxford_flowers102": (8e-3, 0.2, 5), "kitti": (8e-3, 0.2, 4),
    "patch_camelyon": (3e-3, 0.0, 4), "oxford_iiit_pet": (3e-4, 0.0, 3), "resisc45": (1e-2, 0.1, 3),
    "smallnorb_azi": (3e-3, 0.2, 5), "smallnorb_ele": (1e-3, 0.1, 5), "sun397": (3e-3, 0.0, 5),
    "svhn": (5e-3, 0.2, 5),
}
# train_vit_vtab.py: AdamW, weight decay 0.05 on every trainable tensor except those named *.bias (the head's
# bias: the side network has none), batch 32 with drop_last, timm CosineLRScheduler(t_initial=100, warmup_t=10,
# warmup_lr_init=1e-7, lr_min=1e-8) for 100 + 10 epochs (the last 10 at lr_min), the model's 0.5 mean/std,
# one evaluation of the test set after training.
_DTL_RECIPE = {
    **TIMM_TRAIN_LOOP, "weight_decay": 0.05, "decay_groups": "method", "batch_size": 32, "label_smoothing": 0.0,
    "normalization": "inception", "selection": "final",
}
_DTL_SOURCE = (
    "heekhero/DTL: train_scripts/vit/vtab/<task>/{script} (--batch_size 32 --epochs 100 --warmup_epochs 10 "
    "--weight_decay 0.05, per-task --lr / --drop_path{fusion}, --amp --prefetcher), train_vit_vtab.py (AdamW "
    "with *.bias tensors in a no-decay group; CosineLRScheduler(t_initial=epochs, lr_min=1e-8, "
    "warmup_lr_init=1e-7, warmup_t=10); num_epochs = cycle length + warmup_epochs = 110; lr_scheduler.step(epoch) "
    "after 1-based epoch `epoch`; the test set evaluated once after training), utils/utils.py (Resize((224, "
    "224)) bicubic, drop_last for training, PrefetchLoader normalising with mean/std 0.5), train800val200 -> "
    "test; the head keeps timm's trunc-normal(0.02) init; seed 42, one run."
)
_DTL_DIFFERENCES = "AMP fp16 officially (petlbench's precision setting here)."


def parse_blocks(method: str, text: str, depth: int, default: list[int], option: str) -> list[int]:
    """'' -> ``default``; '3-7' -> 3..7; '0,2,5' -> those blocks. Bad input is one clear line."""
    if not text.strip():
        return list(default)
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise PetlbenchError(f"method {method!r}: {option}={text!r} is not a block list. Fix: e.g. --set {option}=6-11 "
                             "or 0,2,4 (empty = the default).") from None
    if not out or min(out) < 0 or max(out) >= depth:
        raise PetlbenchError(f"method {method!r}: {option}={text!r} names blocks outside 0-{depth - 1} of this backbone. "
                             f"Fix: --set {option}=<blocks in 0-{depth - 1}>.")
    return sorted(out)


class SideNetwork(nn.Module):
    """The DTL side branch. ``running`` holds this forward pass's R per stage until the last addition.

    ``lora_blocks``/``add_blocks``/``stage_of`` index the backbone's blocks; R sums only within a
    stage (on Swin the width changes between stages and the official code restarts R at 0). R is
    a running sum, as in the official forward: each lora block adds its B A x once, and the first
    lora block of a stage restarts it, so a stale R from an interrupted pass is never read.
    """

    def __init__(self, dims: dict[int, int], stage_of: dict[int, int], rank: int, beta: float,
                 lora_blocks: list[int], add_blocks: list[int], fusion: int, prefix: int,
                 grid: TokenGrid | None = None) -> None:
        super().__init__()
        self.grids = (grid,)  # ViT: the patch grid of the current input (lives in petl; a tuple, not a child)
        self.lora_blocks, self.add_blocks, self.stage_of = lora_blocks, add_blocks, stage_of
        self.lora_a = nn.ParameterList(nn.Parameter(torch.empty(rank, dims[i])) for i in lora_blocks)
        self.lora_b = nn.ParameterList(nn.Parameter(torch.zeros(dims[i], rank)) for i in lora_blocks)
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        stages = sorted({stage_of[i] for i in add_blocks}) if fusion else []
        dim_of_stage = {stage_of[i]: dims[i] for i in add_blocks}
        self.fusion = nn.ModuleDict({
            str(st): nn.Conv2d(dim_of_stage[st], dim_of_stage[st], fusion, padding="same", groups=dim_of_stage[st],
                               bias=False)
            for st in stages
        })
        self.beta = beta
        self.prefix = prefix
        self.first_lora: dict[int, int] = {}  # stage -> its first lora block
        for i in lora_blocks:
            self.first_lora.setdefault(stage_of[i], i)
        self.running: dict[int, torch.Tensor] = {}

    def collect(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Pre-hook of block ``lora_blocks[slot]``: add B A x to its stage's R, pass x through unchanged."""
        a, b = self.lora_a[slot].to(x.dtype), self.lora_b[slot].to(x.dtype)
        block = self.lora_blocks[slot]
        stage = self.stage_of[block]
        part = F.linear(F.linear(x, a), b)
        self.running[stage] = part if self.first_lora[stage] == block else self.running[stage] + part
        return x

    def _fuse(self, conv: nn.Conv2d, r: torch.Tensor) -> torch.Tensor:
        """Depth-wise conv over the patch grid: (B, H, W, C) on Swin; (B, prefix + H*W, C) on ViT."""
        if r.dim() == 4:
            return conv(r.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        p, (n, t, c) = self.prefix, r.shape
        h, w = self.grids[0].hw(t - p, "dtl_plus")
        grid = conv(r[:, p:].reshape(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, -1, c)
        return torch.cat([r[:, :p], grid], dim=1)

    def add(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Output hook of an add block: x + F(swish(R_block))."""
        stage = self.stage_of[block]
        r = self.running.get(stage) if self.first_lora.get(stage, block + 1) <= block else None
        if block == self.add_blocks[-1]:
            self.running = {}
        if r is None:
            return x
        r = r * torch.sigmoid(r * self.beta)
        if str(stage) in self.fusion:
            r = self._fuse(self.fusion[str(stage)], r)
        return x + r

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the final norm: the mean of the patch tokens, as a one-token sequence."""
        return x[:, self.prefix:].mean(dim=1, keepdim=True)


class DTL(Method):
    name = "dtl"
    family_refusals = {
        "deit_distilled": "DTL replaces the class-token pooling by the mean of the patch tokens; distilled DeiT classifies "
                          "with two heads on two tokens, which that pooling does not define",
        "eva": "DTL replaces a class-token pooling by the mean of the patch tokens before the final norm, and this "
               "implementation handles the vit family's token prefix only (EVA-02 pools after fc_norm)",
        "convnext": "DTL's side network reads the token outputs of transformer blocks; ConvNeXt has none",
    }
    display_name = "DTL"
    summary = "DTL: rank-2 side network summed over blocks, swish-added to the second half; mean-pooled head."
    paper = "Fu et al., DTL: Disentangled Transfer Learning for Visual Recognition, AAAI 2024"
    published = {"vtab": "DTL"}
    pooling = POOLING
    bounded_by_width = frozenset({"rank"})
    hparams = {
        "rank": HParam(0, "rank r of each block's low-rank map (0 = the official value: ViT 2, Swin 4)", low=0),
        "beta": HParam(100.0, "swish sharpness beta", low=0.0, low_exclusive=True),
        "lora_blocks": HParam("", "blocks whose input feeds the side network ('' = all; e.g. 0-11)"),
        "add_blocks": HParam("", "blocks after which the side features are added ('' = second half; e.g. 6-11)"),
        "fusion_size": HParam(0, "DTL+ depth-wise conv kernel on the patch grid (0 = DTL)", low=0),
    }
    recipes = {"vtab": {"*": dict(_DTL_RECIPE), **{t: {"lr": lr, "drop_path_rate": dp} for t, (lr, dp) in _DTL.items()}}}
    recipe_source = {"vtab": _DTL_SOURCE.format(script="train_dtl.sh", fusion=", --fusion_size 0")}
    recipe_differences = {
        "vtab": _DTL_DIFFERENCES,
        "fgvc": "no recipe: DTL's repository has no FGVC scripts (VTAB, few-shot and domain generalisation only).",
    }

    @classmethod
    def published_as(cls, suite: str, config: Mapping[str, Any]) -> str | None:
        """The quoted DTL row is rank 2 without the fusion conv (DTL+ has no table row here)."""
        if config.get("rank") not in (0, 2) or config.get("fusion_size") != 0:
            return None
        return super().published_as(suite, config)

    def no_weight_decay(self, backbone: Backbone, petl: nn.ModuleDict) -> list[nn.Parameter]:
        """The official optimiser exempts the tensors named *.bias: of what DTL trains, only the head's bias."""
        return head_bias(backbone)

    @staticmethod
    def _pools_like_dtl(backbone: Backbone) -> bool:
        """A ViT whose own pooling already is DTL's: the mean of the patch tokens, then the final
        LayerNorm (MAE-style ``global_pool='avg'`` with ``fc_norm``); DTL then installs nothing."""
        return backbone.pooling == "avg" and backbone.fc_norm is not None and backbone.last_norm is backbone.fc_norm

    def check_backbone(self, backbone: Backbone) -> None:
        super().check_backbone(backbone)
        if backbone.family == "vit" and backbone.pooling != "cls_token" and not self._pools_like_dtl(backbone):
            raise PetlbenchError(
                f"method {self.name!r} classifies from the mean of the patch tokens followed by the final norm; "
                f"{backbone.arch!r} pools with {backbone.pooling!r}"
                f"{' (an attention-pool head)' if backbone.attn_pool is not None else ''}, which that cannot replace. "
                "Fix: build the backbone with global_pool='token' (or 'avg' with fc_norm)."
            )

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        blocks = backbone.blocks
        depth, stage_of = len(blocks), {b.index: b.stage for b in blocks}
        last_stages = sorted(set(stage_of.values()))[-2:]
        default_lora = [b.index for b in blocks if b.stage in last_stages]
        lora = parse_blocks(self.name, self.hp.lora_blocks, depth, default_lora, "lora_blocks")
        add = parse_blocks(self.name, self.hp.add_blocks, depth, lora[len(lora) // 2:], "add_blocks")
        # A map reaches the output only through a later addition in its own stage.
        lora = [i for i in lora if any(j >= i and stage_of[j] == stage_of[i] for j in add)]
        if not lora:
            raise PetlbenchError(f"method {self.name!r}: no lora block ({self.hp.lora_blocks or 'default'}) has an add "
                                 f"block ({self.hp.add_blocks or 'default'}) after it in the same stage, so the side "
                                 "network would never be used. Fix: e.g. --set lora_blocks=0-11 --set add_blocks=6-11.")
        rank = self.hp.rank or (2 if backbone.family == "vit" else 4)
        if rank > min(b.dim for b in blocks):
            raise PetlbenchError(f"method {self.name!r}: rank {rank} is larger than the width of {backbone.arch!r}.")
        vit = backbone.family == "vit"
        # Swin and average-pooled ViTs (mean of the patch tokens, then fc_norm) keep their own pooling.
        install_pool = vit and not self._pools_like_dtl(backbone)
        self.pooling = POOLING if install_pool else None
        grid = TokenGrid() if vit and self.hp.fusion_size else None
        side = SideNetwork({b.index: b.dim for b in blocks}, stage_of, rank, self.hp.beta, lora, add,
                           self.hp.fusion_size, backbone.num_prefix_tokens if vit else 0, grid)
        petl["side"] = side
        if grid is not None:  # DTL+ convolves over the real patch grid (non-square, dynamic sizes)
            petl["grid"] = grid
            backbone.track_grid(grid)
        for slot, i in enumerate(lora):
            backbone.transform_input(blocks[i].block, functools.partial(side.collect, slot))
        for i in add:
            backbone.transform_output(blocks[i].block, functools.partial(side.add, i))
        if install_pool:
            backbone.transform_input(backbone.final_norm, side.pool)


class DTLPlus(DTL):
    name = "dtl_plus"
    display_name = "DTL+"
    summary = "DTL+: DTL with a depth-wise conv (per-task kernel 3-5) fusing the side features over the patch grid."
    published: dict[str, str] = {}
    hparams = {**DTL.hparams, "fusion_size": HParam(3, "depth-wise conv kernel on the patch grid (0 = DTL)", low=0)}
    presets = {"vtab": {t: {"fusion_size": k} for t, (_, _, k) in _DTL_PLUS.items()}}
    recipes = {
        "vtab": {"*": dict(_DTL_RECIPE),
                 **{t: {"lr": lr, "drop_path_rate": dp} for t, (lr, dp, _) in _DTL_PLUS.items()}}
    }
    recipe_source = {"vtab": _DTL_SOURCE.format(script="train_dtl+.sh", fusion=", --fusion_size (the presets)")}

