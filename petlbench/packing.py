"""Several runs that share a frozen backbone, trained in one step ("packing").

The runs of a sweep that differ only in what trains (seeds of one method on one task, the
trials of a ``tune`` grid) spend nearly all their time in the same frozen matmuls. A packed
step runs R of them at once: ``torch.func.vmap`` over the runs' trainable tensors (adapters,
heads) with the frozen parameters shared, so every frozen linear sees R x the rows in one
matmul, the per-run modules are batched over R, and one backward serves all R runs.

What stays per run is exactly what a run owns: its initialisation, its data order and
augmentation (its own loader), its optimiser, parameter groups and learning rates (built and
stepped by the unpacked engine's own functions: :func:`petlbench.engine.build_optimizer`,
:func:`petlbench.engine.lr_schedule`), its gradient clipping and its evaluation. The loss is the sum of the runs' mean losses, so run r's
gradients are those of its own loss alone. The numbers therefore equal those of the same runs
trained one by one up to floating-point summation order in the batched kernels (tested);
dropout/drop-path draw from one stream for the pack, so with those on a packed run is an
equally valid, not an identical, draw.

Not packed (the caller trains them alone): fp16 with a gradient scaler (one scaler would
couple the runs), linear probing (already one backbone pass per image), runs whose frozen
tensors differ, and runs with mixup/cutmix or a weight EMA (:data:`UNPACKABLE`: a packed step
has one batch layout and no per-run averaged weights; those runs are never grouped).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlbench import engine
from petlbench.memory import PhasePeaks
from petlbench.precision import apply_matmul_precision, resolve_precision

#: Settings a packed step cannot honour per run (batch mixing, a weight EMA): such runs train alone.
UNPACKABLE = ("mixup", "cutmix", "ema_decay")

_SAME_KEYS = ("epochs", "cooldown_epochs", "batch_size", "eval_batch_size", "warmup_epochs", "precision", "drop_last",
              "label_smoothing", "compile")


def pack_problem(models: Sequence[Any], cfgs: Sequence[Mapping[str, Any]], loaders: Sequence[Any],
                 device: torch.device) -> str | None:
    """Why these runs cannot be packed, or None when they can."""
    if len(models) < 2:
        return "a pack needs at least two runs"
    base = models[0]
    if any(type(m.method) is not type(base.method) or m.method.config != base.method.config for m in models):
        return "the runs use different methods or hyperparameters"
    if any(c.get(k) != cfgs[0].get(k) for c in cfgs for k in _SAME_KEYS):
        return f"the runs differ in a setting packing shares ({', '.join(_SAME_KEYS)})"
    unpackable = [k for k in UNPACKABLE if any(c.get(k) for c in cfgs)]
    if unpackable:
        return f"packing has no per-run batch mixing or weight EMA ({', '.join(unpackable)} set)"
    if base.method.needs_calibration:
        return "the method chooses what trains from each run's own data (calibration); runs differ in their masks"
    if base.method.frozen_features:
        return "linear probing trains on features extracted once; nothing to pack"
    if any(m.backbone_kwargs != base.backbone_kwargs for m in models):
        return "the runs' backbones are built differently (dropout, drop path: one backbone runs the pack)"
    if any(getattr(m, "head_norm", None) is not None for m in models):
        return "head_norm=bn keeps running statistics per run, which a vmapped step cannot update"
    if cfgs[0].get("compile") and len(base.backbone.heads) > 1:
        return "the compiled packed step runs one classifier head per run; this backbone has two (distilled DeiT)"
    if resolve_precision(cfgs[0]["precision"], device).grad_scaler:
        return "fp16 training needs a gradient scaler per run"
    if len({len(loader) for loader in loaders}) != 1 or len({getattr(loader, "num_samples", None) for loader in loaders}) != 1:
        return "the runs' training sets differ in size"
    names = base.trainable_names()
    params0 = dict(base.named_parameters())
    for m in models[1:]:
        if m.trainable_names() != names:
            return "the runs train different tensors"
        for n, p in m.named_parameters():
            q = params0.get(n)
            if q is None or p.shape != q.shape:
                return "the runs' models differ in structure"
            if not p.requires_grad and p.data_ptr() != q.data_ptr() and not torch.equal(p, q):
                return f"the runs' frozen tensor {n} differs (packed runs share one frozen backbone)"
    return None


def share_frozen(models: Sequence[nn.Module]) -> None:
    """Point every run's frozen tensors at the first run's (one backbone in memory, not R)."""
    base = dict(models[0].named_parameters())
    for m in models[1:]:
        for n, p in m.named_parameters():
            if not p.requires_grad:
                p.data = base[n].data


def _packed_features(base: Any, body: dict[str, torch.Tensor], xs: torch.Tensor) -> torch.Tensor:
    """Pooled features of every run: ``base`` with run r's trainable body tensors, on ``xs[r]``."""
    from torch.nn.utils.stateless import _reparametrize_module

    def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with _reparametrize_module(base, params):
            return base.forward_features(x)

    return torch.func.vmap(one, in_dims=(0, 0), randomness="different")(body, xs)


class PackedForward:
    """``logits[r] = models[r](x[r])`` for all r in one vmapped call (frozen tensors shared).

    With ``compile`` the vmapped backbone (up to the pooled features) is compiled once per
    structure and process, like the unpacked engine's: the heads run eagerly after it as one
    batched matmul, so the graph depends on neither the number of classes nor the task.
    """

    def __init__(self, models: Sequence[Any], compile: bool = False, batch_shape: tuple[int, ...] = ()) -> None:
        self.models = list(models)
        base = self.models[0]
        self.names = base.trainable_names()
        self.frozen = {n: p for n, p in base.named_parameters() if not p.requires_grad}
        self.frozen.update(dict(base.named_buffers()))
        self.base = base
        # Each name's R leaves, looked up once (the optimisers update them in place, never replace them)
        self._leaves = {n: [m.get_parameter(n) for m in self.models] for n in self.names}

        def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base, {**self.frozen, **params}, (x,))

        self._vmapped = torch.func.vmap(one, in_dims=(0, 0), randomness="different")
        self.features: engine.MaybeCompiled | None = None
        if compile:
            head = {id(p) for p in base.backbone.head.parameters()}
            named = dict(base.named_parameters())
            self.head_names = [n for n in self.names if id(named[n]) in head]
            self.body_names = [n for n in self.names if id(named[n]) not in head]
            key = (*engine.structure_key(base, batch_shape, True), "packed", len(self.models))
            compiled_fn, counter = engine.FEATURE_COMPILER.get(key, engine.compile_backend(), _packed_features)
            self.features = engine.MaybeCompiled(functools.partial(_packed_features, base), True,
                                                 compiled_fn=functools.partial(compiled_fn, base), counter=counter)

    def _stack(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        # Stacking the runs' own leaves keeps each run's parameters (and optimiser) its own:
        # the stack's backward hands run r exactly its slice of the gradient.
        return {n: torch.stack(self._leaves[n]) for n in names}

    def __call__(self, xs: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # Fused attention has no vmap batching rule yet: it loops over the R runs (the frozen
            # matmuls around it stay batched). Known and measured; not worth a warning per step.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            if self.features is None:
                return self._vmapped(self._stack(self.names), xs)
            feats = self.features(self._stack(self.body_names), xs)
        head = self._stack(self.head_names)
        weight = next(v for n, v in head.items() if n.endswith("weight"))
        bias = next(v for n, v in head.items() if n.endswith("bias"))
        return torch.baddbmm(bias.unsqueeze(1).to(feats.dtype), feats, weight.transpose(1, 2).to(feats.dtype))


def packed_step(forward: PackedForward, params: Sequence[Sequence[nn.Parameter]],
                optimizers: Sequence[torch.optim.Optimizer], xs: torch.Tensor, ys: torch.Tensor,
                cfgs: Sequence[Mapping[str, Any]], plan: Any, device: torch.device) -> torch.Tensor:
    """One optimisation step of every packed run (``xs``: R x B images); returns the R losses
    without a host sync. Run r's part is :func:`petlbench.engine.train_step` of run r."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with plan.context(device):
        logits = forward(xs)
    smoothing = cfgs[0]["label_smoothing"]
    losses = torch.stack([F.cross_entropy(logits[r].float(), ys[r], label_smoothing=smoothing,
                                          ignore_index=engine._PAD_LABEL) for r in range(len(optimizers))])
    losses.sum().backward()  # run r's parameters get the gradient of its own loss only
    for ps, opt, c in zip(params, optimizers, cfgs, strict=True):
        if c["grad_clip"] > 0:
            nn.utils.clip_grad_norm_(ps, c["grad_clip"])
        opt.step()
    return losses.detach()


def train_packed(
    models: Sequence[Any],
    train_loaders: Sequence[Any],
    eval_loaders: Sequence[Mapping[str, Any]],
    cfgs: Sequence[Mapping[str, Any]],
    device: torch.device,
    *,
    select_on: str | None = None,
    eval_every: int = 0,
    peaks: PhasePeaks | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> list[engine.TrainResult]:
    """Train the runs ``models[r]`` (with ``train_loaders[r]``, ``cfgs[r]``) in packed steps; the
    same contract as :func:`petlbench.engine.train` for each run. Raises ValueError when the runs
    cannot be packed (see :func:`pack_problem`)."""
    problem = pack_problem(models, cfgs, train_loaders, device)
    if problem:
        raise ValueError(f"cannot pack these runs: {problem}")
    with engine.on_device(device):
        return _train_packed(models, train_loaders, eval_loaders, cfgs, device, select_on, eval_every, peaks,
                             on_epoch)


def _train_packed(models, train_loaders, eval_loaders, cfgs, device, select_on, eval_every, peaks, on_epoch):
    R = len(models)
    cfgs = [engine.complete(c) for c in cfgs]
    cfg0 = cfgs[0]
    plan = resolve_precision(cfg0["precision"], device)
    apply_matmul_precision(plan, device)
    phase = peaks.phase if peaks is not None else (lambda _name: engine._no_phase())
    share_frozen(models)
    results = [engine.TrainResult(precision=plan.as_dict(), steps_per_epoch=len(train_loaders[0]))
               for _ in range(R)]
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    opts = [engine.build_optimizer(m, ps, c) for m, ps, c in zip(models, params, cfgs, strict=True)]
    pad_to = cfg0["batch_size"] if cfg0["compile"] else 0  # fixed shapes for the compiled graph
    size = getattr(train_loaders[0], "output_size", None)
    forward = PackedForward(models, compile=bool(cfg0["compile"]),
                            batch_shape=(pad_to, 3, *size) if size else (pad_to,))
    epochs = engine.total_epochs(cfg0)
    steps_per_epoch = len(train_loaders[0])
    lrs = [engine.lr_schedule(c, steps_per_epoch) for c in cfgs]  # run r's lr at every iteration
    best = [-1.0] * R
    step = 0
    for epoch in range(epochs):
        for m, loader in zip(models, train_loaders, strict=True):
            m.train()
            loader.set_epoch(epoch)
        t0 = time.perf_counter()
        running = torch.zeros(R, device=device)
        batches = 0
        with phase("train"):
            for batch in zip(*train_loaders, strict=True):
                for opt, run_lrs in zip(opts, lrs, strict=True):
                    for group in opt.param_groups:
                        group["lr"] = run_lrs[step]
                n = int(batch[0][1].shape[0])
                if pad_to:
                    batch = [engine.pad_batch(x, y, pad_to) for x, y in batch]
                xs = torch.stack([x for x, _ in batch])
                ys = torch.stack([y for _, y in batch])
                running += packed_step(forward, params, opts, xs, ys, cfgs, plan, device)
                batches += 1
                step += 1
                for res in results:
                    res.train_images += n
            mean_losses = (running / max(1, batches)).tolist()  # one host sync per epoch
        elapsed = time.perf_counter() - t0
        for r, res in enumerate(results):
            res.train_time_s += elapsed  # the pack's wall time: each run shares it
            if not math.isfinite(mean_losses[r]):
                raise engine.RunFailed(f"non-finite training loss ({mean_losses[r]}) in epoch {epoch + 1} "
                                       f"of packed run {r}")
            res.train_loss.append(mean_losses[r])
        if epoch == epochs - 1 or (eval_every and (epoch + 1) % eval_every == 0):
            t1 = time.perf_counter()
            with phase("eval"):
                for r, (m, res) in enumerate(zip(models, results, strict=True)):
                    m.eval()
                    evaluated, res.evaluated_merged = engine.deployable(m)
                    for name, loader in eval_loaders[r].items():
                        acc = engine.evaluate(evaluated, loader, device, plan)
                        res.curve.append({"epoch": epoch + 1, "split": name, "top1": acc})
                        if name == select_on and acc > best[r]:
                            best[r] = acc
                            res.best_epoch, res.best_val = epoch + 1, acc
                            res.best_state = {k: v.detach().clone() for k, v in m.trainable_state_dict().items()}
                    del evaluated
            for res in results:
                res.eval_time_s += time.perf_counter() - t1
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, sum(mean_losses) / R)
    info = forward.features.summary() if forward.features is not None else engine.NOT_COMPILED
    for res in results:
        res.compile_info = dict(info)
    return results
