"""Training configuration: every setting the engine reads, with defaults, and how they resolve.

Resolution, lowest to highest priority: the defaults below < the suite's ``train_defaults``
(YAML) < the method's published ``train_presets`` for the suite (``"*"``, then the task) < a
user config file < ``--set key=value``. The resolved values are part of each run's identity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from petlbench.errors import PetlbenchError, did_you_mean, read_user_text
from petlbench.method import HParam, Method

TRAIN_HPARAMS: dict[str, HParam] = {
    "epochs": HParam(100, "training epochs", low=1),
    "batch_size": HParam(64, "training batch size", low=1),
    "eval_batch_size": HParam(256, "evaluation batch size", low=1),
    "lr": HParam(1e-3, "peak learning rate (AdamW)", low=0.0, low_exclusive=True),
    "weight_decay": HParam(1e-4, "AdamW weight decay (applied to every trainable tensor, as the papers do)", low=0.0),
    "warmup_epochs": HParam(10, "linear warm-up epochs (stepped per iteration)", low=0),
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
                            choices=("backbone", "imagenet", "inception")),
    "head_init": HParam("timm", "classifier-head initialisation: timm (trunc-normal std 0.02, bias 0; timm's "
                        "default), zeros (ARC's code), vpt (VPT's code: kaiming-normal fan-out, bias -log(99)), torch "
                        "(PyTorch's nn.Linear default: Convpass, FacT, RepAdapter), adaptformer (trunc-normal std 0.01, "
                        "PyTorch's default bias)", choices=("timm", "zeros", "vpt", "torch", "adaptformer")),
    "head_norm": HParam("none", "normalisation before the classifier head: none, or bn (BatchNorm1d without affine, "
                        "eps 1e-6, as AdaptFormer's/MAE's script; batch statistics in training, running ones at "
                        "evaluation, saved with the trained state, folded into the head on merge)",
                        choices=("none", "bn")),
    "compile": HParam(False, "torch.compile the model (falls back to eager mode if compilation fails)"),
    "eval_every": HParam(0, "evaluate every N epochs for the learning curve (0 = only at the end)", low=0),
    "tune_lr": HParam("1e-3,1e-2", "learning rates tried by the `tune` protocol (comma-separated)"),
    "tune_weight_decay": HParam("1e-4,1e-3", "weight decays tried by the `tune` protocol (comma-separated)"),
    "limit_train": HParam(0, "use only the first N training images (0 = all; smoke tests only)", low=0),
    "limit_eval": HParam(0, "use only the first N evaluation images (0 = all; smoke tests only)", low=0),
}

_WHERE = "training setting"


def _check(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in TRAIN_HPARAMS:
            raise PetlbenchError(f"{source}: " + did_you_mean(key, TRAIN_HPARAMS, _WHERE, label="Known"))
        out[key] = TRAIN_HPARAMS[key].coerce(source, key, value, where=f"{source}: training setting {key!r}")
    return out


def parse_floats(text: str, key: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise PetlbenchError(f"training setting {key!r} must be comma-separated numbers, got {text!r}.") from None
    if not values or any(v < 0 for v in values):
        raise PetlbenchError(f"training setting {key!r} needs at least one non-negative number, got {text!r}.")
    return values


def resolve_train(
    suite_defaults: Mapping[str, Any],
    method: type[Method],
    suite: str,
    task: str,
    user: Mapping[str, Any],
) -> dict[str, Any]:
    """The fully resolved training configuration of one run."""
    out = {k: h.default for k, h in TRAIN_HPARAMS.items()}
    out.update(_check(suite_defaults, f"suite {suite!r} train_defaults"))
    table = method.train_presets.get(suite, {})
    out.update(_check(table.get("*", {}), f"method {method.name!r} train_presets"))
    out.update(_check(table.get(task, {}), f"method {method.name!r} train_presets"))
    out.update(_check(user, "--set"))
    for key in ("tune_lr", "tune_weight_decay"):
        parse_floats(out[key], key)
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
