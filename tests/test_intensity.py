"""Modality-aware intensity mapping on real files: CT in HU, MONOCHROME1, VOI, ultrasound colour."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from helpers import write_ct_dicom
from medssl.intensity import map_frame
from medssl.io import read_image


def _first(path):
    src = read_image(path)
    frame = next(src.frames)
    return src, frame, map_frame(src, frame, (0.5, 99.5))


def test_ct_stays_in_hounsfield_units(pydicom_test_files):
    path = pydicom_test_files / "CT_small.dcm"
    _, _, (values, intensity) = _first(path)
    ds = pydicom.dcmread(path)
    expected = np.maximum(apply_modality_lut(ds.pixel_array, ds), -1024)
    assert intensity.semantics == "hounsfield" and intensity.unit == "HU"
    np.testing.assert_allclose(values, expected, atol=1e-3)


def test_ct_full_range_kept_beyond_any_window(tmp_path):
    hu = np.full((32, 32), 40.0)
    hu[:8] = -1000  # air
    hu[-4:] = 2500  # dense bone / metal: must not be clipped to a window
    hu[0, 0] = -3024  # padding outside the field of view
    write_ct_dicom(tmp_path / "ct.dcm", hu, WindowCenter=40, WindowWidth=80)
    _, _, (values, _) = _first(tmp_path / "ct.dcm")
    assert values.max() == 2500 and values[5, 5] == -1000 and values[0, 0] == -1024


def test_monochrome1_is_inverted(pydicom_data_dir):
    path = pydicom_data_dir / "RG1_UNCR.dcm"  # CR, MONOCHROME1, with a VOI window
    src, frame, (values, intensity) = _first(path)
    assert src.photometric == "MONOCHROME1"
    assert any("MONOCHROME1 inverted" in s for s in intensity.steps)
    raw = frame.pixels
    # MONOCHROME1: high stored values are dark, so the brightest output lies where raw values are low
    assert values[raw <= np.percentile(raw, 5)].mean() > values[raw >= np.percentile(raw, 95)].mean()
    assert 0.0 <= values.min() and values.max() <= 1.0


def test_voi_lut_is_applied(pydicom_data_dir):
    _, _, (values, intensity) = _first(pydicom_data_dir / "vlut_04.dcm")
    assert any(s.startswith("VOI LUT") for s in intensity.steps)
    assert 0.0 <= values.min() and values.max() <= 1.0


def test_ultrasound_colour_to_grey(pydicom_data_dir):
    path = pydicom_data_dir / "US1_UNCR.dcm"
    src, frame, (values, intensity) = _first(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rgb = pydicom.dcmread(path).pixel_array.astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert src.modality == "US" and "colour to grey (BT.601 luma)" in intensity.steps
    np.testing.assert_allclose(values, luma / 255.0, atol=1e-4)


def test_palette_colour_ultrasound(pydicom_data_dir):
    src, _, (values, _) = _first(pydicom_data_dir / "OBXXXX1A.dcm")
    assert src.photometric == "RGB" and values.ndim == 2 and np.ptp(values) > 0


def test_mr_percentile_scaling(pydicom_test_files):
    _, frame, (values, intensity) = _first(pydicom_test_files / "MR_small.dcm")
    assert intensity.semantics == "normalized"
    assert values.min() == 0.0 and values.max() == 1.0
    # robust range: at least 0.5 % of pixels saturate at each end
    assert (values == 1.0).mean() >= 0.004


def test_constant_frame_is_empty(tmp_path):
    write_ct_dicom(tmp_path / "flat.dcm", np.full((16, 16), 30.0))
    src = read_image(tmp_path / "flat.dcm")
    assert map_frame(src, next(src.frames), (0.5, 99.5)) is None


def test_float_values_near_the_float32_limits_are_scaled_not_zeroed(tmp_path):
    import tifffile

    values = np.linspace(-3e38, 3e38, 256, dtype=np.float32).reshape(16, 16)  # differences overflow float32
    tifffile.imwrite(tmp_path / "f.tif", values)
    _, _, (out, _) = _first(tmp_path / "f.tif")
    assert np.isfinite(out).all() and out.min() == 0 and out.max() == 1  # (old float32 maths: all 0 or NaN)
    assert np.all(np.diff(out.ravel()) >= 0) and np.unique(out).size > 200
