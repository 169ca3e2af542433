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
from petlbench.layers import ensure_bias, fold_input
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
        #: Leading tokens the heads read one each (distilled DeiT: 2), 0 for one pooled vector.
        self.head_tokens = Backbone(net, arch).head_tokens
        #: What :func:`calibrate` did ({"images", "batches", "seconds"} or {"restored_from": ...});
        #: None until a calibration-based method has been calibrated.
        self.calibration: dict[str, Any] | None = None
        #: The normalisation before the classifier head (training setting ``head_norm``), set by
        #: :func:`add_head_norm`; None when the head sees the pooled features directly.
        self.head_norm: HeadBatchNorm | None = None

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
        """Pre-logit features: what ``backbone.classifier`` maps to the logits. The pooled vector
        the head sees, or for distilled DeiT its class and distillation tokens (B, 2, D), one per
        head (timm's own pre-logits there are their mean, on which no head of the model runs)."""
        tokens = self.net.forward_features(x)
        if self.head_tokens:
            return tokens[:, : self.head_tokens]
        return self.net.forward_head(tokens, pre_logits=True)

    # ------------------------------------------------------------ trainable state
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def calibration_buffers(self) -> dict[str, torch.Tensor]:
        """The persistent buffers of ``petl`` (a calibration's masks and indices), by model name."""
        params = {n for n, _ in self.petl.named_parameters()}
        return {f"petl.{k}": v for k, v in self.petl.state_dict(keep_vars=True).items() if k not in params}

    def head_norm_state(self) -> dict[str, torch.Tensor]:
        """The running statistics of the head's BatchNorm (``head_norm=bn``), by model name; they are
        learnt from the task's data, so they belong to the per-task state. Empty without one."""
        if self.head_norm is None:
            return {}
        return {f"head_norm.{k}": v for k, v in self.head_norm.state_dict(keep_vars=True).items()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The per-task state: every trainable parameter (adapter + head), the method's buffers
        (calibration results) and the head norm's running statistics, nothing frozen."""
        state = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        state.update({n: b.detach() for n, b in self.calibration_buffers().items()})
        state.update({n: b.detach() for n, b in self.head_norm_state().items()})
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
        saved_norm = any(k.startswith("head_norm.") for k in state)
        if saved_norm != (self.head_norm is not None):
            raise PetlbenchError(
                f"{source} was saved {'with' if saved_norm else 'without'} a BatchNorm before the head (head_norm=bn) "
                f"and this model has {'none' if saved_norm else 'one'}. Fix: build the model with the same head_norm "
                "(petlbench.model.add_head_norm)."
            )
        params = dict(self.named_parameters())
        buffers = {**self.calibration_buffers(), **self.head_norm_state()}
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
    """timm architectures of the timm modules whose model classes the backbone interface describes
    (see :data:`petlbench.backbone.FAMILY_MODULES`); ``petlbench backbone describe`` shows one's roles."""
    import timm

    from petlbench.backbone import FAMILY_MODULES

    modules = sorted({m for names in FAMILY_MODULES.values() for m in names})
    return timm.list_models(module=modules)


def build_on_meta(backbone: str, method: str, num_classes: int = 2, backbone_kwargs: Mapping[str, Any] | None = None,
                  hparams: Mapping[str, Any] | None = None) -> PETLModel | None:
    """``method`` built on ``backbone`` on the ``meta`` device (shapes only: no memory, no weights,
    well under a second for ViT-B) and merged there when it merges, so a refused family, a missing
    role, a width the backbone cannot take or a fold with nowhere to go is found before any data is
    read or any step is trained. Raises that :class:`PetlbenchError`; returns None when the build
    trips over an op without a meta kernel (the real build then reports whatever is real)."""
    try:
        model = create_model(backbone, method, num_classes, backbone_kwargs=backbone_kwargs, device="meta",
                             **dict(hparams or {}))
        if model.method.mergeable:
            try:
                merge(model)
            except NotMergeableError:  # this configuration evaluates unmerged, by design
                pass
    except PetlbenchError:
        raise
    except Exception:  # noqa: BLE001 - an op without a meta kernel; the real build reports real errors
        return None
    return model


def method_problem(backbone: str, method: str, num_classes: int = 2, backbone_kwargs: Mapping[str, Any] | None = None,
                   hparams: Mapping[str, Any] | None = None) -> str | None:
    """Why ``method`` cannot run (or merge) on ``backbone``, in one line, or None when it can
    (:func:`build_on_meta`)."""
    try:
        build_on_meta(backbone, method, num_classes, backbone_kwargs, hparams)
    except PetlbenchError as exc:
        return str(exc)
    return None


def describe_backbone(backbone: str, backbone_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:meth:`Backbone.describe` of ``backbone`` built with ``backbone_kwargs`` (on the ``meta``
    device: nothing allocated or downloaded), plus ``methods``: for every registered method,
    ``"merges"``, ``"runs unmerged"`` or ``"refused: <why>"`` on this backbone."""
    from petlbench.registry import list_methods

    arch = resolve_arch(backbone)
    net, _ = _build_backbone(backbone, arch, 2, None, dict(backbone_kwargs or {}), "meta")
    description = Backbone(net, arch).describe()
    verdicts = {}
    for name in list_methods():
        cls = get_method(name)
        why = cls.refusal(description["family"]) or method_problem(backbone, name, 2, backbone_kwargs)
        verdicts[name] = f"refused: {why}" if why else ("merges" if cls.mergeable else "runs unmerged")
    description["methods"] = verdicts
    return description


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
    ``timm.create_model`` (e.g. ``drop_path_rate``, or a tiny ``depth``/``embed_dim`` for tests),
    except :data:`OWN_BACKBONE_KWARGS` (``mlp_drop_rate``), which petlbench applies itself.
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

    timm_kwargs = {k: v for k, v in kwargs.items() if k not in OWN_BACKBONE_KWARGS}
    try:
        with torch.device(device) if device is not None else nullcontext():
            net = timm.create_model(backbone, pretrained=False, num_classes=num_classes, **timm_kwargs)
    except (TypeError, RuntimeError) as exc:
        raise PetlbenchError(f"backbone {backbone!r} cannot be built with {kwargs or 'default settings'}: {exc}. "
                             "Fix: check the architecture name/tag and backbone_kwargs.") from None
    if kwargs.get("mlp_drop_rate"):
        Backbone(net, arch).set_mlp_dropout(float(kwargs["mlp_drop_rate"]))
    weights = load_weights(Backbone(net, arch), pretrained) if pretrained not in (None, False) else None
    return net, weights


#: Backbone build settings petlbench applies itself, through :class:`Backbone` roles, after timm has
#: built the model (timm has no such argument); every other backbone kwarg goes to ``timm.create_model``.
#: ``mlp_drop_rate``: dropout after the MLP activation and after fc2 only (ARC's ``--vit_drop``).
OWN_BACKBONE_KWARGS = ("mlp_drop_rate",)


def _new_head(net: nn.Module, arch: str, num_classes: int) -> None:
    """A fresh classifier for ``num_classes`` (every head of it), initialised as timm initialises
    ViT and Swin heads (truncated normal, std 0.02; zero bias)."""
    net.reset_classifier(num_classes)
    with torch.no_grad():
        for head in Backbone(net, arch).heads:
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
HEAD_INITS = ("timm", "zeros", "vpt", "torch", "adaptformer")


@torch.no_grad()
def init_head(head: nn.Linear, scheme: str) -> None:
    """(Re-)initialise the classifier head as a published codebase does; the result is part of the run.

    ``timm``: leave the head as timm created it (trunc-normal std 0.02 weight, zero bias; nothing is
    redrawn, so the seeded run is unchanged). ``zeros``: weight and bias zero (ARC's code). ``vpt``: kaiming-normal (fan-out, a=0) weight and
    bias ``-log((1 - 0.01) / 0.01)`` = -4.595 (VPT's ``MLP(special_bias=True)``). ``torch``: PyTorch's
    default ``nn.Linear`` initialisation, weight and bias U(+-1/sqrt(in_features)) (the official
    Convpass, FacT and RepAdapter scripts keep the ``nn.Linear`` that ``reset_classifier`` builds).
    ``adaptformer``: that default, then the weight redrawn trunc-normal std 0.01 (AdaptFormer's
    ``main_image.py``, after MoCo v3), so the bias keeps PyTorch's default.
    """
    if scheme == "timm":
        return
    if scheme == "zeros":
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    elif scheme == "vpt":
        nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
        nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    elif scheme == "torch":
        head.reset_parameters()
    elif scheme == "adaptformer":
        head.reset_parameters()  # weight, then bias: the draws of the official freshly built head
        nn.init.trunc_normal_(head.weight, std=0.01)  # bounds +-2 absolute, as timm's trunc_normal_
    else:
        raise PetlbenchError(f"training setting 'head_init' must be one of {', '.join(HEAD_INITS)}, got {scheme!r}.")


#: Normalisations before the classifier head (training setting ``head_norm``).
HEAD_NORMS = ("none", "bn")


class HeadBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d(affine=False, eps=1e-6)`` on the pooled features, before the classifier head.

    MAE's linear-probing recipe, which AdaptFormer's ``main_image.py`` uses for every image run
    (``model.head = Sequential(BatchNorm1d(in_features, affine=False, eps=1e-6), head)``): PyTorch's
    default momentum 0.1 with running statistics, batch statistics in training, running ones at
    evaluation. It has no parameters (nothing trains), but its running statistics are learnt from
    the task, so they are saved with the trainable state and folded into the head by :func:`merge`.
    Computed in float32 whatever the autocast precision (statistics of bf16 features drift).
    """

    def __init__(self, features: int) -> None:
        super().__init__(features, eps=1e-6, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            raise PetlbenchError(
                f"head_norm=bn got a training batch of {x.shape[0]} image: a BatchNorm needs at least 2 per batch. "
                "Fix: --set drop_last=true (or a batch_size that leaves no single-image last batch)."
            )
        return super().forward(x.float()).to(x.dtype)


def add_head_norm(model: PETLModel, scheme: str) -> None:
    """Put the normalisation ``scheme`` (training setting ``head_norm``) before ``model``'s head.

    ``none``: nothing. ``bn``: a :class:`HeadBatchNorm` as ``model.head_norm``, attached as an input
    transform of the head Linear, so every call of the head (the full forward, the engine's
    compiled-features path, linear probing on cached features) sees normalised features; the
    model's train/eval mode decides batch or running statistics. Call it once, after
    :func:`create_model`; it adds no trainable parameter.
    """
    if scheme not in HEAD_NORMS:
        raise PetlbenchError(f"training setting 'head_norm' must be one of {', '.join(HEAD_NORMS)}, got {scheme!r}.")
    if scheme == "none":
        return
    if model.head_norm is not None:
        raise PetlbenchError("this model already has a head norm; add_head_norm is called once per model.")
    if len(model.backbone.heads) > 1:
        raise PetlbenchError(f"head_norm=bn puts one BatchNorm before one classifier head; {model.arch} has "
                             f"{len(model.backbone.heads)} (distilled DeiT). Fix: --set head_norm=none, or another backbone.")
    head = model.backbone.head
    model.head_norm = HeadBatchNorm(head.in_features).to(head.weight.device)
    model.backbone.transform_input(head, model.head_norm)


#: Training settings that are arguments of the backbone's timm constructor (dropout and drop path):
#: part of the backbone's build, so of its cache key, its compiled-graph key and the plan-time check.
BUILD_SETTINGS = ("drop_path_rate", "drop_rate", "pos_drop_rate", "proj_drop_rate", "mlp_drop_rate")


def backbone_build_kwargs(backbone_kwargs: Mapping[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    """The timm constructor arguments of a run's backbone: ``backbone_kwargs`` plus the non-zero
    :data:`BUILD_SETTINGS` of its training settings ``train`` (zero is timm's default, except
    Swin's drop path, which petlbench leaves as timm sets it)."""
    return {**backbone_kwargs, **{k: train[k] for k in BUILD_SETTINGS if train.get(k)}}


def check_head_norm(cfg: Mapping[str, Any], images: int | None) -> None:
    """Refuse, in one line, training settings under which ``head_norm=bn`` cannot be what it says:
    a one-image batch (no batch statistics) or batches padded with blank images (``compile`` pads
    the short last batch; the blanks would enter the statistics). ``images``: the training set size
    (None at plan time, before the data is read: only the batch size is checked)."""
    if cfg.get("head_norm", "none") != "bn":
        return
    batch, drop_last = int(cfg["batch_size"]), bool(cfg["drop_last"])
    if batch < 2:
        raise PetlbenchError(f"head_norm=bn needs batch_size >= 2 (a BatchNorm on one image has no statistics), got "
                             f"{batch}. Fix: --set batch_size=<2 or more>.")
    if images is None:
        return
    short = images % batch
    if not drop_last and short == 1:
        raise PetlbenchError(f"head_norm=bn: {images} training images in batches of {batch} leave a last batch of one "
                             "image, which a BatchNorm cannot normalise. Fix: --set drop_last=true.")
    if not drop_last and short and cfg.get("compile"):
        raise PetlbenchError(f"head_norm=bn with compile=true: the short last batch ({short} of {batch} images) is "
                             "padded with blank images, which would enter the BatchNorm statistics. "
                             "Fix: --set drop_last=true.")


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
    owned = {id(m) for m in model.modules()}  # the backbone, the method's modules, the head norm
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
        if clone.head_norm is not None:  # eval-mode BatchNorm is affine: fold it into the head exactly
            norm = clone.head_norm
            inv = (norm.running_var.double() + norm.eps).rsqrt()
            fold_input(bb.head, torch.diag(inv), -norm.running_mean.double() * inv)
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
        if bb.has("grid_size"):
            size = tuple(g * s for g, s in zip(bb.grid_size, bb.patch_proj.stride, strict=True))
        else:  # no token grid (ConvNeXt): the input size of its pretrained configuration
            size = tuple(model.data_config["input_size"][1:])
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
    if model.head_norm is not None:
        meta["head_norm"] = "bn"
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
