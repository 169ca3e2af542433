"""Benchmark: is the input pipeline ever the bottleneck of a PETL training step?

Measures, at the same batch size and on the same device:

1. the device loader alone: uint8 cache -> batch on device, random crop + flip + normalise
   (the FGVC train recipe: whole images, each crop drawn in its own image's range) or, with
   ``--train-crop random_resized``, random resized crops resampled on the device, images/s;
2. a training step of a timm model (forward + backward + SGD step) on ready batches, images/s;
3. both together, end to end;
4. optionally (``--baseline``) the conventional path: JPEG files decoded by PIL and transformed
   by torchvision in ``DataLoader`` workers every epoch.

and prints the ratio pipeline/model and the device name. The images are crops of
scikit-image's photographs, so nothing is downloaded. This is a benchmark, not a test.

    python benchmarks/bench_input_pipeline.py --quick                 # seconds, on CPU
    python benchmarks/bench_input_pipeline.py --device cuda --model vit_base_patch16_224 --batch-size 64
    python benchmarks/bench_input_pipeline.py --pipeline-only --train-crop random_resized
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from petlbench.data.loader import DeviceLoader
from petlbench.data.slots import pack_images
from petlbench.data.transforms import NORMALIZATIONS, prepare_image, reference_transform, transform_spec


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def real_crops(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` crops of varied size and aspect ratio from scikit-image's photographs."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h = int(rng.integers(img.shape[0] // 3, img.shape[0]))
        w = int(rng.integers(img.shape[1] // 3, img.shape[1]))
        y, x = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        out.append(Image.fromarray(np.ascontiguousarray(img[y:y + h, x:x + w])))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(loader: Iterable, steps: int, warmup: int, device: torch.device) -> float:
    """Batches drawn (restarting the loader as needed) and moved to ``device``, per second."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    sync(device)
    start = time.perf_counter()
    n = 0
    for _ in range(steps):
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, _ = next(it)
        x = x.to(device, non_blocking=True)
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - start)



def time_model(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, warmup: int,
               device: torch.device, amp: bool) -> float:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(*batches[i % len(batches)])
    sync(device)
    start = time.perf_counter()
    n = 0
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - start)


def time_end_to_end(model: torch.nn.Module, loader: DeviceLoader, steps: int, warmup: int, device: torch.device,
                    amp: bool) -> float:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    model.train()
    it = iter(loader)
    n = 0
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - start)


def time_baseline(images: list[Image.Image], spec, batch_size: int, steps: int, workers: int, device: torch.device) -> float:
    """Decode JPEG files with PIL + torchvision transforms in DataLoader workers, every epoch."""
    from torch.utils.data import DataLoader, Dataset

    norm = NORMALIZATIONS["imagenet"]
    tf = reference_transform(spec, train=True, normalization=norm)

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, img in enumerate(images):
            p = Path(tmp) / f"{i:06d}.jpg"
            img.save(p, quality=90)
            paths.append(p)

        class Files(Dataset):
            def __len__(self) -> int:
                return len(paths)

            def __getitem__(self, i: int):
                with Image.open(paths[i]) as im:
                    return tf(im), 0

        loader = DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
        return images_per_s(loader, steps, 1, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (random init; no download)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--protocol", default="fgvc_crop", choices=["fgvc_crop", "vtab_resize"])
    ap.add_argument("--train-crop", default="protocol", choices=["protocol", "random_resized"])
    ap.add_argument("--interpolation", default="protocol", choices=["protocol", "bilinear", "bicubic", "random"])
    ap.add_argument("--pipeline-only", action="store_true", help="time the loader alone (no model)")
    ap.add_argument("--images", type=int, default=1024, help="images in the uint8 cache")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model step")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="also time PIL+torchvision DataLoader decoding")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers for --baseline")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes: a few seconds on CPU")
    args = ap.parse_args()
    if args.quick:
        args.model, args.image_size, args.batch_size = "vit_tiny_patch16_224", 64, 32
        args.images, args.steps, args.warmup = min(args.images, 128), 4, 1

    import timm

    device = torch.device(args.device)
    spec = transform_spec(args.protocol, args.image_size, train_crop=args.train_crop, interpolation=args.interpolation)
    storage = spec.storage(True)
    t0 = time.perf_counter()
    pil_images = real_crops(args.images)
    stored = [np.asarray(prepare_image(im, storage)) for im in pil_images]
    labels = torch.randint(0, 100, (args.images,), generator=torch.Generator().manual_seed(0))
    mode = spec.crop_mode(True)
    common = dict(batch_size=args.batch_size, normalization="imagenet", shuffle=True, drop_last=True, seed=0,
                  device=device, channels_last=args.channels_last)
    if storage.kind == "short_side":  # whole images in slots, as the cache stores a training split
        original = np.asarray([(im.height, im.width) for im in pil_images], dtype=np.int64)
        packed, layout = pack_images(stored, original, storage.overlap)
        cache = torch.from_numpy(packed)
        rrc = spec.interpolation if mode == "random_resized" else None
        loader = DeviceLoader(cache, labels, crop=spec.image_size, random_crop=rrc is None, flip=spec.flip(True),
                              layout=layout, random_resized=rrc, **common)
    else:
        cache = torch.from_numpy(np.stack(stored))
        loader = DeviceLoader(cache, labels, crop=spec.image_size if mode != "none" else None,
                              random_crop=mode == "random", flip=spec.flip(True), **common)
    decode_s = time.perf_counter() - t0
    if args.pipeline_only:
        pipe = images_per_s(loader, args.steps, args.warmup, device)
        print(f"device        : {device_name(device)}")
        print(f"setup         : {args.images} images in a {tuple(cache.shape)} uint8 cache ({cache.numel() / 1e6:.1f} MB) "
              f"in {decode_s:.1f}s; protocol {spec.name}, train crop {mode}, interpolation {spec.interpolation}")
        print(f"pipeline      : {pipe:12.1f} images/s (batch {args.batch_size} at {args.image_size}px)")
        return
    model = timm.create_model(args.model, num_classes=100, img_size=args.image_size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = [b for _, b in zip(range(4), loader, strict=False)]

    pipe = images_per_s(loader, args.steps, args.warmup, device)
    step = time_model(model, batches, args.steps, args.warmup, device, args.bf16)
    both = time_end_to_end(model, loader, args.steps, args.warmup, device, args.bf16)

    print(f"device        : {device_name(device)}")
    print(f"setup         : {args.images} images decoded into a {tuple(cache.shape)} uint8 cache in {decode_s:.1f}s; "
          f"protocol {spec.name} (train: {'no crop' if mode == 'none' else f'{mode} crop {spec.image_size}'}, "
          f"flip {spec.flip(True)}), "
          f"loader resident on device: {loader.resident}")
    print(f"model         : {args.model} @ {args.image_size}px, batch {args.batch_size}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, forward+backward+SGD step")
    print(f"pipeline      : {pipe:12.1f} images/s")
    print(f"model step    : {step:12.1f} images/s")
    print(f"end to end    : {both:12.1f} images/s ({both / step:.1%} of the model-step rate)")
    print(f"ratio         : pipeline is {pipe / step:.1f}x the model step "
          f"(it would take {step / pipe:.1%} of the step time if not overlapped)")
    if args.baseline:
        base = time_baseline(pil_images, spec, args.batch_size, args.steps, args.workers, device)
        print(f"baseline      : {base:12.1f} images/s (PIL decode + torchvision, {args.workers} DataLoader workers); "
              f"{base / step:.2f}x the model step")


if __name__ == "__main__":
    main()
