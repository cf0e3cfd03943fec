"""NIfTI volumes: slice counts per plane, canonical display orientation whatever the storage order."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from helpers import manifest, shard_samples
from medssl.config import IngestConfig
from medssl.ingest import ingest
from medssl.io import read_image
from medssl.shard_format import decode_pixels

NX, NY, NZ = 40, 30, 12


def _volume_ras() -> np.ndarray:
    """A volume in RAS+ index order with a bright marker at the Right-Anterior-Superior corner region."""
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 10, size=(NX, NY, NZ)).astype(np.float32)
    vol[-6:-2, -6:-2, :] = 1000  # right (high x), anterior (high y), every axial slice
    return vol


def _write(path, storage: str) -> None:
    vol = _volume_ras()
    if storage == "RAS":
        data, affine = vol, np.diag([1.0, 1.0, 2.0, 1.0])
    else:  # LPS storage, as DICOM-converted volumes often are: x and y indices run the other way
        data = vol[::-1, ::-1, :].copy()
        affine = np.diag([-1.0, -1.0, 2.0, 1.0])
        affine[:3, 3] = [NX - 1, NY - 1, 0]
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.mark.parametrize("storage", ["RAS", "LPS"])
def test_axial_slices_in_display_orientation(tmp_path, storage):
    path = tmp_path / "vol.nii.gz"
    _write(path, storage)
    src = read_image(path, nifti_modality="MR")
    frames = list(src.frames)
    assert len(frames) == NZ
    img = frames[0].pixels
    assert img.shape == (NY, NX)  # rows run anterior -> posterior, columns patient right -> left
    marker = np.argwhere(img > 500)
    # Patient right is on the image's left, anterior at the top: the marker sits top-left.
    assert marker[:, 0].max() < 6 and marker[:, 1].max() < 6
    assert src.spacing_mm == (1.0, 1.0)


def test_planes_and_stride(tmp_path):
    path = tmp_path / "vol.nii"
    _write(path, "LPS")
    src = read_image(path, planes=["axial", "coronal", "sagittal"], stride=2, nifti_modality="MR")
    planes = [f.plane for f in src.frames]
    assert planes.count("axial") == len(range(0, NZ, 2))
    assert planes.count("coronal") == len(range(0, NY, 2))
    assert planes.count("sagittal") == len(range(0, NX, 2))


def test_ingest_skips_empty_slices_and_guesses_ct(tmp_path):
    vol = np.full((NX, NY, NZ), -1024.0, dtype=np.float32)
    vol[5:30, 5:25, 3:9] = 40.0  # soft tissue in 6 of 12 slices; the rest is all air (constant)
    vol[10:12, 10:12, 3:9] = 1200.0
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 3.0, 1.0])), tmp_path / "in" / "ct.nii.gz")
    ingest(IngestConfig(inputs=[tmp_path / "in"], out=tmp_path / "out", workers=1), show_progress=False)
    (row,) = manifest(tmp_path / "out")
    assert row["status"] == "ingested" and row["modality"] == "CT"
    assert len(row["samples"]) == 6 and row["empty_frames"] == 6
    samples = shard_samples(tmp_path / "out")
    meta = samples[row["samples"][0]][1]
    assert meta["intensity"]["semantics"] == "hounsfield" and meta["spacing_mm"] == [0.7, 0.7]
    from medssl.shard_format import read_shard

    first = next(read_shard(next((tmp_path / "out" / "shards").glob("*.tar"))))
    values = decode_pixels(first.png, first.meta)
    assert values.min() == -1024 and values.max() == 1200  # HU survive the round trip exactly


def test_4d_volume_uses_first_timepoint(tmp_path):
    data = np.random.default_rng(1).normal(size=(8, 8, 3, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "fmri.nii")
    src = read_image(tmp_path / "fmri.nii", nifti_modality="MR")
    assert len(list(src.frames)) == 3 and "first volume" in src.info["note"]
