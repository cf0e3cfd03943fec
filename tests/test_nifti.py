"""NIfTI volumes: slice counts per plane, canonical display orientation whatever the storage order."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from helpers import manifest, shard_samples
from medssl.config import IngestConfig
from medssl.ingest import ingest
from medssl.io import Rejected, read_image
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
    values = decode_pixels(first.pixels, first.meta)
    assert values.min() == -1024 and values.max() == 1200  # HU survive the round trip exactly


def test_4d_volume_uses_first_timepoint(tmp_path):
    data = np.random.default_rng(1).normal(size=(8, 8, 3, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "fmri.nii")
    src = read_image(tmp_path / "fmri.nii", nifti_modality="MR")
    assert len(list(src.frames)) == 3 and "first volume" in src.info["note"]


def test_2d_image_is_read_as_one_slice(tmp_path):
    data = np.random.default_rng(2).random((16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.8, 1.0, 1.0])), tmp_path / "s.nii")
    src = read_image(tmp_path / "s.nii", nifti_modality="MR")
    (frame,) = list(src.frames)
    assert frame.pixels.shape == (12, 16) and src.spacing_mm == (0.8, 0.5)


def test_4d_volume_is_sliced_without_loading_the_first_volume_whole(tmp_path, monkeypatch):
    data = np.random.default_rng(1).normal(size=(8, 6, 3, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "fmri.nii")
    src = read_image(tmp_path / "fmri.nii", nifti_modality="MR")
    reads = []
    real = nib.arrayproxy.ArrayProxy.__getitem__
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__getitem__", lambda self, s: reads.append(s) or real(self, s))
    frames = list(src.frames)
    assert len(reads) == 3 and all(s[2] != slice(None) and s[3] == 0 for s in reads)  # a slice of volume 0 each
    np.testing.assert_array_equal(frames[1].pixels, data[::-1, ::-1, 1, 0].T)


def _set_sform(path, value: float) -> None:
    """Overwrite the sform of a saved NIfTI-1 file (nibabel would not write a degenerate one)."""
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = np.full(12, value, "<f4").tobytes()  # srow_x, srow_y, srow_z
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("value, words", [(0.0, "singular"), (np.nan, "NaN")])
def test_degenerate_affine_is_bad_header(tmp_path, value, words):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v.nii")
    _set_sform(tmp_path / "v.nii", value)
    with pytest.raises(Rejected) as err:
        read_image(tmp_path / "v.nii")
    assert err.value.code == "bad_header" and words in err.value.detail


def test_truncated_or_corrupt_voxel_data_is_rejected_before_or_while_slicing(tmp_path):
    vol = np.random.default_rng(3).normal(size=(32, 32, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii")
    data = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(Rejected) as err:
        read_image(tmp_path / "cut.nii")  # from the header and the file size, before any slice
    assert err.value.code == "truncated"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    gz = (tmp_path / "v.nii.gz").read_bytes()
    middle = len(gz) // 2
    # a cut and a corrupt deflate stream (the corrupt one was an internal_error)
    for data, code, cause in [(gz[:middle], "truncated", "EOFError"),
                              (gz[:middle] + b"\xff" * 64 + gz[middle + 64:], "decode_failed", "zlib.error")]:
        (tmp_path / "bad.nii.gz").write_bytes(data)
        src = read_image(tmp_path / "bad.nii.gz", nifti_modality="MR")
        with pytest.raises(Rejected) as err:
            list(src.frames)
        assert err.value.code == code and "axial slice" in err.value.detail and cause in err.value.detail


def test_unsupported_voxel_type_is_named(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.complex64), np.eye(4)), tmp_path / "c.nii")
    with pytest.raises(Rejected) as err:
        read_image(tmp_path / "c.nii")
    assert err.value.code == "unsupported_encoding" and "complex64" in err.value.detail


def test_pair_whose_voxel_file_is_a_fifo_is_rejected_without_opening_it(tmp_path):
    import os

    nib.save(nib.Nifti1Pair(np.ones((8, 8, 4), np.float32), np.eye(4)), tmp_path / "p.img")
    (tmp_path / "p.img").unlink()
    os.mkfifo(tmp_path / "p.img")  # opening it for reading would block forever
    with pytest.raises(Rejected) as err:
        read_image(tmp_path / "p.hdr")
    assert err.value.code == "unreadable_nifti" and "not a regular file" in err.value.detail


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_without_its_extension_is_read_by_content(tmp_path, name):
    """Detected as NIfTI by content, then rejected (unreadable_nifti ... ImageFileError): nibabel chose its
    reader by the file name."""
    _write(tmp_path / name, "RAS")
    bare = tmp_path / "in" / "1.2.840.99.7"  # as PACS exports and uploads name files
    bare.parent.mkdir()
    (tmp_path / name).rename(bare)
    src = read_image(bare, nifti_modality="MR")
    assert src.format == "nifti" and len(list(src.frames)) == NZ
    ingest(IngestConfig(inputs=[bare.parent], out=tmp_path / "out", workers=1), show_progress=False)
    rows = manifest(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ingested"], rows
    assert len(shard_samples(tmp_path / "out")) == NZ
