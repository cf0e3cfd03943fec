"""NIfTI reader (nibabel): volumes sliced lazily into 2D images in a canonical orientation.

Slices are cut along the RAS+ axes whatever the file's storage order (``io_orientation`` of the
affine), and each 2D slice is laid out like a radiological display: patient right on the image's
left; anterior (axial) or superior (coronal, sagittal) at the top. Only one slice is in memory at a
time, so long volumes stay cheap.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl.io.source import Frame, Limits, Rejected, SourceImage

_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # canonical RAS axis each plane is cut along


def _canonical_slice(dataobj, ornt: np.ndarray, shape: tuple[int, int, int], axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along canonical axis ``axis``, returned as a display-oriented 2D float array."""
    src_axis = {int(ornt[a, 0]): a for a in range(3)}  # canonical axis -> storage axis
    flip = {int(ornt[a, 0]): ornt[a, 1] < 0 for a in range(3)}
    a = src_axis[axis]
    stored_index = shape[a] - 1 - index if flip[axis] else index
    slicer = [slice(None)] * 3
    slicer[a] = stored_index
    plane = np.asarray(dataobj[tuple(slicer)], dtype=np.float32)
    in_plane = [c for c in range(3) if c != axis]  # canonical axes (p, q), p < q
    stored_order = sorted(in_plane, key=lambda c: src_axis[c])  # canonical axis of each remaining dim
    if stored_order != in_plane:
        plane = plane.T
    for dim, c in enumerate(in_plane):
        if flip[c]:
            plane = np.flip(plane, axis=dim)
    # plane[p, q] increases toward +p, +q. Display: rows run toward -q, columns toward -p.
    return np.ascontiguousarray(plane[::-1, ::-1].T)


def _guess_modality(dataobj, ornt, shape) -> str:
    """CT volumes hold Hounsfield units (air near -1000); MR intensities are non-negative."""
    middle = _canonical_slice(dataobj, ornt, shape, 2, shape[_axis_of(ornt, 2)] // 2)
    finite = middle[np.isfinite(middle)]
    return "CT" if finite.size and finite.min() <= -500 and finite.max() >= 100 else "MR"


def _axis_of(ornt: np.ndarray, canonical_axis: int) -> int:
    return next(a for a in range(3) if int(ornt[a, 0]) == canonical_axis)


def read_nifti(path: Path, limits: Limits, planes: list[str], stride: int, modality: str) -> SourceImage:
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        zooms = tuple(round(float(z), 6) for z in img.header.get_zooms())  # float32 header -> clean decimals
    except Exception as e:  # nibabel raises many types for malformed headers
        raise Rejected("unreadable_nifti", f"nibabel cannot read the file: {type(e).__name__}") from None
    if len(shape) < 2 or min(shape) <= 0:
        raise Rejected("bad_header", f"volume shape {shape} is empty")
    info: dict = {"volume_shape": list(shape)}
    dataobj = img.dataobj
    if len(shape) == 2:
        shape = shape + (1,)
        dataobj = np.asarray(dataobj)[..., None]
    elif len(shape) > 3:
        info["note"] = f"{len(shape)}D volume: first volume of {int(np.prod(shape[3:]))} ingested"
        dataobj = dataobj[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
        shape = shape[:3]
    if max(shape) > limits.max_frame_side:
        raise Rejected("too_large", f"volume {shape} exceeds max_frame_side={limits.max_frame_side}")
    if int(np.prod(shape)) > limits.max_pixels:
        raise Rejected("too_large", f"volume {shape} exceeds max_pixels={limits.max_pixels}")
    ornt = nib.orientations.io_orientation(img.affine)
    info["orientation"] = "".join(nib.orientations.aff2axcodes(img.affine))
    try:
        if modality == "auto":
            modality = _guess_modality(dataobj, ornt, shape)
            info["modality_guessed"] = True
    except Exception as e:
        raise Rejected("truncated", f"voxel data cannot be read: {type(e).__name__}") from None

    canonical_zooms = [zooms[_axis_of(ornt, c)] for c in range(3)]
    jobs = []
    for plane in planes:
        axis = _PLANE_AXIS[plane]
        n = shape[_axis_of(ornt, axis)]
        jobs += [(plane, axis, i) for i in range(0, n, stride)]
    first_plane = _PLANE_AXIS[planes[0]]
    p, q = [c for c in range(3) if c != first_plane]

    def frames() -> Iterator[Frame]:
        for plane, axis, index in jobs:
            try:
                pixels = _canonical_slice(dataobj, ornt, shape, axis, index)
            except Exception as e:
                raise Rejected("truncated", f"voxel data cannot be read: {type(e).__name__}") from None
            yield Frame(index=index, pixels=pixels, plane=plane)

    return SourceImage(
        format="nifti",
        modality=modality,
        photometric="MONOCHROME2",
        n_frames=len(jobs),
        frame_shape=(shape[_axis_of(ornt, q)], shape[_axis_of(ornt, p)]),
        spacing_mm=(canonical_zooms[q], canonical_zooms[p]),
        bits_stored=None,
        frames=frames(),
        info=info,
    )
