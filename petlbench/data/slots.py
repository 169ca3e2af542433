"""Images of every aspect ratio in one fixed-shape uint8 array: the slot layout.

The FGVC training crop reads anywhere in a short-side-resized image (``RandomCrop(S)`` after
``Resize(R)`` starts at 0..W-S), so the whole image must be cached, not a central square. The
loader's speed rests on one fixed-shape array (one ``index_select`` per batch when streamed, one
gather for every crop and flip), so images of different shapes are laid out like this:

* each image is stored with its **shorter side along the slot's rows**: portrait images are
  transposed (a flag per image; the gather swaps row and column indices for them), so one slot
  height ``H`` (the largest shorter side, R for a ``Resize(R)`` store) fits every image;
* the slot width ``L`` is chosen per split to minimise the bytes stored
  (:func:`best_slot_width`); an image whose longer side exceeds ``L`` (a 3:1 panorama) spans
  several slots that overlap by ``overlap`` pixels, the widest window a batch reads from one image
  at once (S for a crop, the largest random-resized-crop box), so every window lies entirely in
  one slot (:meth:`SlotLayout.locate`) and the official range of offsets is kept for any aspect;
* the rest of a slot is zero padding, never read.

Memory: ``slots x H x L x 3`` bytes. For photographs of one aspect ratio that is the image itself
(256 x 341 x 3 = 262 KB for a 4:3 photo at R = 256, against 197 KB for the former central
square); a split mixing shapes pays the padding the chosen ``L`` leaves, and a panorama pays about
``W / (L - overlap)`` slots, never the whole split's width.

The per-image table (:data:`COLUMNS`) is cached next to the pixels (``<key>.layout.npy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Columns of :attr:`SlotLayout.table`: the image's first slot and slot count, whether it is
#: stored transposed, its stored height and width (image orientation) and its original size.
COLUMNS = ("first_slot", "slots", "transposed", "height", "width", "orig_height", "orig_width")
FIRST, COUNT, TRANSPOSED, HEIGHT, WIDTH, ORIG_HEIGHT, ORIG_WIDTH = range(len(COLUMNS))


def slot_counts(longs: np.ndarray, width: int, overlap: int) -> np.ndarray:
    """Slots each longer side needs at slot width ``width``: 1 if it fits, else enough steps of
    ``width - overlap`` that the last slot (aligned to the image's end) reaches it."""
    longs = np.asarray(longs, dtype=np.int64)
    stride = max(width - overlap, 1)
    extra = np.maximum(longs - width, 0)
    return 1 + -(-extra // stride)


def best_slot_width(longs: np.ndarray, overlap: int, minimum: int) -> int:
    """The slot width (>= ``minimum``) that stores these longer sides in the fewest bytes.

    A width between ``minimum`` and the longest side; a width that makes some image span several
    slots must exceed ``overlap`` (else consecutive slots would not advance)."""
    longs = np.asarray(longs, dtype=np.int64)
    if longs.size == 0:
        return max(1, minimum)
    longest = int(longs.max())
    if longest <= minimum:
        return max(1, minimum)
    sides, counts = np.unique(longs, return_counts=True)
    candidates = np.arange(max(minimum, overlap + 1), longest + 1, dtype=np.int64)
    if candidates.size == 0:
        return longest
    stride = candidates[:, None] - overlap
    extra = np.maximum(sides[None, :] - candidates[:, None], 0)
    slots = (1 + -(-extra // stride)) @ counts
    return int(candidates[int(np.argmin(slots * candidates))])  # the narrowest of equally small


@dataclass(frozen=True, eq=False)
class SlotLayout:
    """Where each image of a slot-stored split lies: ``table`` (N x 7 int64, :data:`COLUMNS`),
    the slot shape ``slot_height x slot_width`` and the ``overlap`` of consecutive slots."""

    table: np.ndarray
    slot_height: int
    slot_width: int
    overlap: int

    @property
    def num_images(self) -> int:
        return int(self.table.shape[0])

    @property
    def num_slots(self) -> int:
        if not self.num_images:
            return 0
        return int(self.table[-1, FIRST] + self.table[-1, COUNT])

    @property
    def stride(self) -> int:
        return max(self.slot_width - self.overlap, 1)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The pixel array's shape."""
        return self.num_slots, self.slot_height, self.slot_width, 3

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def take(self, n: int) -> SlotLayout:
        """The first ``n`` images (their slots are the first ones)."""
        return SlotLayout(self.table[:n].copy(), self.slot_height, self.slot_width, self.overlap)

    def torch_table(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.table, dtype=np.int64))

    def slot_starts(self, long: int, count: int) -> list[int]:
        """Where each of an image's ``count`` slots starts along its longer side ``long``."""
        return [0] if count == 1 else [min(k * self.stride, long - self.slot_width) for k in range(count)]

    def locate(self, table: torch.Tensor, index: torch.Tensor, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot row holding a window that starts at ``start`` along the longer side of image
        ``index`` (and extends at most ``overlap`` pixels), and its start inside that slot.

        ``table`` is :meth:`torch_table` (passed in so a loader converts it once). Vectorised:
        every argument is a tensor of the batch's length."""
        row = table[index]
        count = row[:, COUNT]
        long = torch.where(row[:, TRANSPOSED].bool(), row[:, HEIGHT], row[:, WIDTH])
        k = torch.minimum(torch.div(start, self.stride, rounding_mode="floor"), count - 1).clamp_(min=0)
        first = torch.minimum(k * self.stride, long - self.slot_width)
        slot_start = torch.where(count == 1, torch.zeros_like(first), first)
        return row[:, FIRST] + k, start - slot_start

    def check(self, num_images: int, pixels_shape: tuple[int, ...]) -> bool:
        """Whether this table can describe a pixel array of ``pixels_shape`` for ``num_images``."""
        t = self.table
        if t.ndim != 2 or t.shape != (num_images, len(COLUMNS)) or tuple(pixels_shape) != self.shape:
            return False
        if not num_images:
            return True
        expected_first = np.concatenate([[0], np.cumsum(t[:-1, COUNT])])
        short = np.where(t[:, TRANSPOSED] == 1, t[:, WIDTH], t[:, HEIGHT])
        long = np.where(t[:, TRANSPOSED] == 1, t[:, HEIGHT], t[:, WIDTH])
        return bool(
            (t[:, FIRST] == expected_first).all() and (t[:, COUNT] >= 1).all()
            and (short <= self.slot_height).all() and (short >= 1).all()
            and (t[:, COUNT] == slot_counts(long, self.slot_width, self.overlap)).all()
        )

    def put(self, out: np.ndarray, i: int, image: np.ndarray) -> None:
        """Write image ``i`` (``height x width x 3`` in its own orientation) into its slots of
        ``out`` (the pixel array, or a chunk of it starting at image ``i``'s first slot when
        ``out`` is shorter than the whole: then slot rows are relative to the chunk)."""
        row = self.table[i]
        if (image.shape[0], image.shape[1]) != (row[HEIGHT], row[WIDTH]):
            raise ValueError(f"image {i} is {image.shape[:2]}, the layout expects {(row[HEIGHT], row[WIDTH])}")
        flat = np.swapaxes(image, 0, 1) if row[TRANSPOSED] else image
        long = flat.shape[1]
        for k, start in enumerate(self.slot_starts(long, int(row[COUNT]))):
            slot = out[k]
            slot[...] = 0
            part = flat[:, start:start + self.slot_width]
            slot[: part.shape[0], : part.shape[1]] = part


def plan_layout(stored: np.ndarray, original: np.ndarray, overlap: int, min_width: int = 1) -> SlotLayout:
    """The layout of images of stored sizes ``stored`` (N x 2: height, width) and original sizes
    ``original``: slot height = the largest shorter side; slot width by :func:`best_slot_width`."""
    stored = np.asarray(stored, dtype=np.int64).reshape(-1, 2)
    original = np.asarray(original, dtype=np.int64).reshape(-1, 2)
    n = stored.shape[0]
    transposed = (stored[:, 0] > stored[:, 1]).astype(np.int64)
    short = stored.min(axis=1) if n else np.zeros(0, np.int64)
    long = stored.max(axis=1) if n else np.zeros(0, np.int64)
    height = int(short.max()) if n else 1
    width = best_slot_width(long, overlap, max(min_width, height if n else 1))
    counts = slot_counts(long, width, overlap)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    table = np.stack([first, counts, transposed, stored[:, 0], stored[:, 1], original[:, 0], original[:, 1]], axis=1)
    return SlotLayout(table.astype(np.int64).reshape(n, len(COLUMNS)), height, width, overlap)


def pack_images(stored: list[np.ndarray], original: np.ndarray, overlap: int) -> tuple[np.ndarray, SlotLayout]:
    """Images already prepared as stored (``height x width x 3`` uint8 each) in the slot layout,
    in memory: the pixel array and its layout (the cache does the same in chunks, on disk)."""
    shapes = np.asarray([img.shape[:2] for img in stored], dtype=np.int64).reshape(-1, 2)
    layout = plan_layout(shapes, original, overlap)
    out = np.zeros(layout.shape, dtype=np.uint8)
    for i, img in enumerate(stored):
        first, count = int(layout.table[i, FIRST]), int(layout.table[i, COUNT])
        layout.put(out[first:first + count], i, img)
    return out, layout
