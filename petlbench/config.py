"""Training configuration: every setting the engine reads, with defaults, and how they resolve.

Two recipes, never mixed (docs/recipes.md). Resolution, lowest to highest priority:

- harmonised (protocols ``vtab1k``, ``tune``, ``fgvc``, ``legacy-best-test``): the defaults below <
  the suite's ``train_defaults`` (YAML) < a user config file < ``--set key=value``. One recipe for
  every method, so a comparison measures the methods, not their training recipes.
- paper (protocols ``paper``, ``paper-best-test``): the defaults < the suite's ``train_defaults`` <
  the method's ``recipes[suite]["*"]`` < ``recipes[suite][task]`` < config file < ``--set``.

The resolved values, with the protocol, are part of each run's identity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from petlbench.data.transforms import INTERPOLATION_SETTINGS, TRAIN_CROPS, TRAIN_SPLITS
from petlbench.errors import PetlbenchError, did_you_mean, read_user_text
from petlbench.method import HParam, Method
from petlbench.model import HEAD_INITS, HEAD_NORMS

TRAIN_HPARAMS: dict[str, HParam] = {
    "epochs": HParam(100, "training epochs", low=1),
    "batch_size": HParam(64, "training batch size", low=1),
    "eval_batch_size": HParam(256, "evaluation batch size", low=1),
    "lr": HParam(1e-3, "peak learning rate (times batch_size / lr_base_batch when lr_base_batch > 0)", low=0.0,
                 low_exclusive=True),
    "weight_decay": HParam(1e-4, "weight decay of the tensors `decay_groups` decays (AdamW: decoupled; SGD: L2)",
                           low=0.0),
    "warmup_epochs": HParam(10, "linear warm-up epochs (stepped as `schedule` says)", low=0),
    "warmup_lr": HParam(1e-6, "learning rate at the start of warm-up", low=0.0),
    "min_lr": HParam(1e-5, "learning rate at the end of the cosine decay", low=0.0),
    "grad_clip": HParam(0.0, "global gradient-norm clip (0 = off)", low=0.0),
    "label_smoothing": HParam(0.0, "cross-entropy label smoothing", low=0.0, high=0.99),
    "drop_path_rate": HParam(0.0, "stochastic depth of the (frozen) backbone", low=0.0, high=0.99),
    "drop_rate": HParam(0.0, "dropout on the pooled features, right before the classifier head (timm drop_rate); "
                        "embedding and block dropouts are pos_drop_rate, proj_drop_rate, mlp_drop_rate", low=0.0,
                        high=0.99),
    "pos_drop_rate": HParam(0.0, "ViT: dropout after the embeddings (patches + class token + position embedding; "
                            "timm pos_drop_rate)", low=0.0, high=0.99),
    "proj_drop_rate": HParam(0.0, "dropout after the attention projection and after the MLP activation and fc2 of every "
                             "block (timm proj_drop_rate)", low=0.0, high=0.99),
    "mlp_drop_rate": HParam(0.0, "dropout after the MLP activation and after fc2 of every block, not after the attention "
                            "projection (ARC's --vit_drop, together with pos_drop_rate)", low=0.0, high=0.99),
    "drop_last": HParam(False, "drop the last incomplete training batch"),
    "precision": HParam("auto", "auto: bf16 autocast on GPUs with native bf16, fp16 + loss scaling on older ones, "
                        "fp32 on CPU; fp32 uses TF32 matmuls on Ampere+", choices=("auto", "fp32", "bf16", "fp16")),
    "normalization": HParam("backbone", "input normalisation: the backbone's pretrained config or a preset",
                            choices=("backbone", "imagenet", "inception", "none")),
    "head_init": HParam("timm", "classifier-head initialisation: timm (trunc-normal std 0.02, bias 0; timm's "
                        "default), zeros (ARC's code), vpt (VPT's code: kaiming-normal fan-out, bias -log(99)), torch "
                        "(PyTorch's nn.Linear default: Convpass, FacT, RepAdapter), adaptformer (trunc-normal std 0.01, "
                        "PyTorch's default bias)", choices=HEAD_INITS),
    "head_norm": HParam("none", "normalisation before the classifier head: none, or bn (BatchNorm1d without affine, "
                        "eps 1e-6, as AdaptFormer's/MAE's script; batch statistics in training, running ones at "
                        "evaluation, saved with the trained state, folded into the head on merge)",
                        choices=HEAD_NORMS),
    "compile": HParam(False, "torch.compile the model (falls back to eager mode if compilation fails)"),
    "eval_every": HParam(0, "evaluate every N epochs for the learning curve (0 = only at the end)", low=0),
    # Optimiser, parameter groups, schedule stepping, mixing, EMA and selection: what the paper
    # recipes of the methods need (docs/recipes.md). The defaults are the harmonised recipe.
    "optimizer": HParam("adamw", "adamw, or sgd (torch.optim.SGD with `momentum`, weight decay as L2)",
                        choices=("adamw", "sgd")),
    "momentum": HParam(0.9, "SGD momentum (optimizer=sgd only)", low=0.0, high=0.999),
    "lr_base_batch": HParam(0, "0 = off; N > 0: the peak lr used is lr * batch_size / N (the 'base lr' of "
                            "VPT and MAE-style scripts; the record shows both)", low=0),
    "decay_groups": HParam("all", "tensors without weight decay: all (none exempt), no_1d (timm's rule: ndim <= 1, "
                           "names ending in .bias and the backbone's own no_weight_decay() list), method (the "
                           "method's no_weight_decay), no_1d+method (both)",
                           choices=("all", "no_1d", "method", "no_1d+method")),
    "schedule": HParam("iter", "iter: warm-up + cosine per iteration; epoch: the same curve held per epoch (epoch e "
                       "at its value for e: VPT's WarmupCosineSchedule); timm_epoch: timm's CosineLRScheduler "
                       "stepped step(epoch) after each epoch (RepAdapter/FacT/Convpass/NOAH scripts: epochs 0 and 1 "
                       "at warmup_lr); timm_train: stepped step(epoch + 1) (timm's train.py: SSF, GPS)",
                       choices=("iter", "epoch", "timm_epoch", "timm_train")),
    "cooldown_epochs": HParam(0, "epochs at min_lr trained after the `epochs` of the schedule (timm's cooldown)",
                              low=0),
    "mixup": HParam(0.0, "mixup alpha (0 = off); timm Mixup semantics, one lambda per batch", low=0.0),
    "cutmix": HParam(0.0, "cutmix alpha (0 = off); timm Mixup semantics, one box per batch", low=0.0),
    "mixup_prob": HParam(1.0, "probability that a batch is mixed (mixup or cutmix on)", low=0.0, high=1.0),
    "mixup_switch_prob": HParam(0.5, "with mixup and cutmix both on: probability that a mixed batch uses cutmix",
                                low=0.0, high=1.0),
    "ema_decay": HParam(0.0, "0 = off; d > 0: an exponential moving average of the trainable tensors, updated after "
                        "every step, is what is evaluated, selected and kept (timm's model EMA)", low=0.0,
                        high=0.999999),
    "selection": HParam("protocol", "what the official script selects, read by the paper protocols: protocol (the "
                        "suite's honest default), final, val, tune (grid tune_lr x tune_weight_decay), best-test "
                        "(paper-best-test only; final epoch under paper)",
                        choices=("protocol", "final", "val", "tune", "best-test")),
    "tune_lr": HParam("1e-3,1e-2", "learning rates tried by the `tune` protocol (comma-separated)"),
    "tune_weight_decay": HParam("1e-4,1e-3", "weight decays tried by the `tune` protocol (comma-separated)"),
    # Input pipeline (petlbench/data/transforms.py; docs/data-recipes.md).
    "train_crop": HParam("protocol", "training crop: protocol (the suite's transform), random_resized "
                         "(torchvision RandomResizedCrop(S), scale (0.08, 1), ratio (3/4, 4/3), + horizontal flip) "
                         "or center (the evaluation input, no augmentation)", choices=TRAIN_CROPS),
    "eval_resize": HParam(0, "evaluation: resize the shorter side to this, then centre-crop S (0 = the protocol's)",
                          low=0),
    "interpolation": HParam("protocol", "resampling filter of the resizes: protocol (the suite's), bilinear, bicubic, "
                            "or random (timm's: each random resized crop bilinear or bicubic; evaluation bicubic)",
                            choices=INTERPOLATION_SETTINGS),
    "train_split": HParam("protocol", "training split: protocol, or train+val (FGVC: train and val together; "
                          "then nothing may be selected on val)", choices=TRAIN_SPLITS),
    "limit_train": HParam(0, "use only the first N training images (0 = all; smoke tests only)", low=0),
    "limit_eval": HParam(0, "use only the first N evaluation images (0 = all; smoke tests only)", low=0),
}

#: Values a recipe may state that are not training settings: facts about the published number.
RECIPE_ONLY: dict[str, HParam] = {
    "published_runs": HParam(1, "how many runs (seeds) the published number averages", low=1),
}

_WHERE = "training setting"


def _check(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in TRAIN_HPARAMS:
            raise PetlbenchError(f"{source}: " + did_you_mean(key, TRAIN_HPARAMS, _WHERE, label="Known"))
        out[key] = TRAIN_HPARAMS[key].coerce(source, key, value, where=f"{source}: training setting {key!r}")
    return out


#: The grids of the ``tune`` protocol: setting -> (what its values are, whether 0 is allowed).
GRIDS = {"tune_lr": ("learning rates", False), "tune_weight_decay": ("weight decays", True)}


def parse_floats(text: str, key: str) -> list[float]:
    """The values of a comma-separated grid setting: finite numbers, each > 0 for ``tune_lr`` (like
    ``lr``) and >= 0 for ``tune_weight_decay`` (like ``weight_decay``), so that ``nan`` or ``inf``
    is refused when the sweep is planned, not after hours of training (or, for a weight decay of
    inf, a finished run with garbage accuracy)."""
    what, zero = GRIDS.get(key, ("numbers", True))
    fix = f"Fix: e.g. --set {key}={TRAIN_HPARAMS[key].default}" if key in TRAIN_HPARAMS else ""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise PetlbenchError(f"training setting {key!r} must be comma-separated numbers, got {text!r}. {fix}") from None
    if not values:
        raise PetlbenchError(f"training setting {key!r} needs at least one number, got {text!r}. {fix}")
    for value in values:
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            bound = ">= 0" if zero else "> 0"
            raise PetlbenchError(f"training setting {key!r} must list finite {what} {bound}, got {value!r} "
                                 f"in {text!r}. {fix}")
    return values


def suite_train_defaults(suite: Any) -> dict[str, Any]:
    """A suite's ``train_defaults`` checked as training settings; an unknown setting or a bad value is
    one line naming the suite file. (The suite loader in data/ checks only their shape.)"""
    return _check(dict(getattr(suite, "train_defaults", {}) or {}),
                  f"suite file {getattr(suite, 'path', '') or suite.name}: train_defaults")


def train_defaults() -> dict[str, Any]:
    """Every training setting at its engine default."""
    return {k: h.default for k, h in TRAIN_HPARAMS.items()}


def recipe_settings(method: type[Method], suite: str, task: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The method's paper recipe for ``suite``/``task``, checked: (training settings, recipe-only
    values such as ``published_runs``). Both empty when it declares none for ``suite``."""
    raw = method.recipe(suite, task)
    where = f"method {method.name!r} {method.recipe_origin(suite) or 'recipes'}[{suite!r}]"
    extras = {k: RECIPE_ONLY[k].coerce(method.name, k, v, where=f"{where}: {k!r}")
              for k, v in raw.items() if k in RECIPE_ONLY}
    return _check({k: v for k, v in raw.items() if k not in RECIPE_ONLY}, where), extras


def train_layers(
    suite_defaults: Mapping[str, Any],
    method: type[Method],
    suite: str,
    task: str,
    user: Mapping[str, Any],
    *,
    protocol: str,
) -> list[tuple[str, dict[str, Any]]]:
    """The checked layers above the engine defaults, lowest first: ``("suite", ...)``, ``("recipe",
    ...)`` (the method's paper recipe; empty under the harmonised protocols) and ``("set", ...)``
    (config file and ``--set``). ``--dry-run`` tags every value with the layer it came from.

    Under the protocols that select on the test set the suite's ``eval_every`` (a learning-curve
    cadence) is dropped: their cadence is the official one, the recipe's or every epoch.
    """
    from petlbench.protocols import PAPER_PROTOCOLS, TEST_SELECTED

    suite_layer = _check(suite_defaults, f"suite {suite!r} train_defaults")
    recipe = recipe_settings(method, suite, task)[0] if protocol in PAPER_PROTOCOLS else {}
    user_layer = _check(user, "--set")
    if protocol in TEST_SELECTED and "eval_every" not in recipe and "eval_every" not in user_layer:
        suite_layer.pop("eval_every", None)
    return [("suite", suite_layer), ("recipe", recipe), ("set", user_layer)]


def resolve_train(
    suite_defaults: Mapping[str, Any],
    method: type[Method],
    suite: str,
    task: str,
    user: Mapping[str, Any],
    *,
    protocol: str,
) -> dict[str, Any]:
    """The fully resolved training configuration of one run under ``protocol`` (see the module
    docstring for the order)."""
    from petlbench.protocols import PAPER_PROTOCOLS

    out = train_defaults()
    layers = train_layers(suite_defaults, method, suite, task, user, protocol=protocol)
    for _name, layer in layers:
        out.update(layer)
    for key in ("tune_lr", "tune_weight_decay"):
        parse_floats(out[key], key)
    if protocol not in PAPER_PROTOCOLS and out["selection"] != "protocol":
        source = next(f"suite {suite!r} train_defaults" if name == "suite" else "--set"
                      for name, layer in reversed(layers) if "selection" in layer)
        raise PetlbenchError(
            f"{source}: training setting 'selection' is read by the paper protocols only; under --protocol "
            f"{protocol} the protocol decides what is selected. Fix: --protocol paper (or paper-best-test), or drop "
            "`selection`."
        )
    return out


def split_overrides(
    overrides: Mapping[str, Any], methods: Iterable[type[Method]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split ``--set`` pairs into training settings and per-method hyperparameters.

    A key may be a hyperparameter of only some of the selected methods (``--set rank=4`` with
    ``arc,lora``); it applies where it exists. A key nobody knows is an error.
    """
    methods = list(methods)
    train = {k: v for k, v in overrides.items() if k in TRAIN_HPARAMS}
    per_method: dict[str, dict[str, Any]] = {m.name: {} for m in methods}
    for key, value in overrides.items():
        if key in TRAIN_HPARAMS:
            continue
        owners = [m for m in methods if key in m.hparams]
        if not owners:
            known = set(TRAIN_HPARAMS) | {h for m in methods for h in m.hparams}
            raise PetlbenchError(
                "--set: " + did_you_mean(key, known, "setting", label="Known")
                + " (training settings, or hyperparameters of the selected methods)"
            )
        for m in owners:
            per_method[m.name][key] = value
    return train, per_method


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML file of ``key: value`` settings (training or method), optionally with a ``methods:``
    mapping of per-method hyperparameters. Returns {"set": {...}, "methods": {name: {...}}}."""
    import yaml

    path = Path(path)
    text = read_user_text(path, f"config file {path}", "save it as UTF-8 (YAML files are UTF-8)")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PetlbenchError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]}).") from None
    except RecursionError:
        raise PetlbenchError(f"config file {path}: nested too deeply (a corrupt file?). "
                             "Fix: write flat `key: value` settings.") from None
    if not isinstance(data, dict):
        raise PetlbenchError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}.")
    methods = data.pop("methods", {}) or {}
    if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
        raise PetlbenchError(f"config file {path}: `methods` must map method names to mappings of hyperparameters.")
    _string_keys(path, data, "")
    _string_keys(path, methods, "methods")
    for name, hparams in methods.items():
        _string_keys(path, hparams, f"methods.{name}")
    return {"set": data, "methods": methods}


def _string_keys(path: Path, mapping: Mapping[Any, Any], where: str) -> None:
    """YAML keys such as ``1:``, ``true:`` or ``null:`` are not names; say which one, not a TypeError."""
    for key in mapping:
        if not isinstance(key, str):
            place = f"`{where}` has" if where else "has"
            raise PetlbenchError(
                f"config file {path}: {place} the key {key!r} ({type(key).__name__}), not a name. "
                "Fix: write names of settings, methods or hyperparameters as keys (quote them if needed)."
            )
