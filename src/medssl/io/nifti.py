"""NIfTI reader (nibabel): volumes sliced lazily into 2D images in a canonical orientation.

Slices are cut along the RAS+ axes whatever the file's storage order (``io_orientation`` of the
affine), and each 2D slice is laid out like a radiological display: patient right on the image's
left; anterior (axial) or superior (coronal, sagittal) at the top. Only one slice is in memory at a
time (the first volume of a 4D file is sliced lazily too), so long volumes stay cheap. A .nii.gz is
read as one stream kept open: slices in storage order (axial, usually) continue it, while slices across
it (sagittal, coronal, or a reversed slice axis) decompress it again up to each slice: time, not memory.

Stages and their codes: the header (``unreadable_nifti``, then ``bad_header``, ``unsupported_encoding``,
``too_large``, ``truncated`` from the declared sizes alone), then each slice (``truncated``,
``decode_failed``).
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from medssl.io.guard import check_deflate_ratio, check_memory, decoding, stage
from medssl.io.source import FRAME_BYTES_PER_VALUE, Frame, Limits, Rejected, SourceImage

_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # canonical RAS axis each plane is cut along


class _FirstVolume:
    """The first 3D volume of a 4D+ array proxy, indexed lazily: a slice reads only that slice."""

    def __init__(self, proxy, extra_dims: int):
        self.proxy, self.extra_dims = proxy, extra_dims

    def __getitem__(self, slicer: tuple) -> np.ndarray:
        return self.proxy[tuple(slicer) + (0,) * self.extra_dims]


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


def _orientation(affine: np.ndarray) -> np.ndarray:
    """io_orientation of the affine; ``bad_header`` when it has no orientation (zero, NaN, singular)."""
    if not np.isfinite(affine).all():
        raise Rejected("bad_header", "the affine (voxel to world transform) holds NaN or infinite values")
    with stage("bad_header", "reading the orientation of the affine"):
        ornt = nib.orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise Rejected("bad_header", "the affine (voxel to world transform) is singular: "
                                     "the voxel axes have no orientation")
    return ornt


def _spacing(zooms: tuple[float, ...]) -> list[float | None]:
    """Voxel sizes of the three spatial axes (1 for a 2D image's missing one); None where not a positive number."""
    sizes = [float(z) for z in zooms[:3]] + [1.0] * (3 - len(zooms[:3]))
    return [round(z, 6) if math.isfinite(z) and z > 0 else None for z in sizes]  # float32 header -> clean decimals


def _slice_span(shape: tuple[int, int, int], storage_axis: int) -> int:
    """Voxels between the first and last voxel of one slice along ``storage_axis`` (column-major storage):
    what reading one slice may pull into memory at once."""
    x, y, z = shape
    return (x * y, (z - 1) * x * y + x, (z - 1) * x * y + (y - 1) * x + 1)[storage_axis]


def _voxel_file(img) -> tuple[int, bool]:
    """Size of the file holding the voxels (the .nii itself, or the .img of a .hdr/.img pair), and whether it
    is gzipped. It must be a regular file: the scan vetted only the path it listed, and a FIFO or a device
    here would block the reader or never end."""
    voxels = Path(img.file_map["image"].filename)
    status = voxels.stat()
    if not stat.S_ISREG(status.st_mode):
        raise Rejected("unreadable_nifti", "the file holding the voxels is not a regular file "
                                           "(a FIFO, device or socket)")
    with open(voxels, "rb") as f:
        return status.st_size, f.read(2) == b"\x1f\x8b"


def _check_sizes(img, voxel_file: tuple[int, bool], full_shape: tuple[int, ...], shape3: tuple[int, int, int],
                 ornt: np.ndarray, axes: set[int], limits: Limits) -> None:
    """Limits, truncation and memory, from the header alone."""
    if max(shape3) > limits.max_frame_side:
        raise Rejected("too_large", f"volume {shape3} exceeds max_frame_side={limits.max_frame_side}")
    if math.prod(shape3) > limits.max_pixels:
        raise Rejected("too_large", f"volume {shape3} exceeds max_pixels={limits.max_pixels}")
    itemsize = img.get_data_dtype().itemsize
    declared = int(img.header.get_data_offset()) + math.prod(full_shape) * itemsize
    file_size, gzipped = voxel_file
    if gzipped:
        check_deflate_ratio(declared, file_size, "the gzipped NIfTI voxel data")
    elif declared > file_size:
        raise Rejected("truncated", f"the voxel file holds {file_size:,} bytes, the header declares {declared:,}")
    # Reading a slice may hold the span of the volume it crosses (nibabel reads across small gaps; a
    # .nii.gz is decompressed up to the slice as a stream, not held), plus the slice's float copies.
    span = max(_slice_span(shape3, _axis_of(ornt, c)) for c in axes)
    slice_values = max(math.prod(shape3) // shape3[_axis_of(ornt, c)] for c in axes)
    check_memory(span * itemsize + slice_values * FRAME_BYTES_PER_VALUE, limits, "a slice of the NIfTI volume")


_alias_folder: list[str] = []  # this process's folder of ``_named_link`` links (made on first use)


def _named_link(path: Path) -> Path:
    """A link to ``path`` named as nibabel expects (``.nii`` or ``.nii.gz``, by the gzip magic).

    nibabel chooses its reader and decompression by the file name, while medssl detects NIfTI by content:
    files of PACS exports, hashed names and uploads often have no extension. A link keeps the file lazily
    read, as under its own name. One link per process, replaced for each file: a process reads one file at
    a time (the decode worker)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not _alias_folder:
        _alias_folder.append(tempfile.mkdtemp(prefix="medssl-nifti-"))
    link = Path(_alias_folder[0], "image.nii.gz" if gzipped else "image.nii")
    tmp = link.with_name("link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.abspath(path), tmp)
    os.replace(tmp, link)
    return link


def _load(path: Path):
    # keep_file_open: a .nii.gz stays open between slices, so slices read in storage order continue the
    # stream instead of decompressing it again from the start for each slice (quadratic in the slices).
    try:
        return nib.load(path, keep_file_open=True)
    except ImageFileError as e:
        if "Cannot work out file type" not in str(e):
            raise
        return nib.load(_named_link(path), keep_file_open=True)


def read_nifti(path: Path, limits: Limits, planes: list[str], stride: int, modality: str) -> SourceImage:
    with stage("unreadable_nifti", "reading the NIfTI header"):
        img = _load(path)
        full_shape = tuple(int(s) for s in img.shape)
        zooms = tuple(img.header.get_zooms())
        affine = np.asarray(img.affine, dtype=np.float64)
        dtype = img.get_data_dtype()
    if len(full_shape) < 2 or min(full_shape) <= 0:
        raise Rejected("bad_header", f"volume shape {full_shape} is empty")
    if dtype.fields is not None or dtype.kind not in "biuf":
        with stage("unsupported_encoding", "naming the NIfTI voxel type"):
            label = img.header.get_value_label("datatype")
        raise Rejected("unsupported_encoding", f"voxel type {label} is not supported (grey-level voxels only)")
    ornt = _orientation(affine)
    shape3 = (full_shape + (1,))[:3]
    axes = {_PLANE_AXIS[p] for p in planes} | ({2} if modality == "auto" else set())
    with stage("unreadable_nifti", "opening the voxel file"):
        voxel_file = _voxel_file(img)
    with stage("bad_header", "checking the declared sizes"):
        _check_sizes(img, voxel_file, full_shape, shape3, ornt, axes, limits)
    info: dict = {"volume_shape": list(full_shape), "orientation": "".join(nib.orientations.ornt2axcodes(ornt))}
    dataobj = img.dataobj
    if len(full_shape) == 2:
        with decoding("reading the 2D image"):
            dataobj = np.asarray(dataobj)[..., None]
    elif len(full_shape) > 3:
        info["note"] = f"{len(full_shape)}D volume: first volume of {math.prod(full_shape[3:])} ingested"
        dataobj = _FirstVolume(dataobj, len(full_shape) - 3)
    if modality == "auto":
        with decoding("reading the middle axial slice"):
            modality = _guess_modality(dataobj, ornt, shape3)
        info["modality_guessed"] = True

    spacing = _spacing(zooms)
    canonical_spacing = [spacing[_axis_of(ornt, c)] for c in range(3)]
    jobs = []
    for plane in planes:
        axis = _PLANE_AXIS[plane]
        n = shape3[_axis_of(ornt, axis)]
        jobs += [(plane, axis, i) for i in range(0, n, stride)]
    first_plane = _PLANE_AXIS[planes[0]]
    p, q = [c for c in range(3) if c != first_plane]

    def frames() -> Iterator[Frame]:
        for plane, axis, index in jobs:
            with decoding(f"reading {plane} slice {index}"):
                pixels = _canonical_slice(dataobj, ornt, shape3, axis, index)
            yield Frame(index=index, pixels=pixels, plane=plane)

    row_mm, col_mm = canonical_spacing[q], canonical_spacing[p]
    return SourceImage(
        format="nifti",
        modality=modality,
        photometric="MONOCHROME2",
        n_frames=len(jobs),
        frame_shape=(shape3[_axis_of(ornt, q)], shape3[_axis_of(ornt, p)]),
        spacing_mm=(row_mm, col_mm) if row_mm is not None and col_mm is not None else None,
        bits_stored=None,
        frames=frames(),
        info=info,
    )
