"""Batches from a uint8 image cache, with augmentation and normalisation done per batch on the device.

Per-sample work in Python (the usual ``Dataset.__getitem__`` + ``DataLoader`` workers) is the
bottleneck for small ViT fine-tuning runs. Here an epoch is a permutation; a batch is one
``index_select`` of uint8 rows, one host-to-device copy (pinned, asynchronous, double
buffered), one gather that does every sample's random crop *and* horizontal flip at once, and
one fused multiply-add for ``(x / 255 - mean) / std``. Images cached at their native size
(smaller than the model's input) are resized on the device, as PIL would: a resident split once,
at its first epoch (the resize is deterministic), a streamed one per batch.

No batch makes a synchronous host-to-device copy: the epoch's order and augmentation parameters
go to the device in one asynchronous copy per epoch and each batch slices them there, so the CPU
can run ahead of the GPU. Every host-to-device copy goes through :func:`_h2d` (tests count them).

Randomness (order, crop offsets, flips) comes from a CPU ``torch.Generator`` seeded from
``(seed, epoch)``, so a given seed yields the same batches on CPU and GPU and across runs.
Each ``iter()`` uses the current epoch and then advances it; :meth:`DeviceLoader.set_epoch`
jumps to a given epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from petlbench.data.cache import CachedSplit
from petlbench.data.transforms import Normalization, center_offset, resolve_normalization

_RESIDENT_MAX_BYTES = 4 << 30


def _h2d(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """The loader's only way onto the device: one place to audit (and, in tests, count) copies."""
    return tensor.to(device, non_blocking=non_blocking)


def _mix(seed: int, epoch: int) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 63)


class DeviceLoader:
    """Iterate ``(images, labels)`` batches on ``device``: images ``B x 3 x S x S`` of ``dtype``, labels int64."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        normalization: Normalization | str,
        crop: int | None = None,
        random_crop: bool = False,
        flip: bool = False,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        resident: bool | None = None,
        channels_last: bool = False,
        resize: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be a uint8 N x H x W x 3 tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if resize is not None and resize < 1:
            raise ValueError(f"resize must be a positive size, got {resize}")
        self.resize = int(resize) if resize is not None else None
        height, width = (self.resize, self.resize) if self.resize is not None else (int(images.shape[1]), int(images.shape[2]))
        self.stored_size = (height, width)  # per-sample size before any crop (after the device resize)
        self.crop = int(crop) if crop is not None else None
        if self.crop is not None and (self.crop > height or self.crop > width):
            raise ValueError(f"crop {self.crop} is larger than the images ({height}x{width})")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.batch_size = int(batch_size)
        self.normalization = resolve_normalization(normalization)
        self.random_crop = bool(random_crop) and self.crop is not None
        self.flip = bool(flip)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self.epoch = 0
        cuda = self.device.type == "cuda"
        if resident is None:
            resident = self._fits_on_device() if cuda else True
        self.resident = resident or not cuda  # streaming only makes sense towards an accelerator
        self.pin = cuda and not resident
        self._device_images: torch.Tensor | None = None
        self._device_labels: torch.Tensor | None = None
        self._streaming: tuple[Any, list[torch.Tensor], list[Any]] | None = None  # copy stream, buffers, events
        mean = torch.tensor(self.normalization.mean, dtype=torch.float32)
        std = torch.tensor(self.normalization.std, dtype=torch.float32)
        # (x / 255 - mean) / std  ==  x * scale + shift
        with self._on_device():
            self._scale = _h2d((1.0 / (255.0 * std)).view(1, 3, 1, 1), self.device)
            self._shift = _h2d((-mean / std).view(1, 3, 1, 1), self.device)

    @classmethod
    def for_split(
        cls,
        cached: CachedSplit,
        *,
        train: bool,
        batch_size: int,
        normalization: Normalization | str,
        shuffle: bool | None = None,
        **kwargs: Any,
    ) -> DeviceLoader:
        """A loader applying ``cached.spec``'s train or eval recipe (and the device resize of a split
        stored at native resolution); shuffles when training unless told."""
        spec = cached.spec
        mode = spec.crop_mode(train)
        return cls(
            cached.images, cached.labels, batch_size=batch_size, normalization=normalization,
            crop=spec.image_size if mode != "none" else None, random_crop=mode == "random",
            flip=spec.flip(train), shuffle=train if shuffle is None else shuffle,
            resize=cached.device_resize, **kwargs,
        )

    def _fits_on_device(self, nbytes: int | None = None) -> bool:
        nbytes = self.images.numel() if nbytes is None else nbytes
        if self.device.type != "cuda":
            return nbytes <= _RESIDENT_MAX_BYTES
        try:
            free, _total = torch.cuda.mem_get_info(self.device)
        except (RuntimeError, AssertionError):  # no usable CUDA: the first .to(device) will say why
            return False
        return nbytes <= min(_RESIDENT_MAX_BYTES, free // 4)

    def _resident_images(self) -> torch.Tensor:
        """The split on the device; a native-resolution split resized there once (in batch-sized
        chunks), not again every epoch, when the resized split fits; else it is resized per batch."""
        images = _h2d(self.images, self.device)
        side = self.resize
        if side is None or self.num_samples == 0 or not self._fits_on_device(self.num_samples * side * side * 3):
            return images
        return torch.cat([self._resized(chunk) for chunk in torch.split(images, self.batch_size)])

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop, self.crop
        return self.stored_size

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``'s order and augmentation."""
        self.epoch = int(epoch)

    def describe(self) -> dict[str, Any]:
        """What the loader does, for result records."""
        return {
            "batch_size": self.batch_size, "crop": self.crop, "random_crop": self.random_crop, "flip": self.flip,
            "shuffle": self.shuffle, "drop_last": self.drop_last, "seed": self.seed,
            "normalization": self.normalization.as_dict(), "dtype": str(self.dtype).replace("torch.", ""),
            "device_resize": self.resize,
        }

    def _epoch_plan(self, gen: torch.Generator) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """This epoch's batches as ``(start, stop)`` spans of one ``4 x n`` int64 plan (rows: sample
        index, crop top, crop left, flip), drawn on the CPU so a seed gives the same batches on any
        device, in the same order as ever (permutation, then per batch: tops, lefts, flips)."""
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        batches = list(torch.split(order, self.batch_size))
        if self.drop_last and batches and batches[-1].numel() < self.batch_size:
            batches.pop()
        used = sum(int(idx.numel()) for idx in batches)
        plan = torch.zeros((4, used), dtype=torch.int64)
        out_h, out_w = self.output_size
        plan[1] = center_offset(self.stored_size[0], out_h)
        plan[2] = center_offset(self.stored_size[1], out_w)
        spans: list[tuple[int, int]] = []
        start = 0
        for idx in batches:
            stop = start + int(idx.numel())
            plan[0, start:stop] = idx
            oy, ox, flips = self._draw(stop - start, gen)
            if oy is not None and ox is not None:
                plan[1, start:stop] = oy
                plan[2, start:stop] = ox
            if flips is not None:
                plan[3, start:stop] = flips.to(torch.int64)
            spans.append((start, stop))
            start = stop
        return spans, plan

    def _on_device(self) -> contextlib.AbstractContextManager[Any]:
        """Every CUDA call of the loader runs with its device current (streams, events, kernels)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _plan_to_device(self, plan: torch.Tensor) -> torch.Tensor:
        """The epoch's plan in one asynchronous copy, so no batch waits on a pageable host copy."""
        if self.device.type == "cuda":
            plan = plan.pin_memory()
        return _h2d(plan, self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        self.epoch += 1
        spans, plan = self._epoch_plan(gen)
        if self.resident:
            with self._on_device():
                if self._device_images is None:
                    self._device_images = self._resident_images()
                labels = self._device_labels_once()
                plan_dev = self._plan_to_device(plan)
            images = self._device_images
            for start, stop in spans:
                with self._on_device():
                    p = plan_dev[:, start:stop]
                    batch = self._finish(images, p[0], labels[p[0]], p[1:])
                yield batch
            return
        yield from self._iter_streamed(spans, plan)

    def _device_labels_once(self) -> torch.Tensor:
        if self._device_labels is None:
            self._device_labels = _h2d(self.labels, self.device)
        return self._device_labels

    def _iter_streamed(self, spans: list[tuple[int, int]], plan: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Host cache larger than the device: gather into two pinned buffers and copy each batch on
        an explicit copy stream of the loader's device. An event recorded on that stream after each
        copy guards its buffer: the buffer is refilled only once the copy that read it is done."""
        dev = self.device
        with self._on_device():
            if self._streaming is None:  # made once: pinned allocations are slow, the buffers are reused
                shape = (self.batch_size, *self.images.shape[1:])
                buffers = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
                self._streaming = (torch.cuda.Stream(device=dev), buffers, [None, None])
            copy_stream, buffers, events = self._streaming
            labels = self._device_labels_once()
            plan_dev = self._plan_to_device(plan)
        for step, (start, stop) in enumerate(spans):
            slot = step % 2
            with self._on_device():
                if events[slot] is not None:
                    events[slot].synchronize()  # the copy that last read this buffer has finished
                out = buffers[slot][: stop - start]
                torch.index_select(self.images, 0, plan[0, start:stop], out=out)
                compute = torch.cuda.current_stream(dev)
                copy_stream.wait_stream(compute)  # the copy's destination memory is free on both streams
                with torch.cuda.stream(copy_stream):
                    x = _h2d(out, dev, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(copy_stream)
                events[slot] = event
                compute.wait_stream(copy_stream)  # kernels of this batch start after its copy
                x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
                p = plan_dev[:, start:stop]
                batch = self._finish(x, None, labels[p[0]], p[1:])
            yield batch

    def _draw(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        oy = ox = flips = None
        if self.random_crop:
            assert self.crop is not None
            oy = torch.randint(0, self.stored_size[0] - self.crop + 1, (b,), generator=gen)
            ox = torch.randint(0, self.stored_size[1] - self.crop + 1, (b,), generator=gen)
        if self.flip:
            flips = torch.rand(b, generator=gen) < 0.5
        return oy, ox, flips

    def _finish(
        self, source: torch.Tensor, idx: torch.Tensor | None, y: torch.Tensor, params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select, resize, crop + flip (one gather) and normalise a batch on ``source``'s device.

        ``source`` is ``N x H x W x 3`` uint8 with ``idx`` the batch rows, or the batch itself
        (``idx=None``); ``params`` is the ``3 x B`` (top, left, flip) slice of the epoch plan,
        already on the device.
        """
        if self.resize is not None and tuple(source.shape[1:3]) != (self.resize, self.resize):
            source = self._resized(source[idx] if idx is not None else source)  # not resized once up front
            idx = None
        h, w = int(source.shape[1]), int(source.shape[2])
        b = int(idx.shape[0]) if idx is not None else int(source.shape[0])
        out_h, out_w = self.output_size
        dev = source.device
        if not self.random_crop and not self.flip:
            x = source[idx] if idx is not None else source
            if (out_h, out_w) != (h, w):  # centre crop: a view of the batch
                top, left = center_offset(h, out_h), center_offset(w, out_w)
                x = x[:, top:top + out_h, left:left + out_w]
        else:
            oy, ox, flip = params[0], params[1], params[2]
            ar_h = torch.arange(out_h, device=dev)
            ar_w = torch.arange(out_w, device=dev)
            rows = oy[:, None] + ar_h  # B x S
            cols = ox[:, None] + torch.where(flip[:, None].bool(), out_w - 1 - ar_w, ar_w)
            bidx = (idx if idx is not None else torch.arange(b, device=dev))[:, None, None]
            x = source[bidx, rows[:, :, None], cols[:, None, :]]  # B x S x S x 3: every crop and flip at once
        x = x.permute(0, 3, 1, 2).float()  # NCHW shape, channels-last strides
        x = torch.addcmul(self._shift, x, self._scale)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x.to(self.dtype), y

    def _resized(self, batch: torch.Tensor) -> torch.Tensor:
        """``B x h x w x 3`` uint8 at native size -> ``B x S x S x 3`` uint8, as PIL's bicubic resize
        does it: a horizontal then a vertical pass with PIL's kernel (a = -0.5, antialiased support),
        each rounded and clamped to uint8. Matches the PIL decode-time resize within 2 levels per pixel
        (tests/data/test_data_native.py states and checks the tolerance)."""
        assert self.resize is not None
        side = self.resize
        x = batch.permute(0, 3, 1, 2).float()
        with torch.autocast(x.device.type, enabled=False):
            if int(x.shape[3]) != side:
                x = F.interpolate(x, size=(int(x.shape[2]), side), mode="bicubic", antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255)
            if int(x.shape[2]) != side:
                x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255)
        return x.to(torch.uint8).permute(0, 2, 3, 1)
