"""Acceptance: the real DICOM corpora of pydicom and pydicom-data, every file accounted for."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from helpers import manifest, shard_samples
from medssl.config import IngestConfig
from medssl.ingest import ingest

# Rejection codes a reader may give; "internal_error" is a bug and must never appear on real files.
SPECIFIC_CODES = {"unreadable_dicom", "no_pixel_data", "bad_header", "too_large", "unknown_transfer_syntax",
                  "unsupported_encoding", "truncated", "decode_failed", "not_an_image", "empty_file", "empty",
                  "non_finite", "unreadable_file", "unreadable_image", "unreadable_nifti", "decoder_crash", "timeout"}


def _plain_pydicom_decodes(path: Path) -> bool:
    """The oracle: pydicom (with its installed decoder plugins) decodes the file to a non-constant image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pydicom.dcmread(path, force=True).pixel_array
    except Exception:
        return False
    return bool(np.isfinite(arr).all() and np.ptp(arr) > 0)


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, pydicom_data_dir, pydicom_test_files):
    out = tmp_path_factory.mktemp("corpus") / "shards"
    # non_image_objects: this module checks the decoders on every file pydicom reads (SEG and RTDOSE among
    # them); leaving such objects out by default has its own test below.
    summary = ingest(IngestConfig(inputs=[pydicom_data_dir, pydicom_test_files], out=out, workers=2,
                                  non_image_objects=True), show_progress=False)
    return out, summary, [pydicom_data_dir, pydicom_test_files]


def test_one_manifest_row_per_input_file(corpus_run):
    out, summary, roots = corpus_run
    n_files = sum(len(files) for root in roots for _, _, files in os.walk(root))
    rows = manifest(out)
    assert len(rows) == n_files
    assert len({r["path"] for r in rows}) == n_files
    assert summary.report["files"] == n_files


def test_every_decodable_file_is_ingested_and_every_other_has_a_specific_reason(corpus_run):
    out, _, roots = corpus_run
    rows = {r["path"]: r for r in manifest(out)}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                row = rows[f"{root.name}/{path.relative_to(root)}"]
                if _plain_pydicom_decodes(path):
                    assert row["status"] in ("ingested", "duplicate"), (path, row)
                if row["status"] == "rejected":
                    code = row["reason"].split(":")[0]
                    assert code in SPECIFIC_CODES, (path, row["reason"])


def test_samples_match_manifest_and_metadata_is_complete(corpus_run):
    out, _, _ = corpus_run
    samples = shard_samples(out)
    listed = [k for r in manifest(out) for k in r.get("samples", [])]
    assert sorted(listed) == sorted(samples)
    for _, meta in samples.values():
        assert meta["modality"]
        assert meta["intensity"]["semantics"] in ("hounsfield", "normalized")
        assert len(meta["source"]["sha256"]) == 64
        assert max(meta["size"]) <= 512
        assert meta["original_size"][0] >= meta["size"][0]


def test_multiframe_and_compressed_encodings_are_ingested(corpus_run):
    out, _, _ = corpus_run
    rows = {r["path"]: r for r in manifest(out)}
    # multi-frame (10 frames), RLE, JPEG-LS, JPEG 2000 and big-endian versions of the same MR series
    for name in ("emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
                 "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"):
        row = rows[f"data/{name}"]
        assert row["status"] == "ingested" and len(row["samples"]) == 10, row
    assert rows["data/emri_small_jpeg_2k_lossless_too_short.dcm"]["reason"].startswith("truncated")
    assert rows["test_files/MR_truncated.dcm"]["reason"].startswith("truncated")
    # files without an extension, detected by content
    assert rows["test_files/dicomdirtests/98892003/MR700/4467"]["status"] == "ingested"
    assert rows["test_files/README.txt"]["reason"].startswith("not_an_image")


def test_exact_duplicates_are_detected(corpus_run):
    out, _, _ = corpus_run
    dups = [r for r in manifest(out) if r["status"] == "duplicate"]
    assert {r["path"] for r in dups} >= {"test_files/examples_jpeg2k.dcm"}
    assert all("same content as" in r["reason"] for r in dups)


def test_non_image_objects_get_their_own_reason_unless_asked_for(tmp_path, pydicom_test_files, pydicom_data_dir):
    """RTDOSE grids and SEG masks were ingested as pretraining images."""
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    for path in (pydicom_test_files / "rtdose.dcm", pydicom_data_dir / "liver.dcm", pydicom_test_files / "CT_small.dcm",
                 pydicom_test_files / "MR_small.dcm"):
        shutil.copy(path, src / path.name)
    summary = ingest(IngestConfig(inputs=[src], out=tmp_path / "default", workers=1, strict=True), show_progress=False)
    reasons = {r["path"].rpartition("/")[2]: r["reason"] for r in summary.report["rejected"]}
    assert reasons["rtdose.dcm"].startswith("non_image_object: a radiotherapy dose grid (RTDOSE)")
    assert reasons["liver.dcm"].startswith("non_image_object: a segmentation (SEG)")
    assert summary.exit_code(strict=True) == 0  # left out by choice, not for a fault
    listed = [r["path"] for r in summary.report["rejected"]]
    assert listed == sorted(listed)  # the report's list, by path
    both = ingest(IngestConfig(inputs=[src], out=tmp_path / "all", workers=1, non_image_objects=True),
                      show_progress=False)
    assert both.report["status"] == {"ingested": 4}
    only_ct = ingest(IngestConfig(inputs=[src], out=tmp_path / "ct", workers=1, modalities=["ct"]),
                     show_progress=False)
    assert only_ct.report["by_modality"].keys() == {"CT"}
    assert only_ct.report["rejections_by_code"] == {"excluded_modality": 3}
    no_mr = ingest(IngestConfig(inputs=[src], out=tmp_path / "no-mr", workers=1, exclude_modalities=["MR"],
                              non_image_objects=True), show_progress=False)
    assert no_mr.report["by_modality"].keys() == {"CT", "RTDOSE", "SEG"}
