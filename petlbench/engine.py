"""The training engine: AdamW, per-iteration warm-up + cosine, bf16 autocast on GPU, evaluation.

It knows nothing about suites or files: it gets a model, loaders and a resolved training
configuration, and returns curves and timings. Linear probing trains on features extracted once
(one backbone forward per image) instead of 100 epochs of forwards.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RunFailed(RuntimeError):
    """A run that cannot produce a number (non-finite loss, ...); recorded as failed."""


class MaybeCompiled:
    """``torch.compile(fn)`` with a measured fallback: if the first compiled call fails, the run
    continues eagerly and says so (``compiled`` is then False)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], enabled: bool) -> None:
        self.fn = fn
        self.compiled_fn = torch.compile(fn) if enabled else None
        self.compiled: bool | None = None if enabled else False
        self.error: str | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled_fn is None or self.compiled is False:
            return self.fn(x)
        try:
            out = self.compiled_fn(x)
        except Exception as exc:  # compilation problems only: after a first success errors are real
            if self.compiled:
                raise
            self.compiled, self.error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return self.fn(x)
        self.compiled = True
        return out


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
    compiled: bool | None = None
    compile_error: str | None = None


def lr_at(step: int, total: int, warmup: int, cfg: Mapping[str, Any]) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr``, then cosine to ``min_lr`` (per iteration)."""
    lr, start, end = cfg["lr"], cfg["warmup_lr"], cfg["min_lr"]
    if step < warmup:
        return start + (lr - start) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return end + 0.5 * (lr - end) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


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
def extract_features(model, loader: Iterable, device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        with autocast(device, precision):
            feats.append(model.forward_features(x).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device: torch.device,
             precision: str) -> float:
    correct, total = torch.zeros((), dtype=torch.int64, device=device), 0
    for x, y in loader:
        with autocast(device, precision):
            logits = forward(x)
        correct += (logits.argmax(dim=-1) == y).sum()  # stays on the device: one sync per evaluation
        total += y.shape[0]
    return 100.0 * int(correct) / max(1, total)


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
               params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor, device: torch.device,
               precision: str, label_smoothing: float = 0.0, grad_clip: float = 0.0) -> torch.Tensor:
    """One optimisation step; returns the loss without a host sync.

    Gradients are freed *before* the forward, so last step's gradients never sit in memory
    beside this step's activations (for full fine-tuning that is a whole model's worth).
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        logits = forward(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()


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
) -> TrainResult:
    """Train ``model``'s trainable parameters; evaluate ``eval_loaders`` every ``eval_every`` epochs
    and after the last one. With ``select_on`` (a key of ``eval_loaders``), keep the trainable
    state of the epoch with the best accuracy on that split (earliest on ties)."""
    result = TrainResult()
    precision = cfg["precision"]
    epochs = cfg["epochs"]
    params = [p for p in model.parameters() if p.requires_grad]
    # Linear probing on fixed inputs (no augmentation): features once, then only the head per step.
    probe = model.method.frozen_features and not train_loader.random_crop and not train_loader.flip
    head = model.backbone.head
    if probe:
        t0 = time.perf_counter()
        feats, labels = extract_features(model, train_loader_no_shuffle(train_loader), device, precision)
        train_iter = FeatureLoader(feats, labels, cfg["batch_size"], True, seed, cfg["drop_last"])
        eval_sets = {}
        for name, loader in eval_loaders.items():
            f, lab = extract_features(model, loader, device, precision)
            eval_sets[name] = FeatureLoader(f, lab, cfg["eval_batch_size"], False, seed, False)
        result.train_time_s += time.perf_counter() - t0
        forward_train, forward_eval = head, head
    else:
        train_iter, eval_sets = train_loader, dict(eval_loaders)
        forward_train = MaybeCompiled(model, cfg["compile"])
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
        for x, y in train_iter:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg)
            running += train_step(forward_train, optimizer, params, x, y, device, precision,
                                  cfg["label_smoothing"], cfg["grad_clip"])
            batches += 1
            step += 1
            result.train_images += int(y.shape[0])
        mean_loss = float(running) / max(1, batches)  # one host sync per epoch, not per step
        result.train_time_s += time.perf_counter() - t0
        if not math.isfinite(mean_loss):
            raise RunFailed(f"non-finite training loss ({mean_loss}) in epoch {epoch + 1}")
        result.train_loss.append(mean_loss)
        last = epoch == epochs - 1
        if last or (eval_every and (epoch + 1) % eval_every == 0):
            t1 = time.perf_counter()
            model.eval()
            for name, loader in eval_sets.items():
                acc = evaluate(forward_eval, loader, device, precision)
                result.curve.append({"epoch": epoch + 1, "split": name, "top1": acc})
                if name == select_on and acc > best:
                    best = acc
                    result.best_epoch, result.best_val = epoch + 1, acc
                    result.best_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
            result.eval_time_s += time.perf_counter() - t1
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, mean_loss)
    if isinstance(forward_train, MaybeCompiled):
        result.compiled, result.compile_error = forward_train.compiled, forward_train.error
    return result


def train_loader_no_shuffle(loader):
    """The same images in a fixed order (feature extraction must not depend on the epoch)."""
    if hasattr(loader, "shuffle"):
        fixed = copy.copy(loader)
        fixed.shuffle = False
        fixed.drop_last = False
        return fixed
    return loader
