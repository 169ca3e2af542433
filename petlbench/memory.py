"""Peak memory of live tensors, counted at the dispatcher, on any device.

CUDA's caching allocator keeps a peak counter; the CPU has none. This mode sees every tensor an
op creates (forward activations, the tensors autograd saves, gradients, optimiser state) and is
told when each storage is freed, so its peak is what a training step needs in tensors, on CPU
as on GPU. It leaves out what the allocator adds on top (block rounding, fragmentation, library
workspaces), so on CUDA it sits slightly below ``torch.cuda.max_memory_allocated``; the
benchmark reports both there.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Current and peak bytes of distinct live tensor storages while the mode is active.

    ``existing`` are tensors alive before the mode starts that the measurement must include
    (parameters, gradients, optimiser state, inputs): they count from the start and, if freed
    inside (a gradient set to None), stop counting.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._finalizers: list[weakref.finalize] = []
        for t in existing:
            self._track(t)

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or opaque layouts have no plain storage
            return
        key = storage._cdata  # the C++ storage, shared by every view of it
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        # Storages keep their Python object while the C++ storage lives, so this fires on the real free.
        self._finalizers.append(weakref.finalize(storage, self._free, key))

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out

    def __exit__(self, *exc: Any) -> None:
        for fin in self._finalizers:  # frees after the measurement must not call back into it
            fin.detach()
        self._finalizers.clear()
        return super().__exit__(*exc)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   *extra: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a training step starts with: parameters, their gradients, buffers, optimiser
    state and the given inputs."""
    out: list[torch.Tensor] = [*model.parameters(), *model.buffers(), *extra]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


class PhasePeaks:
    """CUDA allocator peaks per phase of a run (``train``, ``eval``), each phase measured on its own.

    A run alternates training epochs and evaluations; one peak counter read at the end mixes
    them (the evaluation's activations and the test split resident on the device land in the
    training figure). Each phase resets the counter on entry and folds the peak into its own
    maximum on exit. On devices without an allocator counter every figure is None.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.allocated: dict[str, int] = {}
        self.reserved: dict[str, int] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def get(self, name: str, kind: str = "allocated") -> int | None:
        return (self.allocated if kind == "allocated" else self.reserved).get(name)


class _Phase:
    def __init__(self, peaks: PhasePeaks, name: str) -> None:
        self.peaks, self.name = peaks, name

    def __enter__(self) -> _Phase:
        if self.peaks.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.peaks.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        p = self.peaks
        if p.device.type != "cuda":
            return
        alloc, res = torch.cuda.max_memory_allocated(p.device), torch.cuda.max_memory_reserved(p.device)
        p.allocated[self.name] = max(p.allocated.get(self.name, 0), int(alloc))
        p.reserved[self.name] = max(p.reserved.get(self.name, 0), int(res))
