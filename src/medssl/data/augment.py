"""Multi-crop medical augmentation (SwAV multi-crop, Caron et al. 2020; medical intensities, Ghesu et al. 2022).

One call turns one decoded shard sample, float32 (H, W) in its intensity convention, into
``n_global`` + ``n_local`` single-channel crops in display space [0, 1], global crops first.

Speed comes from doing little work per pixel of the *source*:
- random resized crop, rotation, zoom and flips are one affine map per crop, so every output pixel
  is sampled once, straight from the source (``affine_grid`` + ``grid_sample``), and the crops of
  one resolution are sampled together (one call per mip level in use);
- a crop that shrinks its box a lot is sampled from a 2x / 4x / 8x average-pooled copy of the
  source (a mip-map level), so that bilinear sampling does not alias; levels are built on demand;
- the few random parameters of a crop are plain Python floats (tiny tensors cost more in dispatch
  than in arithmetic); intensity changes run after sampling, vectorised over crops, on few pixels.

CT windows are applied after sampling in Hounsfield units, as a viewer does: a random window per
crop over soft-tissue, brain, bone, lung and mediastinum-like levels and widths. Images already
``normalized`` to [0, 1] keep their values. Then gamma, contrast, brightness, Gaussian blur and
Gaussian noise. No colour jitter: the images have one channel.

Randomness comes from one ``torch.Generator`` (given per call, or the transform's own from
``seed``, or torch's global one), drawn in a fixed order, so a seed reproduces every crop exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor
from torch.nn import functional as F

from medssl.config import StrictModel

SEMANTICS = ("hounsfield", "normalized")

# (level, width) in HU of common display windows.
DEFAULT_CT_WINDOWS = [
    (40.0, 400.0),     # soft tissue (abdomen)
    (40.0, 80.0),      # brain
    (50.0, 350.0),     # mediastinum
    (500.0, 2000.0),   # bone
    (-600.0, 1500.0),  # lung
]

_MAX_MIP_LEVEL = 3  # 8x: enough for a 512-px box to a 48-px crop with bilinear sampling


class MultiCropConfig(StrictModel):
    """Crops and augmentation strengths. Ranges are (min, max); a range (v, v) fixes the value."""

    n_global: int = Field(default=2, ge=1, description="global crops (codes are computed on these)")
    global_size: int = Field(default=224, ge=8, description="side of a global crop in pixels")
    global_scale: tuple[float, float] = Field(default=(0.25, 1.0), description="area of a global crop's box, fraction of the image")
    n_local: int = Field(default=6, ge=0, description="local crops")
    local_size: int = Field(default=96, ge=8, description="side of a local crop in pixels")
    local_scale: tuple[float, float] = Field(default=(0.05, 0.25), description="area of a local crop's box, fraction of the image")
    aspect_ratio: tuple[float, float] = Field(default=(3 / 4, 4 / 3), description="width/height of a crop's box (log-uniform)")
    rotation: tuple[float, float] = Field(default=(-15.0, 15.0), description="rotation in degrees (uniform)")
    scale_jitter: tuple[float, float] = Field(default=(0.9, 1.1), description="zoom of the box (log-uniform); > 1 shows more, outside the image filled with its minimum")
    hflip_prob: float = Field(default=0.5, ge=0, le=1)
    vflip_prob: float = Field(default=0.0, ge=0, le=1, description="off by default: anatomy has an up and down")
    ct_windows: list[tuple[float, float]] = Field(default_factory=lambda: list(DEFAULT_CT_WINDOWS), min_length=1, description="(level, width) in HU; one is picked per crop")
    ct_window_jitter: float = Field(default=0.2, ge=0, description="level moves by up to this fraction of the width; width scales by up to exp(+-this)")
    gamma_prob: float = Field(default=0.5, ge=0, le=1)
    gamma: tuple[float, float] = Field(default=(0.7, 1.5), description="gamma exponent (log-uniform)")
    contrast: float = Field(default=0.3, ge=0, lt=1, description="contrast factor in 1 +- this, about the crop's mean")
    brightness: float = Field(default=0.1, ge=0, description="added offset in +- this")
    blur_prob: float = Field(default=0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = Field(default=(0.1, 1.5), description="Gaussian blur sigma in output pixels")
    noise_prob: float = Field(default=0.3, ge=0, le=1)
    noise_std: tuple[float, float] = Field(default=(0.0, 0.03), description="std of added Gaussian noise")

    @model_validator(mode="after")
    def _ranges(self) -> MultiCropConfig:
        positive = ("global_scale", "local_scale", "aspect_ratio", "scale_jitter", "gamma", "blur_sigma")
        for name in (*positive, "rotation", "noise_std"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: need min <= max, got ({lo}, {hi})")
            if name in positive and lo <= 0:
                raise ValueError(f"{name}: values must be > 0, got ({lo}, {hi})")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"{name}: a box cannot be larger than the image, got max {getattr(self, name)[1]}")
        if any(width <= 0 for _, width in self.ct_windows):
            raise ValueError(f"ct_windows: widths must be > 0, got {self.ct_windows}")
        return self

    @classmethod
    def preset(cls, name: str) -> MultiCropConfig:
        """``swav``: 2x224 + 6x96 as in SwAV; ``cpu``: 2x96 + 4x48 for CPU-scale runs."""
        if name not in PRESETS:
            raise ValueError(f"unknown multi-crop preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    "swav": dict(n_global=2, global_size=224, n_local=6, local_size=96),
    "cpu": dict(n_global=2, global_size=96, n_local=4, local_size=48),
}


class _CropParams(NamedTuple):
    """The random draw of one crop."""

    theta: list[list[float]]  # 2x3 affine map: output coords in [-1, 1] -> source coords in [-1, 1]
    level: int                # mip level to sample from
    window: tuple[float, float]  # (lowest HU, width in HU); used for hounsfield samples only
    gamma: float
    contrast: float
    brightness: float
    blur_sigma: float         # 0: no blur
    noise_std: float          # 0: no noise


_N_UNIFORMS = 19  # random numbers per crop, see _draw


class MultiCrop:
    """Callable: ``(values (H, W), semantics) -> [crop (1, size, size), ...]``, global crops first."""

    def __init__(self, config: MultiCropConfig | None = None, seed: int | None = None):
        self.config = config or MultiCropConfig()
        # Without a seed, torch's global generator: DataLoader seeds it differently in each worker,
        # whereas a generator object would be copied into every worker with the same state.
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        c = self.config
        self._groups = [(n, size, scale) for n, size, scale in
                        [(c.n_global, c.global_size, c.global_scale), (c.n_local, c.local_size, c.local_scale)] if n > 0]
        self._distance: dict[int, Tensor] = {}  # per crop size: (i - j)^2, to build blur matrices

    def __call__(self, values: np.ndarray | Tensor, semantics: str,
                 generator: torch.Generator | None = None) -> list[Tensor]:
        """values: float (H, W) in the sample's convention (``hounsfield`` or ``normalized``)."""
        if semantics not in SEMANTICS:
            raise ValueError(f"unknown intensity semantics {semantics!r}; expected one of {SEMANTICS}")
        image = torch.as_tensor(values, dtype=torch.float32)
        if image.ndim != 2:
            raise ValueError(f"expected one grey image of shape (H, W), got shape {tuple(image.shape)}")
        g = generator if generator is not None else self.generator

        n_total = sum(n for n, _, _ in self._groups)
        # Every uniform number of the call in one draw, in a fixed layout: reproducible and cheap.
        uniforms = iter(torch.rand(n_total, _N_UNIFORMS, generator=g).tolist())
        pyramid = _Pyramid(image)
        crops: list[Tensor] = []
        for count, size, scale in self._groups:
            params = [self._draw(next(uniforms), image.shape, size, scale) for _ in range(count)]
            batch = _resample(pyramid, params, size)
            crops.extend(self._intensity(batch, params, semantics, g).unbind(0))
        return crops

    def _draw(self, u: list[float], shape: tuple[int, int], size: int, scale: tuple[float, float]) -> _CropParams:
        """Turn 19 uniform numbers into one crop's parameters."""
        c = self.config
        height, width = shape
        area = _between(*scale, u[0]) * height * width
        ratio = _log_between(*c.aspect_ratio, u[1])
        # A box taller or wider than the image is clipped to it rather than redrawn (torchvision
        # retries up to 10 times): no loop, and only extreme aspect ratios are affected.
        box_w = min(math.sqrt(area * ratio), width)
        box_h = min(math.sqrt(area / ratio), height)
        cx = (u[2] - 0.5) * (width - box_w)  # box centre in pixels from the image centre,
        cy = (u[3] - 0.5) * (height - box_h)  # anywhere the box fits
        angle = math.radians(_between(*c.rotation, u[4]))
        zoom = _log_between(*c.scale_jitter, u[5])
        half_w = zoom * box_w / 2 * (-1 if u[6] < c.hflip_prob else 1)
        half_h = zoom * box_h / 2 * (-1 if u[7] < c.vflip_prob else 1)
        cos, sin = math.cos(angle), math.sin(angle)
        # Scale the unit square to the box, rotate it, move it to its centre; pixels -> [-1, 1].
        theta = [[2 / width * cos * half_w, -2 / width * sin * half_h, 2 / width * cx],
                 [2 / height * sin * half_w, 2 / height * cos * half_h, 2 / height * cy]]
        # Mip level: halve the source until the box shrinks by less than 2x onto the crop.
        shrink = zoom * math.sqrt(box_w * box_h) / size
        level = min(max(math.floor(math.log2(shrink)), 0), _MAX_MIP_LEVEL)

        level_hu, width_hu = c.ct_windows[min(int(u[8] * len(c.ct_windows)), len(c.ct_windows) - 1)]
        width_hu *= math.exp(_between(-c.ct_window_jitter, c.ct_window_jitter, u[10]))
        level_hu += _between(-c.ct_window_jitter, c.ct_window_jitter, u[9]) * width_hu
        return _CropParams(
            theta=theta,
            level=level,
            window=(level_hu - width_hu / 2, width_hu),
            gamma=_log_between(*c.gamma, u[12]) if u[11] < c.gamma_prob else 1.0,
            contrast=_between(1 - c.contrast, 1 + c.contrast, u[13]),
            brightness=_between(-c.brightness, c.brightness, u[14]),
            blur_sigma=_between(*c.blur_sigma, u[16]) if u[15] < c.blur_prob else 0.0,
            noise_std=_between(*c.noise_std, u[18]) if u[17] < c.noise_prob else 0.0,
        )

    def _intensity(self, x: Tensor, params: list[_CropParams], semantics: str, g: torch.Generator | None) -> Tensor:
        """Window (CT), gamma, contrast, brightness, blur, noise; vectorised over the crops."""
        def per_crop(values: list[float]) -> Tensor:
            return torch.tensor(values).view(-1, 1, 1, 1)

        if semantics == "hounsfield":
            low, width = zip(*(p.window for p in params))
            x = (x - per_crop(low)) / per_crop(width)
        x = x.clamp(0, 1).pow(per_crop([p.gamma for p in params]))
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * per_crop([p.contrast for p in params]) + mean + per_crop([p.brightness for p in params])
        x = x.clamp(0, 1)

        blurred = [i for i, p in enumerate(params) if p.blur_sigma > 0]
        if blurred:
            x[blurred] = self._blur(x[blurred], [params[i].blur_sigma for i in blurred])
        noisy = [i for i, p in enumerate(params) if p.noise_std > 0]
        if noisy:
            noise = torch.randn((len(noisy), *x.shape[1:]), generator=g)
            x[noisy] += per_crop([params[i].noise_std for i in noisy]) * noise
        return x.clamp(0, 1)

    def _blur(self, x: Tensor, sigmas: list[float]) -> Tensor:
        """Gaussian blur, one sigma per crop, as K @ X @ K^T with a dense Gaussian matrix K.

        For crops of at most a few hundred pixels two small matrix products beat a grouped
        convolution. Rows of K are normalised, so the borders keep their brightness.
        """
        size = x.shape[-1]
        if size not in self._distance:
            steps = torch.arange(size, dtype=torch.float32)
            self._distance[size] = (steps[:, None] - steps[None, :]) ** 2
        sigma = torch.tensor(sigmas).view(-1, 1, 1)
        # Clamped: weights below e^-30 are nil after normalising, and exp of far smaller
        # numbers takes a slow underflow path (10x the time of the whole blur).
        kernel = torch.exp((self._distance[size] / (-2 * sigma**2)).clamp(min=-30.0))
        kernel = kernel / kernel.sum(dim=2, keepdim=True)
        return (kernel @ x[:, 0] @ kernel.transpose(1, 2)).unsqueeze(1)


class _Pyramid:
    """Mip levels of one image, built on demand, each shifted by the image's minimum.

    The shift makes grid_sample's zero padding fill the outside of the image with its darkest
    value (air in CT) rather than with 0, which would be water in Hounsfield units.
    """

    def __init__(self, image: Tensor):
        self.fill = image.min()
        self._raw = [image]
        self._shifted: dict[int, Tensor] = {}

    def level(self, k: int) -> Tensor:
        while len(self._raw) <= k:
            top = self._raw[-1]
            # An odd last row/column is dropped: a scale error under 1/size, not worth a pad.
            top = top[: top.shape[0] // 2 * 2, : top.shape[1] // 2 * 2]
            rows = top[0::2] + top[1::2]  # pairs of whole rows first: half the strided reads
            self._raw.append((rows[:, 0::2] + rows[:, 1::2]) * 0.25)
        if k not in self._shifted:
            self._shifted[k] = (self._raw[k] - self.fill)[None, None]
        return self._shifted[k]


def _resample(pyramid: _Pyramid, params: list[_CropParams], size: int) -> Tensor:
    """All crops of one size: one affine grid, one grid_sample per mip level in use."""
    grid = _affine_grid(torch.tensor([p.theta for p in params]), size)
    levels = [p.level for p in params]
    out = torch.empty(len(params), 1, size, size)
    for k in sorted(set(levels)):
        pick = [i for i, level in enumerate(levels) if level == k]
        source = pyramid.level(k).expand(len(pick), -1, -1, -1)  # a view: no copy per crop
        out[pick] = F.grid_sample(source, grid[pick], mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + pyramid.fill


def _affine_grid(theta: Tensor, size: int) -> Tensor:
    """``F.affine_grid(theta, (n, 1, size, size), align_corners=False)``, built differently.

    An affine map of a pixel grid is a row term plus a column term: two small outer sums instead
    of affine_grid's batched matmul with an inner dimension of 3, which is ~8x slower on CPU.
    """
    centres = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    t = theta.unsqueeze(-1)  # (n, 2 outputs, 3 coefficients, 1)
    grid = t[:, :, 0:1] * centres.view(1, 1, 1, -1) + (t[:, :, 1:2] * centres.view(1, 1, -1, 1) + t[:, :, 2:3])
    return grid.permute(0, 2, 3, 1)  # (n, size, size, xy); grid_sample reads the strided view as fast


def _between(lo: float, hi: float, u: float) -> float:
    return lo + (hi - lo) * u


def _log_between(lo: float, hi: float, u: float) -> float:
    return math.exp(_between(math.log(lo), math.log(hi), u))
