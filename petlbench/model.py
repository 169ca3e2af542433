"""Building adapted models, merging them back into plain timm models, and saving what trains.

Data flow: ``create_model`` builds the unmodified timm backbone, loads and verifies its weights,
lets the method add its modules (to ``model.petl``) and hooks, and freezes everything the method
does not train. ``merge`` folds a linear method into a *copy* of the backbone and returns that
plain timm model.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petlbench.backbone import Backbone, petl_hooks, remove_petl_hooks
from petlbench.errors import NotMergeableError, PetlbenchError, did_you_mean
from petlbench.layers import ensure_bias
from petlbench.method import Method
from petlbench.registry import get_method
from petlbench.weights import WeightsInfo, load_weights, resolve_source


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
        #: What :func:`calibrate` did ({"images", "batches", "seconds"} or {"restored_from": ...});
        #: None until a calibration-based method has been calibrated.
        self.calibration: dict[str, Any] | None = None

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

    def calibration_buffers(self) -> dict[str, torch.Tensor]:
        """The persistent buffers of ``petl`` (a calibration's masks and indices), by model name."""
        params = {n for n, _ in self.petl.named_parameters()}
        return {f"petl.{k}": v for k, v in self.petl.state_dict(keep_vars=True).items() if k not in params}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The per-task state: every trainable parameter (adapter + head) and the method's buffers
        (calibration results), nothing frozen."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        state.update({n: b.detach() for n, b in self.calibration_buffers().items()})
        return state

    def refreeze(self) -> None:
        """Freeze everything, then unfreeze what the method trains (after apply or calibrate)."""
        self.requires_grad_(False)
        for param in self.method.trainable(self.backbone, self.petl):
            param.requires_grad_(True)

    @torch.no_grad()
    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state") -> None:
        if self.method.needs_calibration and self.calibration is None:
            self._restore_calibration(state, source)
        params = dict(self.named_parameters())
        buffers = self.calibration_buffers()
        expected = set(self.trainable_names()) | set(buffers)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        current = {**params, **buffers}
        wrong = sorted(k for k in expected & set(state) if tuple(state[k].shape) != tuple(current[k].shape))
        if missing or unexpected or wrong:
            raise PetlbenchError(
                f"{source} does not fit this {self.method.name} model: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, wrong shape {wrong[:4]}. Fix: load it into a model built with the same method, "
                "hyperparameters, backbone and number of classes."
            )
        for key in expected:
            current[key].copy_(state[key].to(current[key].dtype))

    def _restore_calibration(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Rebuild an uncalibrated model's calibration from the saved buffers (no data needed)."""
        params = {n for n, _ in self.named_parameters()}
        saved = {k[len("petl."):]: v for k, v in state.items() if k.startswith("petl.") and k not in params}
        if not saved:
            return  # not a calibrated state; the shape check reports what is missing
        device = next(iter(self.net.parameters())).device
        self.method.restore_calibration(self.backbone, self.petl, saved)
        self.petl.to(device)
        _check_hooks(self)
        self.refreeze()
        self.calibration = {"restored_from": source}

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
    reuse_backbone: bool = False,
    **method_hparams: Any,
) -> PETLModel:
    """Build ``backbone`` (a timm architecture, optionally ``arch.tag``) adapted by ``method``.

    ``pretrained``: a local weights file, a timm tag already in the local cache (or True for the
    architecture's default tag), or None for random init. ``suite``/``task`` select the presets
    the method's paper publishes; ``method_hparams`` override them. ``backbone_kwargs`` go to
    ``timm.create_model`` (e.g. ``drop_path_rate``, or a tiny ``depth``/``embed_dim`` for tests).
    ``device="meta"`` builds shapes only (parameter counting without allocating memory).
    ``reuse_backbone``: take the backbone from the per-process cache (:data:`BACKBONES`): built,
    loaded and hashed once, copied per model, with a fresh head. The backbone is then built
    outside the caller's random stream, so a model's initialisation is the same whether the
    cache had it or not (but differs from a model built without the cache).
    """
    method_cls = get_method(method)
    hparams = method_cls.resolve(method_hparams, suite=suite, task=task)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise PetlbenchError(f"num_classes must be a positive integer, got {num_classes!r}.")
    arch = resolve_arch(backbone)
    kwargs = dict(backbone_kwargs or {})
    if device is not None and str(device) == "meta" and pretrained:
        raise PetlbenchError("cannot load weights onto the meta device; build on a real device instead.")
    if reuse_backbone and (device is None or str(device) == "cpu"):
        net, weights = BACKBONES.get(backbone, arch, num_classes, pretrained, kwargs)
    else:
        net, weights = _build_backbone(backbone, arch, num_classes, pretrained, kwargs, device)
    bb = Backbone(net, arch)
    model = PETLModel(net, method_cls(**hparams), arch, kwargs, weights)
    model.method.check_backbone(bb)
    with torch.device(device) if device is not None else nullcontext():
        model.method.apply(bb, model.petl)
    _check_hooks(model)
    model.refreeze()
    return model


def _build_backbone(backbone: str, arch: str, num_classes: int, pretrained: Any, kwargs: Mapping[str, Any],
                    device: str | torch.device | None = None) -> tuple[nn.Module, WeightsInfo | None]:
    import timm

    try:
        with torch.device(device) if device is not None else nullcontext():
            net = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise PetlbenchError(f"backbone {backbone!r} cannot be built with {kwargs or 'default settings'}: {exc}. "
                             "Fix: check the architecture name/tag and backbone_kwargs.") from None
    weights = load_weights(Backbone(net, arch), pretrained) if pretrained not in (None, False) else None
    return net, weights


def _new_head(net: nn.Module, arch: str, num_classes: int) -> None:
    """A fresh classifier for ``num_classes``, initialised as timm initialises ViT and Swin heads
    (truncated normal, std 0.02; zero bias)."""
    net.reset_classifier(num_classes)
    head = Backbone(net, arch).head
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)


class BackboneCache:
    """Backbones built, loaded and hashed once per process, handed out as copies.

    A sweep runs dozens of models on one backbone; building it, reading the weights file and
    hashing it (seconds for ViT-B) are paid once. Keyed by architecture, build arguments and the
    weights file's path, size and modification time (a file changed in place is read again). The
    pristine copy stays on the CPU; each model gets its own deep copy with a new head.
    """

    def __init__(self, maxsize: int = 2) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, tuple[nn.Module, WeightsInfo | None]] = OrderedDict()
        self.builds = 0

    def _key(self, backbone: str, arch: str, pretrained: Any, kwargs: Mapping[str, Any]) -> tuple:
        source: tuple = (None,)
        if pretrained not in (None, False):
            path, description = resolve_source(pretrained, arch)
            st = path.stat()
            source = (str(path.resolve()), description, st.st_size, st.st_mtime_ns)
        return backbone, repr(sorted(kwargs.items())), source

    def get(self, backbone: str, arch: str, num_classes: int, pretrained: Any, kwargs: Mapping[str, Any]
            ) -> tuple[nn.Module, WeightsInfo | None]:
        key = self._key(backbone, arch, pretrained, kwargs)
        if key not in self._entries:
            with torch.random.fork_rng(devices=[]):  # the caller's random stream must not depend on a hit
                net, weights = _build_backbone(backbone, arch, 1, pretrained, kwargs)
            self.builds += 1
            net.requires_grad_(False)
            self._entries[key] = (net, weights)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        pristine, weights = self._entries[key]
        net = copy.deepcopy(pristine)
        _new_head(net, arch, num_classes)
        net.requires_grad_(True)  # as timm builds it; create_model freezes what the method does not train
        return net, weights

    def clear(self) -> None:
        self._entries.clear()


BACKBONES = BackboneCache()


#: Classifier-head initialisations (training setting ``head_init``), by the code they come from.
HEAD_INITS = ("timm", "zeros", "vpt")


@torch.no_grad()
def init_head(head: nn.Linear, scheme: str) -> None:
    """(Re-)initialise the classifier head as a published codebase does; the result is part of the run.

    ``timm``: leave the head as timm created it (trunc-normal std 0.02 weight, zero bias; nothing is
    redrawn, so the seeded run is unchanged). ``zeros``: weight and bias zero (ARC's code). ``vpt``: kaiming-normal (fan-out, a=0) weight and
    bias ``-log((1 - 0.01) / 0.01)`` = -4.595 (VPT's ``MLP(special_bias=True)``).
    """
    if scheme == "timm":
        return
    if scheme == "zeros":
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    elif scheme == "vpt":
        nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
        nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    else:
        raise PetlbenchError(f"training setting 'head_init' must be one of {', '.join(HEAD_INITS)}, got {scheme!r}.")


def calibrate(model: PETLModel, loader: Any, device: str | torch.device | None = None) -> dict[str, Any] | None:
    """Run the method's calibration step on ``loader`` (the task's training batches), if it has one.

    Call it after :func:`create_model` (and after moving the model to ``device``), before building
    the optimiser. Returns what was done ({"images", "batches", "seconds"}), also kept as
    ``model.calibration``; None for methods without a calibration step.
    """
    import time

    method = model.method
    if not method.needs_calibration:
        return None
    name = method.name
    size = len(loader) if loader is not None and hasattr(loader, "__len__") else None
    if loader is None or size == 0:
        raise PetlbenchError(
            f"method {name!r} chooses what trains from gradients on the task's training data, but its calibration "
            "loader has no training batches. Fix: run it on a task with a non-empty training split (check "
            "limit_train and the split files)."
        )
    dev = torch.device(device) if device is not None else next(iter(model.net.parameters())).device
    counted = _CountingLoader(loader)
    was_training = model.training
    start = time.perf_counter()
    method.calibrate(model.backbone, model.petl, counted, dev)
    seconds = time.perf_counter() - start
    if counted.batches == 0:
        raise PetlbenchError(
            f"method {name!r}: its calibration step saw no training batch (the loader yielded nothing). Fix: run it "
            "on a task with a non-empty training split."
        )
    model.petl.to(dev)
    _check_hooks(model)
    model.refreeze()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    model.calibration = {"images": counted.images, "batches": counted.batches, "seconds": round(seconds, 3)}
    return model.calibration


class _CountingLoader:
    """Wraps a loader to count the batches and images a calibration step really used."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.batches, self.images = loader, 0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches += 1
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            self.images += int(first.shape[0]) if hasattr(first, "shape") else 0
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def _check_hooks(model: PETLModel) -> None:
    """Hooks must belong to modules the model owns, or copies of the model would share state."""
    owned = {id(m) for m in model.petl.modules()} | {id(m) for m in model.net.modules()}
    for _, _, _, hook in petl_hooks(model.net):
        if id(hook.owner) not in owned:
            raise TypeError(
                f"method {model.method.name!r} attached a hook owned by {type(hook.owner).__name__}, which is not "
                "registered in `petl`; add that module to `petl` so it is saved, counted and copied with the model."
            )


#: Attribute of a merged model: the timm constructor arguments it needs beyond the adapted model's
#: own ``backbone_kwargs`` (e.g. ``{"qkv_bias": True}`` when a shift was folded into a qkv built
#: without a bias); ``{}`` when the merged model is the same architecture.
MERGED_KWARGS = "petlbench_merged_kwargs"


def merge(model: PETLModel) -> nn.Module:
    """Return a plain timm model equal (in eval mode) to ``model``: same classes, no extra parameters.

    ``model`` itself is not changed. Raises :class:`NotMergeableError` for non-linear methods, and
    for a mergeable method that cannot fold into this backbone (``method.unmerged_reason``).
    When a shift had to go into a linear built without a bias, that linear gets a bias, and so
    does every layer of the same timm argument (zero, so the function is unchanged): the result
    is the timm model built with that argument True, recorded as ``merged.petlbench_merged_kwargs``
    (see :func:`merged_backbone_kwargs`).
    """
    if not isinstance(model, PETLModel):
        raise PetlbenchError(f"merge() expects a model from petlbench.create_model, got {type(model).__name__}.")
    if not model.method.mergeable:
        reason = getattr(model.method, "unmerged_reason", None)
        if reason:  # a mergeable method that cannot fold into this backbone
            raise NotMergeableError(f"method {model.method.name!r} cannot be merged into {model.arch}: {reason}; "
                                    "deploy the unmerged model.")
        model.method.merge(model.backbone, model.petl)  # raises NotMergeableError with the method's reason
        raise NotMergeableError(f"method {model.method.name!r} is not mergeable.")
    clone = copy.deepcopy(model)
    bb = clone.backbone
    had_bias = {id(m) for m in clone.net.modules() if isinstance(m._parameters.get("bias"), nn.Parameter)}
    with torch.no_grad():
        clone.method.merge(bb, clone.petl)
    remove_petl_hooks(clone.net)
    net = clone.net
    setattr(net, MERGED_KWARGS, _complete_added_biases(bb, had_bias, model.method.name))
    for param in net.parameters():
        param.requires_grad_(True)
    return net


def _complete_added_biases(bb: Backbone, had_bias: set[int], method: str) -> dict[str, bool]:
    """Give every layer of each timm bias argument a bias once a merge added one to any of them (a
    zero bias: same function), so the merged model is the timm model built with that argument."""
    added: dict[str, bool] = {}
    for module in bb.model.modules():
        if id(module) in had_bias or not isinstance(module._parameters.get("bias"), nn.Parameter):
            continue
        argument = bb.bias_argument(module)
        if argument is None:
            raise PetlbenchError(f"method {method!r} merged a bias into a {type(module).__name__} that no timm argument "
                                 "gives one; the merged model would not be a plain timm model. Deploy unmerged.")
        added[argument] = True
    for argument in added:
        for layer in bb.bias_group(argument):
            ensure_bias(layer, "a linear layer")
    return added


def merged_backbone_kwargs(merged: nn.Module) -> dict[str, bool]:
    """The timm arguments a merged model needs beyond its adapted model's ``backbone_kwargs``
    (``{}`` for a model :func:`merge` did not return, or one of the same architecture)."""
    return dict(getattr(merged, MERGED_KWARGS, {}) or {})


@torch.no_grad()
def merge_error(model: PETLModel, merged: nn.Module, x: torch.Tensor | None = None) -> float:
    """max |merged(x) - model(x)| / max |model(x)| in fp32 without TF32 and in eval mode: the check
    that a merged model is the trained one. ``x`` defaults to a fixed random batch of two images
    at the size the backbone was built for (its patch grid times the patch stride).

    Merges are exact folds computed in float64, so this is rounding (~1e-6); a site folded on the
    wrong side of a LayerNorm shows up as a difference of order 1e-2 or more."""
    param = next(iter(model.net.parameters()))
    if x is None:
        bb = model.backbone
        size = tuple(g * s for g, s in zip(bb.grid_size, bb.patch_proj.stride, strict=True))
        x = torch.randn(2, bb.in_chans, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.eval()
        merged.eval()
        want, got = model(x).double(), merged(x).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        model.train(was_training)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


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
    if model.calibration is not None:
        meta["calibration"] = {k: v for k, v in model.calibration.items() if k != "seconds"}
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


__all__ = ["PETLModel", "calibrate", "create_model", "merge", "merge_error", "merged_backbone_kwargs", "save_trainable",
           "load_trainable", "NotMergeableError"]
