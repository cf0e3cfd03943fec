#!/usr/bin/env python
"""A model of GPU-rate pretraining, from what can be measured without a GPU (issue 12, point 5).

What one GPU needs to train at ``--target`` samples/s (default 1,500: one H100-class GPU, ResNet-50,
2x224 + 6x96 crops, bf16, channels_last), component by component:

1. **Model**: FLOPs of one training sample (forward + backward of SSLModel with all its crops, and the
   hybrid loss), counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real modules, for
   resnet50, resnet18 and vit_small. The reference is a published, measured GPU rate: NVIDIA's
   DeepLearningExamples ResNet-50 v1.5 (PyTorch, mixed precision, one A100 80GB, 224-px images, 1,000
   classes): 2,470 images/s (``--reference-rate``). Its FLOPs per image are counted here the same way;
   our rate at the *same achieved FLOP rate* is ``reference rate x reference FLOPs / our FLOPs``. That is a
   conservative estimate for an H100-class GPU (3.2x the A100's dense bf16 peak, 1.7x its memory
   bandwidth), assuming our step is no less efficient than a tuned classification step.
2. **Loader cores per GPU**: CPU-seconds per sample of one DataLoader worker, measured here (1 torch
   thread), for ``crops_on: device`` (read + decode + collate onto a canvas, the crops on the GPU) and
   for ``crops_on: loader`` with the same 2x224 + 6x96 crops made on the CPU; cores = target x CPU-s.
3. **Bytes**: shard bytes read per sample (storage or network bandwidth), and host-to-device bytes per
   sample (the uint16 canvas).
4. **Crops on the device**: output pixels per sample of the batched resampling, against the model's
   FLOPs (a bilinear sample is ~10 FLOPs; the crops are negligible next to the network if this is small).

Shards: ``--shards DIR`` or the cache of benchmarks/loader.py (made on first use from the shared brain MR
set, 512 px). Run from the repository root:  .venv/bin/python benchmarks/gpu_model.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import DEFAULT_SHARDS, DEFAULT_SOURCE, ensure_shards, stored_batches, stream, timed  # noqa: E402
from medssl.config import PretrainConfig  # noqa: E402
from medssl.data.augment import MultiCrop  # noqa: E402
from medssl.data.stream import list_shards  # noqa: E402
from medssl.machine import machine_facts, version
from medssl.models.ssl_model import SSLModel  # noqa: E402
from medssl.ssl import HybridLoss  # noqa: E402

REFERENCE = "NVIDIA DeepLearningExamples ResNet-50 v1.5, PyTorch AMP, 1x A100 80GB (pytorch-21.03 NGC)"


def training_flops(model_fn, inputs_fn, loss_fn) -> float:
    """FLOPs of one forward + backward, counted on the real modules (batch given by ``inputs_fn``)."""
    model = model_fn()
    inputs = inputs_fn()
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, inputs).backward()
    return float(counter.get_total_flops())


def ssl_sample_flops(backbone: str, crops, batch: int = 2) -> float:
    cfg = PretrainConfig(backbone=backbone)
    n_views = crops.n_global + crops.n_local

    def views():
        return ([torch.rand(batch, 1, crops.global_size, crops.global_size) for _ in range(crops.n_global)]
                + [torch.rand(batch, 1, crops.local_size, crops.local_size) for _ in range(crops.n_local)])

    def step(model, inputs):
        loss = HybridLoss(cfg.w_cluster, cfg.w_contrast, crops.n_global, cfg.temperature, cfg.nce_temperature,
                          cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations, None)
        embeddings, scores = model(inputs)
        return loss(embeddings, scores, model.prototypes)[0]

    assert n_views == len(views())
    return training_flops(lambda: SSLModel(backbone, cfg.proj_hidden, cfg.proj_dim, cfg.n_prototypes), views,
                          step) / batch


def reference_image_flops(batch: int = 2) -> float:
    import timm

    def step(model, x):
        return torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))

    return training_flops(lambda: timm.create_model("resnet50", pretrained=False, num_classes=1000),
                          lambda: torch.rand(batch, 3, 224, 224), step) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shards", type=Path, default=None,
                        help=f"a `medssl ingest` output (default: {DEFAULT_SHARDS}, made if missing)")
    parser.add_argument("--target", type=float, default=1500.0, help="samples/s per GPU to plan for (default 1500)")
    parser.add_argument("--reference-rate", type=float, default=2470.0, help=f"images/s of the reference ({REFERENCE})")
    parser.add_argument("--samples", type=int, default=300, help="samples per loader measurement (default 300)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    crops = PretrainConfig(crops="swav").multicrop()
    result = {"machine": machine_facts(), "versions": {"torch": version("torch"), "timm": version("timm")},
              "target_samples_per_s": args.target, "reference": REFERENCE,
              "reference_images_per_s": args.reference_rate}

    # 1. model
    ref = reference_image_flops()
    result["reference_gflops_per_image"] = round(ref / 1e9, 2)
    print(f"reference ResNet-50 224 px, 3 channels, 1000 classes: {ref / 1e9:.1f} GFLOPs per training image",
          flush=True)
    result["models"] = {}
    for backbone in ("resnet50", "resnet18", "vit_small_patch16_224"):
        flops = ssl_sample_flops(backbone, crops)
        estimate = args.reference_rate * ref / flops
        result["models"][backbone] = {"gflops_per_sample": round(flops / 1e9, 2),
                                      "samples_per_s_at_reference_flop_rate": round(estimate),
                                      "tflops_needed_at_target": round(args.target * flops / 1e12, 1)}
        print(f"{backbone}: {flops / 1e9:.1f} GFLOPs per sample (2x224 + 6x96, fwd + bwd, loss); at the reference's "
              f"achieved FLOP rate {estimate:,.0f} samples/s; {args.target:.0f}/s needs "
              f"{args.target * flops / 1e12:.0f} TFLOP/s", flush=True)

    # 2.-3. loader cores and bytes
    shards = ensure_shards(args.shards or DEFAULT_SHARDS, DEFAULT_SOURCE)
    infos = list_shards([shards])
    samples = sum(s.samples for s in infos)
    stored_bytes = sum(os.path.getsize(s.path) for s in infos) / samples
    batch = 64
    device_path = timed(stored_batches(shards, batch), max(1, args.samples // batch), 1, per_item=batch)
    cpu_path = timed(iter(stream(shards, transform=MultiCrop(crops))), args.samples, 20)
    first = next(stored_batches(shards, batch))["values"]  # (batch, H, W) int16 canvas
    canvas_bytes = first[0].element_size() * first[0].numel()
    result["loader"] = {
        "crops_on_device": {**device_path, "cores_per_gpu": round(args.target / device_path["per_cpu_s"], 2)},
        "crops_on_loader_swav": {**cpu_path, "cores_per_gpu": round(args.target / cpu_path["per_cpu_s"], 2)},
    }
    result["bytes"] = {"shard_bytes_per_sample": round(stored_bytes),
                       "storage_mb_per_s_at_target": round(args.target * stored_bytes / 1e6, 1),
                       "host_to_device_bytes_per_sample": canvas_bytes,
                       "host_to_device_gb_per_s_at_target": round(args.target * canvas_bytes / 1e9, 2)}
    out_pixels = crops.n_global * crops.global_size ** 2 + crops.n_local * crops.local_size ** 2
    result["device_crops"] = {"output_pixels_per_sample": out_pixels,
                              "gflops_per_sample_at_10_per_pixel": round(out_pixels * 10 / 1e9, 4)}
    for name, row in result["loader"].items():
        print(f"loader, {name}: {row['per_cpu_s']:.0f} samples per CPU-s -> {row['cores_per_gpu']:.1f} cores per GPU "
              f"at {args.target:.0f}/s", flush=True)
    print(json.dumps(result["bytes"]), json.dumps(result["device_crops"]), flush=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
