"""Building adapted models, merging them back into plain timm models, and saving what trains.

Data flow: ``create_model`` builds the unmodified timm backbone, loads and verifies its weights,
lets the method add its modules (to ``model.petl``) and hooks, and freezes everything the method
does not train. ``merge`` folds a linear method into a *copy* of the backbone and returns that
plain timm model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petlbench.backbone import Backbone, petl_hooks, remove_petl_hooks
from petlbench.errors import NotMergeableError, PetlbenchError, did_you_mean
from petlbench.method import Method
from petlbench.registry import get_method
from petlbench.weights import WeightsInfo, load_weights


class PETLModel(nn.Module):
    """A timm backbone (``net``, tree unchanged) adapted by one method (modules in ``petl``)."""

    def __init__(
        self,
        net: nn.Module,
        method: Method,
        arch: str,
        backbone_kwargs: Mapping[str, Any] | None = None,
        weights: WeightsInfo | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.petl = nn.ModuleDict()
        self.method = method
        self.arch = arch
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.weights = weights

    @property
    def backbone(self) -> Backbone:
        """The role view of ``net`` (rebuilt on access so copies of the model stay consistent)."""
        return Backbone(self.net, self.arch)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def pooling(self) -> str:
        """What the classifier sees: the method's own pooling if it installs one, else the backbone's."""
        return self.method.pooling or self.backbone.pooling

    @property
    def data_config(self) -> dict[str, Any]:
        """Input size, interpolation and normalisation from the backbone's pretrained config."""
        from timm.data import resolve_data_config

        return resolve_data_config({}, model=self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features (what the head sees)."""
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    # ------------------------------------------------------------ trainable state
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The per-task state: every trainable parameter (adapter + head), nothing frozen."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state") -> None:
        params = dict(self.named_parameters())
        expected = set(self.trainable_names())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        wrong = sorted(k for k in expected & set(state) if tuple(state[k].shape) != tuple(params[k].shape))
        if missing or unexpected or wrong:
            raise PetlbenchError(
                f"{source} does not fit this {self.method.name} model: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, wrong shape {wrong[:4]}. Fix: load it into a model built with the same method, "
                "hyperparameters, backbone and number of classes."
            )
        for key in expected:
            params[key].copy_(state[key].to(params[key].dtype))

    def extra_repr(self) -> str:
        return f"method={self.method!r}, arch={self.arch!r}"


def supported_backbones() -> list[str]:
    """timm architectures whose model class the backbone interface describes."""
    import timm

    names = timm.list_models(module=["vision_transformer", "swin_transformer", "deit"])
    return [n for n in names if "distilled" not in n]


def resolve_arch(backbone: str) -> str:
    """The timm architecture of ``backbone`` (``arch`` or ``arch.tag``); unknown names get a suggestion."""
    import timm

    arch = backbone.split(".", 1)[0]
    if arch not in timm.list_models():
        raise PetlbenchError(did_you_mean(arch, supported_backbones(), "backbone", list_all=False)
                             + " Fix: see `petlbench list backbones`.")
    return arch


def create_model(
    backbone: str,
    method: str,
    num_classes: int,
    pretrained: str | os.PathLike | bool | None = None,
    *,
    backbone_kwargs: Mapping[str, Any] | None = None,
    suite: str | None = None,
    task: str | None = None,
    device: str | torch.device | None = None,
    **method_hparams: Any,
) -> PETLModel:
    """Build ``backbone`` (a timm architecture, optionally ``arch.tag``) adapted by ``method``.

    ``pretrained``: a local weights file, a timm tag already in the local cache (or True for the
    architecture's default tag), or None for random init. ``suite``/``task`` select the presets
    the method's paper publishes; ``method_hparams`` override them. ``backbone_kwargs`` go to
    ``timm.create_model`` (e.g. ``drop_path_rate``, or a tiny ``depth``/``embed_dim`` for tests).
    ``device="meta"`` builds shapes only (parameter counting without allocating memory).
    """
    import timm

    method_cls = get_method(method)
    hparams = method_cls.resolve(method_hparams, suite=suite, task=task)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise PetlbenchError(f"num_classes must be a positive integer, got {num_classes!r}.")
    arch = resolve_arch(backbone)
    kwargs = dict(backbone_kwargs or {})
    if device is not None and str(device) == "meta" and pretrained:
        raise PetlbenchError("cannot load weights onto the meta device; build on a real device instead.")
    try:
        with torch.device(device) if device is not None else nullcontext():
            net = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise PetlbenchError(f"backbone {backbone!r} cannot be built with {kwargs or 'default settings'}: {exc}. "
                             "Fix: check the architecture name/tag and backbone_kwargs.") from None
    bb = Backbone(net, arch)
    weights = load_weights(bb, pretrained) if pretrained not in (None, False) else None
    model = PETLModel(net, method_cls(**hparams), arch, kwargs, weights)
    model.method.check_backbone(bb)
    with torch.device(device) if device is not None else nullcontext():
        model.method.apply(bb, model.petl)
    _check_hooks(model)
    model.requires_grad_(False)
    for param in model.method.trainable(bb, model.petl):
        param.requires_grad_(True)
    return model


def _check_hooks(model: PETLModel) -> None:
    """Hooks must belong to modules the model owns, or copies of the model would share state."""
    owned = {id(m) for m in model.petl.modules()} | {id(m) for m in model.net.modules()}
    for _, _, _, hook in petl_hooks(model.net):
        if id(hook.owner) not in owned:
            raise TypeError(
                f"method {model.method.name!r} attached a hook owned by {type(hook.owner).__name__}, which is not "
                "registered in `petl`; add that module to `petl` so it is saved, counted and copied with the model."
            )


def merge(model: PETLModel) -> nn.Module:
    """Return a plain timm model equal (in eval mode) to ``model``: same classes, no extra parameters.

    ``model`` itself is not changed. Raises :class:`NotMergeableError` for non-linear methods.
    """
    if not isinstance(model, PETLModel):
        raise PetlbenchError(f"merge() expects a model from petlbench.create_model, got {type(model).__name__}.")
    if not model.method.mergeable:
        model.method.merge(model.backbone, model.petl)  # raises NotMergeableError with the method's reason
        raise NotMergeableError(f"method {model.method.name!r} is not mergeable.")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.method.merge(clone.backbone, clone.petl)
    remove_petl_hooks(clone.net)
    net = clone.net
    for param in net.parameters():
        param.requires_grad_(True)
    return net


def save_trainable(model: PETLModel, path: str | os.PathLike) -> Path:
    """Write the per-task trainable state (and what it belongs to) as .safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {
        "method": model.method.name,
        "hparams": model.method.config,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "weights_sha256": model.weights.sha256 if model.weights else "",
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # One metadata key: safetensors writes a multi-key metadata map in arbitrary order, and the
    # same state must always give the same bytes (and SHA-256).
    save_file({k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}, str(tmp),
              metadata={"petlbench": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    return path


def load_trainable(model: PETLModel, path: str | os.PathLike) -> dict[str, Any]:
    """Load a file written by :func:`save_trainable`; returns its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("petlbench", "{}"))
        state = load_file(str(path))
    except Exception as exc:
        raise PetlbenchError(f"trainable-state file {path} cannot be read ({exc}).") from None
    if meta.get("method") not in (None, model.method.name):
        raise PetlbenchError(f"{path} holds {meta['method']!r} parameters, but the model uses {model.method.name!r}.")
    model.load_trainable_state_dict(state, source=str(path))
    return meta


__all__ = ["PETLModel", "create_model", "merge", "save_trainable", "load_trainable", "NotMergeableError"]
