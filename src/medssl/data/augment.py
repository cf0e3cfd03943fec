"""Multi-crop medical augmentation (SwAV multi-crop, Caron et al. 2020; medical intensities, Ghesu et al. 2022).

One call turns one decoded shard sample, float32 (H, W) in its intensity convention, into
``n_global`` + ``n_local`` single-channel crops in display space [0, 1], global crops first.

Speed comes from doing little work per pixel of the *source*:
- random resized crop, rotation, zoom and flips are one affine map per crop, so every output pixel
  is sampled once, straight from the source (``affine_grid`` + ``grid_sample``), and the crops of
  one resolution are sampled together (one call per mip level in use);
- a crop that shrinks its box a lot is sampled from a 2x / 4x / 8x average-pooled copy of the
  source (a mip-map level), so that bilinear sampling does not alias; levels are built on demand;
- the random parameters of the crops are drawn together, as float64 numpy arrays (tiny tensors cost
  more in dispatch than in arithmetic); intensity changes run after sampling, vectorised over crops,
  on few pixels.

The same crops can be made batched on the training device (``medssl.data.device_crops``): it draws
its parameters with ``MultiCrop.draw`` and changes intensities with ``apply_intensity``, so only the
resampling is written twice, and a generator in the same state gives both paths the same crops.

CT windows are applied after sampling in Hounsfield units, as a viewer does: a random window per
crop over soft-tissue, brain, bone, lung and mediastinum-like levels and widths. Images already
``normalized`` to [0, 1] keep their values. Then gamma, contrast, brightness, Gaussian blur and
Gaussian noise. No colour jitter: the images have one channel.

Randomness comes from one ``torch.Generator`` (given per call, or the transform's own from
``seed``, or torch's global one), drawn in a fixed order, so a seed reproduces every crop exactly.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from medssl.config import MultiCropConfig

SEMANTICS = ("hounsfield", "normalized")

_MAX_MIP_LEVEL = 3  # 8x: enough for a 512-px box to a 48-px crop with bilinear sampling




class CropParams(NamedTuple):
    """The random draw of n crops, one row per crop."""

    box: np.ndarray         # (n, 2) width and height of the crop's box in image pixels (before the zoom)
    theta: np.ndarray       # (n, 2, 3) affine map: output coords in [-1, 1] -> image coords in [-1, 1]
    level: np.ndarray       # (n,) mip level to sample from
    window: np.ndarray      # (n, 2) lowest HU and width in HU; used for hounsfield samples only
    gamma: np.ndarray       # (n,)
    contrast: np.ndarray    # (n,)
    brightness: np.ndarray  # (n,)
    blur_sigma: np.ndarray  # (n,) 0: no blur
    noise_std: np.ndarray   # (n,) 0: no noise


class U(IntEnum):
    """The columns of a crop's drawn values (``_ranges`` gives each its range): named, not positional."""

    AREA = 0         # box area, fraction of the image
    ASPECT = 1       # box width / height (log-uniform)
    CENTRE_X = 2     # box centre, as a fraction of the free room
    CENTRE_Y = 3
    ROTATION = 4     # radians
    ZOOM = 5         # (log-uniform)
    HFLIP = 6        # coin: flip if below its probability
    VFLIP = 7
    WINDOW = 8       # which CT window
    LEVEL = 9        # level shift, times the width
    WIDTH = 10       # width factor (log-uniform)
    GAMMA_ON = 11    # coin
    GAMMA = 12       # (log-uniform)
    CONTRAST = 13
    BRIGHTNESS = 14
    BLUR_ON = 15     # coin
    BLUR = 16        # sigma
    NOISE_ON = 17    # coin
    NOISE = 18       # std


N_UNIFORMS = len(U)  # random numbers per crop
_COINS = [int(U.GAMMA_ON), int(U.BLUR_ON), int(U.NOISE_ON)]  # each decides whether the value after it applies
_COINED = [int(U.GAMMA), int(U.BLUR), int(U.NOISE)]
_LOG_UNIFORM = [U.ASPECT, U.ZOOM, U.WIDTH, U.GAMMA]  # drawn log-uniformly (exp of a uniform draw of the logs)


class MultiCrop:
    """Callable: ``(values (H, W), semantics) -> [crop (1, size, size), ...]``, global crops first."""

    def __init__(self, config: MultiCropConfig | None = None, seed: int | None = None):
        self.config = config or MultiCropConfig()
        # Without a seed, torch's global generator: DataLoader seeds it differently in each worker,
        # whereas a generator object would be copied into every worker with the same state.
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        c = self.config
        # (count, size, box area range) of the global crops, then of the local ones
        self.groups = [(n, size, scale) for n, size, scale in
                       [(c.n_global, c.global_size, c.global_scale), (c.n_local, c.local_size, c.local_scale)] if n > 0]
        self.n_crops = sum(n for n, _, _ in self.groups)
        self._ranges = [_ranges(c, scale) for _, _, scale in self.groups]  # (low, span) per group
        self._constants = _Constants(
            windows=np.asarray(c.ct_windows, dtype=np.float64),
            flip_probs=np.array([c.hflip_prob, c.vflip_prob]),
            coin_probs=np.array([c.gamma_prob, c.blur_prob, c.noise_prob]),
            neutral=np.array([1.0, 0.0, 0.0]),
        )
        self._distance: dict = {}  # per crop size and device: (i - j)^2, to build blur matrices

    def __call__(self, values: np.ndarray | Tensor, semantics: str,
                 generator: torch.Generator | None = None) -> list[Tensor]:
        """values: float (H, W) in the sample's convention (``hounsfield`` or ``normalized``)."""
        check_semantics(semantics)
        image = torch.as_tensor(values, dtype=torch.float32)
        if image.ndim != 2:
            raise ValueError(f"expected one grey image of shape (H, W), got shape {tuple(image.shape)}")
        g = generator if generator is not None else self.generator

        uniforms = self.uniforms(g)[None]  # first: every call starts with the same draw
        pyramid = _Pyramid(image)
        crops: list[Tensor] = []
        for (count, size, _), params in zip(self.groups, self.draw(uniforms, [image.shape])):
            batch = _resample(pyramid, params, size)
            hounsfield = np.full(count, semantics == "hounsfield")
            crops.extend(apply_intensity(batch, params, hounsfield, g, self._distance).unbind(0))
        return crops

    def uniforms(self, generator: torch.Generator | None) -> np.ndarray:
        """The random numbers of one image's crops, (n_crops, N_UNIFORMS): one draw, the first of a call."""
        return torch.rand(self.n_crops, N_UNIFORMS, generator=generator).numpy().astype(np.float64)

    def draw(self, uniforms: np.ndarray, shapes: list[tuple[int, int]] | np.ndarray) -> list[CropParams]:
        """The crops of m images from their ``uniforms`` (m, n_crops, N_UNIFORMS) and (height, width):
        one ``CropParams`` per group (global, local), its rows image by image (m x count).

        Vectorised over images and crops, so the per-image and the batched path run the same code and
        draw the same crops; about 50 numpy calls in all, as one image's crops are drawn per call.
        """
        shapes = np.asarray(shapes, dtype=np.float64)
        values, rows, sizes, first = [], [], [], 0
        for (count, size, _), (low, span) in zip(self.groups, self._ranges):
            values.append(low + span * uniforms[:, first:first + count].reshape(-1, N_UNIFORMS))
            rows.append(np.repeat(shapes, count, axis=0))
            sizes.append(np.full(len(rows[-1]), size, dtype=np.float64))
            first += count
        values = np.concatenate(values)  # group by group, in each image by image
        values[:, _LOG_UNIFORM] = np.exp(values[:, _LOG_UNIFORM])
        drawn = _crop_params(values, np.concatenate(rows), np.concatenate(sizes), self._constants)
        params, first = [], 0
        for r in rows:
            params.append(CropParams(*(f[first:first + len(r)] for f in drawn)))
            first += len(r)
        return params


def check_semantics(semantics: str) -> None:
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown intensity semantics {semantics!r}; expected one of {SEMANTICS}")


def _ranges(c: MultiCropConfig, scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(low, span), each (N_UNIFORMS,), for crops whose box area range is ``scale``: a crop's uniform
    number u in column j stands for low + span * u (or exp of that for the _LOG_UNIFORM columns);
    span 1, low 0 keeps u itself, for the coin flips and the window choice."""
    log = math.log
    jitter = c.ct_window_jitter
    ranges = {
        U.AREA: scale,
        U.ASPECT: (log(c.aspect_ratio[0]), log(c.aspect_ratio[1])),
        U.CENTRE_X: (-0.5, 0.5), U.CENTRE_Y: (-0.5, 0.5),
        U.ROTATION: tuple(math.radians(a) for a in c.rotation),
        U.ZOOM: (log(c.scale_jitter[0]), log(c.scale_jitter[1])),
        U.HFLIP: (0, 1), U.VFLIP: (0, 1), U.WINDOW: (0, 1),
        U.LEVEL: (-jitter, jitter), U.WIDTH: (-jitter, jitter),
        U.GAMMA_ON: (0, 1), U.GAMMA: (log(c.gamma[0]), log(c.gamma[1])),
        U.CONTRAST: (1 - c.contrast, 1 + c.contrast),
        U.BRIGHTNESS: (-c.brightness, c.brightness),
        U.BLUR_ON: (0, 1), U.BLUR: c.blur_sigma,
        U.NOISE_ON: (0, 1), U.NOISE: c.noise_std,
    }
    table = np.asarray([ranges[column] for column in U], dtype=np.float64)
    return table[:, 0], table[:, 1] - table[:, 0]


class _Constants(NamedTuple):
    """Arrays of a MultiCrop's settings used at every draw: building them costs as much as using them."""

    windows: np.ndarray     # (k, 2) CT window levels and widths
    flip_probs: np.ndarray  # horizontal, vertical
    coin_probs: np.ndarray  # gamma, blur, noise
    neutral: np.ndarray     # gamma, blur sigma, noise std when not applied


_PLUS_MINUS = np.array([1.0, -1.0])


def _crop_params(v: np.ndarray, shapes: np.ndarray, size: np.ndarray, k: _Constants) -> CropParams:
    """The parameters of n crops from their drawn values ``v`` (n, N_UNIFORMS; see ``_ranges``), the
    (height, width) of each crop's image and the crops' output ``size``. Numpy calls are most of the
    cost at a few crops per call, so width and height go through as pairs and nothing is stacked."""
    n = len(v)
    wh = shapes[:, ::-1]  # image (width, height)
    area = v[:, U.AREA] * wh[:, 0] * wh[:, 1]
    # A box wider or taller than the image is clipped to it rather than redrawn (torchvision
    # retries up to 10 times): no loop, and only extreme aspect ratios are affected.
    # Slices of neighbouring columns, not lists: views, no copies (this runs for every image).
    box = np.minimum(np.sqrt(area[:, None] * v[:, U.ASPECT:U.ASPECT + 1] ** _PLUS_MINUS), wh)  # (width, height)
    centre = v[:, U.CENTRE_X:U.CENTRE_Y + 1] * (wh - box)  # box centre in pixels from the image centre
    zoom = v[:, U.ZOOM]
    half = zoom[:, None] * box / 2 * np.where(v[:, U.HFLIP:U.VFLIP + 1] < k.flip_probs, -1.0, 1.0)
    cos, sin = np.cos(v[:, U.ROTATION]), np.sin(v[:, U.ROTATION])
    # Scale the unit square to the box, rotate it, move it to its centre; pixels -> [-1, 1].
    theta = np.empty((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos * half[:, 0], -sin * half[:, 1]
    theta[:, 1, 0], theta[:, 1, 1] = sin * half[:, 0], cos * half[:, 1]
    theta[:, :, 2] = centre
    theta *= (2 / wh)[:, :, None]
    # Mip level: halve the source until the box shrinks by less than 2x onto the crop.
    shrink = zoom * np.sqrt(box[:, 0] * box[:, 1]) / size
    level = np.minimum(np.maximum(np.floor(np.log2(shrink)), 0), _MAX_MIP_LEVEL).astype(np.int64)

    # CT window: (level, width) -> (lowest HU, width), width scaled, level moved by a fraction of the width.
    window = k.windows[np.minimum((v[:, U.WINDOW] * len(k.windows)).astype(np.int64), len(k.windows) - 1)]
    window[:, 1] *= v[:, U.WIDTH]
    window[:, 0] += (v[:, U.LEVEL] - 0.5) * window[:, 1]
    # Gamma, blur and noise, each applied with its probability (else neutral: 1, 0, 0).
    gamma, blur, noise = np.where(v[:, _COINS] < k.coin_probs, v[:, _COINED], k.neutral).T
    return CropParams(box=box, theta=theta, level=level, window=window, gamma=gamma, contrast=v[:, U.CONTRAST],
                      brightness=v[:, U.BRIGHTNESS], blur_sigma=blur, noise_std=noise)


def apply_intensity(x: Tensor, p: CropParams, hounsfield: np.ndarray, generator: torch.Generator | None,
                    distance: dict) -> Tensor:
    """Window (CT crops), gamma, contrast, brightness, blur, noise of crops ``x`` (n, 1, s, s) on any
    device, vectorised over the crops. ``distance``: a cache for the blur, kept by the caller."""
    columns = [p.window[:, 0], p.window[:, 1], p.gamma, p.contrast, p.brightness]
    # One small host -> device copy for all per-crop numbers.
    per_crop = torch.from_numpy(np.array(columns, dtype=np.float32)).to(x.device)
    low, width, gamma, contrast, brightness = per_crop.view(len(columns), -1, 1, 1, 1).unbind(0)
    n_ct = np.count_nonzero(hounsfield)
    if n_ct == len(hounsfield):
        x = (x - low) / width
    elif n_ct:  # a batch of CT and other images: the others keep their values
        ct = torch.from_numpy(hounsfield).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(ct, (x - low) / width, x)
    x = x.clamp(0, 1).pow(gamma)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    x = x.clamp(0, 1)

    blurred = np.flatnonzero(p.blur_sigma > 0).tolist()
    if blurred:
        x[blurred] = _blur(x[blurred], p.blur_sigma[blurred], distance)
    noisy = np.flatnonzero(p.noise_std > 0).tolist()
    if noisy:
        noise = torch.randn((len(noisy), *x.shape[1:]), generator=generator, device=x.device)
        std = torch.tensor(p.noise_std[noisy], dtype=torch.float32).to(x.device).view(-1, 1, 1, 1)
        x[noisy] += std * noise
    return x.clamp(0, 1)


def _blur(x: Tensor, sigmas: np.ndarray, distance: dict) -> Tensor:
    """Gaussian blur, one sigma per crop, as K @ X @ K^T with a dense Gaussian matrix K.

    For crops of at most a few hundred pixels two small matrix products beat a grouped
    convolution. Rows of K are normalised, so the borders keep their brightness.
    """
    size = x.shape[-1]
    if (size, x.device) not in distance:
        steps = torch.arange(size, dtype=torch.float32, device=x.device)
        distance[size, x.device] = (steps[:, None] - steps[None, :]) ** 2
    sigma = torch.tensor(sigmas, dtype=torch.float32).to(x.device).view(-1, 1, 1)
    # Clamped: weights below e^-30 are nil after normalising, and exp of far smaller
    # numbers takes a slow underflow path (10x the time of the whole blur).
    kernel = torch.exp((distance[size, x.device] / (-2 * sigma**2)).clamp(min=-30.0))
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


def _resample(pyramid: _Pyramid, params: CropParams, size: int) -> Tensor:
    """All crops of one size: one affine grid, one grid_sample per mip level in use."""
    grid = affine_grid(torch.tensor(params.theta, dtype=torch.float32), size)
    levels = params.level.tolist()
    out = torch.empty(len(levels), 1, size, size)
    for k in sorted(set(levels)):
        pick = [i for i, level in enumerate(levels) if level == k]
        source = pyramid.level(k).expand(len(pick), -1, -1, -1)  # a view: no copy per crop
        out[pick] = F.grid_sample(source, grid[pick], mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + pyramid.fill


def affine_grid(theta: Tensor, size: int) -> Tensor:
    """``F.affine_grid(theta, (n, 1, size, size), align_corners=False)``, built differently.

    An affine map of a pixel grid is a row term plus a column term: two small outer sums instead
    of affine_grid's batched matmul with an inner dimension of 3, which is ~8x slower on CPU.
    """
    # pixel centres in [-1, 1]
    centres = (torch.arange(size, dtype=torch.float32, device=theta.device) * 2 + 1) / size - 1
    t = theta.unsqueeze(-1)  # (n, 2 outputs, 3 coefficients, 1)
    grid = t[:, :, 0:1] * centres.view(1, 1, 1, -1) + (t[:, :, 1:2] * centres.view(1, 1, -1, 1) + t[:, :, 2:3])
    return grid.permute(0, 2, 3, 1)  # (n, size, size, xy); grid_sample reads the strided view as fast
