"""Augmentation throughput: medssl MultiCrop against lightly's SwaVTransform, same crops, same run.

Both make the crops of one of our presets (``cpu``: 2x96 + 4x48, ``swav``: 2x224 + 6x96; box
areas from the preset, 0.25-1.0 and 0.05-0.25 of the image) from 512x512 inputs, in one process with one torch thread (a DataLoader worker's setting). Ours starts from the float32
Hounsfield values that a shard sample decodes to; lightly gets ready-made 8-bit RGB PIL images
(the conversion is left out of its time, in its favour). Rounds alternate between the two so that
load from other processes hits both alike; the median round is reported.

    .venv/bin/python benchmarks/augment_speed.py [--preset cpu] [--images 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from medssl.data.augment import MultiCrop, MultiCropConfig


def phantom(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """A CT-like slice in HU: air, a soft-tissue body, a bone ring, lung-like holes, noise."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    body = (yy / rng.uniform(0.35, 0.45)) ** 2 + (xx / rng.uniform(0.3, 0.45)) ** 2
    hu = np.where(body < 1, 40.0, -1024.0)
    hu[(body > 0.8) & (body < 0.9)] = 900.0
    for side in (-1, 1):
        lung = ((yy + 0.05) / 0.2) ** 2 + ((xx - side * 0.15) / 0.1) ** 2
        hu[lung < 1] = -800.0
    return (hu + rng.normal(0, 15, hu.shape)).astype(np.float32)


def images_per_second(transform, inputs: list) -> float:
    start = time.perf_counter()
    for item in inputs:
        transform(item)
    return len(inputs) / (time.perf_counter() - start)


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images per round and pipeline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", choices=["cpu", "swav"], default="cpu", help="crop sizes and counts")
    args = parser.parse_args()

    from lightly.transforms.swav_transform import SwaVTransform
    import lightly

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    hu_images = [phantom(rng) for _ in range(16)]
    # What a lightly user would feed: an 8-bit display image (soft-tissue window) as RGB.
    pil_images = [Image.fromarray((np.clip((hu + 160) / 400, 0, 1) * 255).astype(np.uint8)).convert("RGB")
                  for hu in hu_images]

    config = MultiCropConfig.preset(args.preset)
    ours = MultiCrop(config, seed=0)
    crops = dict(crop_sizes=(config.global_size, config.local_size), crop_counts=(config.n_global, config.n_local),
                 crop_min_scales=(config.global_scale[0], config.local_scale[0]),
                 crop_max_scales=(config.global_scale[1], config.local_scale[1]))
    ours_name = f"medssl MultiCrop ({args.preset} preset)"
    pipelines = {
        ours_name: (lambda hu: ours(hu, "hounsfield"), hu_images),
        "lightly SwaVTransform": (SwaVTransform(**crops), pil_images),
        "lightly SwaVTransform + rotation": (SwaVTransform(**crops, rr_prob=1.0, rr_degrees=15.0), pil_images),
    }
    for transform, inputs in pipelines.values():  # warm-up
        images_per_second(transform, inputs)

    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, (transform, inputs) in pipelines.items():
            rates[name].append(images_per_second(transform, [inputs[i % len(inputs)] for i in range(args.images)]))

    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {machine()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, lightly {lightly.__version__}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"crops: {config.n_global}x{config.global_size} + {config.n_local}x{config.local_size} from 512x512; "
          f"{args.rounds} rounds x {args.images} images, median round")
    median = {name: statistics.median(r) for name, r in rates.items()}
    ours_rate = median[ours_name]
    for name, rate in median.items():
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"  {name:34s} {rate:8.1f} images/s  (rounds {spread})   ours / this = {ours_rate / rate:.2f}x")


if __name__ == "__main__":
    main()
