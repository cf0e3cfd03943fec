"""Formats are detected from content, not names."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from helpers import write_ct_dicom
from medssl.io import detect_format, read_image


def test_detection_ignores_names(tmp_path, pydicom_test_files):
    write_ct_dicom(tmp_path / "IM000123", np.zeros((8, 8)))  # no extension, as in PACS exports
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "x.png").rename(tmp_path / "image.dat")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.jpg")
    (tmp_path / "x.jpg").rename(tmp_path / "photo.dcm")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    (tmp_path / "v.nii.gz").rename(tmp_path / "volume")
    (tmp_path / "notes.dcm").write_text("hello")
    assert detect_format(tmp_path / "IM000123") == "dicom"
    assert detect_format(tmp_path / "image.dat") == "png"
    assert detect_format(tmp_path / "photo.dcm") == "jpeg"
    assert detect_format(tmp_path / "volume") == "nifti"
    assert detect_format(tmp_path / "notes.dcm") is None
    # a data set written without the 128-byte preamble and DICM marker
    assert detect_format(pydicom_test_files / "ExplVR_BigEndNoMeta.dcm") == "dicom"


def test_dicom_without_preamble_is_read(tmp_path):
    write_ct_dicom(tmp_path / "a.dcm", np.arange(64, dtype=float).reshape(8, 8))
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    del ds.file_meta
    ds.preamble = None
    ds.save_as(tmp_path / "bare", enforce_file_format=False, implicit_vr=True, little_endian=True)
    raw = (tmp_path / "bare").read_bytes()
    assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"  # starts straight with group 0008
    src = read_image(tmp_path / "bare")
    assert src.format == "dicom" and src.modality == "CT"
    assert next(src.frames).pixels.max() == 63  # rescale intercept applied: back in HU


def test_16bit_png_and_multipage_tiff(tmp_path):
    import tifffile

    img16 = (np.arange(64 * 64, dtype=np.uint16) * 13).reshape(64, 64)
    Image.fromarray(img16).save(tmp_path / "a.png")
    src = read_image(tmp_path / "a.png")
    assert src.bits_stored == 16
    np.testing.assert_array_equal(next(src.frames).pixels, img16.astype(np.float32))
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([img16, img16 // 2, img16 // 3]), photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([img16] * 3), photometric="rgb", planarconfig="separate")
    rgb = read_image(tmp_path / "rgb.tif")
    assert rgb.photometric == "RGB" and next(rgb.frames).pixels.shape == (64, 64, 3)
    src = read_image(tmp_path / "stack.tif")
    assert src.format == "tiff" and len(list(src.frames)) == 3


def test_corrupt_gzip_is_not_an_image_not_an_error(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    data = bytearray((tmp_path / "v.nii.gz").read_bytes())
    data[12:40] = b"\xff" * 28  # the deflate stream's first block: zlib.error (escaped the reader before)
    (tmp_path / "v.nii.gz").write_bytes(bytes(data))
    assert detect_format(tmp_path / "v.nii.gz") is None
