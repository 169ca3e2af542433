"""The training engine: optimiser, learning-rate schedule, bf16 autocast on GPU, evaluation.

It knows nothing about suites or files: it gets a model, loaders and a resolved training
configuration, and returns curves and timings. Linear probing trains on features extracted once
(one backbone forward per image) instead of 100 epochs of forwards.

The harmonised default is AdamW over every trainable tensor with a per-iteration warm-up +
cosine. What the paper recipes need is here too, written once (docs/recipes.md): SGD with
momentum, ``lr_base_batch`` scaling, weight-decay parameter groups (``decay_groups``), timm's
per-epoch ``CosineLRScheduler`` stepping (``schedule``) with ``cooldown_epochs``, mixup/cutmix
with label smoothing, and an EMA of the trainable tensors (``ema_decay``). None of them adds
work to a step that does not use it: the learning rates of the whole run are computed once, and
the loss of an unmixed batch is the same single cross-entropy as before.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import os
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench.memory import PhasePeaks
from petlbench.precision import Precision, apply_matmul_precision, resolve_precision


class RunFailed(RuntimeError):
    """A run that cannot produce a number (non-finite loss, ...); recorded as failed."""


_PAD_LABEL = -100  # cross_entropy's ignore_index: padded rows add nothing to the loss or the gradients


def compile_backend() -> str:
    """The torch.compile backend (``PETLBENCH_COMPILE_BACKEND``; tests use ``eager``/``aot_eager``)."""
    return os.environ.get("PETLBENCH_COMPILE_BACKEND", "inductor")


class _CountingBackend:
    """A torch.compile backend that counts the graphs it builds and the calls of compiled code.

    Dynamo falls back to eager *silently* (recompile limit, graph it cannot capture); counting
    calls of the compiled graphs is the only way to know that a step really ran compiled.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._dynamo import lookup_backend

        compiled = lookup_backend(self.backend)(gm, example_inputs)
        self.graphs += 1

        def run(*args: Any) -> Any:
            self.calls += 1
            return compiled(*args)
        return run


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


class MaybeCompiled:
    """``torch.compile(fn)`` with a measured fallback and the truth about it.

    If the first compiled call fails the run continues eagerly and says so. Afterwards every
    call checks that compiled code actually ran (dynamo's silent fallbacks: recompile limit,
    frames it skips); ``compiled`` is True only when every call did.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], enabled: bool, *, backend: str | None = None,
                 compiled_fn: Callable[..., torch.Tensor] | None = None,
                 counter: _CountingBackend | None = None) -> None:
        self.fn = fn
        self.counter = counter
        if enabled and compiled_fn is None:
            self.counter = _CountingBackend(backend or compile_backend())
            compiled_fn = torch.compile(fn, backend=self.counter)
        self.compiled_fn = compiled_fn if enabled else None
        self.compiled: bool | None = None if enabled else False
        self.error: str | None = None
        self.calls = 0
        self.eager_calls = 0
        self._graphs0 = self.counter.graphs if self.counter else 0
        self._breaks0 = _graph_breaks() if enabled else 0

    @property
    def graphs_built(self) -> int:
        """Graphs compiled while this wrapper was in use (0: it reused what the process had)."""
        return (self.counter.graphs - self._graphs0) if self.counter else 0

    @property
    def graph_breaks(self) -> int:
        return _graph_breaks() - self._breaks0 if self.compiled_fn is not None else 0

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.compiled_fn is None or (self.compiled is False and self.error is not None):
            self.eager_calls += 1
            return self.fn(*args)
        before = self.counter.calls if self.counter else None
        try:
            out = self.compiled_fn(*args)
        except Exception as exc:  # compilation problems only: after a first success errors are real
            if self.compiled:
                raise
            self.compiled, self.error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.eager_calls += 1
            return self.fn(*args)
        if before is not None and self.counter.calls == before:  # dynamo ran the frame eagerly
            self.eager_calls += 1
            self.compiled = False
        elif self.compiled is None:
            self.compiled = True
        return out

    def summary(self) -> dict[str, Any]:
        """What a record says about compilation."""
        error = self.error
        if error is None and self.eager_calls and self.compiled_fn is not None:
            error = (f"torch.compile fell back to eager in {self.eager_calls} of {self.calls} calls "
                     "(dynamo recompile limit or a frame it skipped)")
        return {"compiled": self.compiled if self.calls else (None if self.compiled_fn is not None else False),
                "compile_error": error, "compile_graphs_built": self.graphs_built,
                "compile_graph_breaks": self.graph_breaks,
                "compile_backend": self.counter.backend if self.counter else None}


def _features(model: Any, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


class _FeatureCompiler:
    """One compiled ``model.forward_features`` per model *structure*, for the whole process.

    The compiled region is the backbone with the method's modules up to the pooled features;
    the classifier head and the loss run eagerly after it, so the graph does not depend on the
    number of classes (the "fixed-width head" of a sweep, without padding any logits), and
    training batches are padded to the full batch size (masked loss), so it does not depend
    on the short last batch either. Models are graph *inputs* (their parameters are lifted), so
    a fresh model of the same structure reuses the graph. Every structure gets its own code
    object, hence its own dynamo cache: a sweep over many methods never reaches the recompile
    limit of one shared function.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[Callable, _CountingBackend]] = {}

    def get(self, key: tuple, backend: str, fn: Callable = _features) -> tuple[Callable, _CountingBackend]:
        key = (*key, backend, fn.__qualname__)
        if key not in self._entries:
            code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_SERIAL)}")  # never reused
            fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
            counter = _CountingBackend(backend)
            self._entries[key] = (torch.compile(fn, backend=counter), counter)
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


_SERIAL = itertools.count()
FEATURE_COMPILER = _FeatureCompiler()


def structure_key(model: Any, batch_shape: tuple[int, ...], training: bool) -> tuple:
    """What a compiled graph depends on: architecture, method and hyperparameters, batch shape."""
    method = model.method
    return (model.arch, repr(sorted(model.backbone_kwargs.items())), type(method).__module__,
            type(method).__qualname__, repr(sorted(method.config.items())), tuple(batch_shape), training,
            tuple(n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(_HEAD_PREFIXES)))


_HEAD_PREFIXES = ("net.head.",)


def compiled_features(model: Any, batch_shape: tuple[int, ...], training: bool, enabled: bool) -> MaybeCompiled:
    """A :class:`MaybeCompiled` over the process-wide compiled features of ``model``'s structure."""
    if not enabled:
        return MaybeCompiled(functools.partial(_features, model), False)
    compiled_fn, counter = FEATURE_COMPILER.get(structure_key(model, batch_shape, training), compile_backend())
    return MaybeCompiled(functools.partial(_features, model), True, compiled_fn=functools.partial(compiled_fn, model),
                         counter=counter)


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` the current CUDA device for everything inside (events, streams, kernels
    launched without an explicit device, the context itself): without it a run on ``cuda:3``
    records events on, and creates a context on, ``cuda:0``.

    It is not switched back on exit: since CUDA 12 selecting a device creates its context, so
    restoring ``cuda:0`` would create exactly the stray context this avoids. The next run sets
    its own device again.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
    yield


def pad_batch(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a short batch to ``size`` rows: zero images with the ignored label, so the mean loss
    and the gradients equal those of the short batch (no layer of a ViT mixes samples)."""
    short = size - x.shape[0]
    if short <= 0:
        return x, y
    return torch.cat([x, x.new_zeros((short, *x.shape[1:]))]), pad_labels(y, size)


def pad_labels(y: torch.Tensor, size: int) -> torch.Tensor:
    """``y`` padded to ``size`` rows with the ignored label (as :func:`pad_batch` pads it)."""
    short = size - y.shape[0]
    return torch.cat([y, y.new_full((short,), _PAD_LABEL)]) if short > 0 else y


NOT_COMPILED = {"compiled": False, "compile_error": None}  # the compile_info of a run that did not ask


@dataclass
class TrainResult:
    curve: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    train_images: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int | None = None
    best_val: float | None = None
    #: :meth:`MaybeCompiled.summary` of the training forward ({"compiled": False, ...} when
    #: compilation was not asked for; empty when nothing could be compiled: linear probing).
    compile_info: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    evaluated_merged: bool = False
    steps_per_epoch: int = 0
    #: A linear probe trained on features extracted once (False: on images, e.g. with mixup).
    probe_on_features: bool = False

    @property
    def compiled(self) -> bool | None:
        return self.compile_info.get("compiled")

    @property
    def compile_error(self) -> str | None:
        return self.compile_info.get("compile_error")


def complete(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with every setting it leaves out at its engine default (a caller of :func:`train`
    may pass only the settings it cares about)."""
    from petlbench.config import train_defaults

    return {**train_defaults(), **cfg}


def peak_lr(cfg: Mapping[str, Any]) -> float:
    """The peak learning rate actually used: ``lr``, or ``lr * batch_size / lr_base_batch`` when
    the recipe states a base lr for a reference batch (VPT, MAE-style scripts)."""
    base = cfg.get("lr_base_batch", 0)
    return cfg["lr"] * cfg["batch_size"] / base if base else cfg["lr"]


def total_epochs(cfg: Mapping[str, Any]) -> int:
    """Epochs trained: the schedule's ``epochs`` plus ``cooldown_epochs`` at ``min_lr``."""
    return cfg["epochs"] + cfg.get("cooldown_epochs", 0)


def lr_at(step: int, total: int, warmup: int, lr: float, start: float, end: float) -> float:
    """Linear warm-up from ``start`` to ``lr`` over ``warmup`` iterations, then cosine to ``end``
    at iteration ``total`` (and ``end`` after it: the cooldown)."""
    if step < warmup:
        return start + (lr - start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return end + 0.5 * (lr - end) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def timm_cosine_lr(t: int, lr: float, epochs: int, warmup: int, warmup_lr: float, min_lr: float) -> float:
    """The value timm's ``CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup,
    warmup_lr_init=warmup_lr, cycle_limit=1)`` gives at ``t`` (epochs): a linear warm-up from
    ``warmup_lr`` that never reaches ``lr`` (it stops one step short), then the cosine of the WHOLE
    ``t / epochs`` (not shifted by the warm-up, so it starts at 0.976 x lr for 10 of 100 epochs), then
    ``min_lr`` once the single cycle is over."""
    if t < warmup:
        return warmup_lr + t * ((lr - warmup_lr) / warmup)
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def lr_schedule(cfg: Mapping[str, Any], steps_per_epoch: int) -> list[float]:
    """The learning rate of every iteration of the run (``total_epochs(cfg) * steps_per_epoch``).

    ``schedule``: ``iter`` steps warm-up + cosine every iteration; ``epoch`` holds that curve's
    value at ``e`` (in epochs) for the whole epoch ``e`` (a ``LambdaLR`` stepped after each epoch:
    VPT's ``WarmupCosineSchedule``). ``timm_epoch`` holds timm's ``CosineLRScheduler`` for a whole
    epoch as the official RepAdapter/FacT/Convpass/NOAH loops do: the scheduler is built before
    training (lr = its value at 0) and ``step(ep)`` runs after epoch ``ep``, so epoch ``e`` trains at
    the value for ``max(0, e - 1)``; ``timm_train`` is timm's train.py (``step(epoch + 1)`` after each
    epoch): epoch ``e`` trains at the value for ``e``.
    """
    lr, epochs = peak_lr(cfg), cfg["epochs"]
    steps = max(1, steps_per_epoch)
    n = total_epochs(cfg) * steps_per_epoch
    schedule = cfg.get("schedule", "iter")
    if schedule == "iter":
        total = max(1, epochs * steps_per_epoch)
        warmup = min(total, cfg["warmup_epochs"] * steps_per_epoch)
        return [lr_at(i, total, warmup, lr, cfg["warmup_lr"], cfg["min_lr"]) for i in range(n)]
    if schedule == "epoch":
        warmup = min(epochs, cfg["warmup_epochs"])
        return [lr_at(i // steps, max(1, epochs), warmup, lr, cfg["warmup_lr"], cfg["min_lr"]) for i in range(n)]
    lag = 1 if cfg["schedule"] == "timm_epoch" else 0
    return [timm_cosine_lr(max(0, i // steps - lag), lr, epochs, cfg["warmup_epochs"], cfg["warmup_lr"], cfg["min_lr"])
            for i in range(n)]


def decay_groups(model: Any, params: list[nn.Parameter], cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Optimiser parameter groups of the trainable ``params`` (order kept): one group with
    ``weight_decay`` for ``decay_groups="all"``; otherwise the exempt tensors in a second group
    with weight decay 0. ``no_1d`` is timm's rule (``param_groups_weight_decay``): ndim <= 1, a name
    ending in ``.bias``, or a name in the backbone's own ``no_weight_decay()`` list (ViT: pos_embed,
    cls_token); ``method`` is :meth:`petlbench.Method.no_weight_decay`."""
    rule, wd = cfg.get("decay_groups", "all"), cfg["weight_decay"]
    if rule == "all":
        return [{"params": list(params), "weight_decay": wd}]
    exempt: set[int] = set()
    if rule in ("no_1d", "no_1d+method"):
        exempt |= {id(p) for p in _timm_no_decay(model)}
    if rule in ("method", "no_1d+method"):
        exempt |= {id(p) for p in model.method.no_weight_decay(model.backbone, model.petl)}
    groups = [{"params": [p for p in params if id(p) not in exempt], "weight_decay": wd},
              {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _timm_no_decay(model: Any) -> list[nn.Parameter]:
    """The parameters timm's rule exempts from weight decay: ndim <= 1, ``*.bias``, and the names
    (glob patterns) the timm model lists in ``no_weight_decay()``, relative to the timm model."""
    import fnmatch

    net = getattr(model, "net", model)
    listed = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
    prefix = "net." if net is not model else ""
    out = []
    for name, p in model.named_parameters():
        inner = name[len(prefix):] if prefix and name.startswith(prefix) else None
        if p.ndim <= 1 or name.endswith(".bias") or (
                inner is not None and any(fnmatch.fnmatch(inner, pattern) for pattern in listed)):
            out.append(p)
    return out


def build_optimizer(model: Any, params: list[nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The run's optimiser over ``params`` (``optimizer``, ``momentum``, ``decay_groups``), at the
    peak learning rate (the schedule sets each step's)."""
    groups = decay_groups(model, params, cfg)
    if cfg.get("optimizer", "adamw") == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr(cfg), momentum=cfg["momentum"])
    return torch.optim.AdamW(groups, lr=peak_lr(cfg))


def mixing(cfg: Mapping[str, Any]) -> bool:
    """True when the recipe mixes batches (mixup or cutmix)."""
    return bool(cfg.get("mixup", 0.0) > 0 or cfg.get("cutmix", 0.0) > 0)


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: Mapping[str, Any], seed: int, epoch: int, step: int
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup/cutmix of one batch with timm's ``Mixup(mode="batch")`` semantics.

    With probability ``mixup_prob`` the batch is mixed: cutmix with probability
    ``mixup_switch_prob`` when both alphas are on (only the one that is on otherwise), lambda ~
    Beta(alpha, alpha) of the chosen kind. Mixup: ``lam * x + (1 - lam) * x.flip(0)``. Cutmix: a
    box of side ``int(S * sqrt(1 - lam))`` centred uniformly (clipped at the borders) is pasted from
    ``x.flip(0)`` and lambda becomes the uncovered fraction. Returns ``(x, y.flip(0), lam)``; the
    target is ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``, which :func:`train_step` applies
    as the same mix of two label-smoothed cross-entropies (equal, by linearity, to timm's
    soft-target cross-entropy). The random numbers come from a CPU generator seeded by
    ``(seed, epoch, step)``, so a seed mixes the same way on every device and in every process.
    """
    import numpy as np

    rng = np.random.default_rng([seed % 2**64, epoch, step])  # SeedSequence takes non-negative words
    if rng.random() >= cfg["mixup_prob"]:
        return x, y, 1.0
    alpha_mix, alpha_cut = cfg["mixup"], cfg["cutmix"]
    cut = alpha_cut > 0 and (alpha_mix <= 0 or rng.random() < cfg["mixup_switch_prob"])
    alpha = alpha_cut if cut else alpha_mix
    lam = float(rng.beta(alpha, alpha))
    flipped = x.flip(0)
    if not cut:
        return x * lam + flipped * (1.0 - lam), y.flip(0), lam
    h, w = x.shape[-2:]
    side = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * side), int(w * side)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, bottom = min(max(cy - cut_h // 2, 0), h), min(max(cy + (cut_h + 1) // 2, 0), h)
    left, right = min(max(cx - cut_w // 2, 0), w), min(max(cx + (cut_w + 1) // 2, 0), w)
    x = x.clone()
    x[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
    return x, y.flip(0), 1.0 - (bottom - top) * (right - left) / float(h * w)


class WeightEMA:
    """An exponential moving average of the trainable tensors (timm's ``ModelEmaV2`` restricted to
    what trains: frozen tensors never change, so their average is themselves).

    :meth:`update` after every optimiser step: ``ema = decay * ema + (1 - decay) * p``, one fused
    multi-tensor op. Evaluation runs inside :meth:`applied` (the averaged weights in the model,
    the trained ones back afterwards); :meth:`finalize` leaves the averaged weights in the model
    for good: the EMA model is the one evaluated, selected, merged and recorded.
    """

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay = list(params), float(decay)
        self.shadow = [p.detach().clone() for p in self.params]
        self._live = [p.detach() for p in self.params]  # views of the trained tensors, built once, not per step

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, self._live, 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.detach() for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in self.params], trained)

    @torch.no_grad()
    def finalize(self) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], self.shadow)


def effective_settings(cfg: Mapping[str, Any], result: TrainResult | None = None) -> dict[str, Any]:
    """What a record says the engine really did with ``cfg``: the peak lr used (after
    ``lr_base_batch`` scaling), epochs trained (cooldown included), iterations per epoch, whether
    the EMA weights were evaluated and whether a linear probe trained on cached features."""
    cfg = complete(cfg)
    out: dict[str, Any] = {"lr": peak_lr(cfg), "epochs_trained": total_epochs(cfg),
                           "evaluated": "ema" if cfg["ema_decay"] > 0 else "trained"}
    if result is not None:
        out.update(steps_per_epoch=result.steps_per_epoch, probe_on_features=result.probe_on_features)
    return out


def _plan(device: torch.device, precision: str | Precision) -> Precision:
    return precision if isinstance(precision, Precision) else resolve_precision(precision, device)


def autocast(device: torch.device, precision: str | Precision) -> contextlib.AbstractContextManager:
    """The autocast region of ``precision`` (a request or a resolved plan) on ``device``."""
    return _plan(device, precision).context(device)


class FeatureLoader:
    """Batches of precomputed features, shuffled like the image loader would be."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool) -> None:
        self.feats, self.labels = feats, labels
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=gen).to(self.feats.device)
        else:
            order = torch.arange(n, device=self.feats.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.feats[idx], self.labels[idx]


@torch.no_grad()
def extract_features(model, loader: Iterable, device: torch.device, precision: str | Precision
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    plan = _plan(device, precision)
    feats, labels = [], []
    for x, y in loader:
        with plan.context(device):
            feats.append(model.forward_features(x).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
             precision: str | Precision) -> float:
    plan = _plan(device, precision)
    correct, total = torch.zeros((), dtype=torch.int64, device=device), 0
    for x, y in loader:
        with plan.context(device):
            logits = forward(x)
        correct += (logits.argmax(dim=-1) == y).sum()  # stays on the device: one sync per evaluation
        total += y.shape[0]
    return 100.0 * int(correct) / max(1, total)


#: A merged model whose output differs from the trained model's by more than this (relative, fp32)
#: is not evaluated: exact merges differ by rounding (~1e-6), a misplaced fold by 1e-2 or more.
MERGE_TOLERANCE = 1e-4


def deployable(model: Any) -> tuple[Any, bool]:
    """The model evaluation should run: merged into the plain backbone when the method merges
    (no adapter branches left, so evaluation is as fast as the plain model), else ``model``.

    The merged model is checked against ``model`` on a fixed probe batch (:func:`merge_error`, two
    small forwards per evaluation); should it differ, the trained model itself is evaluated (and
    ``evaluated_merged`` says so) with a warning: a number always comes from the model trained."""
    import warnings

    from petlbench.errors import NotMergeableError
    from petlbench.model import merge, merge_error

    if not getattr(getattr(model, "method", None), "mergeable", False):
        return model, False
    try:
        merged = merge(model).eval()
    except NotMergeableError:  # a configuration of the method that does not merge
        return model, False
    error = merge_error(model, merged)
    if not error <= MERGE_TOLERANCE:
        warnings.warn(f"method {model.method.name!r}: the merged model differs from the trained one by {error:.2g} "
                      "(relative); evaluating the unmerged model instead.", RuntimeWarning, stacklevel=2)
        return model, False
    return merged, True


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
               params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, device: torch.device,
               precision: str | Precision, label_smoothing: float = 0.0, grad_clip: float = 0.0,
               scaler: torch.amp.GradScaler | None = None,
               mixed: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """One optimisation step; returns the loss without a host sync.

    Gradients are freed *before* the forward, so last step's gradients never sit in memory
    beside this step's activations (for full fine-tuning that is a whole model's worth).
    Labels equal to -100 are padding (see :func:`pad_batch`): they count for nothing. With an
    fp16 ``scaler`` the loss is scaled for the backward and steps with inf/NaN gradients skip.
    ``mixed = (y2, lam)`` (a mixed batch, :func:`mix_batch`): the loss is
    ``lam * CE(logits, y) + (1 - lam) * CE(logits, y2)``, both label-smoothed.
    """
    optimizer.zero_grad(set_to_none=True)
    with _plan(device, precision).context(device):
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, ignore_index=_PAD_LABEL)
    if mixed is not None and mixed[1] != 1.0:
        other = F.cross_entropy(logits.float(), mixed[0], label_smoothing=label_smoothing, ignore_index=_PAD_LABEL)
        loss = mixed[1] * loss + (1.0 - mixed[1]) * other
    if scaler is None:
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def _no_phase() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def train(
    model,
    train_loader,
    eval_loaders: Mapping[str, Any],
    cfg: Mapping[str, Any],
    device: torch.device,
    *,
    select_on: str | None = None,
    eval_every: int = 0,
    seed: int = 0,
    on_epoch: Callable[[int, int, float], None] | None = None,
    peaks: PhasePeaks | None = None,
    merge_for_eval: bool = True,
) -> TrainResult:
    """Train ``model``'s trainable parameters; evaluate ``eval_loaders`` every ``eval_every`` epochs
    and after the last one. With ``select_on`` (a key of ``eval_loaders``), keep the trainable
    state of the epoch with the best accuracy on that split (earliest on ties).

    ``peaks`` collects the CUDA memory peaks of the training and the evaluation phases apart.
    With ``merge_for_eval`` a mergeable method is evaluated merged (same function, fewer ops).
    """
    with on_device(device):
        return _train(model, train_loader, eval_loaders, cfg, device, select_on=select_on, eval_every=eval_every,
                      seed=seed, on_epoch=on_epoch, peaks=peaks, merge_for_eval=merge_for_eval)


def _train(model, train_loader, eval_loaders, cfg, device, *, select_on, eval_every, seed, on_epoch, peaks,
           merge_for_eval) -> TrainResult:
    cfg = complete(cfg)
    result = TrainResult()
    plan = resolve_precision(cfg["precision"], device)
    apply_matmul_precision(plan, device)
    result.precision = plan.as_dict()
    scaler = plan.scaler(device)
    epochs = total_epochs(cfg)
    phase = peaks.phase if peaks is not None else (lambda _name: _no_phase())
    params = [p for p in model.parameters() if p.requires_grad]
    mix = mixing(cfg)
    # Linear probing on fixed inputs (no augmentation): features once, then only the head per step.
    # Mixed images have no cached features: a probe with mixup/cutmix trains on images.
    probe = model.method.frozen_features and not train_loader.random_crop and not train_loader.flip and not mix
    result.probe_on_features = bool(probe)
    head = model.backbone.classifier  # pre-logit features -> logits (distilled DeiT: both heads, averaged)
    features: MaybeCompiled | None = None
    pad_to = 0
    if probe:
        t0 = time.perf_counter()
        with phase("train"):
            feats, labels = extract_features(model, train_loader_no_shuffle(train_loader), device, plan)
        train_iter = FeatureLoader(feats, labels, cfg["batch_size"], True, seed, cfg["drop_last"])
        eval_sets = {}
        with phase("eval"):
            for name, loader in eval_loaders.items():
                f, lab = extract_features(model, loader, device, plan)
                eval_sets[name] = FeatureLoader(f, lab, cfg["eval_batch_size"], False, seed, False)
        result.train_time_s += time.perf_counter() - t0
        forward_train, forward_eval = head, head
    else:
        train_iter, eval_sets = train_loader, dict(eval_loaders)
        if cfg["compile"]:
            # One graph per model structure and process: fixed batch (padded) and the head outside it.
            pad_to = cfg["batch_size"]
            size = getattr(train_loader, "output_size", None)
            shape = (pad_to, 3, *size) if size else (pad_to,)
            features = compiled_features(model, shape, True, True)
            compiled = features

            def forward_train(x: torch.Tensor) -> torch.Tensor:
                return head(compiled(x))
        else:
            forward_train = model
        forward_eval = model

    optimizer = build_optimizer(model, params, cfg)
    steps_per_epoch = len(train_iter)
    result.steps_per_epoch = steps_per_epoch
    lrs = lr_schedule(cfg, steps_per_epoch)  # every iteration's lr, computed once
    ema = WeightEMA(params, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    step = 0
    best = -1.0
    for epoch in range(epochs):
        model.train(not probe)  # probing runs only the head on fixed features
        if probe and getattr(model, "head_norm", None) is not None:
            model.head_norm.train()  # ... whose BatchNorm (head_norm=bn) still learns its statistics
        train_iter.set_epoch(epoch)
        t0 = time.perf_counter()
        running, batches = torch.zeros((), device=device), 0
        with phase("train"):
            for x, y in train_iter:
                lr = lrs[step]
                for group in optimizer.param_groups:
                    group["lr"] = lr
                n = int(y.shape[0])
                mixed = None
                if mix:  # before padding: padded rows must not be mixed into real ones
                    x, y2, lam = mix_batch(x, y, cfg, seed, epoch, batches)
                    mixed = (pad_labels(y2, pad_to), lam)
                if pad_to:
                    x, y = pad_batch(x, y, pad_to)
                running += train_step(forward_train, optimizer, params, x, y, device, plan,
                                      cfg["label_smoothing"], cfg["grad_clip"], scaler, mixed)
                if ema is not None:
                    ema.update()
                batches += 1
                step += 1
                result.train_images += n
            mean_loss = float(running) / max(1, batches)  # one host sync per epoch, not per step
        result.train_time_s += time.perf_counter() - t0
        if not math.isfinite(mean_loss):
            raise RunFailed(f"non-finite training loss ({mean_loss}) in epoch {epoch + 1}")
        result.train_loss.append(mean_loss)
        last = epoch == epochs - 1
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            t1 = time.perf_counter()
            model.eval()
            with phase("eval"), (ema.applied() if ema is not None else contextlib.nullcontext()):
                evaluated, merged = (deployable(model) if merge_for_eval and not probe else (forward_eval, False))
                result.evaluated_merged = merged
                for name, loader in eval_sets.items():
                    acc = evaluate(evaluated, loader, device, plan)
                    result.curve.append({"epoch": epoch + 1, "split": name, "top1": acc})
                    if name == select_on and acc > best:
                        best = acc
                        result.best_epoch, result.best_val = epoch + 1, acc
                        result.best_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
                del evaluated
            result.eval_time_s += time.perf_counter() - t1
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, mean_loss)
    if ema is not None:
        ema.finalize()  # the EMA model is the run's model (saved, merged, timed)
    if features is not None:
        result.compile_info = features.summary()
    elif not cfg["compile"]:
        result.compile_info = dict(NOT_COMPILED)
    return result


def train_loader_no_shuffle(loader):
    """The same images in a fixed order (feature extraction must not depend on the epoch)."""
    if hasattr(loader, "shuffle"):
        fixed = copy.copy(loader)
        fixed.shuffle = False
        fixed.drop_last = False
        return fixed
    return loader
