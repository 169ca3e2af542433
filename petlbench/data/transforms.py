"""Protocol transforms, split into a decode-once part (PIL, cached) and a per-batch part (device).

The published protocols (methods.md §3.4), and the recipe settings that change them
(``train_crop``, ``eval_resize``, ``interpolation``; docs/data-recipes.md):

* ``vtab_resize`` (VTAB-1k, NOAH/RepAdapter/ARC): ``Resize((S, S))`` bicubic, aspect ratio not
  kept, no augmentation; train = eval. Everything is deterministic, so the cache stores the
  final ``S x S`` image and the device only normalises.
* ``fgvc_crop`` (FGVC, VPT): train ``Resize(R)`` (shorter side, bilinear) -> ``RandomCrop(S)`` ->
  horizontal flip p=0.5; eval ``Resize(R)`` -> ``CenterCrop(S)``; ``R = round(S * 256 / 224)``.
  Training stores every image **whole**, shorter side R at its own aspect ratio (the exact
  pixels of torchvision's ``Resize(R)`` on PIL), in the slot layout of
  :mod:`petlbench.data.slots`; each batch draws every crop offset in its own image's full range
  ``0..W-S`` x ``0..H-S`` and crops + flips on the device, bit-equal to ``RandomCrop`` +
  ``RandomHorizontalFlip`` for the same offset and flip. Evaluation is deterministic, so the
  cache stores the final ``S x S`` centre crop (bit-equal to ``Resize(R)`` + ``CenterCrop(S)``).
* ``train_crop: random_resized``: torchvision's ``RandomResizedCrop(S, scale=(0.08, 1),
  ratio=(3/4, 4/3))`` + horizontal flip, the ``--simple-aug`` of the SSF, GPS and Adapter+ FGVC
  scripts. The crop box is drawn on the ORIGINAL image size by torchvision's rule
  (:func:`petlbench.data.resample.rrc_boxes`); the cache keeps each training image at its
  original resolution when its shorter side is at most ``RRC_SOURCE_FACTOR * S`` (CUB, most of
  Dogs), else shrunk to that (bicubic, antialiased); the device resamples every box to ``S x S``
  with PIL's own filter arithmetic (:mod:`petlbench.data.resample`), bit-equal to torchvision's
  ``resized_crop`` on PIL where the original is kept.
* ``train_crop: center``: training sees exactly the evaluation input, no augmentation (e.g. an
  FGVC run without crops or flips: ``Resize(R)`` + ``CenterCrop(S)`` for both roles with
  ``eval_resize: R``), one stored split for both roles. No built-in recipe uses it: the SSF and
  GPS VTAB scripts' ``--no-aug --direct-resize`` is the ``vtab_resize`` input itself.
* ``eval_resize: R'`` / ``interpolation``: evaluation ``Resize(R')`` + ``CenterCrop(S)`` with
  the given filter (SSF and GPS: 248 bicubic; Adapter+: 256 bicubic). ``interpolation: random``
  is timm's ``--train-interpolation random`` (each training crop bilinear or bicubic, p=0.5)
  with bicubic evaluation, as those three scripts run it.

Normalisation is a protocol field (anchors.md §5.3: codebases disagree). The caller passes the
backbone's pretrained ``mean``/``std`` by default, or a preset name; :class:`Normalization`
records which one was used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from petlbench.data.files import open_regular
from petlbench.errors import PetlbenchError, did_you_mean

_FGVC_RESIZE = 256 / 224
#: A random-resized-crop source keeps its original pixels up to a shorter side of this many times
#: the model's input (448 at 224); larger originals are shrunk to it. Measured on photographs,
#: boxes resampled from a 448 source differ from boxes resampled from the original by 0.45 of 255
#: levels per pixel on average (docs/data-recipes.md); the cost is about 0.8 MB per 4:3 image.
RRC_SOURCE_FACTOR = 2
#: torchvision's (and timm's) RandomResizedCrop defaults, which every official script keeps.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Values of the recipe settings (petlbench.config.TRAIN_HPARAMS uses them as its choices).
TRAIN_CROPS = ("protocol", "random_resized", "center")
INTERPOLATION_SETTINGS = ("protocol", "bilinear", "bicubic", "random")
TRAIN_SPLITS = ("protocol", "train+val")

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
class Storage:
    """What the decode cache holds for a split under one role (training or evaluation).

    * ``square``: every image resized to ``size x size`` (aspect not kept).
    * ``center_crop``: shorter side resized to ``size``, then the central ``crop x crop``: the
      final evaluation input, so evaluation reads it as is.
    * ``short_side``: every image whole at its aspect ratio, shorter side ``size`` (``enlarge``:
      torchvision's ``Resize(size)``, which also enlarges small images) or, without ``enlarge``,
      at its original size unless its shorter side exceeds ``size``. Kept in the slot layout of
      :mod:`petlbench.data.slots`, whose neighbouring slots share ``overlap`` pixels (the widest
      window a batch reads from one image at once).
    """

    kind: str
    size: int
    interpolation: str
    crop: int = 0
    enlarge: bool = True
    overlap: int = 0

    def key(self) -> dict[str, Any]:
        """What determines the stored pixels and their shape (hashed into the cache key).

        A square store keeps the description it always had, so VTAB caches written before the
        recipe settings existed stay valid; the other layouts name themselves, so a file of the
        former FGVC layout (the central square) is never read as one of them."""
        if self.kind == "square":
            return {"name": "vtab_resize", "image_size": self.size, "stored_size": self.size,
                    "interpolation": self.interpolation, "resize": "square", "train_crop": "none",
                    "train_flip": False, "eval_crop": "none"}
        return {"layout": self.kind, **asdict(self)}

    def stored_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of ``height x width`` as stored (before any slotting)."""
        if self.kind == "square":
            return self.size, self.size
        if self.kind == "center_crop":
            return self.crop, self.crop
        if not self.enlarge and min(height, width) <= self.size:
            return height, width
        return short_side_shape(height, width, self.size)

    def describe(self) -> dict[str, Any]:
        """The layout, in words and numbers, for records and docs."""
        out: dict[str, Any] = asdict(self)
        if self.kind == "square":
            out["bytes_per_image"] = self.size * self.size * 3
            out["note"] = f"{self.size}x{self.size} ({self.interpolation}), aspect ratio not kept"
        elif self.kind == "center_crop":
            out["bytes_per_image"] = self.crop * self.crop * 3
            out["note"] = (f"final input: shorter side {self.size} ({self.interpolation}), central "
                           f"{self.crop}x{self.crop} (torchvision Resize + CenterCrop, bit-equal)")
        else:
            how = (f"shorter side {self.size}" if self.enlarge
                   else f"original pixels, shrunk to a shorter side of {self.size} only when larger")
            longer = int(self.size * 4 / 3)
            out["bytes_per_image"] = (f"about shorter x longer side x 3 ({self.size}x{longer}x3 = "
                                      f"{self.size * longer * 3} for a 4:3 photo)")
            out["note"] = (f"every image whole ({how}, {self.interpolation}), portrait ones transposed, in "
                           f"fixed-size slots; an image longer than a slot spans overlapping slots "
                           f"(overlap {self.overlap}), so every crop lies in one slot")
        return out


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output (height, width): shorter side ``size``, the longer
    ``int(size * longer / shorter)`` (truncated, as torchvision and the former VPT code do)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def rrc_overlap(cap: int) -> int:
    """The widest a random-resized-crop box can be along the longer side of an image stored with
    a shorter side of at most ``cap``, plus margins: its long edge is at most ratio_max x its short
    edge, which is at most the image's shorter side (+1 for rounding, +2 for the partly covered
    pixels at both ends, +1 spare)."""
    return math.ceil(RRC_RATIO[1] * cap) + 4


@dataclass(frozen=True)
class TransformSpec:
    """The input recipe of a run: what is done once at decode time and what per batch."""

    name: str  # the suite's protocol transform: "vtab_resize" | "fgvc_crop"
    image_size: int  # S, the model's input
    stored_size: int  # training resize: the square side, the shorter side R, or the RRC source cap
    interpolation: str  # training resampling: "bilinear" | "bicubic" | "random" (RRC only)
    resize: str  # training resize: "square" | "short_side"
    train_crop: str  # "none" | "random" | "random_resized" | "center" (the evaluation input)
    train_flip: bool
    eval_crop: str  # "none" | "center"
    eval_resize: str = "square"  # "square" | "short_side"
    eval_size: int = 0  # evaluation resize: the square side or the shorter side
    eval_interpolation: str = "bicubic"

    def describe(self) -> dict[str, Any]:
        """The exact recipe, for result records and report footnotes: each step, what is stored
        for training and for evaluation, and its memory cost."""
        out = asdict(self)
        out["train_storage"] = self.storage(True).describe()
        out["eval_storage"] = self.storage(False).describe()
        if self.train_crop == "random_resized":
            out["random_resized"] = {
                "scale": list(RRC_SCALE), "ratio": list(RRC_RATIO), "flip": self.train_flip,
                "interpolation": ("bilinear or bicubic per image, p=0.5 (timm 'random')"
                                  if self.interpolation == "random" else self.interpolation),
                "box": "torchvision's rule (10 tries, then the centre fallback) on the original image size",
                "source": f"the original image when its shorter side is <= {self.stored_size}, else shrunk to "
                          f"{self.stored_size} (bicubic, antialiased); resampled on the device with PIL's "
                          "filter arithmetic (bit-equal to torchvision on PIL where the original is kept)",
            }
        return out

    def crop_mode(self, train: bool) -> str:
        return self.train_crop if train else self.eval_crop

    def flip(self, train: bool) -> bool:
        return self.train_flip and train

    def storage(self, train: bool) -> Storage:
        """What the cache holds for a split used for training (``train``) or evaluation."""
        if train:
            if self.train_crop == "center":
                return self.storage(False)
            if self.train_crop == "none":
                return Storage("square", self.image_size, self.interpolation)
            if self.train_crop == "random":
                return Storage("short_side", self.stored_size, self.interpolation, overlap=self.image_size)
            return Storage("short_side", self.stored_size, "bicubic", enlarge=False,
                           overlap=rrc_overlap(self.stored_size))
        if self.eval_resize == "square":
            return Storage("square", self.image_size, self.eval_interpolation)
        return Storage("center_crop", self.eval_size, self.eval_interpolation, crop=self.image_size)


def _setting(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise PetlbenchError(f"training setting {key!r} must be one of {', '.join(allowed)}, got {value!r}.")
    return str(value)


def transform_spec(
    name: Any, image_size: int | None = None, *, train_crop: str = "protocol", eval_resize: int = 0,
    interpolation: str = "protocol",
) -> TransformSpec:
    """The :class:`TransformSpec` for a protocol transform name (or a Suite, using its fields),
    changed by the recipe settings ``train_crop``, ``eval_resize`` and ``interpolation``."""
    if hasattr(name, "transform") and hasattr(name, "image_size"):
        image_size = image_size or name.image_size
        name = name.transform
    if image_size is None or image_size < 8:
        raise PetlbenchError(f"image_size must be an integer >= 8, got {image_size!r}.")
    s = int(image_size)
    if name == "vtab_resize":
        spec = TransformSpec(name, s, s, "bicubic", "square", "none", False, "none", "square", s, "bicubic")
    elif name == "fgvc_crop":
        r = int(round(s * _FGVC_RESIZE))
        spec = TransformSpec(name, s, r, "bilinear", "short_side", "random", True, "center", "short_side", r, "bilinear")
    else:
        raise PetlbenchError(did_you_mean(str(name), ["vtab_resize", "fgvc_crop"], "transform"))
    train_crop = _setting("train_crop", train_crop, TRAIN_CROPS)
    interpolation = _setting("interpolation", interpolation, INTERPOLATION_SETTINGS)
    if isinstance(eval_resize, bool) or not isinstance(eval_resize, int) or (eval_resize and eval_resize < s):
        raise PetlbenchError(
            f"training setting 'eval_resize' must be 0 (the protocol's) or a shorter side of at least the input "
            f"size {s}, got {eval_resize!r}. Fix: e.g. --set eval_resize={round(s * _FGVC_RESIZE)}"
        )
    if interpolation == "random" and train_crop != "random_resized":
        raise PetlbenchError(
            "training setting 'interpolation': 'random' (timm's per-image bilinear or bicubic) applies to "
            "random resized crops only. Fix: --set train_crop=random_resized, or interpolation=bilinear|bicubic."
        )
    changes: dict[str, Any] = {}
    if interpolation != "protocol":
        changes["interpolation"] = interpolation
        changes["eval_interpolation"] = "bicubic" if interpolation == "random" else interpolation
    if train_crop == "center":
        changes.update(train_crop="center", train_flip=False)
    if train_crop == "random_resized":
        changes.update(train_crop="random_resized", train_flip=True, resize="short_side",
                       stored_size=RRC_SOURCE_FACTOR * s)
    if eval_resize:
        changes.update(eval_resize="short_side", eval_size=int(eval_resize), eval_crop="center")
    return TransformSpec(**{**asdict(spec), **changes})


def input_spec(suite: Any, train: Mapping[str, Any]) -> TransformSpec:
    """A run's input recipe: the suite's protocol transform under its training settings."""
    return transform_spec(
        suite.transform, suite.image_size, train_crop=train.get("train_crop", "protocol"),
        eval_resize=train.get("eval_resize", 0), interpolation=train.get("interpolation", "protocol"),
    )


_PIL_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def center_offset(size: int, crop: int) -> int:
    """torchvision's centre-crop offset (``int(round((size - crop) / 2))``)."""
    return int(round((size - crop) / 2.0))


def pil_resize(img: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """``img.resize(size)`` with PIL's two passes in the order every Pillow up to 12.x runs them:
    the horizontal pass (width), then the vertical pass (height), each rounded to 8 bits.

    Pillow 13 may run the vertical pass first for some sizes, which moves pixels by a level or
    two; the official scripts ran Pillow <= 12 (Adapter+ pins 10.4), so the cached pixels and the
    device resampling (:mod:`petlbench.data.resample`) follow the classic order on any Pillow.
    One-axis resizes have no order to choose and are what PIL computes."""
    w, h = img.size
    filt = _PIL_INTERP[interpolation]
    if size[0] != w:
        img = img.resize((size[0], h), filt)
    if size[1] != h:
        img = img.resize(size, filt)
    return img


def _storage(what: Storage | TransformSpec) -> Storage:
    return what.storage(True) if isinstance(what, TransformSpec) else what


def prepare_image(img: Image.Image, what: Storage | TransformSpec) -> Image.Image:
    """The deterministic, decode-time part of a recipe: RGB + resize (+ centre crop), as stored
    (a TransformSpec means its training storage). Each step is the PIL call torchvision makes."""
    storage = _storage(what)
    img = img.convert("RGB")
    w, h = img.size
    if storage.kind == "square":  # one PIL call, as VTAB caches have always been written
        return img.resize((storage.size, storage.size), _PIL_INTERP[storage.interpolation])
    new_h, new_w = storage.stored_shape(h, w) if storage.kind != "center_crop" else short_side_shape(h, w, storage.size)
    img = pil_resize(img, (new_w, new_h), storage.interpolation)
    if storage.kind == "center_crop":
        left, top = center_offset(new_w, storage.crop), center_offset(new_h, storage.crop)
        img = img.crop((left, top, left + storage.crop, top + storage.crop))
    return img


def decode_image(path: str | Path, what: Storage | TransformSpec) -> np.ndarray:
    """Open, fully decode and prepare one image: ``height x width x 3`` uint8 as stored."""
    storage = _storage(what)
    with open_regular(Path(path)) as fh, Image.open(fh) as img:  # never a FIFO or a device
        img.load()
        expected = storage.stored_shape(img.height, img.width)
        out = np.asarray(prepare_image(img, storage), dtype=np.uint8)
    if out.shape != (*expected, 3):
        raise ValueError(f"decoded shape {out.shape} differs from the expected stored size {expected}")
    return out


def reference_transform(spec: TransformSpec, train: bool, normalization: Normalization) -> Any:
    """The recipe written with torchvision (and timm) on PIL images, as the reference codebases do.

    Not used by the fast path; it documents the recipe and lets tests compare against it.
    """
    from torchvision import transforms as T

    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    steps: list[Any] = [T.Lambda(lambda im: im.convert("RGB"))]
    s = spec.image_size
    if train and spec.train_crop != "center":
        if spec.train_crop == "none":
            steps.append(T.Resize((s, s), interpolation=modes[spec.interpolation]))
        elif spec.train_crop == "random":
            steps += [T.Resize(spec.stored_size, interpolation=modes[spec.interpolation]), T.RandomCrop(s)]
        elif spec.interpolation == "random":
            from timm.data.transforms import RandomResizedCropAndInterpolation

            steps.append(RandomResizedCropAndInterpolation(s, scale=RRC_SCALE, ratio=RRC_RATIO, interpolation="random"))
        else:
            steps.append(T.RandomResizedCrop(s, scale=RRC_SCALE, ratio=RRC_RATIO, interpolation=modes[spec.interpolation]))
        if spec.train_flip:
            steps.append(T.RandomHorizontalFlip(0.5))
    elif spec.eval_resize == "square":
        steps.append(T.Resize((s, s), interpolation=modes[spec.eval_interpolation]))
    else:
        steps += [T.Resize(spec.eval_size, interpolation=modes[spec.eval_interpolation]), T.CenterCrop(s)]
    steps += [T.ToTensor(), T.Normalize(normalization.mean, normalization.std)]
    return T.Compose(steps)
