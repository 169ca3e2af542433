"""Training recipes shared by several built-in methods, as data (issue 16, the paper protocols).

Several published rows come from one codebase: RepAdapter, FacT and Convpass share the
JieShibo/PETL-ViT training loop (SCT and GLoRA copied it), NOAH's script produced the LoRA and
Adapter VTAB baselines as well as NOAH's own rows, and VPT's code produced its own rows and the
linear / full / bias / adapter baselines of its tables. Each family's common settings are written
once here; every method file adds its per-task values, the script it read and what differs.

The values are facts read from the official scripts (paths in each method's ``recipe_source``);
the keys are the training settings of ``petlbench.config.TRAIN_HPARAMS``. This module holds no
method (it registers nothing); its name starts with an underscore for that reason.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from petlbench import Backbone

#: JieShibo/PETL-ViT ``convpass/vtab/train.py``, ``FacT/fact_tk.py`` and luogen1996/RepAdapter ``train.py``
#: (the same loop): AdamW(lr 1e-3, wd 1e-4) over every trainable tensor, timm ``CosineLRScheduler(
#: t_initial=100, warmup_t=10, warmup_lr_init=1e-6, lr_min=1e-5)`` stepped once per epoch with
#: ``step(ep)`` after epoch ``ep``, batch 64 with ``drop_last=True``, drop path 0.1, ImageNet mean/std,
#: ``reset_classifier`` (PyTorch's default ``nn.Linear`` init), test set evaluated at epochs 9, 19, ..., 99
#: and the best of those 10 reported.
PETL_VIT_VTAB: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "all", "batch_size": 64,
    "drop_last": True, "epochs": 100, "schedule": "timm_epoch", "warmup_epochs": 10, "warmup_lr": 1e-6,
    "min_lr": 1e-5, "drop_path_rate": 0.1, "label_smoothing": 0.0, "grad_clip": 0.0, "normalization": "imagenet",
    "head_init": "torch", "selection": "best-test", "eval_every": 10,
}

PETL_VIT_DIFFERENCES = (
    "the official loop runs fp32 (petlbench: its precision setting, bf16 autocast on a GPU) with one seed (42); "
    "the paper numbers are the best of the 10 test evaluations, which only --protocol paper-best-test "
    "reproduces (--protocol paper reports the final epoch)."
)

#: timm's ``train.py`` as dongzelian/SSF ships it (FightingFighting/GPS copied SSF's scripts, heekhero/DTL's
#: ``train_vit_vtab.py`` the same loop): AdamW, 100 epochs + timm's 10 cool-down epochs at the floor
#: (``num_epochs = t_initial + cooldown``), ``CosineLRScheduler(warmup_t=10, warmup_lr_init=1e-7,
#: lr_min=1e-8)`` stepped as timm's train loop steps it, ``drop_last=True`` for training, no gradient
#: clipping, the head as ``reset_classifier`` leaves it (timm's init). Each method adds its weight decay,
#: parameter groups, batch, normalisation and selection.
TIMM_TRAIN_LOOP: dict[str, Any] = {
    "optimizer": "adamw", "drop_last": True, "epochs": 100, "cooldown_epochs": 10, "schedule": "timm_train",
    "warmup_epochs": 10, "warmup_lr": 1e-7, "min_lr": 1e-8, "grad_clip": 0.0, "head_init": "timm",
}

#: SSF's VTAB input, which GPS's VTAB scripts keep: ``--no-aug --direct-resize`` with timm's
#: ``input_size=(3, 224, 224)`` is ``transforms_direct_resize((224, 224))``, i.e. ``Resize((224, 224))``
#: (square, the aspect ratio not kept; the ``CenterCrop(224)`` after it changes nothing) with the model's
#: bicubic, for training and evaluation: the VTAB protocol's own input. No mixup, cutmix or smoothing.
SSF_VTAB_INPUT: dict[str, Any] = {"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0}

#: SSF's FGVC input, which GPS's FGVC scripts keep: train on VPT's train + val with timm's
#: RandomResizedCrop (random interpolation), evaluate after a resize to 248 and a centre crop; mixup 0.8 /
#: cutmix 1.0 (always one of them, switching with probability 0.5) and label smoothing 0.1.
SSF_FGVC_INPUT: dict[str, Any] = {
    "train_split": "train+val", "train_crop": "random_resized", "eval_resize": 248, "interpolation": "random",
    "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "label_smoothing": 0.1,
}

#: ZhangYuanhan-AI/NOAH ``supernet_train_prompt.py`` as ``configs/{LoRA,Adapter}/VTAB/slurm_train_*_vtab.sh`` and
#: ``configs/NOAH/VTAB/subnet/slurm_retrain_vtab.sh`` run it: timm 0.5.4 ``create_optimizer`` (AdamW; every
#: 1-D tensor and every ``*.bias`` without weight decay), lr 1e-3, wd 1e-4, batch 64, ``drop_last=True``,
#: 100 epochs, timm ``create_scheduler`` cosine (warm-up 10 epochs from 1e-6, floor 1e-5) stepped with
#: ``step(epoch)`` after each epoch, drop path 0.1 (``--drop-path`` default), ``--no_aug --direct_resize``
#: (bicubic 224 x 224), ImageNet mean/std, no mixup / cutmix / smoothing, ``reset_classifier``
#: (trunc-normal 0.02, zero bias), test evaluated every 10 epochs (``--val_interval`` 10: epochs 0, 10, ...,
#: 90 and the last) and the maximum printed.
NOAH_VTAB: dict[str, Any] = {
    **PETL_VIT_VTAB, "decay_groups": "no_1d", "head_init": "timm",
}

NOAH_SOURCE = (
    "ZhangYuanhan-AI/NOAH: supernet_train_prompt.py run by {script} (--batch-size=64 --lr=0.001 --epochs=100 "
    "--weight-decay=0.0001 --no_aug --mixup=0 --cutmix=0 --direct_resize --smoothing=0); its defaults "
    "--drop-path 0.1, --warmup-epochs 10, --warmup-lr 1e-6, --min-lr 1e-5, --val_interval 10; timm 0.5.4 "
    "create_optimizer (AdamW, 1-D tensors and biases without decay), create_scheduler (cosine) stepped "
    "step(epoch) after every epoch; DataLoader drop_last=True; lib/datasets.py: Resize((224, 224)) bicubic, "
    "ImageNet mean/std (no --inception); reset_classifier: trunc-normal 0.02 weight, zero bias; the maximum "
    "test accuracy over the evaluations (epochs 0, 10, ..., 90, 99) is the reported number, one seed."
)

NOAH_DIFFERENCES = (
    "the official script evaluates the test set after epochs 0, 10, ..., 90 and 99 (11 evaluations); "
    "petlbench's eval_every 10 evaluates after epochs 10, 20, ..., 100 (10 evaluations, no epoch-0 one); "
    "AMP off officially (fp32), petlbench's precision setting here."
)

#: KMnP/vpt: SGD (momentum 0.9) over every trainable tensor with weight decay, except the classifier's bias
#: (``last_layer.bias``; ``src/solver/optimizer.py``); ``WarmupCosineSchedule`` (``src/solver/lr_scheduler.py``)
#: from 0 over 10 warm-up epochs to 0 at the end; 100 epochs; ImageNet mean/std; the head of
#: ``src/models/mlp.py`` (kaiming-normal fan-out, bias -log(99)); lr and weight decay chosen on the
#: validation split from a grid, lr scaled by batch / 256 (``tune_vtab.py``, ``tune_fgvc.py``).
VPT_SGD: dict[str, Any] = {
    "optimizer": "sgd", "momentum": 0.9, "lr_base_batch": 256, "decay_groups": "method", "drop_last": False,
    "epochs": 100, "schedule": "epoch", "warmup_epochs": 10, "warmup_lr": 0.0, "min_lr": 0.0,
    "drop_path_rate": 0.0, "label_smoothing": 0.0, "grad_clip": 0.0, "normalization": "imagenet",
    "head_init": "vpt", "selection": "tune", "tune_weight_decay": "0.01,0.001,0.0001,0",
}

#: The lr grids (before the batch / 256 scaling) of KMnP/vpt ``tune_vtab.py`` (train types ``prompt`` and
#: ``linear``: the same ten values) and ``tune_fgvc.py`` (``linear_main``; ``prompt_main`` lacks 0.05).
VPT_LR_GRID = "50,25,10,5,2.5,1,0.5,0.25,0.1,0.05"
VPT_PROMPT_FGVC_LR_GRID = "50,25,10,5,2.5,1,0.5,0.25,0.1"

#: VTAB-1k (``tune_vtab.py``): TFDS images resized with ``tf.image.resize`` (bilinear) to 224 x 224; the only
#: VTAB batch size in the repository's instructions is demo.ipynb's tuning command (128).
VPT_VTAB: dict[str, Any] = {**VPT_SGD, "batch_size": 128, "interpolation": "bilinear", "tune_lr": VPT_LR_GRID}

_VPT_CODE = (
    "src/solver/optimizer.py (SGD momentum 0.9 with weight decay on every trainable tensor except "
    "last_layer.bias; AdamW for end2end), src/solver/lr_scheduler.py WarmupCosineSchedule (linear from 0 over "
    "WARMUP_EPOCH, cosine to 0 at TOTAL_EPOCH, stepped once per epoch), src/engine/trainer.py, src/models/mlp.py "
    "(head: kaiming-normal fan-out weight, bias -log(99)), ImageNet mean/std (src/data/transforms.py, "
    "src/data/datasets/tf_dataset.py)"
)

#: ``{what}``: the transfer type and config read; ``{grid}``: the lr grid.
VPT_VTAB_SOURCE = (
    "KMnP/vpt: {what}; tune_vtab.py: lr grid {grid} (x batch/256) x wd 0.01, 0.001, 0.0001, 0, each trained on "
    "train800 and scored on val200 at the last epoch (ties -> the smaller lr), then 5 final runs (seeds 42, 44, "
    "82, 100, 800) on train800val200, the test accuracy recorded every epoch (the paper's number taken as the "
    "last epoch's), averaged over the 5 runs; TFDS images "
    "resized by tf.image.resize (bilinear) to 224 x 224; batch 128 (demo.ipynb's tuning command); "
    + _VPT_CODE + "."
)
VPT_FGVC_SOURCE = (
    "KMnP/vpt: {what}; tune_fgvc.py: lr grid {grid} (x batch/256) x wd 0.01, 0.001, 0.0001, 0, trained on "
    "train, chosen on val, test reported (one run per setting); Resize(256), RandomCrop(224), flip / "
    "Resize(256), CenterCrop(224); single-GPU loaders without drop_last; " + _VPT_CODE + "."
)

VPT_DIFFERENCES = (
    "VTAB images come from TFDS resized by tf.image.resize "
    "(bilinear, no antialiasing) in VPT, from the NOAH-format JPEGs with PIL bilinear here; the VTAB mean "
    "over 5 seeds is petlbench's --seeds, not part of one run."
)

def head_bias(backbone: Backbone) -> list[nn.Parameter]:
    """The classifier's bias (found through the backbone's head role), or nothing if it has none."""
    bias = backbone.head.bias
    return [bias] if bias is not None else []
