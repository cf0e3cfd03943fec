"""The multi-crop of ``MultiCrop``, batched on the training device: loader cores only read and decode.

Why: a GPU trains on ~1,500 images/s; resampling 8 crops per image on loader cores would need several
cores per GPU, while the device does it for a whole batch in a few kernels.

What the loader delivers (``ShardStream(pixels="stored")`` + ``collate_stored``): each image's uint16
stored values in the top-left corner of a batch canvas (zeros elsewhere), its (height, width), and the
seed its augmentation would get on the per-image path. Stored values are half the bytes of floats and
leave the float conversion to the device.

The same crops as ``MultiCrop``: the parameters come from ``MultiCrop.draw`` with one generator per
image seeded like the per-image path's, so the boxes, windows and intensity changes are the same
numbers (box area a fraction of the *image*, not of the canvas); ``apply_intensity`` is shared; only
the Gaussian noise comes from a device generator (seeded from the batch's seeds). Resampling gives the
same pixels up to float rounding:

- values = stored * scale + offset (float32, as ``decode_pixels``), each image shifted by its minimum
  and zero outside its extent, so that outside the image is filled with its darkest value;
- mip levels by 2x2 averaging of the whole canvas, each cut to the image's extent at that level (the
  per-image pyramid drops an odd last row/column, so the kept pixels are the same);
- all levels of all images side by side in one atlas, two zero pixels between levels; each crop's
  affine map is moved into its level's region, and its sampling positions are clamped to that region
  plus half a pixel of the zero border, so bilinear sampling reads exactly what ``grid_sample`` with
  zero padding reads on the image's own level;
- one ``grid_sample`` per crop size for the whole batch: the crops of an image stacked in its output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from medssl.config import MultiCropConfig
from medssl.data.augment import CropParams, MultiCrop, affine_grid, apply_intensity, check_semantics

_GAP = 2  # zero pixels around each level in the atlas: a clamped position lies between two of them


class DeviceMultiCrop:
    """``(values (B, H, W), shapes, semantics, generators) -> [view (B, 1, size, size), ...]``, global
    views first, on the device of ``values``: view j holds crop j of every image, as ``MultiCrop`` and
    ``collate_samples`` give them."""

    def __init__(self, config: MultiCropConfig | None = None):
        self.crop = MultiCrop(config)  # its crop groups, drawing and blur cache

    @property
    def config(self) -> MultiCropConfig:
        return self.crop.config

    def __call__(self, values: Tensor, shapes: Sequence[tuple[int, int]], semantics: Sequence[str],
                 generators: Sequence[torch.Generator], noise: torch.Generator | None = None) -> list[Tensor]:
        """``values``: float32 (B, H, W), image i in ``[:h_i, :w_i]`` (``shapes[i]``), in its convention
        (``semantics[i]``); ``generators``: one CPU generator per image, drawn from as by ``MultiCrop``;
        ``noise``: a generator on the device for the Gaussian noise."""
        if values.ndim != 3 or not len(values) == len(shapes) == len(semantics) == len(generators):
            raise ValueError(f"expected values (B, H, W) and B shapes, semantics and generators; got values of shape "
                             f"{tuple(values.shape)}, {len(shapes)} shapes, {len(semantics)} semantics, "
                             f"{len(generators)} generators")
        for s in semantics:
            check_semantics(s)
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        if (shapes < 1).any() or (shapes > values.shape[1:]).any():
            raise ValueError(f"image shapes must lie within the canvas {tuple(values.shape[1:])}, "
                             f"got {shapes.tolist()}")
        uniforms = np.stack([self.crop.uniforms(g) for g in generators])
        params = self.crop.draw(uniforms, shapes)
        atlas = _Atlas(values, shapes, top_level=max(int(p.level.max()) for p in params))
        hounsfield = np.array([s == "hounsfield" for s in semantics])
        views: list[Tensor] = []
        for (count, size, _), p in zip(self.crop.groups, params):
            crops = atlas.sample(p, count, size)
            crops = apply_intensity(crops, p, np.repeat(hounsfield, count), noise, self.crop._distance)
            views.extend(crops.view(len(values), count, 1, size, size).unbind(1))
        return views

    def views(self, batch: dict, device: torch.device) -> list[Tensor]:
        """The views of a batch of ``collate_stored``, made on ``device``."""
        stored = batch["values"].to(device, non_blocking=True)
        store = [m["intensity"]["store"] for m in batch["meta"]]
        scale = torch.tensor([s["scale"] for s in store], dtype=torch.float32).view(-1, 1, 1).to(device)
        offset = torch.tensor([s["offset"] for s in store], dtype=torch.float32).view(-1, 1, 1).to(device)
        # uint16 bits travel as int16 (every device handles int16; uint16 has few kernels): undo the sign.
        values = (stored.to(torch.int32) & 0xFFFF).to(torch.float32)
        values = values * scale + offset  # two roundings, as decode_pixels does: the same float32 values
        seeds = batch["seeds"]
        noise = torch.Generator(device=device).manual_seed(_batch_seed(seeds))
        return self(values, batch["sizes"].tolist(), [m["intensity"]["semantics"] for m in batch["meta"]],
                    [torch.Generator().manual_seed(s) for s in seeds], noise)


def _batch_seed(seeds: Sequence[int]) -> int:
    """One seed from the batch's per-image seeds, for its noise: the same batch gets the same noise."""
    return int.from_bytes(hashlib.blake2b(np.asarray(seeds, dtype=np.uint64).tobytes(), digest_size=8).digest(),
                          "little")


class _Atlas:
    """The mip levels 0..top_level of a batch of images side by side in one tensor (B, 1, Ha, Wa),
    shifted by each image's minimum and zero outside each image's extent (module docstring)."""

    def __init__(self, values: Tensor, shapes: np.ndarray, top_level: int):
        batch, height, width = values.shape
        self.shapes = shapes
        # Column where level k starts: levels of the canvas's size at that level, _GAP zeros around each.
        self.origins = np.cumsum([_GAP] + [(width >> k) + _GAP for k in range(top_level)])
        self.atlas = values.new_zeros(batch, 1, height + 2 * _GAP, int(self.origins[-1]) + (width >> top_level) + _GAP)
        extent = torch.from_numpy(shapes).to(values.device)
        inside = self._inside(extent, height, width)
        self.fill = values.masked_fill(~inside, float("inf")).amin(dim=(1, 2))
        level = (values - self.fill.view(-1, 1, 1)).masked_fill_(~inside, 0.0)
        for k in range(top_level + 1):
            if k:
                h, w = level.shape[1] // 2, level.shape[2] // 2
                top = level[:, : 2 * h, : 2 * w]
                rows = top[:, 0::2] + top[:, 1::2]  # summed as the per-image pyramid sums them
                level = ((rows[:, :, 0::2] + rows[:, :, 1::2]) * 0.25).masked_fill_(
                    ~self._inside(extent >> k, h, w), 0.0)
            x0 = int(self.origins[k])
            self.atlas[:, 0, _GAP:_GAP + level.shape[1], x0:x0 + level.shape[2]] = level

    @staticmethod
    def _inside(extent: Tensor, height: int, width: int) -> Tensor:
        """(B, height, width): which canvas pixels lie inside each image of (h, w) ``extent``."""
        rows = torch.arange(height, device=extent.device).view(1, -1, 1) < extent[:, 0].view(-1, 1, 1)
        cols = torch.arange(width, device=extent.device).view(1, 1, -1) < extent[:, 1].view(-1, 1, 1)
        return rows & cols

    def sample(self, p: CropParams, count: int, size: int) -> Tensor:
        """The crops ``p`` (``count`` per image, image by image) as (B * count, 1, size, size): one grid_sample."""
        batch, _, height, width = self.atlas.shape
        image = np.repeat(np.arange(batch), count)
        h = (self.shapes[image, 0] >> p.level).astype(np.float64)  # each crop's image at its level
        w = (self.shapes[image, 1] >> p.level).astype(np.float64)
        x0, y0 = self.origins[p.level].astype(np.float64), float(_GAP)
        # Image coords in [-1, 1] -> pixel ((x + 1) * w - 1) / 2 of the level -> atlas coords in [-1, 1].
        theta = p.theta.copy()
        theta[:, 0] *= (w / width)[:, None]
        theta[:, 0, 2] += (2 * x0 + w) / width - 1
        theta[:, 1] *= (h / height)[:, None]
        theta[:, 1, 2] += (2 * y0 + h) / height - 1
        # The level's pixels -1.5 .. w + 0.5 (zeros beyond its extent), in atlas coords.
        low = np.stack([(2 * (x0 - 1.5) + 1) / width - 1, np.full(len(w), (2 * (y0 - 1.5) + 1) / height - 1)], axis=1)
        high = np.stack([(2 * (x0 + w + 0.5) + 1) / width - 1, (2 * (y0 + h + 0.5) + 1) / height - 1], axis=1)
        device = self.atlas.device
        bounds = torch.from_numpy(np.stack([low, high]).astype(np.float32)).to(device).view(2, -1, 1, 1, 2)
        grid = affine_grid(torch.from_numpy(theta.astype(np.float32)).to(device), size)
        grid = torch.minimum(torch.maximum(grid, bounds[0]), bounds[1])
        out = F.grid_sample(self.atlas, grid.reshape(batch, count * size, size, 2), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
        return out.view(batch * count, 1, size, size) + self.fill[torch.from_numpy(image).to(device)].view(-1, 1, 1, 1)
