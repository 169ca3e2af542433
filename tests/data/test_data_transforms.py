"""Protocol transforms and the device loader: shapes, ranges, dtypes, augmentation, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from petlbench.data.cache import load_images
from petlbench.data.loader import DeviceLoader
from petlbench.data.readers import read_split
from petlbench.data.transforms import (
    NORMALIZATIONS,
    decode_image,
    prepare_image,
    reference_transform,
    resolve_normalization,
    transform_spec,
)
from petlbench.errors import PetlbenchError


def test_specs() -> None:
    vtab = transform_spec("vtab_resize", 224)
    assert (vtab.stored_size, vtab.interpolation, vtab.crop_mode(True), vtab.flip(True)) == (224, "bicubic", "none", False)
    fgvc = transform_spec("fgvc_crop", 224)
    assert (fgvc.stored_size, fgvc.interpolation, fgvc.crop_mode(True), fgvc.crop_mode(False)) == (256, "bilinear", "random", "center")
    assert fgvc.flip(True) and not fgvc.flip(False)
    assert transform_spec("fgvc_crop", 32).stored_size == 37  # 256/224 scaled
    from petlbench.data.suites import get_suite

    assert transform_spec(get_suite("demo")).image_size == 32
    with pytest.raises(PetlbenchError, match="unknown transform"):
        transform_spec("vtab", 224)


def test_normalization_presets_and_resolution() -> None:
    assert NORMALIZATIONS["imagenet"].mean == (0.485, 0.456, 0.406)
    assert NORMALIZATIONS["imagenet"].std == (0.229, 0.224, 0.225)
    assert NORMALIZATIONS["inception"].mean == NORMALIZATIONS["inception"].std == (0.5, 0.5, 0.5)
    assert resolve_normalization(mean=(0.5, 0.5, 0.5), std=[0.5] * 3).name == "inception"
    custom = resolve_normalization(mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    assert custom.name == "custom" and custom.as_dict()["mean"] == [0.4, 0.4, 0.4]
    assert resolve_normalization("imagenet").name == "imagenet"
    for bad in [dict(), dict(norm="imgnet"), dict(mean=(0.5,) * 3), dict(mean=(0.5,) * 3, std=(0, 1, 1)),
                dict(norm="imagenet", mean=(0.5,) * 3, std=(0.5,) * 3)]:
        with pytest.raises(PetlbenchError):
            resolve_normalization(**bad)


def test_prepare_image_sizes(crops: list[np.ndarray]) -> None:
    img = Image.fromarray(crops[0])  # non-square
    assert prepare_image(img, transform_spec("vtab_resize", 48)).size == (48, 48)
    h, w = crops[0].shape[:2]
    fgvc = transform_spec("fgvc_crop", 48)
    whole = prepare_image(img, fgvc)  # training: the whole image, shorter side 55, aspect kept
    assert min(whole.size) == 55 and whole.size == ((55, int(55 * h / w)) if w <= h else (int(55 * w / h), 55))
    assert prepare_image(img, fgvc.storage(False)).size == (48, 48)  # evaluation: the final centre crop
    grey = Image.fromarray(crops[1][..., 0])
    assert np.asarray(prepare_image(grey, transform_spec("vtab_resize", 16))).shape == (16, 16, 3)


@pytest.fixture
def vtab_cached(vtab_root: Path):
    index = read_split("vtab", "cifar", "train800val200", vtab_root)
    return load_images(index, transform_spec("vtab_resize", 32), persist=False)


def test_vtab_loader_matches_torchvision_reference(vtab_cached) -> None:
    norm = NORMALIZATIONS["imagenet"]
    loader = DeviceLoader.for_split(vtab_cached, train=True, batch_size=4, normalization=norm, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    ref = reference_transform(vtab_cached.spec, train=True, normalization=norm)
    for i in range(4):
        with Image.open(vtab_cached.index.paths[i]) as im:
            expected = ref(im)
        torch.testing.assert_close(x[i], expected, atol=1e-5, rtol=0)
    assert y.tolist() == list(vtab_cached.index.labels[:4])


def test_value_range_and_dtypes(vtab_cached) -> None:
    x, _ = next(iter(DeviceLoader.for_split(vtab_cached, train=False, batch_size=9, normalization="inception")))
    assert -1.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-5 and float(x.std()) > 0.1
    x01, _ = next(iter(DeviceLoader.for_split(vtab_cached, train=False, batch_size=9, normalization="none")))
    assert -1e-6 <= float(x01.min()) and float(x01.max()) <= 1.0 + 1e-6
    torch.testing.assert_close(x, x01 * 2 - 1, atol=1e-5, rtol=0)
    xb, _ = next(iter(DeviceLoader.for_split(vtab_cached, train=False, batch_size=9, normalization="inception",
                                              dtype=torch.bfloat16, channels_last=True)))
    assert xb.dtype == torch.bfloat16 and xb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xb.float(), x, atol=1e-2, rtol=0)


def test_vtab_train_equals_eval(vtab_cached) -> None:
    a = [x for x, _ in DeviceLoader.for_split(vtab_cached, train=True, batch_size=4, normalization="imagenet", shuffle=False)]
    b = [x for x, _ in DeviceLoader.for_split(vtab_cached, train=False, batch_size=4, normalization="imagenet")]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_batching_shuffle_and_drop_last(vtab_cached) -> None:
    n = len(vtab_cached)
    keep = DeviceLoader.for_split(vtab_cached, train=False, batch_size=4, normalization="imagenet")
    assert len(keep) == 3 and [len(y) for _, y in keep] == [4, 4, 1]
    drop = DeviceLoader.for_split(vtab_cached, train=False, batch_size=4, normalization="imagenet", drop_last=True)
    assert len(drop) == 2 and [len(y) for _, y in drop] == [4, 4]
    shuffled = DeviceLoader.for_split(vtab_cached, train=True, batch_size=n, normalization="imagenet")
    x, y = next(iter(shuffled))
    plain_x, plain_y = next(iter(DeviceLoader.for_split(vtab_cached, train=False, batch_size=n, normalization="imagenet")))
    order = [next(j for j in range(n) if torch.equal(plain_x[j], x[i])) for i in range(n)]
    assert sorted(order) == list(range(n)) and order != list(range(n))
    assert y.tolist() == [plain_y[j].item() for j in order]


def _fgvc_split(tmp_path: Path, photos: list[np.ndarray]):
    """Non-square FGVC images (450x300)."""
    import json

    root = tmp_path / "fgvc"
    ds = root / "OxfordFlowers"
    mapping = {}
    for i, photo in enumerate(photos):
        img = Image.fromarray(photo).resize((450, 300))  # w x h: reference offsets are exact here
        path = ds / "jpg" / f"image_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        mapping[f"jpg/image_{i:05d}.png"] = 7 + i % 2
    for split in ("train", "val", "test"):
        (ds / f"{split}.json").write_text(json.dumps(mapping))
    return read_split("fgvc", "flowers", "train", root)


def test_fgvc_eval_matches_reference_and_train_differs(tmp_path: Path, photos: list[np.ndarray]) -> None:
    index = _fgvc_split(tmp_path, photos)
    spec = transform_spec("fgvc_crop", 64)
    cached = load_images(index, spec, train=False, persist=False)
    assert tuple(cached.images.shape) == (4, 64, 64, 3)  # the final centre crops
    norm = NORMALIZATIONS["imagenet"]
    with pytest.raises(ValueError, match="train=True"):
        DeviceLoader.for_split(cached, train=True, batch_size=4, normalization=norm)
    ev = DeviceLoader.for_split(cached, train=False, batch_size=4, normalization=norm)
    x_eval, _ = next(iter(ev))
    assert x_eval.shape == (4, 3, 64, 64)
    ref = reference_transform(cached.spec, train=False, normalization=norm)
    for i in range(4):
        with Image.open(index.paths[i]) as im:
            torch.testing.assert_close(x_eval[i], ref(im), atol=1e-5, rtol=0)
    whole = load_images(index, spec, train=True, persist=False)
    assert whole.layout is not None and tuple(whole.images.shape) == (4, 73, 109, 3)  # 450x300 -> 109x73, whole
    tr = DeviceLoader.for_split(whole, train=True, batch_size=4, normalization=norm, shuffle=False, seed=1)
    x_train, _ = next(iter(tr))
    assert x_train.shape == x_eval.shape and not torch.equal(x_train, x_eval)


def test_random_crop_and_flip_are_real_crops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(16, 12, 12, 3), dtype=np.uint8))
    loader = DeviceLoader(images, torch.arange(16), batch_size=16, normalization="none", crop=8,
                          random_crop=True, flip=True, seed=3)
    x, y = next(iter(loader))
    flipped = 0
    for i in range(16):
        src = images[int(y[i])].permute(2, 0, 1).float() / 255
        candidates = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                      if torch.allclose((src[:, dy:dy + 8, dx:dx + 8].flip(-1) if f else src[:, dy:dy + 8, dx:dx + 8]), x[i])]
        assert candidates, i
        flipped += candidates[0][2]
    assert 0 < flipped < 16


def test_determinism_for_a_seed(vtab_cached) -> None:
    images = vtab_cached.images
    def run(seed: int, epochs: int = 2) -> list[torch.Tensor]:
        loader = DeviceLoader(images, vtab_cached.labels, batch_size=4, normalization="imagenet", crop=24,
                              random_crop=True, flip=True, shuffle=True, seed=seed)
        return [torch.cat([x for x, _ in loader]) for _ in range(epochs)]
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # a new epoch reshuffles and re-augments
    loader = DeviceLoader(images, vtab_cached.labels, batch_size=4, normalization="imagenet", crop=24,
                          random_crop=True, flip=True, shuffle=True, seed=0)
    loader.set_epoch(1)
    assert torch.equal(torch.cat([x for x, _ in loader]), a[1])


def test_decode_image_matches_cache(vtab_cached) -> None:
    first = decode_image(vtab_cached.index.paths[0], vtab_cached.spec)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert np.array_equal(first, vtab_cached.images[0].numpy())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_batches_equal_cpu_batches(vtab_cached, resident: bool) -> None:
    kwargs = dict(batch_size=4, normalization="imagenet", crop=24, random_crop=True, flip=True, shuffle=True, seed=5)
    cpu = list(DeviceLoader(vtab_cached.images, vtab_cached.labels, **kwargs))
    loader = DeviceLoader(vtab_cached.images, vtab_cached.labels, device="cuda", resident=resident, **kwargs)
    assert loader.resident is resident
    for _ in range(2):  # the streamed path reuses its pinned buffers across epochs
        gpu = list(loader)
    loader.set_epoch(0)
    gpu = list(loader)
    assert len(gpu) == len(cpu) == 3
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc, atol=1e-6, rtol=0)
        assert torch.equal(yg.cpu(), yc)
