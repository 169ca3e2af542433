"""Batches from a uint8 image cache, with augmentation and normalisation done per batch on the device.

Per-sample work in Python (the usual ``Dataset.__getitem__`` + ``DataLoader`` workers) is the
bottleneck for small ViT fine-tuning runs. Here an epoch is a permutation; a batch is one
``index_select`` of uint8 rows, one host-to-device copy (pinned, asynchronous, double
buffered), one gather that does every sample's random crop *and* horizontal flip at once, and
one fused multiply-add for ``(x / 255 - mean) / std``.

Randomness (order, crop offsets, flips) comes from a CPU ``torch.Generator`` seeded from
``(seed, epoch)``, so a given seed yields the same batches on CPU and GPU and across runs.
Each ``iter()`` uses the current epoch and then advances it; :meth:`DeviceLoader.set_epoch`
jumps to a given epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from petlbench.data.cache import CachedSplit
from petlbench.data.transforms import Normalization, center_offset, resolve_normalization

_RESIDENT_MAX_BYTES = 4 << 30


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
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be a uint8 N x H x W x 3 tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        height, width = int(images.shape[1]), int(images.shape[2])
        self.crop = int(crop) if crop is not None else None
        if self.crop is not None and (self.crop > height or self.crop > width):
            raise ValueError(f"crop {self.crop} is larger than the stored images ({height}x{width})")
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
        mean = torch.tensor(self.normalization.mean, dtype=torch.float32)
        std = torch.tensor(self.normalization.std, dtype=torch.float32)
        # (x / 255 - mean) / std  ==  x * scale + shift
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(self.device)

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
        """A loader applying ``cached.spec``'s train or eval recipe; shuffles when training unless told."""
        spec = cached.spec
        mode = spec.crop_mode(train)
        return cls(
            cached.images, cached.labels, batch_size=batch_size, normalization=normalization,
            crop=spec.image_size if mode != "none" else None, random_crop=mode == "random",
            flip=spec.flip(train), shuffle=train if shuffle is None else shuffle, **kwargs,
        )

    def _fits_on_device(self) -> bool:
        nbytes = self.images.numel()
        try:
            free, _total = torch.cuda.mem_get_info(self.device)
        except (RuntimeError, AssertionError):  # no usable CUDA: the first .to(device) will say why
            return False
        return nbytes <= min(_RESIDENT_MAX_BYTES, free // 4)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    @property
    def output_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop, self.crop
        return int(self.images.shape[1]), int(self.images.shape[2])

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
        }

    def _batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        batches = list(torch.split(order, self.batch_size))
        if self.drop_last and batches and batches[-1].numel() < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        self.epoch += 1
        batches = self._batches(gen)
        # Draw every random number up front, in batch order, so results never depend on the device.
        params = [self._draw(len(idx), gen) for idx in batches]
        if self.resident:
            if self._device_images is None or self._device_labels is None:
                self._device_images = self.images.to(self.device)
                self._device_labels = self.labels.to(self.device)
            images, labels = self._device_images, self._device_labels
            for idx, p in zip(batches, params, strict=True):
                idx = idx.to(self.device)
                yield self._finish(images, idx, labels[idx], p)
            return
        yield from self._iter_streamed(batches, params)

    def _iter_streamed(self, batches: list[torch.Tensor], params: list[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Host cache larger than the device: gather into pinned buffers, copy asynchronously."""
        shape = (self.batch_size, *self.images.shape[1:])
        buffers = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
        events: list[Any] = [None, None]
        for step, (idx, p) in enumerate(zip(batches, params, strict=True)):
            slot = step % 2
            if events[slot] is not None:
                events[slot].synchronize()  # the copy that last read this buffer has finished
            out = buffers[slot][: len(idx)]
            torch.index_select(self.images, 0, idx, out=out)
            x = out.to(self.device, non_blocking=True)
            y = self.labels[idx].pin_memory().to(self.device, non_blocking=True)
            events[slot] = torch.cuda.Event()
            events[slot].record()
            yield self._finish(x, None, y, p)

    def _draw(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        oy = ox = flips = None
        if self.random_crop:
            assert self.crop is not None
            oy = torch.randint(0, int(self.images.shape[1]) - self.crop + 1, (b,), generator=gen)
            ox = torch.randint(0, int(self.images.shape[2]) - self.crop + 1, (b,), generator=gen)
        if self.flip:
            flips = torch.rand(b, generator=gen) < 0.5
        return oy, ox, flips

    def _finish(
        self, source: torch.Tensor, idx: torch.Tensor | None, y: torch.Tensor, params: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Select, crop + flip (one gather) and normalise a batch on ``source``'s device.

        ``source`` is ``N x H x W x 3`` uint8 with ``idx`` the batch rows, or the batch itself
        (``idx=None``).
        """
        oy, ox, flips = params
        h, w = int(source.shape[1]), int(source.shape[2])
        b = int(idx.shape[0]) if idx is not None else int(source.shape[0])
        out_h, out_w = self.output_size
        dev = source.device
        if oy is None and flips is None:
            x = source[idx] if idx is not None else source
            if (out_h, out_w) != (h, w):  # centre crop: a view of the batch
                top, left = center_offset(h, out_h), center_offset(w, out_w)
                x = x[:, top:top + out_h, left:left + out_w]
        else:
            if oy is None:
                oy = torch.full((b,), center_offset(h, out_h), dtype=torch.int64)
                ox = torch.full((b,), center_offset(w, out_w), dtype=torch.int64)
            flip = flips if flips is not None else torch.zeros(b, dtype=torch.bool)
            oy, ox, flip = torch.stack([oy, ox, flip.to(torch.int64)]).to(dev)  # one small copy
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
