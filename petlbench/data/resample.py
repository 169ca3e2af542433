"""Random resized crops on the device: torchvision's box rule and PIL's resampling arithmetic.

The SSF, GPS and Adapter+ FGVC scripts train on ``RandomResizedCrop(224)`` + flip, applied by
torchvision to each PIL image in DataLoader workers. Here a whole batch is done at once:

* :func:`rrc_boxes` draws every sample's box ``(top, left, height, width)`` by torchvision's rule
  (up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``,
  each rounded, accepted when it fits; otherwise the centre fallback clamped to ``ratio``), from
  uniforms the loader draws on the CPU, so a seed gives the same boxes on any device.
* :func:`box_weights` builds, for every sample, the matrix of PIL's fixed-point filter
  coefficients along one axis (``precompute_coeffs`` + ``normalize_coeffs_8bpc``: support scaled
  by the downscaling factor, clipped to the crop, normalised in double precision, rounded to 22
  fractional bits), and :func:`resample` applies them as PIL does: the horizontal pass first,
  each pass accumulated exactly (three float32 products of 8-bit digits, :func:`_chunks`) and
  rounded, clipped to 0..255.
  With the original pixels cached, a box is therefore resampled bit-equal to torchvision's
  ``resized_crop`` (crop, then PIL ``resize``) for either filter; tests/data/test_data_recipes.py
  checks it against PIL.

Where the cache holds a shrunk copy (originals whose shorter side exceeds the cap of
:data:`petlbench.data.transforms.RRC_SOURCE_FACTOR`), the box is mapped into the copy's
coordinates (fractional) and resampled there with the same filter: the remaining difference from
resampling the original (docs/data-recipes.md).
"""

from __future__ import annotations

import contextlib
import math

import torch

from petlbench.data.transforms import RRC_RATIO, RRC_SCALE

#: PIL's fixed-point precision for 8-bit images (Resample.c: 32 - 8 - 2).
PRECISION_BITS = 22
_ONE = float(1 << PRECISION_BITS)
_HALF = float(1 << (PRECISION_BITS - 1))
#: torchvision's and timm's number of tries before the centre fallback.
TRIES = 10


def rrc_boxes(
    height: torch.Tensor, width: torch.Tensor, u_area: torch.Tensor, u_ratio: torch.Tensor,
    u_top: torch.Tensor, u_left: torch.Tensor,
    scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch: ``(top, left, h, w)`` int64.

    ``height``/``width``: each image's size (B,); ``u_area``/``u_ratio``: uniforms in [0, 1),
    (B, TRIES), one per try for the area fraction and for the log aspect ratio; ``u_top``/``u_left``:
    uniforms (B,) placing an accepted box (offsets uniform over every position that fits). The
    first try whose rounded box fits is taken, as the sequential rule does; if none fits, the
    centre fallback.
    """
    h = height.to(torch.float64)[:, None]
    w = width.to(torch.float64)[:, None]
    target = (h * w) * (scale[0] + u_area.to(torch.float64) * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + u_ratio.to(torch.float64) * (hi - lo))
    cw = torch.round(torch.sqrt(target * aspect))  # Python's round() and torch.round: half to even
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    found = fits.any(dim=1)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    h, w = h[:, 0], w[:, 0]
    in_ratio = w / h
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(h * max(ratio)), w)
    fh = torch.where(narrow, torch.round(w / min(ratio)), h)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = torch.where(found, _uniform_int(u_top, h - ch + 1), torch.floor((h - ch) / 2))
    left = torch.where(found, _uniform_int(u_left, w - cw + 1), torch.floor((w - cw) / 2))
    return top.long(), left.long(), ch.long(), cw.long()


def _uniform_int(u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``floor(u * n)`` for u in [0, 1): uniform over 0..n-1 (float64, so no rounding reaches n)."""
    return torch.minimum(torch.floor(u.to(torch.float64) * n), n - 1)


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), term by term in PIL's order of operations."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1  # ((a + 2) x - (a + 3)) x x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def max_taps(extent: int, out: int) -> int:
    """A bound on PIL's taps per output pixel when a box of at most ``extent`` pixels is resampled
    to ``out`` (support 2 x max(scale, 1) each side, + 2 for the rounding at both ends)."""
    return math.ceil(4 * max(extent / out, 1.0)) + 2


#: Above this many taps a float32 sum of 8-bit pixel x 8-bit digit products could exceed 2^24.
EXACT_TAPS = (1 << 24) // (255 * 255)


def box_weights(
    start: torch.Tensor, stop: torch.Tensor, limit: torch.Tensor, out: int, bicubic: torch.Tensor, length: int,
    extent: int | None = None,
) -> torch.Tensor:
    """PIL's 8-bit coefficients for resampling ``[start, stop)`` of an axis to ``out`` pixels, per
    sample, as a dense (B, out, length) float64 matrix of integers (22 fractional bits).

    ``start``/``stop`` (B,) are the box in stored pixel coordinates (integers when the original is
    stored: then this is exactly PIL resizing the cropped image); ``limit`` (B,) the stored extent
    of that axis; ``bicubic`` (B,) bool, else bilinear; ``length`` the matrix width and ``extent``
    a bound on the boxes' length (default ``length``), which bounds the taps computed. The crop's
    frame starts at ``floor(start)``, so the filter never reaches outside the box, as with
    torchvision's crop-then-resize.
    """
    dev = start.device
    start, stop = start.to(torch.float64), stop.to(torch.float64)
    base = torch.floor(start)
    frac = (start - base)[:, None]
    in_size = (torch.minimum(torch.ceil(stop), limit.to(torch.float64)) - base)[:, None]
    scale = ((stop - start) / out)[:, None]
    filterscale = torch.clamp(scale, min=1.0)
    support = torch.where(bicubic, 2.0, 1.0).to(torch.float64)[:, None] * filterscale
    ss = 1.0 / filterscale
    center = (torch.arange(out, device=dev, dtype=torch.float64)[None, :] + 0.5) * scale + frac
    xmin = torch.clamp(torch.floor(center - support + 0.5), min=0.0)
    count = torch.minimum(torch.floor(center + support + 0.5), in_size) - xmin
    taps = max_taps(min(length, extent or length) + 2, out)
    if taps > EXACT_TAPS:
        raise ValueError(f"boxes up to {extent or length} pixels resampled to {out} need {taps} taps; "
                         f"exact sums allow {EXACT_TAPS}")
    t = torch.arange(taps, device=dev, dtype=torch.float64)
    d = ((xmin[..., None] + t) - center[..., None] + 0.5) * ss[..., None]  # PIL: (x + xmin - center + 0.5) * ss
    k = torch.where(bicubic[:, None, None], _bicubic(d), _bilinear(d))
    k = torch.where(t < count[..., None], k, torch.zeros_like(k))
    total = k[..., 0]
    for i in range(1, taps):  # PIL sums the taps one after the other: the same order, the same double
        total = total + k[..., i]
    total = total[..., None]
    k = torch.where(total != 0.0, k / total, k)
    fixed = torch.where(k < 0, torch.trunc(-0.5 + k * _ONE), torch.trunc(0.5 + k * _ONE))
    index = base[:, None, None] + xmin[..., None] + t
    index = index.clamp_(0, length - 1).long()  # unused taps carry 0 and may point anywhere
    dense = torch.zeros((start.shape[0], out, length), dtype=torch.float64, device=dev)
    return dense.scatter_add_(2, index, fixed)


def _round8(acc: torch.Tensor) -> torch.Tensor:
    """PIL's ``clip8``: (sum + 2^21) >> 22, clipped to 0..255."""
    return torch.floor((acc + _HALF) * (1.0 / _ONE)).clamp_(0.0, 255.0)


def _chunks(weights: torch.Tensor) -> list[torch.Tensor]:
    """Integer coefficients split into 8-bit digits, ``w = d0 + 256 d1 + 65536 d2`` (d0, d1 in
    0..255, d2 signed and small), each float32: a matrix product of 8-bit pixels with 8-bit digits
    sums integers below 2^24 (taps x 255 x 255), exact in float32 accumulation and unchanged by
    TF32's 10-bit inputs, so three float32 products give PIL's integer sums on any GPU."""
    low = torch.remainder(weights, 256.0)
    rest = (weights - low) / 256.0
    mid = torch.remainder(rest, 256.0)
    return [low.float(), mid.float(), ((rest - mid) / 256.0).float()]


def _apply(x: torch.Tensor, weights: torch.Tensor, left: bool, digits: bool) -> torch.Tensor:
    """``weights @ x`` (``left``) or ``x @ weights^T`` with exact integer sums, then PIL's rounding:
    in float64 (one product; CPUs), or in float32 8-bit digits (``digits``: three products that
    use the GPU's float32/TF32 units instead of its far slower float64 ones). Equal results."""
    def product(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul(w[:, None], v) if left else torch.matmul(v, w.transpose(1, 2)[:, None])

    if not digits:
        return _round8(product(weights, x.to(torch.float64))).float()
    total: torch.Tensor | None = None
    for scale, digit in zip((1.0, 256.0, 65536.0), _chunks(weights), strict=True):
        part = product(digit, x).to(torch.float64) * scale
        total = part if total is None else total + part
    assert total is not None
    return _round8(total).float()


def resample(source: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, transposed: bool,
             digits: bool | None = None) -> torch.Tensor:
    """Resample each ``H x L x 3`` uint8 slot of ``source`` (B, H, L, 3) with ``rows`` (B, S, H)
    along its rows and ``cols`` (B, S, L) along its columns: (B, S, S, 3) float32 of 0..255 in the
    image's own orientation.

    ``transposed``: the slots hold portrait images transposed (their x along the slot's rows).
    Either way the image's horizontal pass comes first, as in PIL, each pass rounded to 8 bits.
    ``digits``: the float32 digit products of :func:`_chunks` (default: on CUDA).
    """
    digits = source.device.type == "cuda" if digits is None else digits
    x = source.permute(0, 3, 1, 2).float()  # B, 3, H, L
    manual = x.device.type in ("cuda", "cpu")  # autocast off (it has no meaning on e.g. meta)
    with torch.autocast(x.device.type, enabled=False) if manual else contextlib.nullcontext():
        if not transposed:  # image x along the slot's columns
            x = _apply(_apply(x, cols, False, digits), rows, True, digits)  # B, 3, S(y), S(x)
        else:  # image x along the slot's rows
            x = _apply(_apply(x, rows, True, digits), cols, False, digits).transpose(2, 3)
    return x.permute(0, 2, 3, 1)
