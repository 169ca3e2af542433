"""The loader on a CUDA device, checked on CPU: a fake ``torch.cuda`` records which device and
stream every call used (the streaming path on ``cuda:1``), and a dispatch mode counts the
host-to-device copies per step (the resident path on the ``meta`` device)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from petlbench.data import loader as loader_mod
from petlbench.data.cache import load_images
from petlbench.data.loader import DeviceLoader
from petlbench.data.readers import read_split
from petlbench.data.transforms import transform_spec


@pytest.fixture
def vtab_cached(vtab_root):
    index = read_split("vtab", "cifar", "train800val200", vtab_root)
    return load_images(index, transform_spec("vtab_resize", 32), persist=False)


AUGMENTED = dict(batch_size=4, normalization="inception", crop=28, random_crop=True, flip=True, shuffle=True, seed=2)


class FakeCuda:
    """Enough of torch.cuda for the loader, keeping a log of (call, current device, stream device)."""

    def __init__(self) -> None:
        self.current = 0  # like a fresh process: device 0 is current
        self.log: list[tuple[str, int, Any]] = []
        self.streams: dict[int, FakeStream] = {}
        self.current_streams: dict[int, FakeStream] = {}

    def note(self, what: str, detail: Any = None) -> None:
        self.log.append((what, self.current, detail))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        @contextlib.contextmanager
        def device(dev: Any):
            index = torch.device(dev).index
            previous, fake.current = fake.current, index if index is not None else fake.current
            try:
                yield
            finally:
                fake.current = previous

        def stream_ctx(stream: FakeStream):
            @contextlib.contextmanager
            def ctx():
                previous = fake.current_streams.get(stream.device)
                fake.current_streams[stream.device] = stream
                try:
                    yield
                finally:
                    fake.current_streams[stream.device] = previous or fake.default(stream.device)
            return ctx()

        def current_stream(dev: Any = None) -> FakeStream:
            index = torch.device(dev).index if dev is not None else fake.current
            return fake.current_streams.setdefault(index, fake.default(index))

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(fake, device, "copy"))
        monkeypatch.setattr(torch.cuda, "Event", lambda **_: FakeEvent(fake))
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: fake.note("record_stream", s))

    def default(self, index: int) -> FakeStream:
        return self.streams.setdefault(index, FakeStream(self, index, "default"))


class FakeStream:
    def __init__(self, cuda: FakeCuda, device: Any, kind: str) -> None:
        index = torch.device(device).index if device is not None else cuda.current
        self.cuda, self.device, self.kind = cuda, index, kind
        cuda.note("stream", self)

    def wait_stream(self, other: FakeStream) -> None:
        self.cuda.note("wait_stream", (self, other))

    def __repr__(self) -> str:
        return f"{self.kind}@cuda:{self.device}"


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.stream: FakeStream | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        # torch's default: the current stream of the *current* device
        self.stream = stream if stream is not None else self.cuda.current_streams.get(
            self.cuda.current, self.cuda.default(self.cuda.current))
        self.cuda.note("event.record", self.stream)

    def synchronize(self) -> None:
        self.cuda.note("event.synchronize", self.stream)

    def elapsed_time(self, other: FakeEvent) -> float:
        return 1.0


def test_streaming_on_cuda1_runs_every_call_on_that_device(vtab_cached, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = list(DeviceLoader(vtab_cached.images, vtab_cached.labels, **AUGMENTED))
    fake = FakeCuda()
    fake.install(monkeypatch)
    copies: list[tuple[int, Any, bool, tuple[int, ...]]] = []

    def h2d(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        assert torch.device(device) == torch.device("cuda", 1)
        copies.append((fake.current, fake.current_streams.get(1), non_blocking, tuple(tensor.shape)))
        return tensor.clone()  # stays on the CPU, so the batches can be compared with the CPU loader

    monkeypatch.setattr(loader_mod, "_h2d", h2d)
    loader = DeviceLoader(vtab_cached.images, vtab_cached.labels, device="cuda:1", resident=False, **AUGMENTED)
    assert not loader.resident
    for epoch in range(2):  # the second epoch reuses the pinned buffers
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == len(expected) == 3, epoch
        for (x, y), (xe, ye) in zip(batches, expected, strict=True):
            assert torch.equal(x, xe) and torch.equal(y, ye)  # images still match their labels

    # Every CUDA call ran with cuda:1 current: no stray context on GPU 0.
    assert {current for _, current, _ in fake.log} == {1}
    assert {c[0] for c in copies} == {1}
    events = [detail for what, _, detail in fake.log if what == "event.record"]
    assert events and all(s.device == 1 and s.kind == "copy" for s in events)
    image_copies = [c for c in copies if c[3][1:] == tuple(vtab_cached.images.shape[1:])]
    assert len(image_copies) == 6  # one per batch, nothing else per batch
    assert all(stream is not None and stream.kind == "copy" and stream.device == 1 and nb
               for _, stream, nb, _ in image_copies)
    # the compute stream waits for each copy, and the batch is tied to the compute stream
    waits = [d for what, _, d in fake.log if what == "wait_stream" and d[0].kind == "default"]
    assert len(waits) == 6 and all(a.device == 1 and b.kind == "copy" for a, b in waits)
    records = [d for what, _, d in fake.log if what == "record_stream"]
    assert len(records) == 6 and all(s.kind == "default" and s.device == 1 for s in records)
    # a buffer is refilled only after the event of the copy that read it: 6 batches, 2 buffers
    assert sum(what == "event.synchronize" for what, _, _ in fake.log) == 6 - 2


class HostToDevice(TorchDispatchMode):
    """Counts ops that read a CPU tensor and produce a tensor on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in ins) and any(t.device.type != "cpu" for t in outs):
            self.count += 1
        return out


@pytest.mark.parametrize("recipe", ["vtab", "fgvc"])
def test_no_host_to_device_copy_per_step(vtab_cached, recipe: str) -> None:
    """Resident on an accelerator (``meta`` stands in for CUDA here): after the first epoch, one
    copy per epoch (its order and crop/flip parameters), none per step, whatever the batch count."""
    kwargs = dict(normalization="imagenet", shuffle=True, seed=1, device="meta")
    if recipe == "fgvc":
        kwargs.update(crop=24, random_crop=True, flip=True)
    per_epoch = {}
    for batch_size in (2, 8):
        loader = DeviceLoader(vtab_cached.images, vtab_cached.labels, batch_size=batch_size, **kwargs)
        counts = []
        for _ in range(3):
            with HostToDevice() as mode:
                steps = sum(1 for _ in loader)
            counts.append(mode.count)
        assert steps == len(loader) > 1
        assert counts[0] == 3  # images and labels once, plus the epoch's plan
        per_epoch[batch_size] = counts[1:]
    assert per_epoch[2] == per_epoch[8] == [1, 1]


def test_counter_sees_a_per_step_copy(vtab_cached) -> None:
    """The counter itself: a loop that moves each batch's indices from the host is caught."""
    with HostToDevice() as mode:
        for idx in torch.split(torch.arange(len(vtab_cached)), 4):
            idx.to("meta")
    assert mode.count == -(-len(vtab_cached) // 4)
