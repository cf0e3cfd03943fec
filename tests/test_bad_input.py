"""Bad input never stops a run: each broken file is rejected with a specific reason; exit codes."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from helpers import manifest, write_ct_dicom


def _reasons(out):
    return {r["path"].split("/", 1)[1]: (r["status"], (r["reason"] or "").split(":")[0]) for r in manifest(out)}


def _run(*args):
    return subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", *map(str, args), "--workers", "1", "--quiet"],
                          capture_output=True, text=True)


def test_each_kind_of_bad_file_gets_its_reason(tmp_path):
    src = tmp_path / "archive"
    src.mkdir()
    rng = np.random.default_rng(0)
    write_ct_dicom(src / "good.dcm", rng.normal(40, 20, (32, 32)))
    (src / "zero.dcm").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    (src / "random.dcm").write_bytes(rng.bytes(5000))
    good_png = src / "truncated.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(good_png)
    good_png.write_bytes(good_png.read_bytes()[:300])
    write_ct_dicom(src / "flat.dcm", np.zeros((32, 32)))
    write_ct_dicom(src / "bomb.dcm", rng.normal(40, 20, (32, 32)))
    ds = pydicom.dcmread(src / "bomb.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000  # header claims 3.6e12 pixels
    ds.save_as(src / "bomb.dcm")
    nan = np.full((8, 8, 2), np.nan, dtype=np.float32)
    nan[:4] = 1.0
    nib.save(nib.Nifti1Image(nan, np.eye(4)), src / "nan.nii")
    out = tmp_path / "out"
    proc = _run(src, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert _reasons(out) == {
        "good.dcm": ("ingested", ""),
        "zero.dcm": ("rejected", "empty_file"),
        "notes.txt": ("rejected", "not_an_image"),
        "random.dcm": ("rejected", "not_an_image"),
        "truncated.png": ("rejected", "truncated"),
        "flat.dcm": ("rejected", "empty"),
        "bomb.dcm": ("rejected", "too_large"),
        "nan.nii": ("rejected", "non_finite"),
    }
    report = (out / "report.md").read_text()
    assert "bomb.dcm" in report and "too_large" in report

    strict = _run(src, "--out", tmp_path / "strict", "--strict")
    assert strict.returncode == 1 and "rejected (--strict)" in strict.stderr


def test_nothing_ingested_is_an_error(tmp_path):
    src = tmp_path / "archive"
    src.mkdir()
    (src / "a.txt").write_text("x")
    proc = _run(src, "--out", tmp_path / "out")
    assert proc.returncode == 1 and "nothing could be ingested" in proc.stderr


def test_configured_pixel_limit_rejects_large_raster(tmp_path):
    src = tmp_path / "archive"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)).save(src / "big.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 50), dtype=np.uint8)).save(src / "small.png")
    proc = _run(src, "--out", tmp_path / "out", "--set", "max_pixels=10000")
    assert proc.returncode == 0, proc.stderr
    assert _reasons(tmp_path / "out") == {"big.png": ("rejected", "too_large"), "small.png": ("ingested", "")}


def test_missing_input_is_a_clear_error(tmp_path):
    proc = _run(tmp_path / "nope", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "nope does not exist" in proc.stderr
