"""The training engine: AdamW, per-iteration warm-up + cosine, bf16 autocast on GPU, evaluation.

It knows nothing about suites or files: it gets a model, loaders and a resolved training
configuration, and returns curves and timings. Linear probing trains on features extracted once
(one backbone forward per image) instead of 100 epochs of forwards.
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
    x = torch.cat([x, x.new_zeros((short, *x.shape[1:]))])
    y = torch.cat([y, y.new_full((short,), _PAD_LABEL)])
    return x, y


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

    @property
    def compiled(self) -> bool | None:
        return self.compile_info.get("compiled")

    @property
    def compile_error(self) -> str | None:
        return self.compile_info.get("compile_error")


def lr_at(step: int, total: int, warmup: int, cfg: Mapping[str, Any]) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine to ``min_lr`` (per iteration)."""
    lr, start, end = cfg["lr"], cfg["warmup_lr"], cfg["min_lr"]
    if step < warmup:
        return start + (lr - start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return end + 0.5 * (lr - end) * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimisation step; returns the loss without a host sync.

    Gradients are freed *before* the forward, so last step's gradients never sit in memory
    beside this step's activations (for full fine-tuning that is a whole model's worth).
    Labels equal to -100 are padding (see :func:`pad_batch`): they count for nothing. With an
    fp16 ``scaler`` the loss is scaled for the backward and steps with inf/NaN gradients skip.
    """
    optimizer.zero_grad(set_to_none=True)
    with _plan(device, precision).context(device):
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, ignore_index=_PAD_LABEL)
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
    result = TrainResult()
    plan = resolve_precision(cfg["precision"], device)
    apply_matmul_precision(plan, device)
    result.precision = plan.as_dict()
    scaler = plan.scaler(device)
    epochs = cfg["epochs"]
    phase = peaks.phase if peaks is not None else (lambda _name: _no_phase())
    params = [p for p in model.parameters() if p.requires_grad]
    # Linear probing on fixed inputs (no augmentation): features once, then only the head per step.
    probe = model.method.frozen_features and not train_loader.random_crop and not train_loader.flip
    head = model.backbone.head
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

    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = len(train_iter)
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total, cfg["warmup_epochs"] * steps_per_epoch)
    step = 0
    best = -1.0
    for epoch in range(epochs):
        model.train(not probe)  # probing runs only the head on fixed features
        train_iter.set_epoch(epoch)
        t0 = time.perf_counter()
        running, batches = torch.zeros((), device=device), 0
        with phase("train"):
            for x, y in train_iter:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, cfg)
                n = int(y.shape[0])
                if pad_to:
                    x, y = pad_batch(x, y, pad_to)
                running += train_step(forward_train, optimizer, params, x, y, device, plan,
                                      cfg["label_smoothing"], cfg["grad_clip"], scaler)
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
            with phase("eval"):
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
