"""Batched multi-crop on the training device (data/device_crops.py) against the per-image MultiCrop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import medssl.train.pretrain as pretrain_module
from medssl.config import MultiCropConfig, PretrainConfig
from medssl.data.augment import MultiCrop
from medssl.data.device_crops import DeviceMultiCrop
from medssl.data.stream import ShardStream, collate_samples, collate_stored
from medssl.train.pretrain import pretrain

# Geometry only: one full-image crop, no intensity change, so outputs can be compared to inputs.
PLAIN = dict(n_global=1, global_size=64, global_scale=(1.0, 1.0), n_local=0, aspect_ratio=(1.0, 1.0),
             rotation=(0.0, 0.0), scale_jitter=(1.0, 1.0), hflip_prob=0.0, vflip_prob=0.0,
             gamma_prob=0.0, contrast=0.0, brightness=0.0, blur_prob=0.0, noise_prob=0.0)
# Images of different sizes in one batch, CT and not.
SHAPES = [(300, 420), (512, 512), (257, 199), (64, 80), (130, 131)]
SEMANTICS = ["hounsfield", "normalized", "hounsfield", "normalized", "hounsfield"]


def phantom(shape, semantics, seed):
    """A soft-tissue ellipse with a bone ring in air and mild noise; in HU, or scaled to [0, 1]."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - h / 2) / h, (xx - w / 2) / w)
    hu = np.where(r < 0.4, 40.0, -1000.0)
    hu[(r > 0.3) & (r < 0.33)] = 1000.0
    hu = (hu + np.random.default_rng(seed).normal(0, 10, hu.shape)).astype(np.float32)
    return hu if semantics == "hounsfield" else (hu + 1050) / 2100


def batch_of(images):
    """The images on one zero canvas (B, H, W), as collate_stored lays them out."""
    canvas = torch.zeros(len(images), max(i.shape[0] for i in images), max(i.shape[1] for i in images))
    for k, image in enumerate(images):
        canvas[k, : image.shape[0], : image.shape[1]] = torch.from_numpy(image)
    return canvas


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def config(preset="cpu", **changes):
    return MultiCropConfig.model_validate({**MultiCropConfig.preset(preset).model_dump(), **changes})


def test_batched_drawing_gives_exactly_the_per_image_parameters():
    crop = MultiCrop(config("swav"))
    uniforms = np.stack([crop.uniforms(g) for g in generators(range(len(SHAPES)))])
    batched = crop.draw(uniforms, SHAPES)
    for i, shape in enumerate(SHAPES):
        single = crop.draw(uniforms[i:i + 1], [shape])
        for (count, _, _), together, alone in zip(crop.groups, batched, single):
            for field, a, b in zip(together._fields, together, alone):
                assert np.array_equal(a[i * count:(i + 1) * count], b), field


@pytest.mark.parametrize("preset", ["cpu", "swav"])
def test_same_generators_give_the_per_image_views(preset):
    """Without noise (the only draw from another generator) the views are the per-image views up to float rounding."""
    cfg = config(preset, noise_prob=0.0)
    images = [phantom(s, sem, k) for k, (s, sem) in enumerate(zip(SHAPES, SEMANTICS))]
    for seed in range(3):
        seeds = [100 * seed + k for k in range(len(images))]
        views = DeviceMultiCrop(cfg)(batch_of(images), SHAPES, SEMANTICS, generators(seeds))
        sizes = [cfg.global_size] * cfg.n_global + [cfg.local_size] * cfg.n_local
        assert [tuple(v.shape) for v in views] == [(len(images), 1, s, s) for s in sizes]
        for k, image in enumerate(images):
            crops = MultiCrop(cfg)(image, SEMANTICS[k], generator=torch.Generator().manual_seed(seeds[k]))
            for c, v in zip(crops, views):
                torch.testing.assert_close(v[k], c, rtol=0, atol=2e-3)


def test_full_image_crop_on_a_larger_canvas_is_the_image():
    """The box is a fraction of the image, not of the canvas, and the padding never shows."""
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    canvas = batch_of([image, np.zeros((90, 100), np.float32)])
    views = DeviceMultiCrop(MultiCropConfig(**PLAIN))(canvas, [(64, 64), (90, 100)], ["normalized"] * 2,
                                                      generators([0, 1]))
    torch.testing.assert_close(views[0][0, 0], torch.from_numpy(image), rtol=0, atol=1e-5)


def test_zoom_out_fills_with_the_image_minimum_not_the_canvas_zeros():
    image = np.full((64, 64), 40.0, np.float32)
    image[0, 0] = -1024.0  # the darkest value: air; the canvas around it holds 0 HU (water)
    cfg = MultiCropConfig(**{**PLAIN, "scale_jitter": (2.0, 2.0), "ct_windows": [(40.0, 400.0)],
                             "ct_window_jitter": 0.0})
    canvas = batch_of([image, np.zeros((128, 128), np.float32)])
    (view,) = DeviceMultiCrop(cfg)(canvas, [(64, 64), (128, 128)], ["hounsfield"] * 2, generators([0, 1]))
    assert view[0, 0, 0, 0] == 0.0 and view[0, 0, -1, -1] == 0.0  # outside the image: air, black
    assert view[0, 0, 32, 32] == pytest.approx(0.5, abs=1e-5)      # centre: the 40 HU tissue


@pytest.mark.parametrize("semantics", ["hounsfield", "normalized"])
def test_view_distribution_matches_the_per_image_path(semantics):
    """With noise (drawn on the device from its own generator) the two paths agree in distribution:
    the same boxes, relative to each image, and the same intensity statistics per view."""
    cfg = config("cpu")
    shapes = [(96, 160), (128, 128)] * 8
    images = [phantom(s, semantics, k) for k, s in enumerate(shapes)]
    seeds = list(range(len(images)))
    device = DeviceMultiCrop(cfg)
    views = device(batch_of(images), shapes, [semantics] * len(images), generators(seeds),
                   torch.Generator().manual_seed(7))
    per_image = [MultiCrop(cfg)(im, semantics, generator=torch.Generator().manual_seed(s))
                 for im, s in zip(images, seeds)]

    # Boxes: the same draws, a fraction of each image (not of the canvas) within the configured range.
    params = device.crop.draw(np.stack([device.crop.uniforms(g) for g in generators(seeds)]), shapes)
    for (_, _, scale), p in zip(device.crop.groups, params):
        image_area = np.repeat([h * w for h, w in shapes], len(p.box) // len(shapes))
        area = p.box.prod(axis=1) / image_area
        assert scale[0] - 1e-9 <= area.min() and area.max() <= scale[1] + 1e-9
        aspect = p.box[:, 0] / p.box[:, 1]
        assert cfg.aspect_ratio[0] - 1e-9 <= aspect.min() and aspect.max() <= cfg.aspect_ratio[1] + 1e-9

    for j, view in enumerate(views):
        ours = view.flatten()
        theirs = torch.stack([crops[j] for crops in per_image]).flatten()
        assert 0 <= ours.min() and ours.max() <= 1
        assert abs(ours.mean() - theirs.mean()) < 0.01 and abs(ours.std() - theirs.std()) < 0.01
        for level in (0.0, 1.0):  # saturated pixels: windows and clamps agree
            assert abs((ours == level).float().mean() - (theirs == level).float().mean()) < 0.02


def test_views_of_a_stored_batch_are_the_loader_views(tiny_shards):
    """The stream's stored pixels + seeds, cropped on the device, are the views the per-image transform
    makes in the loader for the same samples (the seeds are the ones the transform runs with)."""
    cfg = config("cpu", global_size=32, local_size=16, noise_prob=0.0)
    stored = ShardStream(tiny_shards, batch_size=8, seed=3, pixels="stored").loader(collate_fn=collate_stored)
    loader = ShardStream(tiny_shards, batch_size=8, seed=3, transform=MultiCrop(cfg)).loader(collate_fn=collate_samples)
    a, b = next(iter(stored)), next(iter(loader))
    assert a["key"] == b["key"]
    assert {m["intensity"]["semantics"] for m in a["meta"]} == {"hounsfield", "normalized"}
    views = DeviceMultiCrop(cfg).views(a, torch.device("cpu"))
    for ours, theirs in zip(views, b["values"]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)


class _Crash(Exception):
    pass


@pytest.mark.slow  # three short pretraining runs, ~10 s
def test_pretraining_with_device_crops_runs_and_resumes_exactly(tmp_path, tiny_shards, monkeypatch):
    tiny = {"backbone": "resnet18", "batch_size": 4, "proj_hidden": 64, "proj_dim": 32, "n_prototypes": 16,
            "workers": 0, "log_every": 1, "shuffle_buffer": 8, "warmup_steps": 2, "freeze_prototypes_steps": 1,
            "augment": {"global_size": 32, "local_size": 16, "n_local": 2}, "crops_on": "device",
            "max_steps": 4, "checkpoint_every": 1, "deterministic": True}
    straight = pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "straight", **tiny), show_progress=False)

    # The first attempt dies right after its second checkpoint; the rerun resumes from it.
    save, saved = pretrain_module.save_checkpoint, []

    def save_then_crash(path, state):
        save(path, state)
        saved.append(state["step"])
        if len(saved) == 2:
            raise _Crash

    monkeypatch.setattr(pretrain_module, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "resumed", **tiny), show_progress=False)
    monkeypatch.setattr(pretrain_module, "save_checkpoint", save)
    resumed = pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "resumed", **tiny), show_progress=False)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert saved == [1, 2] and len(losses(straight)) == 4
    assert losses(resumed) == losses(straight)
    a, b = load_file(str(straight / "encoder.safetensors")), load_file(str(resumed / "encoder.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
