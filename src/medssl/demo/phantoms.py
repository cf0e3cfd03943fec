"""Numerical phantoms: anatomy made of tissue classes with realistic values, and the physics that turns
it into CT, projection radiograph, MR and ultrasound images, with lesions whose masks are known.

numpy only. Every random choice comes from the ``numpy.random.Generator`` passed in, so a seed
reproduces an image exactly. Geometry is in millimetres in the DICOM patient frame (LPS: x toward
the patient's left, y toward posterior, z toward the head). Images are laid out the way a
radiologist views them: axial images with anterior at the top and the patient's right on the image's
left; projection radiographs (posterior-anterior view) with the head at the top and the patient's
right on the image's left.

What is simulated, and what is not: piecewise-constant tissue classes with partial-volume edges (one
binomial blur) and modality noise. No scanner physics beyond that: no beam hardening, scatter,
reconstruction kernels, k-space, or beam forming.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Tissue classes of the label maps that come with every phantom."""

    AIR = 0
    FAT = 1
    SOFT_TISSUE = 2  # skin, muscle, heart and mediastinum, abdomen
    BONE = 3
    LUNG = 4
    CSF = 5
    GREY_MATTER = 6
    WHITE_MATTER = 7


# Typical CT numbers in Hounsfield units. Grey matter is denser than white matter (less myelin, whose
# lipid lowers attenuation), which gives head CT its grey/white contrast of about 10 HU.
CT_HU = {
    Tissue.AIR: -1000.0,
    Tissue.FAT: -100.0,
    Tissue.SOFT_TISSUE: 40.0,
    Tissue.BONE: 700.0,  # cancellous bone (vertebrae, skull diploe); cortical bone is set per structure
    Tissue.LUNG: -850.0,
    Tissue.CSF: 8.0,
    Tissue.GREY_MATTER: 38.0,
    Tissue.WHITE_MATTER: 28.0,
}
CORTICAL_BONE_HU = 1500.0      # skull tables
RIB_HU = 900.0
# Acute intraparenchymal blood: haemoglobin raises it above brain, +50..+65 HU in the first hours (a
# retracted clot reaches 80-90 HU later): 12-37 HU above grey (+38) and white matter (+28), against
# 10 HU of noise. Small deep haematomas, 8-16 mm across (0.3-2 mL, the size a reader can miss), are
# 2-5 pixels across at the demo's 64-pixel input (3.4 mm per pixel): the low end of both ranges keeps
# the demo's task one where labels are scarce enough to matter.
HEMORRHAGE_HU = (50.0, 65.0)
HEMORRHAGE_MM = (8.0, 16.0)
TUMOUR_MM = (16.0, 30.0)       # enhancing brain tumour (MR)
NODULE_HU = (60.0, 150.0)      # solid nodule, some with fine calcification

# MR signal relative to white matter on T1. T1-weighted: fat > WM > GM > CSF (CSF dark); T2-weighted:
# CSF > GM > WM (CSF bright). Cortical bone and air give no signal in either.
MR_SIGNAL = {
    "T1": {Tissue.AIR: 0.0, Tissue.FAT: 1.2, Tissue.SOFT_TISSUE: 0.55, Tissue.BONE: 0.05,
           Tissue.CSF: 0.25, Tissue.GREY_MATTER: 0.65, Tissue.WHITE_MATTER: 1.0},
    "T2": {Tissue.AIR: 0.0, Tissue.FAT: 0.7, Tissue.SOFT_TISSUE: 0.35, Tissue.BONE: 0.05,
           Tissue.CSF: 1.6, Tissue.GREY_MATTER: 0.8, Tissue.WHITE_MATTER: 0.6},
}
MR_SIGNAL["T1C"] = MR_SIGNAL["T1"]  # gadolinium changes only what it enhances: the lesion
# A tumour is T1-hypointense before contrast, enhances brightly after it (a bright rim around a
# necrotic core, or solid) and is T2-hyperintense (water).
MR_LESION = {"T1": 0.5, "T2": 1.25, "T1C": 1.5}
MR_NECROSIS = {"T1": 0.3, "T2": 1.5, "T1C": 0.3}
MR_NOISE = 0.04                # Rician sigma relative to white matter on T1 (SNR ~ 25)
MR_SCALE = 1000.0              # scanner units per unit signal (stored as integers)

CT_NOISE_HEAD = 10.0           # HU, standard deviation
CT_NOISE_CHEST = 18.0          # HU: a larger body absorbs more photons
SLICE_MM = 5.0
HEAD_FOV_MM = 220.0
CHEST_FOV_MM = 400.0
DETECTOR_MM = 430.0            # 17-inch radiography detector
MU_WATER = 0.02                # linear attenuation of water per mm at ~70 keV effective energy
PHOTONS = 30000.0              # unattenuated photons per detector pixel (sets quantum noise)
DETECTOR_SCALE = 500.0         # stored detector value per unit of attenuation (-ln transmission)
DETECTOR_MAX = 4095            # 12-bit detector


@dataclass
class Phantom:
    """One simulated image or volume with its ground truth.

    ``image``: (N, H, W) for CT/MR volumes, slices and US frames, (H, W) for radiographs, float32 in the
    modality's units (HU; MR scanner units; detector values; US 8-bit display grey).
    ``tissue``: uint8 :class:`Tissue` map of the same shape (for radiographs, a summary of what each
    ray crossed: see :func:`radiograph`). ``lesion``: bool mask of the inserted lesions.
    ``spacing_mm``: (slice, row, column) or (row, column). ``z_mm``: slice positions (superior
    positive), for volumes.
    """

    image: np.ndarray
    tissue: np.ndarray
    lesion: np.ndarray
    spacing_mm: tuple[float, ...]
    z_mm: tuple[float, ...] = ()


# ----------------------------------------------------------------------------------------- helpers

def _pixel_centres(n: int, fov_mm: float) -> np.ndarray:
    step = fov_mm / n
    return ((np.arange(n) - (n - 1) / 2) * step).astype(np.float32)


def _blur(a: np.ndarray, passes: int = 1, axes: tuple[int, ...] = (-2, -1)) -> np.ndarray:
    """Binomial [1, 2, 1] / 4 blur along ``axes`` (default the last two): the finite resolution of any imager."""
    for _ in range(passes):
        for axis in (ax % a.ndim for ax in axes):
            pad = [(0, 0)] * a.ndim
            pad[axis] = (1, 1)
            p = np.pad(a, pad, mode="edge")
            n = a.shape[axis]
            a = 0.25 * p.take(np.arange(n), axis) + 0.5 * p.take(np.arange(1, n + 1), axis) \
                + 0.25 * p.take(np.arange(2, n + 2), axis)
    return a


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance Gaussian noise with a short correlation length, like reconstructed CT noise."""
    # One 2D binomial pass keeps sum(w^2) = (6/16)^2 of the variance: divide by its square root.
    return _blur(rng.standard_normal(shape, dtype=np.float32)) / 0.375


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """Unit-variance random field with structures of about ``1 / cutoff`` pixels (Gaussian low-pass)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    spectrum = np.fft.rfft2(rng.standard_normal(shape)) * np.exp(-(fx**2 + fy**2) / (2 * cutoff**2))
    field = np.fft.irfft2(spectrum, s=shape)
    return ((field - field.mean()) / field.std()).astype(np.float32)


def _ellipse(x, y, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1.0


def _ellipsoid(x, y, z, centre: tuple[float, float, float], semi: tuple[float, float, float]) -> np.ndarray:
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2 < 1.0


def _lookup(table: dict[Tissue, float], tissue: np.ndarray) -> np.ndarray:
    values = np.zeros(len(Tissue), dtype=np.float32)
    for t, v in table.items():
        values[t] = v
    return values[tissue]


# -------------------------------------------------------------------------------------------- head

@dataclass
class _Head:
    """One phantom patient's head: sizes and shape details drawn once, shared by CT and MR."""

    semi_x: float          # mm, half width at the widest level
    semi_y: float          # mm, half length (front to back)
    half_height: float     # mm: the head narrows as a sphere cap above and below its widest level
    centre: tuple[float, float]
    tilt: float            # radians, in-plane rotation
    gyri: tuple[float, float, float, float]  # phases and amplitude scale of the cortical folding
    ventricles: float      # size factor of the lateral ventricles (they grow with age)


def _draw_head(rng: np.random.Generator) -> _Head:
    scale = rng.uniform(0.9, 1.05)
    return _Head(semi_x=70.0 * scale * rng.uniform(0.95, 1.05), semi_y=88.0 * scale,
                 half_height=100.0 * scale, centre=tuple(rng.uniform(-5, 5, 2)), tilt=rng.uniform(-0.1, 0.1),
                 gyri=(rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi),
                       rng.uniform(0.8, 1.2)),
                 ventricles=rng.uniform(0.8, 1.3))


def _head_frame(head: _Head, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (mm) in the head's own rotated frame, for an axial slice of ``size`` pixels."""
    c = _pixel_centres(size, HEAD_FOV_MM)
    y, x = np.meshgrid(c, c, indexing="ij")
    x, y = x - head.centre[0], y - head.centre[1]
    cos, sin = np.cos(head.tilt), np.sin(head.tilt)
    return cos * x + sin * y, -sin * x + cos * y


def _head_slice(head: _Head, x: np.ndarray, y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue classes of the axial head section at height ``z`` mm, and the depth below the skin (mm).

    Layers from outside in (depth in mm): skin 0-1.5, scalp fat 1.5-5, skull 5-12 (outer table,
    diploe 7-10, inner table), CSF of the subarachnoid space 12-14, cortical grey matter from 14 to a
    folded grey/white boundary near 18, white matter; deep grey nuclei and lateral ventricles inside.
    """
    shrink = np.sqrt(max(0.0, 1.0 - (z / head.half_height) ** 2))
    ax, ay = head.semi_x * shrink, head.semi_y * shrink
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    depth = (1.0 - rho) * (ax + ay) / 2  # distance below the skin along the radius, close enough for these ellipses
    theta = np.arctan2(y, x)
    p1, p2, p3, amp = head.gyri
    tissue = np.full(x.shape, Tissue.AIR, dtype=np.uint8)
    tissue[depth >= 0] = Tissue.SOFT_TISSUE
    tissue[depth >= 1.5] = Tissue.FAT
    tissue[depth >= 5] = Tissue.BONE
    tissue[depth >= 12] = Tissue.CSF
    tissue[depth >= 14] = Tissue.GREY_MATTER
    # Sulci: thin CSF clefts reaching into the cortex.
    sulci = (np.abs(np.sin(21 * theta + p3)) < 0.12) & (depth >= 14) & (depth < 17)
    tissue[sulci] = Tissue.CSF
    # Gyri: the grey/white boundary undulates, so the cortex looks folded.
    white_from = 18 + amp * (2.5 * np.sin(13 * theta + p1) + 1.5 * np.sin(29 * theta + p2))
    tissue[depth >= white_from] = Tissue.WHITE_MATTER
    if abs(z) < 20:  # basal ganglia and thalami, low in the brain
        k = np.sqrt(1 - (z / 20) ** 2)
        for side in (-1, 1):
            tissue[_ellipse(x, y, side * 17, 5, 7 * k, 12 * k) & (depth > 25)] = Tissue.GREY_MATTER
    reach = 1 - ((z - 15) / 30) ** 2  # lateral ventricles span about 45 mm of height
    if reach > 0:
        v = head.ventricles * np.sqrt(reach)
        for side in (-1, 1):
            tissue[_ellipse(x, y, side * 7 * head.ventricles, -8, 4 * v, 20 * v) & (depth > 25)] = Tissue.CSF
    return tissue, depth


@dataclass
class _Lesion:
    """An ellipsoidal intracranial lesion spanning whole slices ``first`` to ``last``."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    angle: float
    first: int
    last: int


def _draw_head_lesion(rng: np.random.Generator, head: _Head, z: np.ndarray, across_mm: tuple[float, float]) -> _Lesion:
    """A lesion ``across_mm`` (range of in-plane diameters) deep in the brain, spanning as many whole
    slices as keep it about as tall as it is wide (at least one)."""
    a, b = rng.uniform(*across_mm, 2) / 2
    n = len(z)
    # Slices spanned: height (n_lesion + 1) x 5 mm (below) closest to the mean diameter a + b.
    n_lesion = int(np.clip(round((a + b) / SLICE_MM) - 1, 1, n))
    first = int(rng.integers(0, n - n_lesion + 1))
    last = first + n_lesion - 1
    zc = (z[first] + z[last]) / 2
    # Half-height so that the slices just outside the span miss the lesion while its end slices still
    # cut it at >= 80% of its largest radius: no label rests on a sliver of a few pixels.
    half_height = (n_lesion + 1) / 2 * SLICE_MM
    phi, frac = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.5)
    cx = frac * (head.semi_x - 25) * np.cos(phi)
    cy = frac * (head.semi_y - 25) * np.sin(phi)
    return _Lesion(centre=(cx, cy, zc), semi=(a, b, half_height), angle=rng.uniform(0, np.pi), first=first, last=last)


def _lesion_section(lesion: _Lesion, x: np.ndarray, y: np.ndarray, z: float, scale: float = 1.0) -> np.ndarray:
    cos, sin = np.cos(lesion.angle), np.sin(lesion.angle)
    dx, dy = x - lesion.centre[0], y - lesion.centre[1]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    a, b, c = (s * scale for s in lesion.semi)
    return (u / a) ** 2 + (v / b) ** 2 + ((z - lesion.centre[2]) / c) ** 2 < 1.0


def _head_z(rng: np.random.Generator, n_slices: int) -> np.ndarray:
    """Slice heights from the level of the basal ganglia upward (the levels of a head CT read)."""
    return (rng.uniform(-10, 20) + SLICE_MM * np.arange(n_slices)).astype(np.float32)


def head_ct(rng: np.random.Generator, size: int = 128, n_slices: int = 6, hemorrhage: bool = False) -> Phantom:
    """Axial head CT slices in Hounsfield units, 5 mm apart, field of view 220 mm.

    Air -1000, scalp skin +40 and fat -100, skull cortical tables +1500 around diploe +700, CSF +8
    (subarachnoid space, sulci, lateral ventricles), grey matter +38 (cortex, basal ganglia), white
    matter +28; one blur for partial volume, then correlated noise of 10 HU. With ``hemorrhage``, a
    small deep intraparenchymal haematoma (ellipsoid, 8-16 mm across, +50..+65 HU: see
    ``HEMORRHAGE_HU``) spanning 1-2 slices (as tall as it is wide), inside the brain; ``lesion`` is its
    mask, so a slice shows haemorrhage exactly where ``lesion`` is set.
    """
    head = _draw_head(rng)
    x, y = _head_frame(head, size)
    z = _head_z(rng, n_slices)
    lesion = _draw_head_lesion(rng, head, z, HEMORRHAGE_MM) if hemorrhage else None
    blood_hu = rng.uniform(*HEMORRHAGE_HU)
    hu = np.empty((n_slices, size, size), dtype=np.float32)
    tissue = np.empty((n_slices, size, size), dtype=np.uint8)
    mask = np.zeros((n_slices, size, size), dtype=bool)
    for k, zk in enumerate(z):
        tissue[k], depth = _head_slice(head, x, y, float(zk))
        hu[k] = _lookup(CT_HU, tissue[k])
        tables = (tissue[k] == Tissue.BONE) & ((depth < 7) | (depth >= 10))
        hu[k][tables] = CORTICAL_BONE_HU
        if lesion is not None:
            intracranial = np.isin(tissue[k], (Tissue.CSF, Tissue.GREY_MATTER, Tissue.WHITE_MATTER)) & (depth > 12)
            mask[k] = _lesion_section(lesion, x, y, float(zk)) & intracranial
            hu[k][mask[k]] = blood_hu
    hu = _blur(hu) + CT_NOISE_HEAD * _correlated_noise(rng, hu.shape)
    pixel = HEAD_FOV_MM / size
    return Phantom(np.maximum(hu, -1024.0), tissue, mask, (SLICE_MM, pixel, pixel), tuple(float(v) for v in z))


def mr_head(rng: np.random.Generator, size: int = 128, n_slices: int = 1,
            weightings: tuple[str, ...] = ("T1", "T2", "T1C"), enhancing_lesion: bool = False) -> dict[str, Phantom]:
    """Axial brain MR of one phantom patient, one :class:`Phantom` per weighting (same anatomy).

    Tissue signal per weighting from ``MR_SIGNAL`` (T1: fat 1.2 > WM 1.0 > GM 0.65 > CSF 0.25; T2:
    CSF 1.6 > GM 0.8 > WM 0.6), times a smooth multiplicative bias field (receive-coil sensitivity,
    about +-20%, the same for all weightings), plus Rician noise: the magnitude of the signal plus
    complex Gaussian noise (sigma 0.04). Values are in scanner units (x1000). With
    ``enhancing_lesion``, a tumour (16-30 mm) that enhances on T1C (1.5, solid or a rim around a
    necrotic core); ``lesion`` marks the enhancing tissue.
    """
    head = _draw_head(rng)
    x, y = _head_frame(head, size)
    z = _head_z(rng, n_slices)
    lesion = _draw_head_lesion(rng, head, z, TUMOUR_MM) if enhancing_lesion else None
    necrotic = rng.random() < 0.5
    tissue = np.empty((n_slices, size, size), dtype=np.uint8)
    whole = np.zeros_like(tissue, dtype=bool)
    core = np.zeros_like(whole)
    for k, zk in enumerate(z):
        tissue[k], depth = _head_slice(head, x, y, float(zk))
        if lesion is not None:
            whole[k] = _lesion_section(lesion, x, y, float(zk)) & (depth > 12)
            if necrotic:
                core[k] = _lesion_section(lesion, x, y, float(zk), scale=0.6) & whole[k]
    u = np.linspace(-1, 1, size, dtype=np.float32)
    v, u = np.meshgrid(u, u, indexing="ij")
    c = rng.normal(0, 0.1, 5)
    bias = np.exp(c[0] * u + c[1] * v + c[2] * (u**2 - 1 / 3) + c[3] * (v**2 - 1 / 3) + c[4] * u * v)
    pixel = HEAD_FOV_MM / size
    out = {}
    for w in weightings:
        signal = _lookup(MR_SIGNAL[w], tissue)
        signal[whole] = MR_LESION[w]
        signal[core] = MR_NECROSIS[w]
        signal = _blur(signal) * bias
        noisy = np.hypot(signal + MR_NOISE * rng.standard_normal(signal.shape, dtype=np.float32),
                         MR_NOISE * rng.standard_normal(signal.shape, dtype=np.float32))
        out[w] = Phantom((MR_SCALE * noisy).astype(np.float32), tissue, whole & ~core,
                         (SLICE_MM, pixel, pixel), tuple(float(v) for v in z))
    return out


# ------------------------------------------------------------------------------------------- chest

@dataclass
class _Chest:
    """One phantom patient's thorax: sizes drawn once, evaluated on any grid."""

    semi_x: float          # mm, body half width
    semi_y: float          # mm, body half depth
    lung: tuple[float, float, float]  # lung semi-axes
    heart: tuple[float, float, float]
    nodules: list[tuple[float, float, float, float, float]]  # x, y, z, radius, HU


def _draw_chest(rng: np.random.Generator, n_nodules: int, z_range: tuple[float, float] = (-80.0, 60.0)) -> _Chest:
    a, b = rng.uniform(150, 175), rng.uniform(100, 120)
    lung = (0.36 * a, 0.78 * b, rng.uniform(110, 130))
    heart = (0.38 * a, 0.5 * b, rng.uniform(60, 70))
    # Nodule centres: inside a lung, at most sqrt(0.3) of its semi-axes from its centre (so the whole
    # nodule is in lung), outside the heart, at heights within ``z_range`` (e.g. a CT's slab).
    low, high = max(z_range[0], -10 - 0.5 * lung[2]), min(z_range[1], -10 + 0.5 * lung[2])
    if low > high:
        raise ValueError(f"no lung between heights {z_range[0]:.0f} and {z_range[1]:.0f} mm to place a nodule in")
    nodules = []
    for _ in range(n_nodules):
        z = rng.uniform(low, high)
        budget = 0.3 - ((z + 10) / lung[2]) ** 2
        while True:
            side, (dx, dy) = rng.choice([-1, 1]), rng.uniform(-1, 1, 2) * np.sqrt(budget)
            x, y = side * 0.45 * a + dx * lung[0], 0.05 * b + dy * lung[1]
            if dx**2 + dy**2 < budget and not _ellipsoid(x, y, z, _heart_centre(a, b), tuple(1.2 * h for h in heart)):
                break
        nodules.append((x, y, z, rng.uniform(7, 13), rng.uniform(*NODULE_HU)))
    return _Chest(a, b, lung, heart, nodules)


def _heart_centre(semi_x: float, semi_y: float) -> tuple[float, float, float]:
    return 0.15 * semi_x, -0.2 * semi_y, -55.0


def _chest(c: _Chest, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, tissue and nodule mask of the thorax at broadcastable coordinates ``x``, ``y``, ``z`` (mm).

    Body: an elliptic cylinder narrowing to the neck above z = 150, skin and muscle +40 under a 12 mm
    layer of subcutaneous fat -100. Lungs -850 (ellipsoids, the right one higher over the liver),
    heart and great vessels +40 between them, vertebral bodies +700, ribs +900 sloping down toward the
    front and the sides, sternum and clavicles; nodules (spheres 14-26 mm across, +60..+150 HU) in the lungs.
    """
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    neck = np.exp(-np.maximum(z - 150.0, 0.0) ** 2 / (2 * 25.0**2))  # 1 below the shoulders
    ax, ay = 60 + (c.semi_x - 60) * neck, 60 + (c.semi_y - 60) * neck
    q = (x / ax) ** 2 + (y / ay) ** 2
    hu = np.full(shape, CT_HU[Tissue.AIR], dtype=np.float32)
    tissue = np.zeros(shape, dtype=np.uint8)

    def paint(mask, t: Tissue, value: float | None = None):
        mask = np.broadcast_to(mask, shape)
        hu[mask] = CT_HU[t] if value is None else value
        tissue[mask] = t

    paint(q < 1, Tissue.FAT)
    paint(((x / (ax - 12)) ** 2 + (y / (ay - 12)) ** 2) < 1, Tissue.SOFT_TISSUE)
    for side, dz in ((-1, 10.0), (1, -5.0)):
        paint(_ellipsoid(x, y, z, (side * 0.45 * c.semi_x, 0.05 * c.semi_y, -10 + dz), c.lung), Tissue.LUNG)
    paint(_ellipsoid(x, y, z, _heart_centre(c.semi_x, c.semi_y), c.heart), Tissue.SOFT_TISSUE)
    paint(_ellipsoid(x, y, z, (5.0, 0.0, 50.0), (25.0, 0.4 * c.semi_y, 90.0)), Tissue.SOFT_TISSUE)  # mediastinum
    paint(_ellipse(x, y, 0.0, c.semi_y - 45, 17.0, 15.0) & (z < 160), Tissue.BONE)  # vertebral bodies
    sternum = (np.abs(x) < 15) & (y > -c.semi_y + 12) & (y < -c.semi_y + 25) & (z > -110) & (z < 120)
    paint(sternum, Tissue.BONE, 500.0)
    # Ribs: 8 mm thick, 12 mm high, every 32 mm, inside the chest wall; each slopes down toward the
    # front and toward the side, as on a radiograph; open at the front, where costal cartilage (soft
    # tissue) joins the sternum.
    wall = np.sqrt((x / (c.semi_x - 14)) ** 2 + (y / (c.semi_y - 14)) ** 2)
    ring = np.abs(wall - 1) < 4 / ((c.semi_x + c.semi_y) / 2)
    t = z - 0.35 * y + 0.3 * np.abs(x)
    phase = np.mod(t - 140.0, 32.0)
    band = ((phase < 6) | (phase > 26)) & (t > -160) & (z < 140)
    paint(ring & band & ~((y < 0) & (np.abs(x) < 30)), Tissue.BONE, RIB_HU)
    clavicle = (y + 0.5 * c.semi_y) ** 2 + (z - 140 - 0.12 * np.abs(x)) ** 2 < 8.0**2
    paint(clavicle & (np.abs(x) > 20) & (np.abs(x) < 130), Tissue.BONE, RIB_HU)
    nodule = np.zeros(shape, dtype=bool)
    for nx, ny, nz, r, value in c.nodules:
        inside = np.broadcast_to(_ellipsoid(x, y, z, (nx, ny, nz), (r, r, r)), shape)
        paint(inside, Tissue.SOFT_TISSUE, value)
        nodule |= inside
    return hu, tissue, nodule


def chest_ct(rng: np.random.Generator, size: int = 128, n_slices: int = 16, n_nodules: int = 1) -> Phantom:
    """A chest CT volume in Hounsfield units: axial slices 5 mm apart, field of view 400 mm.

    Anatomy of ``_chest`` (fat -100, soft tissue +40, lung -850, bone +500..+900, nodules +60..+150),
    lungs textured with +-35 HU parenchyma and vessel cross-sections (about +40 HU); one blur for
    partial volume, then correlated noise of 18 HU.
    """
    z = (rng.uniform(-60, 0) + SLICE_MM * (np.arange(n_slices) - (n_slices - 1) / 2)).astype(np.float32)
    chest = _draw_chest(rng, n_nodules, (float(z.min()), float(z.max())))
    c = _pixel_centres(size, CHEST_FOV_MM)
    hu, tissue, nodule = _chest(chest, c[None, None, :], c[None, :, None], z[:, None, None])
    for k in range(n_slices):
        texture = _smooth_field(rng, (size, size), 0.08)
        lung = tissue[k] == Tissue.LUNG
        hu[k][lung] += 35 * texture[lung]
        vessels = lung & (_smooth_field(rng, (size, size), 0.12) > 2.2)
        hu[k][vessels] = CT_HU[Tissue.SOFT_TISSUE]
    hu = _blur(hu) + CT_NOISE_CHEST * _correlated_noise(rng, hu.shape)
    pixel = CHEST_FOV_MM / size
    return Phantom(np.maximum(hu, -1024.0), tissue, nodule, (SLICE_MM, pixel, pixel), tuple(float(v) for v in z))


def radiograph(rng: np.random.Generator, size: int = 128, nodule: bool = False) -> Phantom:
    """A posterior-anterior chest radiograph: line integrals through the 3D thorax of ``_chest``.

    Attenuation mu = 0.02/mm x (1 + HU/1000) summed along the beam (4 mm steps, parallel beam),
    Poisson quantum noise on 30000 photons per pixel, detector blur, then the log transform
    -ln(counts / 30000) stored as 500 detector units per unit of attenuation (12 bit): high values
    are dense (bone, mediastinum), low values air and lung. The image is ``size`` pixels over a 430 mm
    detector. With ``nodule``, one solid lung nodule of 14-26 mm; ``lesion`` marks the pixels whose
    ray crosses it. ``tissue`` is BONE where a ray crosses > 20 mm of bone (spine, tangential ribs),
    LUNG where it crosses > 100 mm of lung and no bone, AIR outside the body, else SOFT_TISSUE.
    """
    chest = _draw_chest(rng, int(nodule))
    cols = _pixel_centres(size, DETECTOR_MM)
    rows = np.float32(200.0 - DETECTOR_MM / 2) - _pixel_centres(size, DETECTOR_MM)  # top row at the neck, z decreasing
    depth = np.arange(-140.0, 140.0, 4.0, dtype=np.float32)
    hu, tissue, lesion = _chest(chest, cols[None, None, :], depth[None, :, None], rows[:, None, None])
    step = float(depth[1] - depth[0])
    attenuation = (np.maximum(MU_WATER * (1 + hu / 1000), 0) * step).sum(axis=1)
    counts = rng.poisson(_blur(PHOTONS * np.exp(-attenuation)))
    detector = DETECTOR_SCALE * np.log(PHOTONS / np.maximum(counts, 1))
    bone = (tissue == Tissue.BONE).sum(axis=1) * step  # mm of bone along each ray
    lung = (tissue == Tissue.LUNG).sum(axis=1) * step
    projected = np.full((size, size), Tissue.SOFT_TISSUE, dtype=np.uint8)
    projected[(tissue != Tissue.AIR).sum(axis=1) == 0] = Tissue.AIR
    projected[(lung > 100) & (bone == 0)] = Tissue.LUNG
    projected[bone > 20] = Tissue.BONE
    pixel = DETECTOR_MM / size
    return Phantom(np.clip(detector, 0, DETECTOR_MAX).astype(np.float32), projected, lesion.any(axis=1), (pixel, pixel))


# ------------------------------------------------------------------------------------- ultrasound

US_DEPTH_MM = 150.0
US_DYNAMIC_RANGE_DB = 40.0


def ultrasound(rng: np.random.Generator, size: int = 128, n_frames: int = 1) -> Phantom:
    """B-mode ultrasound of the abdominal wall and a liver-like organ in a 70-degree sector, 150 mm deep.

    Echogenicity map: bright skin line, hypoechoic fat (0.15), muscle (0.6) with bright fibres, organ
    parenchyma (1.0) with an anechoic cyst (0.001, with posterior acoustic enhancement below it) and an echogenic
    focus (4.0). Speckle: the magnitude of complex Gaussian noise smoothed over an anisotropic
    resolution cell (wider laterally), i.e. Rayleigh-distributed, multiplying the echo amplitude;
    residual depth attenuation after time-gain compensation; log compression over 40 dB to 8-bit
    grey, black outside the sector. Cine frames (``n_frames`` > 1) slide the probe 1 pixel per frame
    and let the speckle partly decorrelate. ``lesion`` marks the cyst.
    """
    shift = n_frames - 1
    width = size + shift  # a wider scene, scanned by a window sliding one column per frame
    row = np.arange(size, dtype=np.float32)[:, None]
    col = np.arange(width, dtype=np.float32)[None, :]
    depth = row / size  # 0 at the skin, 1 at 150 mm
    echo = np.where(depth < 0.02, 3.0, np.where(depth < 0.12, 0.15, np.where(depth < 0.25, 0.6, 1.0)))
    echo = echo * np.ones_like(col)
    echo[(depth >= 0.12) & (depth < 0.25) & (np.mod(row + 0.1 * col, 6) < 1)] = 1.6  # muscle fibre striations
    cy, cx, r = rng.uniform(0.45, 0.7) * size, rng.uniform(0.35, 0.65) * width, rng.uniform(0.07, 0.12) * size
    cyst = (row - cy) ** 2 + (col - cx) ** 2 < r**2
    echo[(np.abs(col - cx) < r) & (row > cy) & ~cyst] *= 1.5  # less attenuation through fluid
    echo[cyst] = 0.001
    fy, fx = rng.uniform(0.35, 0.85) * size, rng.uniform(0.2, 0.8) * width
    echo[(row - fy) ** 2 + (col - fx) ** 2 < (0.02 * size) ** 2] = 4.0
    gain = np.exp(-0.6 * depth)  # what time-gain compensation leaves of the depth attenuation

    def speckle() -> np.ndarray:
        field = _blur(rng.standard_normal((2, size, width), dtype=np.float32), passes=2)
        field = _blur(field, axes=(-1,))  # a third lateral pass: lateral resolution is coarser than axial
        return field[0] + 1j * field[1]

    apex_row, apex_col = -0.1 * size, (size - 1) / 2
    radius = np.hypot(row - apex_row, np.arange(size)[None, :] - apex_col)
    angle = np.arctan2(np.arange(size)[None, :] - apex_col, row - apex_row)
    sector = (np.abs(angle) < np.radians(35)) & (radius > 0.15 * size) & (radius < 1.08 * size)
    base = speckle()
    frames = np.empty((n_frames, size, size), dtype=np.float32)
    for f in range(n_frames):
        field = 0.8 * base + 0.6 * speckle()  # correlation 0.8 between frames, unit power
        window = slice(f, f + size)
        envelope = np.sqrt(echo[:, window] * gain) * np.abs(field[:, window])
        db = 20 * np.log10(envelope + 1e-6)
        top = np.percentile(db[sector], 99)
        grey = np.clip((db - (top - US_DYNAMIC_RANGE_DB)) / US_DYNAMIC_RANGE_DB, 0, 1) * 255
        frames[f] = np.where(sector, np.rint(grey), 0)
    tissue = np.broadcast_to(np.where(sector, Tissue.SOFT_TISSUE, Tissue.AIR).astype(np.uint8), frames.shape).copy()
    lesion = np.stack([cyst[:, f:f + size] & sector for f in range(n_frames)])
    mm = US_DEPTH_MM / size
    return Phantom(frames, tissue, lesion, (mm, mm))
