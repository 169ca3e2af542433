"""GPS (Zhang et al., "Gradient-based Parameter Selection for Efficient Fine-Tuning", CVPR 2024).

Before training, GPS accumulates the gradient of every weight over one pass of the task's
training data and keeps, per output neuron (row of a linear, output channel of the patch
embedding), the K input weights with the largest |gradient|; only those train, together with
every bias outside the norms and the head. As ``FightingFighting/GPS``
(``utils/pruning.py`` ``prune_by_percentile_gradient_perCell``, ``train_gps.py``):

- selected: qkv, proj, fc1, fc2 of every block and the patch-embedding convolution (flattened
  to out x in*k*k); norms, position embedding and class token stay frozen;
- the gradient pass runs the model in train mode over the whole training loader, summing the
  gradients of a supervised contrastive loss (SupCon, temperature 0.07) on the pooled features
  of two augmented views per image (``--contrastive --contrast-aug``; ``loss=ce`` uses
  cross-entropy on the logits instead, the official non-contrastive option);
- K (``--times_para``) is published per task (VTAB: 1, patch_camelyon 2; FGVC: CUB 2,
  NABirds 20, Flowers 1, Cars 15, Dogs 1; presets) and so are lr, batch size and drop-path (the
  paper recipe, ``recipes``, with the FGVC mixup / cutmix / smoothing / EMA of the scripts).

petlbench stores the update, not a gradient mask: per target a (rows x K) tensor of selected
column indices (a buffer, the calibration result) and a (rows x K) tensor of trained values
added there, plus a bias update. With Adam and no weight decay (GPS's setting) this trains
exactly the same scalars as masking the gradient of the full weight, and the trainable count is
honest by construction: ViT-B/16 at K=1 trains 167,424 (83,712 weights + 83,712 biases), as
the official code counts. Published counts: the paper's "0.36 % of the backbone over 24 tasks"
compares with 0.34 % here (head excluded; per-task K); V-PETL's 0.22 M for VTAB is not
reproduced (171,831 mean over the VTAB presets, 0.21 M with the head). The
update is a sparse delta_W, so GPS merges exactly. Training cost: the update runs as a dense
branch in parallel with each frozen layer (one extra matmul forward, two backward, where GPS
computes the full weight gradient and masks it); the merged model costs nothing extra.

On the same gradients, the selection equals the official ``prune_by_percentile_gradient_perCell``
mask (same weights, same biases, same count).

Deliberate differences: the two views are built from the loader's images with random
resized crops and horizontal flips only (GPS also jitters colour and greys, which needs
unnormalised pixels the calibration step does not see); weight decay, if set, pulls the update
toward zero (toward the pre-trained weight), not the weight toward zero (the recipes use none). On Swin the patch-merging
reductions and the relative-position bias tables are no block role and stay frozen.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import Backbone, HParam, Method, PetlbenchError
from petlbench.backbone import CONVNEXT_NO_ATTENTION, EVA_NO_QKV
from petlbench.layers import add_to_weight_rows

from ._recipes import SSF_FGVC_INPUT, SSF_VTAB_INPUT, TIMM_TRAIN_LOOP

_SITES = ("qkv", "proj", "fc1", "fc2")


class SparseDelta(nn.Module):
    """K trained values per row at calibrated columns, plus a bias update, for one frozen layer."""

    def __init__(self, rows: int, cols: int, k: int, bias: bool) -> None:
        super().__init__()
        self.cols = cols
        # Until calibration: the first K columns (any distinct columns; calibration replaces them).
        # Stored in the narrowest integer type that holds a column, so the per-task state stays small.
        dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
        self.register_buffer("index", torch.arange(k).repeat(rows, 1).to(dtype))
        self.values = nn.Parameter(torch.zeros(rows, k))
        self.bias = nn.Parameter(torch.zeros(rows)) if bias else None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """delta_W as a dense (rows, cols) matrix."""
        out = torch.zeros(self.values.shape[0], self.cols, dtype=dtype, device=self.values.device)
        return out.scatter(1, self.index.long(), self.values.to(dtype))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense(x.dtype), bias)

    def conv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight = self.dense(x.dtype).reshape(conv.weight.shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), ``contrast_mode='all'``, as GPS uses it.

    ``features``: (2B, d), the first B rows one view of each image, the last B the other.
    """
    f = F.normalize(features.float(), dim=1)
    n = f.shape[0]
    labels = labels.repeat(2)
    logits = f @ f.t() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=f.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(dim=1, keepdim=True))
    mean_pos = (log_prob * positives).sum(dim=1) / positives.sum(dim=1)
    return -mean_pos.mean()  # temperature / base_temperature = 1 in GPS


def two_views(x: torch.Tensor) -> torch.Tensor:
    """Two random resized crops (scale 0.08-1) with random horizontal flips per image: (2B, C, H, W)."""
    from torchvision.transforms import RandomResizedCrop

    crop = RandomResizedCrop(tuple(x.shape[-2:]), antialias=True)
    views = []
    for _ in range(2):
        for img in x:
            out = crop(img)
            views.append(out.flip(-1) if torch.rand(()) < 0.5 else out)
    return torch.stack(views)


# train_scripts/vit/vtab/<task>/train_gps.sh: (lr, batch size, drop path), by petlbench task name.
_GPS_VTAB = {
    "caltech101": (2e-3, 16, 0.0), "cifar": (1e-2, 32, 0.0), "clevr_count": (3e-4, 16, 0.1),
    "clevr_dist": (2e-3, 16, 0.1), "diabetic_retinopathy": (2e-3, 32, 0.2), "dmlab": (1.5e-3, 16, 0.1),
    "dsprites_loc": (7e-3, 32, 0.0), "dsprites_ori": (5e-4, 16, 0.2), "dtd": (2e-3, 16, 0.0),
    "eurosat": (2e-3, 16, 0.0), "oxford_flowers102": (2e-3, 16, 0.0), "kitti": (1e-3, 16, 0.0),
    "patch_camelyon": (4e-3, 32, 0.0), "oxford_iiit_pet": (3e-3, 32, 0.0), "resisc45": (1.5e-3, 16, 0.1),
    "smallnorb_azi": (3e-3, 32, 0.1), "smallnorb_ele": (3e-4, 32, 0.2), "sun397": (2.5e-3, 16, 0.0),
    "svhn": (5e-3, 32, 0.0),
}
# train_scripts/vit/fgvc/<dataset>/train_gps.sh: (lr, batch size, drop path, --model-ema-decay).
_GPS_FGVC = {
    "CUB_200_2011": (3e-3, 32, 0.0, 0.9998), "NABirds": (1e-4, 32, 0.1, 0.9998), "OxfordFlowers": (1e-3, 32, 0.1, 0.99),
    "StanfordCars": (5e-4, 32, 0.0, 0.9998), "StanfordDogs": (1e-4, 64, 0.0, 0.9998),
}
# Adam (= AdamW here: weight decay 0), 100 epochs + timm's 10 cool-down epochs, warm-up 10 epochs from 1e-7,
# floor 1e-8, stepped once per epoch; the model's mean/std (0.5); every epoch evaluated, the best kept.
_GPS_COMMON = {
    **TIMM_TRAIN_LOOP, "weight_decay": 0.0, "decay_groups": "all", "normalization": "backbone",
    "selection": "best-test", "eval_every": 1,
}


class GPS(Method):
    name = "gps"
    families = frozenset({"vit", "deit_distilled", "swin"})
    family_refusals = {
        "eva": EVA_NO_QKV,
        "convnext": CONVNEXT_NO_ATTENTION,
    }
    display_name = "GPS"
    summary = "GPS: per output neuron, train the K weights with the largest task gradient (+ biases); calibrated."
    paper = "Zhang et al., Gradient-based Parameter Selection for Efficient Fine-Tuning, CVPR 2024"
    published = {"vtab": "GPS", "fgvc": "GPS"}
    mergeable = True
    needs_calibration = True
    hparams = {
        "k": HParam(1, "weights kept per output neuron (--times_para; per-task presets)", low=1),
        "loss": HParam("supcon", "gradient of: supcon (two views, GPS's scripts) or ce (cross-entropy on the logits)",
                       choices=("supcon", "ce")),
        "temperature": HParam(0.07, "SupCon temperature", low=0.0, low_exclusive=True),
        "calibration_batches": HParam(0, "training batches in the gradient pass (0 = one full pass, as GPS)", low=0),
    }
    presets = {
        "vtab": {"patch_camelyon": {"k": 2}},
        "fgvc": {"CUB_200_2011": {"k": 2}, "NABirds": {"k": 20}, "OxfordFlowers": {"k": 1},
                 "StanfordDogs": {"k": 1}, "StanfordCars": {"k": 15}},
    }
    recipes = {
        "vtab": {"*": {**_GPS_COMMON, **SSF_VTAB_INPUT},
                 **{t: {"lr": lr, "batch_size": bs, "drop_path_rate": dp} for t, (lr, bs, dp) in _GPS_VTAB.items()}},
        "fgvc": {"*": {**_GPS_COMMON, **SSF_FGVC_INPUT},
                 **{t: {"lr": lr, "batch_size": bs, "drop_path_rate": dp, "ema_decay": ema}
                    for t, (lr, bs, dp, ema) in _GPS_FGVC.items()}},
    }
    recipe_source = {
        "vtab": "FightingFighting/GPS: train_scripts/vit/vtab/<task>/train_gps.sh (--opt adam --weight-decay 0, "
                "per-task bz / lr / --drop-path / --times_para, --epochs 100 --warmup-epochs 10 --warmup-lr 1e-7 "
                "--min-lr 1e-8, --no-aug --direct-resize, --mixup 0 --cutmix 0 --smoothing 0, --amp), train_gps.py "
                "and args.py (timm's training loop: --cooldown-epochs 10, scheduler.step(epoch + 1) after each "
                "epoch, test evaluated every epoch, the best logged), model default config (mean / std 0.5, "
                "bicubic); one run.",
        "fgvc": "FightingFighting/GPS: train_scripts/vit/fgvc/<dataset>/train_gps.sh (Adam, wd 0, per-dataset bz / "
                "lr / --drop-path / --model-ema-decay / --times_para, --simple-aug; args.py defaults --mixup 0.8 "
                "--cutmix 1.0 --smoothing 0.1 --train-interpolation random --scale 0.08 1), data/fgvc.py (VPT's "
                "JSON splits: train = train.json + val.json, eval = test.json), data/transforms_factory.py "
                "(RandomResizedCrop + flip; eval Resize(floor(224 / 0.9) = 248, bicubic) + CenterCrop(224)), "
                "train_gps.py (raw and EMA models evaluated every epoch, best of each logged; checkpoints ranked "
                "by the EMA model).",
    }
    recipe_differences = {
        "vtab": "Adam with weight decay 0 is AdamW with weight decay 0 (the same update). "
                "AMP fp16 officially (petlbench's precision setting here); the calibration's colour jitter / "
                "grey-scale views are not reproduced (see the module docstring); the published number is the best "
                "test epoch of 110, reproduced only by --protocol paper-best-test.",
        "fgvc": "Adam with weight decay 0 is AdamW with weight decay 0. GPS logs the best raw and the best EMA test accuracy and the "
                "paper does not say which it quotes (the EMA model is evaluated here, as timm reports it); best "
                "test epoch only under --protocol paper-best-test.",
    }

    def _targets(self, backbone: Backbone) -> list[nn.Module]:
        """The selected layers, patch embedding first (the order of ``petl['gps']``)."""
        return [backbone.patch_proj] + [getattr(blk, site) for blk in backbone.blocks for site in _SITES]

    def apply(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        targets = self._targets(backbone)
        narrow = min(t.weight[0].numel() for t in targets)
        if self.hp.k > narrow:
            raise PetlbenchError(
                f"method 'gps': k={self.hp.k} is larger than the narrowest layer's {narrow} inputs per neuron. "
                "Fix: e.g. --set k=1."
            )
        deltas = nn.ModuleList(
            SparseDelta(t.weight.shape[0], t.weight[0].numel(), self.hp.k, t.bias is not None) for t in targets
        )
        petl["gps"] = deltas
        backbone.add_parallel(targets[0], functools.partial(deltas[0].conv, targets[0]))
        for target, delta in zip(targets[1:], deltas[1:], strict=True):
            backbone.add_parallel(target, delta.linear)

    def calibrate(self, backbone: Backbone, petl: nn.ModuleDict, loader: Iterable, device: torch.device | str) -> None:
        """Pick, per output neuron of every target, the K columns with the largest accumulated |gradient|."""
        targets = self._targets(backbone)
        model = backbone.model
        params = list(model.parameters()) + list(petl.parameters())
        flags = [p.requires_grad for p in params]
        was_training = model.training
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for t in targets:
            t.weight.requires_grad_(True)
        model.train()
        batches = 0
        try:
            for batch in loader:
                if self.hp.calibration_batches and batches >= self.hp.calibration_batches:
                    break
                x, y = batch[0].to(device), batch[1].to(device)
                if self.hp.loss == "supcon":
                    views = two_views(x)
                    feats = model.forward_head(model.forward_features(views), pre_logits=True)
                    loss = supcon_loss(feats, y, self.hp.temperature)
                else:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                batches += 1
            if batches == 0:
                raise PetlbenchError(
                    "method 'gps' selects its weights from gradients on the task's training data, but the training "
                    "loader yielded no batch. Fix: point the run at a task with training images (check the split)."
                )
            with torch.no_grad():
                for target, delta in zip(targets, petl["gps"], strict=True):
                    score = target.weight.grad.reshape(target.weight.shape[0], -1).abs()
                    chosen = score.topk(self.hp.k, dim=1).indices
                    delta.index.copy_(chosen.sort(dim=1).values.to(delta.index.dtype))
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.grad = None
                p.requires_grad_(flag)
            model.train(was_training)

    @torch.no_grad()
    def merge(self, backbone: Backbone, petl: nn.ModuleDict) -> None:
        for target, delta in zip(self._targets(backbone), petl["gps"], strict=True):
            weight = delta.dense(torch.float64).reshape(target.weight.shape[0], -1)
            if isinstance(target, nn.Conv2d):
                w = target.weight
                w.copy_((w.double() + weight.reshape(w.shape)).to(w.dtype))
            else:
                add_to_weight_rows(target, 0, weight)
            if delta.bias is not None:
                target.bias.copy_((target.bias.double() + delta.bias.double()).to(target.bias.dtype))
