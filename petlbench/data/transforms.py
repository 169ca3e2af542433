"""Protocol transforms, split into a decode-once part (PIL, cached) and a per-batch part (device).

The published protocols (methods.md §3.4):

* ``vtab_resize`` (VTAB-1k, NOAH/RepAdapter/ARC): ``Resize((S, S))`` bicubic, aspect ratio not
  kept, no augmentation; train = eval. Everything is deterministic, so the cache stores the
  final ``S x S`` image and the device only normalises.
* ``fgvc_crop`` (FGVC, VPT): train ``Resize(R)`` (shorter side, bilinear) -> ``RandomCrop(S)`` ->
  horizontal flip p=0.5; eval ``Resize(R)`` -> ``CenterCrop(S)``; ``R = round(S * 256 / 224)``.
  The cache stores the **central R x R square** of the short-side-resized image; the device does
  the random crop + flip (train) or the centre crop (eval) per batch. Eval is the VPT result up
  to a one-pixel difference in the crop offset on the long side (two roundings instead of one);
  for training, random crops are drawn from the central square instead of the whole long side.
  That keeps one fixed-size uint8 tensor per split (256x256x3 bytes per image) and is recorded
  in :meth:`TransformSpec.describe` so it shows up in results.

Normalisation is a protocol field (anchors.md §5.3: codebases disagree). The caller passes the
backbone's pretrained ``mean``/``std`` by default, or a preset name; :class:`Normalization`
records which one was used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from petlbench.data.files import open_regular
from petlbench.errors import PetlbenchError, did_you_mean

_FGVC_RESIZE = 256 / 224


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x / 255 - mean) / std``; ``name`` says where the numbers came from."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}


NORMALIZATIONS: dict[str, Normalization] = {
    "imagenet": Normalization("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": Normalization("inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # [0, 1] inputs, as PETL_Vision's VTAB default and Binary Adapter feed them.
    "none": Normalization("none", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise PetlbenchError(f"normalisation {what} must be 3 finite numbers (R, G, B), got {values!r}.")
    return vals  # type: ignore[return-value]


def resolve_normalization(
    norm: str | Normalization | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Normalization:
    """A preset name, an explicit ``mean``/``std`` (e.g. the backbone's ``pretrained_cfg``), or both agreeing.

    Explicit numbers equal to a preset are labelled with the preset's name, so results say
    ``inception`` rather than ``custom`` when a ViT's config carries (0.5, 0.5, 0.5).
    """
    if isinstance(norm, Normalization):
        return norm
    preset = None
    if norm is not None:
        if norm not in NORMALIZATIONS:
            raise PetlbenchError(did_you_mean(norm, NORMALIZATIONS, "normalisation"))
        preset = NORMALIZATIONS[norm]
    if mean is None and std is None:
        if preset is None:
            raise PetlbenchError(
                "no normalisation given. Fix: pass the backbone's mean/std or one of "
                f"{', '.join(NORMALIZATIONS)}."
            )
        return preset
    if mean is None or std is None:
        raise PetlbenchError("normalisation needs both mean and std. Fix: pass both, or a preset name.")
    m, s = _triple(mean, "mean"), _triple(std, "std")
    if min(s) <= 0:
        raise PetlbenchError(f"normalisation std must be positive, got {s}.")
    for p in NORMALIZATIONS.values():
        if np.allclose(m, p.mean, atol=1e-6) and np.allclose(s, p.std, atol=1e-6):
            if preset is not None and preset is not p:
                raise PetlbenchError(f"normalisation {norm!r} conflicts with mean={m}, std={s} (that is {p.name!r}).")
            return p
    if preset is not None:
        raise PetlbenchError(f"normalisation {norm!r} conflicts with mean={m}, std={s}.")
    return Normalization("custom", m, s)


@dataclass(frozen=True)
class TransformSpec:
    """What is done once at decode time and what per batch, for one protocol and image size."""

    name: str
    image_size: int
    stored_size: int
    interpolation: str  # "bicubic" | "bilinear"
    resize: str  # "square": to (stored, stored), aspect not kept | "short_side_center_square"
    train_crop: str  # "none" | "random"
    train_flip: bool
    eval_crop: str  # "none" | "center"

    def describe(self) -> dict[str, Any]:
        """The exact recipe, for result records and report footnotes."""
        return asdict(self)

    def crop_mode(self, train: bool) -> str:
        return self.train_crop if train else self.eval_crop

    def flip(self, train: bool) -> bool:
        return self.train_flip and train


def transform_spec(name: Any, image_size: int | None = None) -> TransformSpec:
    """The :class:`TransformSpec` for a protocol transform name (or a Suite, using its fields)."""
    if hasattr(name, "transform") and hasattr(name, "image_size"):
        image_size = image_size or name.image_size
        name = name.transform
    if image_size is None or image_size < 8:
        raise PetlbenchError(f"image_size must be an integer >= 8, got {image_size!r}.")
    if name == "vtab_resize":
        return TransformSpec(name, image_size, image_size, "bicubic", "square", "none", False, "none")
    if name == "fgvc_crop":
        stored = int(round(image_size * _FGVC_RESIZE))
        return TransformSpec(name, image_size, stored, "bilinear", "short_side_center_square", "random", True, "center")
    raise PetlbenchError(did_you_mean(str(name), ["vtab_resize", "fgvc_crop"], "transform"))


_PIL_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def center_offset(size: int, crop: int) -> int:
    """torchvision's centre-crop offset (``int(round((size - crop) / 2))``)."""
    return int(round((size - crop) / 2.0))


def prepare_image(img: Image.Image, spec: TransformSpec) -> Image.Image:
    """The deterministic, decode-time part of the protocol: RGB + resize (+ centre square)."""
    img = img.convert("RGB")
    interp = _PIL_INTERP[spec.interpolation]
    side = spec.stored_size
    if spec.resize == "square":
        return img.resize((side, side), interp)
    w, h = img.size
    if w <= h:
        new_w, new_h = side, int(side * h / w)
    else:
        new_w, new_h = int(side * w / h), side
    img = img.resize((new_w, new_h), interp)
    left, top = center_offset(new_w, side), center_offset(new_h, side)
    return img.crop((left, top, left + side, top + side))


def decode_image(path: str | Path, spec: TransformSpec) -> np.ndarray:
    """Open, fully decode and prepare one image: ``stored x stored x 3`` uint8."""
    with open_regular(Path(path)) as fh, Image.open(fh) as img:  # never a FIFO or a device
        img.load()
        out = np.asarray(prepare_image(img, spec), dtype=np.uint8)
    if out.shape != (spec.stored_size, spec.stored_size, 3):
        raise ValueError(f"decoded shape {out.shape} differs from the expected stored size")
    return out


def reference_transform(spec: TransformSpec, train: bool, normalization: Normalization) -> Any:
    """The protocol written with torchvision on PIL images, exactly as the reference codebases do.

    Not used by the fast path; it documents the protocol and lets tests compare against it.
    """
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[spec.interpolation]
    steps: list[Any] = [T.Lambda(lambda im: im.convert("RGB"))]
    if spec.resize == "square":
        steps.append(T.Resize((spec.image_size, spec.image_size), interpolation=interp))
    else:
        steps.append(T.Resize(spec.stored_size, interpolation=interp))
        if train:
            steps += [T.RandomCrop(spec.image_size), T.RandomHorizontalFlip(0.5)]
        else:
            steps.append(T.CenterCrop(spec.image_size))
    steps += [T.ToTensor(), T.Normalize(normalization.mean, normalization.std)]
    return T.Compose(steps)
