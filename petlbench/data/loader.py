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

**Whole images** (a :class:`~petlbench.data.slots.SlotLayout`, the FGVC training store): each
image has its own size, so the epoch's plan draws every crop offset in its own image's range
(uniform over ``0..W-S`` x ``0..H-S``, as ``RandomCrop``) and names the slot holding that window;
the batch is still one gather of slot rows, crops and flips (row and column indices swapped for
images stored transposed). **Random resized crops** draw torchvision's boxes on the CPU
(:func:`~petlbench.data.resample.rrc_boxes`) and resample the batch on the device with PIL's
filter arithmetic (:mod:`petlbench.data.resample`): one gather of the slots, two batched matrix
products per orientation (portrait and landscape images of a batch are resampled as two groups,
each in PIL's pass order), one flip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from petlbench.data.cache import CachedSplit
from petlbench.data.resample import TRIES, box_weights, resample, rrc_boxes
from petlbench.data.slots import HEIGHT, ORIG_HEIGHT, ORIG_WIDTH, TRANSPOSED, WIDTH, SlotLayout
from petlbench.data.transforms import Normalization, center_offset, resolve_normalization

_RESIDENT_MAX_BYTES = 4 << 30


def _h2d(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """The loader's only way onto the device: one place to audit (and, in tests, count) copies."""
    return tensor.to(device, non_blocking=non_blocking)


# Rows of a whole-image plan (crop, centre crop): image, slot row, offset along the slot's rows,
# offset along its columns, flip, stored transposed.
_IMG, _ROW, _A, _B, _FLIP, _T = range(6)
# Rows of a random-resized-crop plan (float64): image, slot row, flip, transposed, bicubic, the
# batch's order with landscape images first, then each box along the slot's rows (a0, a1) and
# columns (b0, b1) in stored pixels, and the stored extent along each.
_R_IMG, _R_ROW, _R_FLIP, _R_T, _R_BIC, _R_ORDER, _R_A0, _R_A1, _R_B0, _R_B1, _R_ALIM, _R_BLIM = range(12)
RANDOM_RESIZED = ("bilinear", "bicubic", "random")


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
        layout: SlotLayout | None = None,
        random_resized: str | None = None,
    ) -> None:
        """``layout``: ``images`` is a whole-image slot array (:mod:`petlbench.data.slots`) and ``crop``
        the output size; then ``random_crop`` draws each crop in its image's range (else the centre
        crop), or ``random_resized`` (``bilinear``, ``bicubic`` or ``random``: either per image)
        resamples torchvision random-resized-crop boxes to ``crop``."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be a uint8 N x H x W x 3 tensor, got {images.dtype} {tuple(images.shape)}")
        rows = layout.num_images if layout is not None else images.shape[0]
        if labels.shape[0] != rows:
            raise ValueError(f"{rows} images but {labels.shape[0]} labels")
        self.layout = layout
        self.random_resized = random_resized
        if layout is not None:
            self._check_layout(images, layout, crop, resize, random_resized)
        elif random_resized is not None:
            raise ValueError("random resized crops need whole images (a slot layout)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if resize is not None and resize < 1:
            raise ValueError(f"resize must be a positive size, got {resize}")
        self.resize = int(resize) if resize is not None else None
        height, width = (self.resize, self.resize) if self.resize is not None else (int(images.shape[1]), int(images.shape[2]))
        self.stored_size = (height, width)  # per-sample size before any crop (after the device resize)
        self.crop = int(crop) if crop is not None else None
        if self.crop is not None and layout is None and (self.crop > height or self.crop > width):
            raise ValueError(f"crop {self.crop} is larger than the images ({height}x{width})")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.batch_size = int(batch_size)
        self.normalization = resolve_normalization(normalization)
        self.random_crop = (bool(random_crop) or random_resized is not None) and self.crop is not None
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
        self._table = layout.torch_table() if layout is not None else None
        mean = torch.tensor(self.normalization.mean, dtype=torch.float32)
        std = torch.tensor(self.normalization.std, dtype=torch.float32)
        # (x / 255 - mean) / std  ==  x * scale + shift
        with self._on_device():
            self._scale = _h2d((1.0 / (255.0 * std)).view(1, 3, 1, 1), self.device)
            self._shift = _h2d((-mean / std).view(1, 3, 1, 1), self.device)

    @staticmethod
    def _check_layout(images: torch.Tensor, layout: SlotLayout, crop: int | None, resize: int | None,
                      random_resized: str | None) -> None:
        if tuple(images.shape) != layout.shape:
            raise ValueError(f"images {tuple(images.shape)} do not match their slot layout {layout.shape}")
        if crop is None or resize is not None:
            raise ValueError("whole images (a slot layout) need an output size (crop) and no device resize")
        if random_resized is not None and random_resized not in RANDOM_RESIZED:
            raise ValueError(f"random_resized must be one of {', '.join(RANDOM_RESIZED)}, got {random_resized!r}")
        if random_resized is None and layout.num_images:
            short = layout.table[:, [HEIGHT, WIDTH]].min()
            if short < crop:
                raise ValueError(f"crop {crop} is larger than the smallest stored image side ({short})")

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
        stored at native resolution); shuffles when training unless told. ``cached`` must have been
        stored for that role (:meth:`~petlbench.data.transforms.TransformSpec.storage`)."""
        spec = cached.spec
        needed = spec.storage(train)
        if cached.stored != needed:
            raise ValueError(f"this split was stored as {cached.stored.kind} ({cached.stored}); the "
                             f"{'training' if train else 'evaluation'} recipe needs {needed}: load it with train={train}")
        shuffle = train if shuffle is None else shuffle
        if cached.layout is not None:
            rrc = spec.train_crop == "random_resized"
            return cls(
                cached.images, cached.labels, batch_size=batch_size, normalization=normalization,
                crop=spec.image_size, random_crop=not rrc, flip=spec.flip(train), shuffle=shuffle,
                layout=cached.layout, random_resized=spec.interpolation if rrc else None, **kwargs,
            )
        mode = spec.crop_mode(train) if needed.kind == "square" else "none"  # a centre crop is stored cropped
        mode = "none" if mode == "center" and needed.kind == "square" else mode  # a square store is the input
        return cls(
            cached.images, cached.labels, batch_size=batch_size, normalization=normalization,
            crop=spec.image_size if mode != "none" else None, random_crop=mode == "random",
            flip=spec.flip(train), shuffle=shuffle, resize=cached.device_resize, **kwargs,
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
        return int(self.labels.shape[0])

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
            "device_resize": self.resize, "whole_images": self.layout is not None,
            "random_resized": self.random_resized,
        }

    def _batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        batches = list(torch.split(order, self.batch_size))
        if self.drop_last and batches and batches[-1].numel() < self.batch_size:
            batches.pop()
        return batches

    def _epoch_plan(self, gen: torch.Generator) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
        """This epoch's batches as ``(start, stop, first)`` spans of one plan tensor, drawn on the CPU
        so a seed gives the same batches on any device. ``first`` (random resized crops only) is how
        many of the batch's images are stored untransposed.

        Fixed-size images: a ``4 x n`` int64 plan (rows: sample index, crop top, crop left, flip), in
        the same order as ever (permutation, then per batch: tops, lefts, flips)."""
        batches = self._batches(gen)
        if self.layout is not None:
            return self._whole_image_plan(batches, gen)
        used = sum(int(idx.numel()) for idx in batches)
        plan = torch.zeros((4, used), dtype=torch.int64)
        out_h, out_w = self.output_size
        plan[1] = center_offset(self.stored_size[0], out_h)
        plan[2] = center_offset(self.stored_size[1], out_w)
        spans: list[tuple[int, int, int]] = []
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
            spans.append((start, stop, stop - start))
            start = stop
        return spans, plan

    def epoch_augmentation(self, epoch: int) -> dict[str, torch.Tensor]:
        """Epoch ``epoch``'s samples and augmentation, in batch order, in each image's own
        coordinates (whole images only; for checks and debugging): ``index``, ``top``, ``left``,
        ``flip``; for random resized crops also the box's ``height`` and ``width`` (on the
        original image) and ``bicubic``. The same draws as the epoch's batches."""
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
        batches = self._batches(gen)
        idx = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)
        return self._draw_whole(idx, gen)

    def _draw_whole(self, idx: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The augmentation of whole images ``idx``, every draw vectorised over the epoch: for a
        crop, offsets uniform over each image's own range (float64 uniforms times the range,
        floored; else torchvision's centre offsets), then flips; for random resized crops,
        torchvision's boxes on the original sizes, then the interpolation (``random``), then flips."""
        assert self._table is not None and self.crop is not None
        used, table, s = int(idx.numel()), self._table[idx], self.crop
        f64 = torch.float64
        out: dict[str, torch.Tensor] = {"index": idx}
        if self.random_resized is not None:
            u_area = torch.rand((used, TRIES), generator=gen, dtype=f64)
            u_ratio = torch.rand((used, TRIES), generator=gen, dtype=f64)
            u_top, u_left = torch.rand(used, generator=gen, dtype=f64), torch.rand(used, generator=gen, dtype=f64)
            out["top"], out["left"], out["height"], out["width"] = rrc_boxes(
                table[:, ORIG_HEIGHT], table[:, ORIG_WIDTH], u_area, u_ratio, u_top, u_left)
            if self.random_resized == "random":  # timm: random.choice((bilinear, bicubic)) per image
                out["bicubic"] = torch.rand(used, generator=gen) < 0.5
            else:
                out["bicubic"] = torch.full((used,), self.random_resized == "bicubic", dtype=torch.bool)
        else:
            h, w = table[:, HEIGHT], table[:, WIDTH]
            if self.random_crop:
                oy = torch.floor(torch.rand(used, generator=gen, dtype=f64) * (h - s + 1)).long()
                ox = torch.floor(torch.rand(used, generator=gen, dtype=f64) * (w - s + 1)).long()
                out["top"], out["left"] = torch.minimum(oy, h - s), torch.minimum(ox, w - s)
            else:  # torchvision's centre crop: int(round((size - crop) / 2)), half to even like Python
                out["top"], out["left"] = torch.round((h - s) / 2).long(), torch.round((w - s) / 2).long()
        out["flip"] = torch.rand(used, generator=gen) < 0.5 if self.flip else torch.zeros(used, dtype=torch.bool)
        return out

    def _whole_image_plan(self, batches: list[torch.Tensor], gen: torch.Generator) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
        """The epoch's plan over whole images (:meth:`_draw_whole`), mapped to slots."""
        assert self.layout is not None and self._table is not None
        sizes = [int(idx.numel()) for idx in batches]
        idx = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.int64)
        aug = self._draw_whole(idx, gen)
        tr = self._table[idx][:, TRANSPOSED].bool()
        if self.random_resized is not None:
            return self._rrc_plan(idx, aug, sizes)
        oy, ox = aug["top"], aug["left"]
        row, along = self.layout.locate(self._table, idx, torch.where(tr, oy, ox))
        plan = torch.stack([idx, row, torch.where(tr, ox, oy), along, aug["flip"].long(), tr.long()])
        return _spans(sizes), plan

    def _rrc_plan(self, idx: torch.Tensor, aug: dict[str, torch.Tensor],
                  sizes: list[int]) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
        """Boxes on the original image mapped to stored pixels (scaled where the store shrank the
        image), then to the slot holding them; per batch, landscape images first."""
        assert self.layout is not None and self._table is not None
        f64 = torch.float64
        table = self._table[idx]
        top, left, ch, cw = aug["top"], aug["left"], aug["height"], aug["width"]
        tr = table[:, TRANSPOSED].bool()
        h, w = table[:, HEIGHT].to(f64), table[:, WIDTH].to(f64)
        fy, fx = h / table[:, ORIG_HEIGHT].to(f64), w / table[:, ORIG_WIDTH].to(f64)  # 1.0 where kept as is
        y0, y1, x0, x1 = top * fy, (top + ch) * fy, left * fx, (left + cw) * fx
        long0, long1 = torch.where(tr, y0, x0), torch.where(tr, y1, x1)
        row, along = self.layout.locate(self._table, idx, torch.floor(long0).long())
        shift = torch.floor(long0) - along.to(f64)  # where the slot starts along the longer side
        plan = torch.empty((12, int(idx.numel())), dtype=f64)
        plan[_R_IMG], plan[_R_ROW], plan[_R_FLIP], plan[_R_T] = idx, row, aug["flip"], tr
        plan[_R_BIC] = aug["bicubic"]
        plan[_R_A0], plan[_R_A1] = torch.where(tr, x0, y0), torch.where(tr, x1, y1)
        plan[_R_B0], plan[_R_B1] = long0 - shift, long1 - shift
        plan[_R_ALIM] = torch.where(tr, w, h)
        plan[_R_BLIM] = torch.clamp(torch.where(tr, h, w) - shift, max=float(self.layout.slot_width))
        spans = []
        for start, stop, _ in _spans(sizes):  # per batch: landscape images first, then portrait ones
            part = tr[start:stop]
            plan[_R_ORDER, start:stop] = torch.argsort(part.to(torch.int8), stable=True).to(f64)
            spans.append((start, stop, int((~part).sum())))
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
            for start, stop, first in spans:
                with self._on_device():
                    batch = self._batch(images, plan_dev[:, start:stop], labels, first, resident=True)
                yield batch
            return
        yield from self._iter_streamed(spans, plan)

    def _source_rows(self, plan: torch.Tensor) -> torch.Tensor:
        """The plan's row of storage rows to read (the sample itself, or its slot)."""
        if self.layout is None:
            return plan[0]
        return plan[_R_ROW].long() if self.random_resized is not None else plan[_ROW]

    def _batch(self, source: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, first: int,
               resident: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch from its slice ``p`` of the device plan: ``source`` is the resident store
        (``resident``) or the batch's rows already gathered."""
        rows = self._source_rows(p) if resident else None
        if self.layout is None:
            return self._finish(source, rows, labels[p[0]], p[1:])
        if self.random_resized is not None:
            return self._finish_resized(source, rows, p, labels[p[_R_IMG].long()], first)
        return self._finish_crop(source, rows, p, labels[p[_IMG]])

    def _device_labels_once(self) -> torch.Tensor:
        if self._device_labels is None:
            self._device_labels = _h2d(self.labels, self.device)
        return self._device_labels

    def _iter_streamed(self, spans: list[tuple[int, int, int]], plan: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        host_rows = self._source_rows(plan)
        for step, (start, stop, first) in enumerate(spans):
            slot = step % 2
            with self._on_device():
                if events[slot] is not None:
                    events[slot].synchronize()  # the copy that last read this buffer has finished
                out = buffers[slot][: stop - start]
                torch.index_select(self.images, 0, host_rows[start:stop], out=out)
                compute = torch.cuda.current_stream(dev)
                copy_stream.wait_stream(compute)  # the copy's destination memory is free on both streams
                with torch.cuda.stream(copy_stream):
                    x = _h2d(out, dev, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(copy_stream)
                events[slot] = event
                compute.wait_stream(copy_stream)  # kernels of this batch start after its copy
                x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
                batch = self._batch(x, plan_dev[:, start:stop], labels, first, resident=False)
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
        return self._to_input(x), y

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        """``B x S x S x 3`` pixel values (0..255, any dtype) -> the normalised model input."""
        x = x.permute(0, 3, 1, 2).float()  # NCHW shape, channels-last strides
        x = torch.addcmul(self._shift, x, self._scale)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x.to(self.dtype)

    def _finish_crop(self, source: torch.Tensor, rows: torch.Tensor | None, p: torch.Tensor,
                     y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop + flip of whole images, one gather: output pixel (i, j) of a sample is slot pixel
        (a + i, b + j') (j' = j, or S-1-j when flipped), or (a + j', b + i) for an image stored
        transposed, i.e. pixel ``base + i * step_i + j' * step_j`` of the flat store, with the two
        steps (row length, 1) swapped for transposed images."""
        assert self.crop is not None
        s, dev = self.crop, source.device
        width = int(source.shape[2])
        slot = rows if rows is not None else torch.arange(int(p.shape[1]), device=dev)
        tr = p[_T].bool()
        base = (slot * int(source.shape[1]) + p[_A]) * width + p[_B]
        step_i = torch.where(tr, 1, width)[:, None]
        step_j = torch.where(tr, width, 1)[:, None]
        ar = torch.arange(s, device=dev)[None, :]
        xs = torch.where(p[_FLIP][:, None].bool(), s - 1 - ar, ar)  # B x S: the image column each output column reads
        index = (base[:, None] + ar * step_i)[:, :, None] + (xs * step_j)[:, None, :]  # B x S x S
        x = source.reshape(-1, 3).index_select(0, index.view(-1)).view(-1, s, s, 3)
        return self._to_input(x), y

    def _finish_resized(self, source: torch.Tensor, rows: torch.Tensor | None, p: torch.Tensor,
                        y: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random resized crops of whole images: each box resampled to ``S x S`` with PIL's fixed-
        point filter (:func:`~petlbench.data.resample.box_weights`), landscape and portrait images
        as two groups (sizes known from the CPU plan: no synchronisation), then flipped."""
        assert self.crop is not None and self.layout is not None
        s = self.crop
        slots = source[rows] if rows is not None else source
        bicubic = p[_R_BIC].bool()
        height, width = self.layout.slot_height, self.layout.slot_width
        along_rows = box_weights(p[_R_A0], p[_R_A1], p[_R_ALIM], s, bicubic, height)
        along_cols = box_weights(p[_R_B0], p[_R_B1], p[_R_BLIM], s, bicubic, width, extent=self.layout.overlap)
        order = p[_R_ORDER].long()
        out = torch.empty((int(p.shape[1]), s, s, 3), dtype=torch.float32, device=source.device)
        for transposed, sel in ((False, order[:first]), (True, order[first:])):
            if int(sel.shape[0]):
                out[sel] = resample(slots[sel], along_rows[sel], along_cols[sel], transposed)
        out = torch.where(p[_R_FLIP].bool()[:, None, None, None], out.flip(2), out)
        return self._to_input(out), y

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


def _spans(sizes: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive ``(start, stop, stop - start)`` spans of batches of these sizes."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n, n))
        start += n
    return out
