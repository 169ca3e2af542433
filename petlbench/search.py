"""Evolutionary search over sub-network configurations, for methods with a supernet stage.

NOAH and GLoRA both train a supernet and then pick one sub-network by the same evolutionary
loop (keep the ``select`` best, breed ``mutation`` children by mutation and ``crossover`` by
crossover, fill the generation with random candidates). The loop is generic; what a candidate
is, how it mutates and how it scores stay in the method's own file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from petlbench.errors import PetlbenchError

C = TypeVar("C", bound=Hashable)


def accuracy(model: nn.Module, loader: Iterable, device: torch.device | str) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``loader``'s ``(images, labels)`` batches, in fp32
    (:func:`petlbench.engine.evaluate` on the batches moved to ``device``)."""
    from petlbench.engine import evaluate

    device = torch.device(device)
    batches = ((batch[0].to(device), batch[1].to(device)) for batch in loader)
    return evaluate(model, batches, device, "fp32") / 100.0


def evolve(
    score: Callable[[C], tuple[float, Any] | None],
    random_candidate: Callable[[], C],
    mutate: Callable[[list[C]], C],
    cross: Callable[[list[C]], C],
    *,
    epochs: int,
    population: int,
    select: int,
    mutation: int,
    crossover: int,
    what: str,
    budget: str,
) -> tuple[C, dict[C, tuple[float, Any]]]:
    """Run the search; return the best candidate and every scored one.

    ``score(candidate)`` returns ``(accuracy, extra)`` or None for a candidate outside the budget
    (it is not kept, and may be drawn again). Each candidate is scored once. Every generation
    draws up to 10x (random: 100x) its quota before giving up, as the official searches do, so an
    infeasible budget ends instead of looping. ``what`` and ``budget`` name the search and its
    budget in the error raised when no candidate fits at all.
    """
    scores: dict[C, tuple[float, Any]] = {}

    def fill(out: list[C], make: Callable[[], C], wanted: int, tries: int) -> None:
        target = len(out) + wanted
        while len(out) < target and tries > 0:
            tries -= 1
            cand = make()
            if cand in scores:
                continue
            result = score(cand)
            if result is not None:
                scores[cand] = result
                out.append(cand)

    candidates: list[C] = []
    fill(candidates, random_candidate, population, 100 * population)
    if not candidates:
        raise PetlbenchError(f"{what} found no sub-network within {budget}. Fix: widen param_limit/min_params.")
    top: list[C] = []
    for _ in range(epochs):
        top = sorted(set(top) | set(candidates), key=lambda c: scores[c][0], reverse=True)[:select]
        candidates = []
        fill(candidates, functools.partial(mutate, top), mutation, 10 * mutation)
        fill(candidates, functools.partial(cross, top), crossover, 10 * crossover)
        fill(candidates, random_candidate, max(population - len(candidates), 0), 100 * population)
    best = max(scores, key=lambda c: scores[c][0])
    return best, scores
