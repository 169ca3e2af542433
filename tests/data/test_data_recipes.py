"""The input recipes of issue 16, each against an independent statement of the official rule.

* FGVC training crop: every offset ``RandomCrop(S)`` reaches after ``Resize(R)`` (0..W-S,
  0..H-S) is reachable and none outside, and each crop + flip is bit-equal to cropping the
  resized image, on odd sizes, portrait images and a 3:1 panorama that spans several slots.
* Evaluation ``Resize(R)`` + ``CenterCrop(S)`` bit-equal, for the protocol and for the SSF
  (248, bicubic) and Adapter+ (256, bicubic) recipes, and the normalised input tensor equal to
  torchvision's ``Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)``.
* ``RandomResizedCrop``: the box rule against a line-by-line statement of torchvision's
  ``get_params``; the resampling bit-equal to PIL on the cropped original where it is kept.
* ``train+val`` and the caches of the former layout.

References resize with PIL's two passes in Pillow's classic order, written out here as two
one-axis ``resize`` calls (horizontal, then vertical): what every Pillow up to 12.x does in one
call and what the official environments ran (Pillow 13 may run the vertical pass first).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from petlbench.data.cache import cache_key, load_images
from petlbench.data.loader import DeviceLoader
from petlbench.data.readers import SplitIndex, concat_splits, read_split, train_val_splits
from petlbench.data.resample import TRIES, rrc_boxes
from petlbench.data.slots import COUNT, best_slot_width, slot_counts
from petlbench.data.suites import get_suite
from petlbench.data.transforms import decode_image, transform_spec
from petlbench.errors import PetlbenchError

FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def classic_resize(img: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """PIL resize with the horizontal pass first (Pillow <= 12's order), one axis per call."""
    filt = FILTERS[interpolation]
    if size[0] != img.width:
        img = img.resize((size[0], img.height), filt)
    if size[1] != img.height:
        img = img.resize(size, filt)
    return img


def torchvision_size(img: Image.Image, short: int) -> tuple[int, int]:
    """(width, height) of torchvision's ``Resize(short)`` (the geometry, from torchvision itself)."""
    return T.Resize(short, interpolation=T.InterpolationMode.BILINEAR)(img).size


def write_fgvc(root: Path, sizes: list[tuple[int, int]], photo: np.ndarray) -> Path:
    """A CUB-layout task whose images are ``photo`` resized to each (width, height), as PNG."""
    ds = root / "CUB_200_2011"
    mapping = {}
    for i, (w, h) in enumerate(sizes):
        key = f"{i + 1:03d}.Bird/img_{i}.png"
        path = ds / "images" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).resize((w, h), Image.Resampling.BICUBIC).save(path)
        mapping[key] = i + 1
    for split in ("train", "val", "test"):
        (ds / f"{split}.json").write_text(json.dumps(mapping))
    return root


def pixels(x: torch.Tensor) -> np.ndarray:
    """A batch normalised with ``none`` (x / 255) back to uint8 HWC (exact: one multiply each way)."""
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


# ----------------------------------------------------------------------------- the FGVC training crop

def test_slot_layout_keeps_panoramas_whole_and_picks_the_cheapest_width() -> None:
    longs = np.array([46, 61, 49, 111])
    width = best_slot_width(longs, overlap=32, minimum=37)
    costs = {w: int(slot_counts(longs, w, 32).sum()) * w for w in range(37, 112)}
    assert costs[width] == min(costs.values())
    assert slot_counts(np.array([111]), width, 32)[0] >= 2  # the panorama spans overlapping slots
    assert best_slot_width(np.array([50, 50]), overlap=32, minimum=37) == 50  # one shape: no padding


def test_train_crop_reaches_every_official_offset_and_none_outside(tmp_path: Path, photo: np.ndarray) -> None:
    sizes = [(50, 40), (40, 66), (101, 75), (150, 50)]  # landscape, portrait, odd, a 3:1 panorama
    index = read_split("fgvc", "cub", "train", write_fgvc(tmp_path, sizes, photo))
    cached = load_images(index, transform_spec("fgvc_crop", 32), persist=False)  # R = 37
    assert cached.layout is not None and cached.layout.table[3, COUNT] >= 2
    loader = DeviceLoader.for_split(cached, train=True, batch_size=4, normalization="none", seed=0)
    draws = [loader.epoch_augmentation(e) for e in range(1500)]
    for i, (w, h) in enumerate(sizes):
        width, height = torchvision_size(Image.new("RGB", (w, h)), 37)
        tops = torch.cat([d["top"][d["index"] == i] for d in draws])
        lefts = torch.cat([d["left"][d["index"] == i] for d in draws])
        flips = torch.cat([d["flip"][d["index"] == i] for d in draws])
        assert set(tops.tolist()) == set(range(height - 32 + 1)), i  # RandomCrop: 0..H-S, all of them
        assert set(lefts.tolist()) == set(range(width - 32 + 1)), i  # 0..W-S (80 positions on the panorama)
        assert 0.35 < flips.float().mean() < 0.65


@pytest.mark.parametrize("size", [(250, 200), (200, 333), (501, 375), (600, 200), (224, 224)])
def test_train_crops_are_bit_equal_to_resize_then_crop(tmp_path: Path, photo: np.ndarray, size) -> None:
    """Whatever the offset and flip drawn, the batch is the official ``Resize(256)`` image cropped
    there (S = 224, the real sizes)."""
    index = read_split("fgvc", "cub", "train", write_fgvc(tmp_path, [size], photo))
    spec = transform_spec("fgvc_crop", 224)
    cached = load_images(index, spec, persist=False)
    with Image.open(index.paths[0]) as im:
        img = im.convert("RGB")
    resized = classic_resize(img, torchvision_size(img, 256), "bilinear")
    assert np.array_equal(decode_image(index.paths[0], spec), np.asarray(resized))  # the whole image is kept
    loader = DeviceLoader.for_split(cached, train=True, batch_size=1, normalization="none", seed=7)
    for epoch in range(6):
        aug = loader.epoch_augmentation(epoch)
        loader.set_epoch(epoch)
        (x, _), = list(loader)
        top, left, flip = int(aug["top"][0]), int(aug["left"][0]), bool(aug["flip"][0])
        ref = F.crop(resized, top, left, 224, 224)
        ref = F.hflip(ref) if flip else ref
        assert np.array_equal(pixels(x)[0], np.asarray(ref)), (epoch, top, left, flip)


# ----------------------------------------------------------------------------- evaluation and normalisation

EVAL_RECIPES = {
    "protocol": ({}, 256, "bilinear"),
    "ssf": ({"eval_resize": 248, "interpolation": "bicubic"}, 248, "bicubic"),  # timm crop_pct 0.9
    "adapter_plus": ({"eval_resize": 256, "interpolation": "bicubic"}, 256, "bicubic"),  # crop_pct 0.875
}


@pytest.mark.parametrize("recipe", sorted(EVAL_RECIPES))
def test_eval_is_bit_equal_and_the_input_tensor_is_torchvision_normalize(tmp_path: Path, photo: np.ndarray,
                                                                        recipe: str) -> None:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    settings, short, interp = EVAL_RECIPES[recipe]
    sizes = [(250, 200), (200, 333), (501, 375), (600, 200)]
    index = read_split("fgvc", "cub", "test", write_fgvc(tmp_path, sizes, photo))
    spec = transform_spec("fgvc_crop", 224, **settings)
    cached = load_images(index, spec, train=False, persist=False)
    assert tuple(cached.images.shape) == (4, 224, 224, 3)  # stored as the final input
    raw, _ = next(iter(DeviceLoader.for_split(cached, train=False, batch_size=4, normalization="none")))
    x, _ = next(iter(DeviceLoader.for_split(cached, train=False, batch_size=4, normalization="imagenet")))
    normalize = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    for i, path in enumerate(index.paths):
        with Image.open(path) as im:
            img = im.convert("RGB")
        ref = F.center_crop(classic_resize(img, torchvision_size(img, short), interp), [224, 224])
        assert np.array_equal(pixels(raw)[i], np.asarray(ref)), i
        torch.testing.assert_close(x[i], normalize(F.to_tensor(ref)), atol=2e-6, rtol=0)


def test_center_train_crop_is_the_ssf_vtab_direct_resize(vtab_root: Path, tmp_path: Path) -> None:
    """SSF's and GPS's VTAB scripts (``--no-aug --direct-resize``): ``Resize(S)`` (shorter side,
    bicubic) + ``CenterCrop(S)`` for training and evaluation alike, not the square resize; one
    stored split serves both roles."""
    index = read_split("vtab", "cifar", "train800val200", vtab_root)  # crops of varied, non-square sizes
    spec = transform_spec("vtab_resize", 32, train_crop="center", eval_resize=32)
    train = load_images(index, spec, train=True, cache_dir=tmp_path)
    evaluation = load_images(index, spec, train=False, cache_dir=tmp_path)
    assert evaluation.hit and evaluation.key == train.key
    x_train, _ = next(iter(DeviceLoader.for_split(train, train=True, batch_size=9, normalization="none", shuffle=False)))
    x_eval, _ = next(iter(DeviceLoader.for_split(evaluation, train=False, batch_size=9, normalization="none")))
    assert torch.equal(x_train, x_eval)
    differs_from_square = 0
    for i, path in enumerate(index.paths):
        with Image.open(path) as im:
            img = im.convert("RGB")
        ref = F.center_crop(classic_resize(img, torchvision_size(img, 32), "bicubic"), [32, 32])
        assert np.array_equal(pixels(x_train)[i], np.asarray(ref)), i
        differs_from_square += not np.array_equal(np.asarray(ref), np.asarray(img.resize((32, 32), FILTERS["bicubic"])))
    assert differs_from_square >= 5  # non-square images: not the protocol's square resize


def test_recipe_settings_are_checked_in_one_line() -> None:
    with pytest.raises(PetlbenchError, match="eval_resize"):
        transform_spec("fgvc_crop", 224, eval_resize=200)  # smaller than the input
    with pytest.raises(PetlbenchError, match="random resized crops only"):
        transform_spec("fgvc_crop", 224, interpolation="random")
    with pytest.raises(PetlbenchError, match="train_crop"):
        transform_spec("fgvc_crop", 224, train_crop="random")
    spec = transform_spec("fgvc_crop", 224, train_crop="random_resized", interpolation="random", eval_resize=248)
    assert (spec.interpolation, spec.eval_interpolation, spec.eval_size) == ("random", "bicubic", 248)
    described = spec.describe()
    assert "random_resized" in described and "bytes_per_image" in described["train_storage"]


# ----------------------------------------------------------------------------- random resized crops

def torchvision_rrc(height: int, width: int, u_area: list[float], u_ratio: list[float], u_top: float,
                    u_left: float, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, line by line, with its random numbers given:
    try 10 times an area fraction uniform in ``scale`` and a log-uniform aspect ratio; the first
    rounded box that fits is placed uniformly; else the whole image clamped to ``ratio``, centred."""
    area = height * width
    for k in range(10):
        target_area = area * (scale[0] + u_area[k] * (scale[1] - scale[0]))
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect_ratio = math.exp(log_ratio[0] + u_ratio[k] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_rrc_boxes_follow_torchvision_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [(375, 500), (500, 375), (200, 600), (1, 1), (2, 3), (10, 1000), (1000, 10), (224, 224), (7, 5)]
    sizes += [(int(h), int(w)) for h, w in torch.randint(1, 700, (300, 2), generator=gen)]
    n = len(sizes)
    u_area = torch.rand((n, TRIES), generator=gen, dtype=torch.float64)
    u_ratio = torch.rand((n, TRIES), generator=gen, dtype=torch.float64)
    u_area[:6] = 1.0 - 1e-12  # the largest areas: often no try fits, the fallback decides
    u_top, u_left = torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    height = torch.tensor([h for h, _ in sizes])
    width = torch.tensor([w for _, w in sizes])
    got = torch.stack(rrc_boxes(height, width, u_area, u_ratio, u_top, u_left), dim=1).tolist()
    fallbacks = 0
    for k, (h, w) in enumerate(sizes):
        expected = torchvision_rrc(h, w, u_area[k].tolist(), u_ratio[k].tolist(), float(u_top[k]), float(u_left[k]))
        assert tuple(got[k]) == expected, (h, w)
        top, left, ch, cw = expected
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        fallbacks += not any(
            0 < round(math.sqrt(h * w * (0.08 + a * 0.92) * r)) <= w and 0 < round(math.sqrt(h * w * (0.08 + a * 0.92) / r)) <= h
            for a, r in zip(u_area[k].tolist(), [math.exp(math.log(3 / 4) + u * math.log(16 / 9)) for u in u_ratio[k].tolist()],
                            strict=True))
    assert fallbacks >= 3  # the fallback branch was exercised


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "random"])
def test_rrc_is_bit_equal_to_resized_crop_of_the_original(tmp_path: Path, photo: np.ndarray, interpolation: str) -> None:
    """Originals kept (shorter side <= 2 x 32): each box, filter and flip equals PIL resizing the
    cropped original, as torchvision's resized_crop does; portrait, landscape and a panorama."""
    sizes = [(60, 45), (45, 61), (150, 50), (33, 40), (64, 64)]
    index = read_split("fgvc", "cub", "train", write_fgvc(tmp_path, sizes, photo))
    spec = transform_spec("fgvc_crop", 32, train_crop="random_resized", interpolation=interpolation)
    cached = load_images(index, spec, persist=False)
    assert cached.layout is not None and cached.layout.table[2, COUNT] >= 2  # the panorama spans slots
    images = []
    for path in index.paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    loader = DeviceLoader.for_split(cached, train=True, batch_size=3, normalization="none", seed=1)
    seen_bicubic = set()
    for epoch in range(4):
        aug = loader.epoch_augmentation(epoch)
        loader.set_epoch(epoch)
        got = np.concatenate([pixels(x) for x, _ in loader])
        for k in range(len(sizes)):
            i, top, left = int(aug["index"][k]), int(aug["top"][k]), int(aug["left"][k])
            h, w, bic = int(aug["height"][k]), int(aug["width"][k]), bool(aug["bicubic"][k])
            seen_bicubic.add(bic)
            ref = classic_resize(F.crop(images[i], top, left, h, w), (32, 32), "bicubic" if bic else "bilinear")
            ref = F.hflip(ref) if bool(aug["flip"][k]) else ref
            assert np.array_equal(got[k], np.asarray(ref)), (epoch, k, i, (top, left, h, w), bic)
    assert seen_bicubic == ({False, True} if interpolation == "random" else {interpolation == "bicubic"})


def test_gpu_digit_products_equal_the_float64_sums() -> None:
    """The CUDA path sums 8-bit pixel x 8-bit digit products in float32 (exact below 2^24, and
    TF32 keeps 8-bit values exact); it must give the float64 result, negative bicubic lobes too."""
    from petlbench.data.resample import box_weights, resample

    gen = torch.Generator().manual_seed(5)
    src = torch.randint(0, 256, (6, 40, 90, 3), generator=gen, dtype=torch.uint8)
    start = torch.tensor([0.0, 3.0, 10.5, 1.25, 0.0, 7.0])
    stop = start + torch.tensor([40.0, 9.0, 20.0, 30.0, 13.0, 33.0])
    bicubic = torch.tensor([True, True, False, True, False, True])
    rows = box_weights(start / 2, stop / 2 + 10, torch.full((6,), 40), 24, bicubic, 40)
    cols = box_weights(start, stop, torch.full((6,), 90), 24, bicubic, 90)
    assert (rows < 0).any()  # negative coefficients are exercised
    for transposed in (False, True):
        r, c = (rows, cols) if not transposed else (box_weights(start, stop, torch.full((6,), 40), 24, bicubic, 40),
                                                    box_weights(start, stop, torch.full((6,), 90), 24, bicubic, 90))
        assert torch.equal(resample(src, r, c, transposed, digits=True), resample(src, r, c, transposed, digits=False))


def test_rrc_from_a_shrunk_source_stays_close_to_the_original(tmp_path: Path, photo: np.ndarray) -> None:
    """An original larger than the cap (shorter side 150 > 64) is stored shrunk; its boxes differ
    from resampling the original by a few levels on average (the documented approximation)."""
    index = read_split("fgvc", "cub", "train", write_fgvc(tmp_path, [(200, 150)], photo))
    spec = transform_spec("fgvc_crop", 32, train_crop="random_resized", interpolation="bilinear")
    cached = load_images(index, spec, persist=False)
    assert cached.layout is not None and tuple(cached.layout.table[0, 3:5]) == (64, 85)
    with Image.open(index.paths[0]) as im:
        img = im.convert("RGB")
    loader = DeviceLoader.for_split(cached, train=True, batch_size=1, normalization="none", seed=3)
    errors = []
    for epoch in range(12):
        aug = loader.epoch_augmentation(epoch)
        loader.set_epoch(epoch)
        (x, _), = list(loader)
        top, left, h, w = (int(aug[k][0]) for k in ("top", "left", "height", "width"))
        ref = classic_resize(F.crop(img, top, left, h, w), (32, 32), "bilinear")
        ref = F.hflip(ref) if bool(aug["flip"][0]) else ref
        errors.append(np.abs(pixels(x)[0].astype(int) - np.asarray(ref).astype(int)).mean())
    assert np.mean(errors) < 4.0, errors


# ----------------------------------------------------------------------------- train+val, caches

def test_train_val_union(fgvc_root: Path) -> None:
    train = read_split("fgvc", "cub", "train", fgvc_root)
    val = read_split("fgvc", "cub", "val", fgvc_root)
    both = concat_splits(train, val)
    assert len(both) == len(train) + len(val) and both.split == "train+val"
    assert both.labels == train.labels + val.labels and both.paths == train.paths + val.paths
    assert both.location(len(train))[0] == str(val.source) and both.location(0)[0] == str(train.source)
    assert both.take(len(train) + 1).sources == (train.source, val.source)
    assert cache_key(both, transform_spec("fgvc_crop", 32)) != cache_key(train, transform_spec("fgvc_crop", 32))
    assert train_val_splits(get_suite("fgvc")) == ("train", "val")
    with pytest.raises(PetlbenchError, match="train\\+val applies to FGVC"):
        train_val_splits(get_suite("vtab"))


def test_train_val_selection_on_val_is_refused_at_plan_time() -> None:
    from petlbench.runner import check_input

    fgvc, cfg = get_suite("fgvc"), {"train_split": "train+val"}
    with pytest.raises(PetlbenchError, match="selects on val"):
        check_input(fgvc, "fgvc", cfg)
    with pytest.raises(PetlbenchError, match="selects on val"):
        check_input(fgvc, "paper", {**cfg, "selection": "val"})  # a recipe that selects on val
    check_input(fgvc, "vtab1k", cfg)  # final epoch: fine
    check_input(fgvc, "legacy-best-test", cfg)
    with pytest.raises(PetlbenchError, match="FGVC-layout"):
        check_input(get_suite("vtab"), "vtab1k", cfg)


def _old_key(index: SplitIndex, describe: dict) -> str:
    """The cache key as petlbench computed it before the recipe settings (format v1)."""
    from petlbench.data.fingerprint import stat_signature

    h = hashlib.sha256(b"petlbench-decoded-v1\n")
    h.update(hashlib.sha256(index.source.read_bytes()).digest())
    h.update(hashlib.sha256("\n".join(index.relpaths).encode()).digest())
    h.update(str(index.image_root.resolve()).encode() + b"\n")
    h.update(stat_signature(index))
    h.update(json.dumps(describe, sort_keys=True).encode())
    return h.hexdigest()[:32]


def test_caches_of_the_former_layout(tmp_path: Path, fgvc_root: Path, vtab_root: Path) -> None:
    """VTAB caches keep their keys (same pixels); an FGVC cache of the former central-square layout
    is never read as the new one, even where its shape would fit."""
    vtab = read_split("vtab", "cifar", "test", vtab_root)
    old_vtab = {"name": "vtab_resize", "image_size": 32, "stored_size": 32, "interpolation": "bicubic",
                "resize": "square", "train_crop": "none", "train_flip": False, "eval_crop": "none"}
    assert cache_key(vtab, transform_spec("vtab_resize", 32)) == _old_key(vtab, old_vtab)

    index = read_split("fgvc", "cub", "test", fgvc_root)
    old_fgvc = {"name": "fgvc_crop", "image_size": 32, "stored_size": 37, "interpolation": "bilinear",
                "resize": "short_side_center_square", "train_crop": "random", "train_flip": True, "eval_crop": "center"}
    old = _old_key(index, old_fgvc)
    spec = transform_spec("fgvc_crop", 32)
    assert old not in {cache_key(index, spec.storage(True)), cache_key(index, spec.storage(False))}
    folder = tmp_path / "cache"
    folder.mkdir()
    np.save(folder / f"{old}.npy", np.zeros((len(index), 37, 37, 3), np.uint8))
    for train in (True, False):
        cached = load_images(index, spec, train=train, cache_dir=folder)
        assert not cached.hit and cached.key != old and cached.images.any()
        again = load_images(index, spec, train=train, cache_dir=folder)
        assert again.hit and torch.equal(again.images, cached.images)
        if train:
            assert again.layout is not None and np.array_equal(again.layout.table, cached.layout.table)


def test_a_slot_table_that_does_not_match_is_not_trusted(tmp_path: Path, photo: np.ndarray) -> None:
    index = read_split("fgvc", "cub", "train", write_fgvc(tmp_path / "d", [(50, 40), (40, 66)], photo))
    spec = transform_spec("fgvc_crop", 32)
    first = load_images(index, spec, cache_dir=tmp_path / "c")
    table_path = first.path.with_name(f"{first.key}.layout.npy")
    bad = first.layout.table.copy()
    bad[1, 1] += 1  # one more slot than the pixels hold
    np.save(table_path, bad)
    again = load_images(index, spec, cache_dir=tmp_path / "c")
    assert not again.hit and torch.equal(again.images, first.images)
    table_path.unlink()
    assert not load_images(index, spec, cache_dir=tmp_path / "c").hit


# ----------------------------------------------------------------------------- loader invariants

@pytest.mark.parametrize("recipe", ["crop", "random_resized"])
def test_whole_images_make_no_host_copy_per_step(tmp_path: Path, photo: np.ndarray, recipe: str) -> None:
    from tests.data.test_data_device import HostToDevice

    index = read_split("fgvc", "cub", "train", write_fgvc(tmp_path, [(50, 40), (40, 66), (101, 75), (150, 50)], photo))
    settings = {"train_crop": "random_resized", "interpolation": "random"} if recipe != "crop" else {}
    cached = load_images(index, transform_spec("fgvc_crop", 32, **settings), persist=False)
    per_epoch = {}
    for batch_size in (1, 2):
        loader = DeviceLoader.for_split(cached, train=True, batch_size=batch_size, normalization="imagenet",
                                        seed=1, device="meta")
        counts = []
        for _ in range(3):
            with HostToDevice() as mode:
                steps = sum(1 for _ in loader)
            counts.append(mode.count)
        assert steps == len(loader) > 1 and counts[0] == 3
        per_epoch[batch_size] = counts[1:]
    assert per_epoch[1] == per_epoch[2] == [1, 1]  # the epoch's plan, nothing per step


@pytest.mark.parametrize("recipe", ["crop", "random_resized"])
def test_streamed_whole_images_equal_resident_ones(tmp_path: Path, photo: np.ndarray, recipe: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from petlbench.data import loader as loader_mod
    from tests.data.test_data_device import FakeCuda

    index = read_split("fgvc", "cub", "train", write_fgvc(tmp_path, [(50, 40), (40, 66), (101, 75), (150, 50)] * 2, photo))
    settings = {"train_crop": "random_resized", "interpolation": "random"} if recipe != "crop" else {}
    cached = load_images(index, transform_spec("fgvc_crop", 32, **settings), persist=False)
    kwargs = dict(train=True, batch_size=3, normalization="inception", seed=4)
    expected = list(DeviceLoader.for_split(cached, **kwargs))
    FakeCuda().install(monkeypatch)
    monkeypatch.setattr(loader_mod, "_h2d", lambda t, device, non_blocking=False: t.clone())
    streamed = DeviceLoader.for_split(cached, device="cuda:0", resident=False, **kwargs)
    got = list(streamed)
    assert len(got) == len(expected) == 3
    for (x, y), (xe, ye) in zip(got, expected, strict=True):
        assert torch.equal(x, xe) and torch.equal(y, ye)


# ----------------------------------------------------------------------------- end to end: a recipe reaches the run

TINY_FGVC = """
name: fgvc_tiny
title: FGVC (tiny)
layout: fgvc_json
image_size: 32
transform: fgvc_crop
splits: [train, val, test]
groups:
  FGVC:
    - name: CUB_200_2011
      classes: 3
      image_roots: [images]
"""


def test_recipe_settings_reach_the_loaders_and_the_record(tmp_path: Path, fgvc_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """normalization, train_crop, interpolation, eval_resize and train_split from the settings are
    what the run's loaders apply and what its record says; selection on val is refused at plan time."""
    from petlbench.runner import _Data, execute_spec
    from petlbench.sweep import plan
    from tests.conftest import TINY_VIT

    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "fgvc_tiny.yaml").write_text(TINY_FGVC)
    monkeypatch.setenv("PETLBENCH_SUITE_PATH", str(tmp_path / "suites"))
    sets = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "eval_batch_size": 4, "normalization": "imagenet",
            "train_crop": "random_resized", "interpolation": "random", "eval_resize": 36, "train_split": "train+val"}
    common = dict(backbone=TINY_VIT[0], backbone_kwargs=TINY_VIT[1], pretrained="none", data_root=str(fgvc_root),
                  output=str(tmp_path / "res"), sets=sets)
    with pytest.raises(PetlbenchError, match="selects on val"):
        plan("fgvc_tiny", ["linear"], seeds=[0], protocol="fgvc", **common)
    spec = plan("fgvc_tiny", ["linear"], seeds=[0], protocol="vtab1k", **common).specs[0]

    data = _Data(spec)
    loader = data.loader("train", True, spec.train, "imagenet", 0, torch.device("cpu"))
    assert loader.random_resized == "random" and loader.num_samples == 6 + 2  # train + val
    test = data.loader("test", False, spec.train, "imagenet", 0, torch.device("cpu"))
    assert test.crop is None and tuple(test.images.shape[1:]) == (32, 32, 3)  # stored as Resize(36) + centre 32

    record = execute_spec(spec)
    assert record["status"] == "ok", record.get("error")
    config = record["config"]
    assert config["normalization"]["name"] == "imagenet" and config["train"]["normalization"] == "imagenet"
    assert config["splits"]["train"] == "train+val" and config["splits"]["sizes"] == {"train": 6, "val": 2, "test": 3}
    described = config["input"]["transform"]
    assert (described["train_crop"], described["interpolation"], described["eval_size"]) == ("random_resized", "random", 36)
    assert set(config["input"]["stored"]) == {"train+val (train)", "test (eval)"}
    assert set(record["provenance"]["data_fingerprint"]) == {"train", "val", "test"}


def test_recipe_keys_are_training_settings() -> None:
    import petlbench
    from petlbench.config import TRAIN_HPARAMS, resolve_train

    defaults = {k: TRAIN_HPARAMS[k].default for k in ("train_crop", "eval_resize", "interpolation", "train_split")}
    assert defaults == {"train_crop": "protocol", "eval_resize": 0, "interpolation": "protocol", "train_split": "protocol"}
    linear = petlbench.get_method("linear")
    got = resolve_train({}, linear, "fgvc", "cub", {"train_crop": "random_resized", "eval_resize": "248"},
                        protocol="fgvc")
    assert (got["train_crop"], got["eval_resize"]) == ("random_resized", 248)
    with pytest.raises(PetlbenchError, match="train_crop' must be one of"):
        resolve_train({}, linear, "fgvc", "cub", {"train_crop": "rrc"}, protocol="fgvc")
