"""Every built-in method's paper recipe against facts read from the official training scripts.

``OFFICIAL`` below is written by hand from the scripts themselves (repository and file in each
row), independently of the declarations in ``methods/*.py``: if a recipe drifts from its script,
or a script was misread in one place only, a row here disagrees. Each row is checked against the
method's *resolved* paper recipe for that suite and task, resolved as the recipe contract defines
it: engine defaults < the suite's ``train_defaults`` < ``recipes[suite]["*"]`` < ``recipes[suite][task]``.

``test_every_recipe_key_is_a_training_setting`` checks the keys and values against
``petlbench.config.TRAIN_HPARAMS``. The recipe settings are added to it by three helpers in
parallel (rec-engine, rec-data, rec-modules), so on the declaring branch alone that test fails by
design; it passes once their keys are merged.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import petlbench
from petlbench.config import TRAIN_HPARAMS
from petlbench.data import get_suite
from petlbench.method import Method
from tests.test_methods import build

PETL_VIT = "JieShibo/PETL-ViT + luogen1996/RepAdapter train loop"
NOAH = "ZhangYuanhan-AI/NOAH supernet_train_prompt.py via configs/*/VTAB/*.sh"
VPT = "KMnP/vpt src/solver/*, tune_vtab.py, tune_fgvc.py, configs/base-*.yaml"
VPT_GRID = {50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05}
VPT_WD_GRID = {0.01, 0.001, 0.0001, 0.0}

# (method, suite, task, source, facts). Values typed from the official files, not from methods/.
OFFICIAL: list[tuple[str, str, str, str, dict[str, Any]]] = [
    # train_scripts/vit/vtab/cifar_100/train_ssf.sh (2 GPUs x 32), train.py (timm: cooldown 10, best epoch)
    ("ssf", "vtab", "cifar", "dongzelian/SSF vtab/cifar_100/train_ssf.sh",
     {"lr": 5e-3, "weight_decay": 5e-5, "drop_path_rate": 0.0, "warmup_lr": 1e-7, "min_lr": 1e-8,
      "warmup_epochs": 10, "epochs": 100, "cooldown_epochs": 10, "batch_size": 64, "optimizer": "adamw",
      "decay_groups": "no_1d", "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0, "normalization": "backbone",
      "selection": "best-test", "eval_every": 1, "schedule": "timm_train",
      # --no-aug --direct-resize with input_size (3, 224, 224): Resize((224, 224)), the VTAB protocol's input
      "train_crop": "protocol", "eval_resize": 0, "interpolation": "protocol"}),
    ("ssf", "vtab", "clevr_dist", "dongzelian/SSF vtab/clevr_dist/train_ssf.sh",
     {"lr": 5e-2, "weight_decay": 5e-2, "drop_path_rate": 0.1}),
    ("ssf", "vtab", "smallnorb_ele", "dongzelian/SSF vtab/smallnorb_ele/train_ssf.sh",
     {"lr": 5e-3, "weight_decay": 5e-2, "drop_path_rate": 0.2}),
    ("ssf", "vtab", "resisc45", "dongzelian/SSF vtab/resisc45/train_ssf.sh",
     {"lr": 2e-3, "weight_decay": 5e-5, "drop_path_rate": 0.1}),
    ("ssf", "fgvc", "CUB_200_2011", "dongzelian/SSF fgvc/cub_2011/train_ssf.sh + timm defaults",
     {"lr": 1e-2, "weight_decay": 5e-2, "drop_path_rate": 0.0, "ema_decay": 0.9998, "mixup": 0.8, "cutmix": 1.0,
      "label_smoothing": 0.1, "train_crop": "random_resized", "eval_resize": 248, "interpolation": "random",
      "train_split": "train+val", "schedule": "timm_train", "warmup_lr": 1e-7, "min_lr": 1e-8, "cooldown_epochs": 10}),
    ("ssf", "fgvc", "OxfordFlowers", "dongzelian/SSF fgvc/oxford_flowers/train_ssf.sh",
     {"lr": 1e-2, "weight_decay": 5e-2, "drop_path_rate": 0.1, "ema_decay": 0.999}),
    ("ssf", "fgvc", "StanfordDogs", "dongzelian/SSF fgvc/stanford_dogs/train_ssf.sh",
     {"lr": 2.5e-4, "weight_decay": 5e-2, "drop_path_rate": 0.0, "ema_decay": 0.9998}),
    # luogen1996/RepAdapter train.py + dataset.py
    ("repadapter", "vtab", "dtd", PETL_VIT,
     {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "all", "batch_size": 64,
      "drop_last": True, "epochs": 100, "warmup_epochs": 10, "warmup_lr": 1e-6, "min_lr": 1e-5,
      "schedule": "timm_epoch", "drop_path_rate": 0.1, "normalization": "imagenet", "head_init": "torch",
      "selection": "best-test", "eval_every": 10}),
    ("fact_tk", "vtab", "kitti", PETL_VIT + " (FacT/fact_tk.py)",
     {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "drop_last": True, "schedule": "timm_epoch",
      "normalization": "imagenet", "head_init": "torch", "eval_every": 10}),
    ("fact_tt", "vtab", "svhn", PETL_VIT + " (FacT/fact_tt.py)",
     {"lr": 1e-3, "weight_decay": 1e-4, "drop_path_rate": 0.1, "warmup_lr": 1e-6, "min_lr": 1e-5}),
    ("convpass", "vtab", "eurosat", PETL_VIT + " (convpass/vtab/train.py)",
     {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64, "drop_last": True, "schedule": "timm_epoch",
      "drop_path_rate": 0.1, "normalization": "imagenet", "head_init": "torch", "selection": "best-test"}),
    # DavidYanAnDe/ARC vtab_ARC_train.py / FGVC_ARC_train.py defaults; FGVC values from issue #1
    ("arc", "vtab", "cifar", "DavidYanAnDe/ARC vtab_ARC_train.py",
     {"lr": 1e-2, "weight_decay": 0.0, "batch_size": 32, "drop_last": False, "epochs": 100, "warmup_epochs": 10,
      "warmup_lr": 0.0, "grad_clip": 1.0, "schedule": "iter", "head_init": "zeros", "normalization": "imagenet",
      "selection": "best-test", "eval_every": 1}),
    ("arc", "fgvc", "CUB_200_2011", "DavidYanAnDe/ARC issue #1",
     {"lr": 1e-3, "weight_decay": 0.05, "pos_drop_rate": 0.1, "mlp_drop_rate": 0.1, "batch_size": 32}),
    ("arc", "fgvc", "StanfordDogs", "DavidYanAnDe/ARC issue #1",
     {"lr": 2.5e-4, "weight_decay": 0.05, "pos_drop_rate": 0.0, "mlp_drop_rate": 0.0}),
    ("arc_att", "fgvc", "OxfordFlowers", "DavidYanAnDe/ARC issue #1 (ARC_att is the FGVC script's default)",
     {"lr": 2.5e-3, "weight_decay": 0.01, "pos_drop_rate": 0.1}),
    # NOAH's script: the NOAH retraining and the LoRA / Adapter VTAB baselines
    ("noah", "vtab", "caltech101", NOAH,
     {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "no_1d", "batch_size": 64,
      "drop_last": True, "epochs": 100, "schedule": "timm_epoch", "warmup_lr": 1e-6, "min_lr": 1e-5,
      "drop_path_rate": 0.1, "label_smoothing": 0.0, "normalization": "imagenet", "head_init": "timm",
      "selection": "best-test"}),
    ("lora", "vtab", "cifar", NOAH + " (--is_LoRA)",
     {"lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "no_1d", "drop_path_rate": 0.1, "schedule": "timm_epoch",
      "normalization": "imagenet"}),
    ("adapter", "vtab", "sun397", NOAH + " (--is_adapter)",
     {"lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "no_1d", "drop_last": True, "head_init": "timm"}),
    # ziplab/SPT configs/vtab_supervised_spt_*.sh + train_spt.py + lib/utils.py build_optimizer
    ("spt_lora", "vtab", "dmlab", "ziplab/SPT vtab_supervised_spt_lora.sh",
     {"lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "no_1d", "batch_size": 64, "drop_last": False,
      "drop_path_rate": 0.1, "schedule": "timm_epoch", "normalization": "imagenet"}),
    ("spt_adapter", "vtab", "dtd", "ziplab/SPT vtab_supervised_spt_adapter.sh",
     {"lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "no_1d", "drop_last": False}),
    # showlab/SCT run_model_sct.sh + configs/model_sct/vtab/*.yaml + train_model_sct.py
    ("sct", "vtab", "cifar", "showlab/SCT run_model_sct.sh, configs/model_sct/vtab/cifar100.yaml",
     {"lr": 0.013, "weight_decay": 1.0, "label_smoothing": 0.1, "batch_size": 64, "drop_last": True,
      "drop_path_rate": 0.1, "schedule": "timm_epoch", "head_init": "torch", "normalization": "imagenet"}),
    ("sct", "vtab", "dmlab", "showlab/SCT run_model_sct.sh, configs/model_sct/vtab/dmlab.yaml",
     {"lr": 0.009, "weight_decay": 0.1, "label_smoothing": 0.0}),
    ("sct", "vtab", "smallnorb_azi", "showlab/SCT run_model_sct.sh",
     {"lr": 0.0062, "weight_decay": 0.005, "label_smoothing": 0.0}),
    # FightingFighting/GPS train_scripts/vit/{vtab,fgvc}/*/train_gps.sh + args.py defaults
    ("gps", "vtab", "patch_camelyon", "FightingFighting/GPS vtab/patch_camelyon/train_gps.sh",
     {"lr": 4e-3, "batch_size": 32, "drop_path_rate": 0.0, "weight_decay": 0.0, "warmup_lr": 1e-7, "min_lr": 1e-8,
      "epochs": 100, "cooldown_epochs": 10, "mixup": 0.0, "label_smoothing": 0.0, "normalization": "backbone"}),
    ("gps", "vtab", "clevr_count", "FightingFighting/GPS vtab/clevr_count/train_gps.sh",
     {"lr": 3e-4, "batch_size": 16, "drop_path_rate": 0.1}),
    ("gps", "fgvc", "NABirds", "FightingFighting/GPS fgvc/nabirds/train_gps.sh",
     {"lr": 1e-4, "batch_size": 32, "drop_path_rate": 0.1, "ema_decay": 0.9998, "mixup": 0.8, "cutmix": 1.0,
      "label_smoothing": 0.1, "train_split": "train+val", "train_crop": "random_resized", "eval_resize": 248}),
    ("gps", "fgvc", "OxfordFlowers", "FightingFighting/GPS fgvc/oxford_flowers/train_gps.sh",
     {"lr": 1e-3, "ema_decay": 0.99, "drop_path_rate": 0.1}),
    ("gps", "fgvc", "StanfordDogs", "FightingFighting/GPS fgvc/stanford_dogs/train_gps.sh",
     {"lr": 1e-4, "batch_size": 64}),
    # heekhero/DTL train_scripts/vit/vtab/*/train_dtl*.sh + train_vit_vtab.py
    ("dtl", "vtab", "cifar", "heekhero/DTL vtab/cifar_100/train_dtl.sh",
     {"lr": 3e-4, "drop_path_rate": 0.1, "weight_decay": 0.05, "batch_size": 32, "drop_last": True,
      "decay_groups": "method", "epochs": 100, "cooldown_epochs": 10, "warmup_lr": 1e-7, "min_lr": 1e-8,
      "normalization": "inception", "selection": "final", "schedule": "timm_train"}),
    ("dtl", "vtab", "dsprites_loc", "heekhero/DTL vtab/dsprites_loc/train_dtl.sh",
     {"lr": 1e-2, "drop_path_rate": 0.0}),
    ("dtl_plus", "vtab", "kitti", "heekhero/DTL vtab/kitti/train_dtl+.sh",
     {"lr": 8e-3, "drop_path_rate": 0.2, "weight_decay": 0.05}),
    # visinf/adapter_plus conf/** + modeling/adaptermodel.py + data/*.py
    ("adapter_plus", "vtab", "svhn", "visinf/adapter_plus conf/train, conf/experiment/vtab/adapter_plus_dim8.yaml",
     {"lr": 1e-3, "weight_decay": 1e-4, "decay_groups": "no_1d", "batch_size": 64, "drop_last": True,
      "warmup_lr": 1e-5, "min_lr": 1e-6, "drop_path_rate": 0.1, "selection": "final", "normalization": "backbone"}),
    ("adapter_plus", "fgvc", "NABirds", "visinf/adapter_plus conf/experiment/fgvc/adapter_plus_dim1-32.yaml",
     {"train_split": "train+val", "train_crop": "random_resized", "eval_resize": 256, "interpolation": "random",
      "drop_last": False, "selection": "final"}),
    # ShoufaChen/AdaptFormer main_image.py + util/lr_sched.py
    ("adaptformer", "vtab", "cifar", "ShoufaChen/AdaptFormer main_image.py",
     {"optimizer": "sgd", "momentum": 0.9, "lr": 0.1, "lr_base_batch": 256, "weight_decay": 0.0,
      "warmup_epochs": 20, "warmup_lr": 0.0, "min_lr": 0.0, "head_norm": "bn", "head_init": "adaptformer",
      "drop_last": True, "schedule": "iter",
      # datasets/image_datasets.py: 0.5 for jx_* (in21k ViT), ImageNet's for mae_pretrain_vit*/swin: the checkpoint's
      "normalization": "backbone"}),
    # Arnav0400/ViT-Slim GLoRA/supernet.py + data/vtab.py
    ("glora", "vtab", "caltech101", "Arnav0400/ViT-Slim GLoRA/supernet.py",
     {"lr": 1e-4, "weight_decay": 1e-4, "epochs": 500, "batch_size": 64, "drop_last": True, "warmup_epochs": 10,
      "warmup_lr": 1e-6, "min_lr": 1e-5, "drop_path_rate": 0.1, "schedule": "timm_epoch", "head_init": "torch",
      "normalization": "imagenet"}),
    # KMnP/vpt
    ("vpt_deep", "vtab", "dmlab", VPT + " (demo.ipynb: batch 64 for dmlab)",
     {"optimizer": "sgd", "momentum": 0.9, "lr_base_batch": 256, "batch_size": 64, "decay_groups": "method",
      "warmup_epochs": 10, "warmup_lr": 0.0, "min_lr": 0.0, "epochs": 100, "head_init": "vpt",
      "normalization": "imagenet", "selection": "tune", "tune_lr": VPT_GRID, "tune_weight_decay": VPT_WD_GRID,
      "schedule": "epoch"}),
    ("vpt_deep", "vtab", "sun397", VPT + " (demo.ipynb: batch 128 for sun397)", {"batch_size": 128}),
    ("vpt_shallow", "fgvc", "NABirds", VPT + " (tune_fgvc.py prompt_main: no 0.05)",
     {"optimizer": "sgd", "tune_lr": VPT_GRID - {0.05}, "tune_weight_decay": VPT_WD_GRID, "drop_last": False}),
    ("linear", "fgvc", "CUB_200_2011", VPT + " (configs/base-linear.yaml, linear_main)",
     {"optimizer": "sgd", "batch_size": 1024, "tune_lr": VPT_GRID, "warmup_epochs": 10, "head_init": "vpt"}),
    ("full", "fgvc", "StanfordCars", VPT + " (configs/base-finetune.yaml, finetune_main)",
     {"optimizer": "adamw", "batch_size": 384, "warmup_epochs": 5, "tune_lr": {0.001, 0.0001, 0.0005, 0.005},
      "decay_groups": "method"}),
    ("bitfit", "vtab", "kitti", VPT + " (tinytl-bias)",
     {"optimizer": "sgd", "decay_groups": "method", "tune_lr": VPT_GRID, "selection": "tune"}),
    ("adapter", "fgvc", "CUB_200_2011", VPT + " (adapter transfer type)",
     {"optimizer": "sgd", "momentum": 0.9, "decay_groups": "method", "head_init": "vpt"}),
    # OSU-MLB/PETL_Vision experiment/config/default_vtab_processed.yml + lr_wd_vtab_processed.yml
    ("ln_tune", "vtab", "eurosat", "OSU-MLB/PETL_Vision default_vtab_processed.yml",
     {"selection": "tune", "tune_lr": {0.001, 0.01}, "tune_weight_decay": {0.0001, 0.001}, "batch_size": 64,
      "drop_path_rate": 0.1, "schedule": "timm_epoch", "drop_last": True, "normalization": "none"}),
]

# Methods that deliberately declare no recipe for a suite (and must say why in recipe_differences).
NO_RECIPE = {("lora", "fgvc"), ("dtl", "fgvc"), ("dtl_plus", "fgvc"), ("repadapter", "fgvc"), ("convpass", "fgvc"),
             ("fact_tt", "fgvc"), ("fact_tk", "fgvc"), ("noah", "fgvc"), ("sct", "fgvc"), ("spt_lora", "fgvc"),
             ("spt_adapter", "fgvc"), ("glora", "fgvc"), ("ln_tune", "fgvc")}


def paper_recipe(method: str, suite: str, task: str) -> dict[str, Any]:
    """The contract's resolution: engine defaults < suite train_defaults < recipe '*' < recipe task."""
    cls = petlbench.get_method(method)
    table = cls.recipes.get(suite, {})
    return {**{k: h.default for k, h in TRAIN_HPARAMS.items()}, **dict(get_suite(suite).train_defaults),
            **table.get("*", {}), **table.get(task, {})}


def _same(declared: Any, official: Any) -> bool:
    if isinstance(official, set):  # a grid: the order of the values does not matter
        return {float(v) for v in str(declared).split(",")} == official
    if isinstance(official, float) and not isinstance(official, bool):
        return declared == pytest.approx(official, rel=1e-9, abs=0.0)
    return declared == official


@pytest.mark.parametrize("method,suite,task,source,facts", OFFICIAL,
                         ids=[f"{m}-{s}-{t}" for m, s, t, _, _ in OFFICIAL])
def test_recipe_matches_the_official_script(method: str, suite: str, task: str, source: str,
                                            facts: dict[str, Any]) -> None:
    recipe = paper_recipe(method, suite, task)
    wrong = {k: (recipe.get(k, "<not declared>"), v) for k, v in facts.items() if not _same(recipe.get(k), v)}
    assert not wrong, f"{method} {suite}/{task} differs from {source}: {{key: (declared, official)}} = {wrong}"


def _builtins() -> list[type[Method]]:
    return [petlbench.get_method(m) for m in petlbench.list_methods()]


def test_every_recipe_key_is_a_training_setting() -> None:
    """Keys and values validate as training settings (passes once rec-engine/rec-data/rec-modules are merged)."""
    for cls in _builtins():
        for suite, table in cls.recipes.items():
            for task, settings in table.items():
                for key, value in settings.items():
                    assert key in TRAIN_HPARAMS, f"{cls.name} {suite}/{task}: {key!r} is not a training setting"
                    TRAIN_HPARAMS[key].coerce(cls.name, key, value)


def test_no_builtin_declares_train_presets() -> None:
    for cls in _builtins():
        for klass in cls.__mro__:
            if klass is Method:
                break
            assert "train_presets" not in vars(klass), f"{klass.__name__} still declares train_presets"


def test_recipes_name_real_tasks_and_say_where_they_come_from() -> None:
    for cls in _builtins():
        for suite, table in cls.recipes.items():
            tasks = set(get_suite(suite).task_names) | {"*"}
            assert set(table) <= tasks, f"{cls.name}: {sorted(set(table) - tasks)} are not {suite} tasks"
            assert "/" in cls.recipe_source.get(suite, ""), f"{cls.name} {suite}: no owner/repo source"


def test_every_builtin_declares_a_recipe_or_says_why_not() -> None:
    for cls in _builtins():
        for suite in ("vtab", "fgvc"):
            if (cls.name, suite) in NO_RECIPE:
                assert suite not in cls.recipes, f"{cls.name} {suite}"
                assert cls.recipe_differences.get(suite, "").startswith("no recipe"), f"{cls.name} {suite}"
            else:
                assert cls.recipes.get(suite, {}).get("*"), f"{cls.name} has no {suite} recipe"
                assert cls.recipe_differences.get(suite), f"{cls.name} {suite}: say what is not reproduced"


# ----------------------------------------------------------------- parameter groups (no weight decay)

def _exempt(model: petlbench.PETLModel, rule: str) -> set[int]:
    """The tensors without weight decay under the contract's ``decay_groups`` rule, by id."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: set[int] = set()
    if "no_1d" in rule:
        out |= {id(p) for n, p in named if p.ndim <= 1 or n.endswith(".bias")}
    if "method" in rule:
        trained = {id(p) for _, p in named}
        out |= {id(p) for p in model.method.no_weight_decay(model.backbone, model.petl)} & trained
    return out


def _official_exempt(model: petlbench.PETLModel, method: str, suite: str) -> set[int]:
    """What the official optimiser exempts, stated in petlbench's tensors (independently of the rule's name)."""
    head = model.backbone.head
    trained = [p for p in model.parameters() if p.requires_grad]
    if method == "ssf":  # timm's groups: every scale / shift (1-D) and the head's bias
        return {id(p) for p in model.petl.parameters()} | {id(head.bias)}
    if method in ("dtl", "vpt_deep", "linear", "bitfit") or (method == "adapter" and suite == "fgvc"):
        return {id(head.bias)}  # DTL: only *.bias (the head's); VPT's SGD: last_layer.bias
    if method == "full":  # VPT's AdamW: every tensor whose name contains "bias", nothing else
        return {id(p) for n, p in model.net.named_parameters() if "bias" in n.rsplit(".", 1)[-1]}
    if method in ("adapter", "adapter_plus", "lora"):  # NOAH / Adapter+ / timm: 1-D tensors and biases
        return {id(p) for p in trained if p.ndim <= 1}
    raise AssertionError(method)


@pytest.mark.parametrize("method,suite", [("ssf", "vtab"), ("dtl", "vtab"), ("vpt_deep", "vtab"), ("linear", "fgvc"),
                                          ("bitfit", "fgvc"), ("full", "fgvc"), ("adapter", "vtab"),
                                          ("adapter", "fgvc"), ("adapter_plus", "vtab"), ("lora", "vtab")])
def test_weight_decay_groups_match_the_official_optimiser(method: str, suite: str) -> None:
    torch.manual_seed(0)
    model = build(method, "vit", **petlbench.get_method(method).resolve(suite=suite))
    rule = paper_recipe(method, suite, "*")["decay_groups"]
    expected = _official_exempt(model, method, suite)
    got = _exempt(model, rule)
    assert got == expected, f"{method} {suite} ({rule}): {len(got)} exempt tensors, official {len(expected)}"
    trained = [p for p in model.parameters() if p.requires_grad]
    assert any(id(p) not in got for p in trained), "something must still decay"
