"""Corrupt, truncated and hostile files: each reader rejects them early, cheaply and with a specific reason.

The isolated decode worker is the last line of defence; these tests run the readers in-process, so a
native panic, a zero-filled raster or an unbounded inflation would show here directly.
"""

from __future__ import annotations

import random
import struct
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from helpers import write_ct_dicom
from medssl.config import IngestConfig
from medssl.ingest.pipeline import FileTask, process_file
from medssl.io import Limits, Rejected, read_image
from medssl.shard_format import Sample, write_shard

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SALT = b"0123456789abcdef0123"


def _outcome(path: Path):
    return process_file(FileTask(0, str(path), "ab" * 32), IngestConfig(), SALT)


def _reason(path: Path, limits: Limits = Limits()) -> tuple[str, str]:
    """(code, detail) of the rejection of ``path``, reading every frame; ("ingested", "") otherwise."""
    try:
        src = read_image(path, limits)
        for _ in src.frames:
            pass
    except Rejected as r:
        return r.code, r.detail
    return "ingested", ""


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, raw: bytes) -> bytes:
    """An 8-bit grey PNG whose IDAT holds a complete deflate stream of ``raw`` (whatever its length)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


def _ct(path: Path, shape=(32, 32), **tags) -> Path:
    write_ct_dicom(path, np.random.default_rng(0).normal(40, 20, shape), **tags)
    return path


# --- native decoder panics ------------------------------------------------------------------------

def test_native_decoder_panic_is_a_decoder_crash_naming_the_transfer_syntax(tmp_path):
    data = bytearray((TEST_FILES / "MR_small_RLE.dcm").read_bytes())
    data[1544] = 0x7F  # pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on this file
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    outcome = _outcome(tmp_path / "bad.dcm")
    assert outcome.status == "rejected" and outcome.reason.startswith("decoder_crash:"), outcome.reason
    assert "RLE Lossless" in outcome.reason and "index out of bounds" not in outcome.reason


# --- bounds before decoding -----------------------------------------------------------------------

def _write_every_format(root: Path) -> dict[str, Path]:
    """One 256 x 256 image in every format and encoding the readers take."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (256, 256), dtype=np.uint8)
    paths = {"dicom": _ct(root / "native.dcm", (256, 256))}
    ds = pydicom.dcmread(paths["dicom"])
    ds.compress(RLELossless)
    ds.save_as(root / "rle.dcm")
    paths["dicom-rle"] = root / "rle.dcm"
    ds = pydicom.dcmread(paths["dicom"])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(root / "deflated.dcm")
    paths["dicom-deflated"] = root / "deflated.dcm"
    for fmt in ("png", "jpeg"):
        Image.fromarray(img).save(root / f"x.{fmt}")
        paths[fmt] = root / f"x.{fmt}"
    tifffile.imwrite(root / "x.tif", img, compression="zlib")
    paths["tiff"] = root / "x.tif"
    for name in ("v.nii", "v.nii.gz"):
        nib.save(nib.Nifti1Image(rng.normal(0, 1, (256, 256, 4)).astype(np.float32), np.eye(4)), root / name)
        paths[name] = root / name
    return paths


def test_every_format_is_checked_against_the_memory_budget_before_decoding(tmp_path):
    paths = _write_every_format(tmp_path)
    # 256 x 256 values x 16 bytes = 1 MiB per frame: fits a 4 MiB budget, not a 512 KiB one.
    for name, path in paths.items():
        assert _reason(path, Limits(max_memory_bytes=4 << 20)) == ("ingested", ""), name
        code, detail = _reason(path, Limits(max_memory_bytes=512 << 10))
        assert code == "too_large" and "max_memory_mb" in detail and "MB" in detail, (name, code, detail)


def test_png_declaring_more_than_deflate_can_hold_is_truncated_before_decoding(tmp_path, monkeypatch):
    # 69 bytes declaring 10000 x 10000 (the old reader spent 1.3 GB and ingested it zero-filled)
    (tmp_path / "bomb.png").write_bytes(_png(10000, 10000, b"\0" * 100))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded before the header check"))
    code, detail = _reason(tmp_path / "bomb.png")
    assert code == "truncated" and "deflate" in detail


def test_png_whose_deflate_stream_ends_early_is_truncated_not_zero_filled(tmp_path):
    rows = b"".join(b"\0" + bytes(range(64)) for _ in range(10))  # 10 of 64 rows, complete stream
    (tmp_path / "short.png").write_bytes(_png(64, 64, rows))
    assert _reason(tmp_path / "short.png")[0] == "truncated"
    full = b"".join(b"\0" + bytes(range(64)) for _ in range(63)) + b"\0" + bytes(64)  # last row black
    (tmp_path / "full.png").write_bytes(_png(64, 64, full))
    assert _reason(tmp_path / "full.png") == ("ingested", "")


def test_truncated_jpeg_and_tiff_are_truncated(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "x.jpg").read_bytes()[:2000])
    assert _reason(tmp_path / "cut.jpg")[0] == "truncated"
    for compression in (None, "zlib"):
        tifffile.imwrite(tmp_path / "x.tif", img, compression=compression)
        data = (tmp_path / "x.tif").read_bytes()
        (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
        assert _reason(tmp_path / "cut.tif")[0] == "truncated", compression


def test_tiff_strip_without_data_is_truncated_not_zero_filled(tmp_path):
    img = np.random.default_rng(0).integers(1, 255, (64, 64), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", img, rowsperstrip=16)
    with tifffile.TiffFile(tmp_path / "x.tif") as tif:
        tag = tif.pages[0].tags["StripByteCounts"]
        offset, count, fmt = tag.valueoffset, tag.count, "<H" if int(tag.dtype) == 3 else "<I"  # SHORT or LONG
    data = bytearray((tmp_path / "x.tif").read_bytes())
    # the last strip: 0 bytes (tifffile fills such a strip with zeros)
    struct.pack_into(fmt, data, offset + struct.calcsize(fmt) * (count - 1), 0)
    (tmp_path / "sparse.tif").write_bytes(bytes(data))
    assert _reason(tmp_path / "sparse.tif")[0] == "truncated"


def test_absurd_dicom_headers_are_rejected_before_decoding(tmp_path):
    cases = {"BitsAllocated": (7, "bad_header"), "SamplesPerPixel": (2, "unsupported_encoding"),
             "PixelRepresentation": (5, "bad_header"), "NumberOfFrames": (10**9, "too_large")}
    for keyword, (value, code) in cases.items():
        path = _ct(tmp_path / f"{keyword}.dcm")
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, value)
        ds.save_as(path)
        assert _reason(path)[0] == code, keyword
    path = _ct(tmp_path / "rows.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = 30000  # the pixel data holds 32 rows
    ds.save_as(path)
    assert _reason(path) == ("truncated", "the pixel data holds 2,048 bytes, the header declares 1,920,000")


# --- deflated DICOM -------------------------------------------------------------------------------

def _deflated(path: Path, shape=(64, 64), padding: int = 0) -> Path:
    _ct(path, shape)
    ds = pydicom.dcmread(path)
    if padding:
        ds.add_new(0xFFFCFFFC, "OB", bytes(padding))  # Data Set Trailing Padding: inflates, holds nothing
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path)
    return path


def test_deflated_dicom_is_read_like_pydicom_reads_it(tmp_path):
    path = TEST_FILES / "image_dfl.dcm"
    src = read_image(path)
    np.testing.assert_array_equal(next(src.frames).pixels, pydicom.dcmread(path).pixel_array)
    assert src.info["transfer_syntax"] == "Deflated Explicit VR Little Endian"


def test_deflated_dicom_stops_inflating_past_what_its_header_declares(tmp_path, monkeypatch):
    import medssl.io.dicom_deflate as deflate

    monkeypatch.setattr(deflate, "NON_PIXEL_ALLOWANCE", 256 << 10)  # keeps the test file small
    path = _deflated(tmp_path / "padded.dcm", padding=8 << 20)  # an 8 KB image, then 8 MB of padding
    assert path.stat().st_size < 64 << 10
    code, detail = _reason(path)  # (the old reader inflated all of it first, then ingested the image)
    assert code == "too_large" and "inflates beyond" in detail and "more than its header declares" in detail
    monkeypatch.setattr(deflate, "NON_PIXEL_ALLOWANCE", 16 << 20)
    assert _reason(path) == ("ingested", "")


def test_corrupt_or_cut_deflate_streams_get_specific_reasons(tmp_path):
    path = _deflated(tmp_path / "ok.dcm")
    data = path.read_bytes()
    start = 132 + 12 + pydicom.dcmread(path).file_meta.FileMetaInformationGroupLength  # the deflated data set
    (tmp_path / "cut.dcm").write_bytes(data[: start + (len(data) - start) // 2])
    assert _reason(tmp_path / "cut.dcm")[0] == "truncated"
    corrupt = bytearray(data)
    corrupt[start + 40: start + 60] = b"\xff" * 20
    (tmp_path / "corrupt.dcm").write_bytes(bytes(corrupt))
    assert _outcome(tmp_path / "corrupt.dcm").reason == "decode_failed: failed while inflating the deflated data set " \
                                                       "(zlib.error)"


# --- specific reasons, never a header value -------------------------------------------------------

def test_reasons_quote_no_header_value(tmp_path):
    private_sop, name = "1.2.826.0.1.3680043.99999.1.2.3", "Doe^Jane"
    path = _ct(tmp_path / "sr.dcm", PatientName=name)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = private_sop
    del ds.PixelData
    ds.save_as(path)
    outcome = _outcome(path)
    assert outcome.reason.startswith("no_pixel_data:") and "non-standard SOP class" in outcome.reason
    assert private_sop not in outcome.reason and "Doe" not in outcome.reason
    private_syntax = "1.2.826.0.1.3680043.99999.9"
    path = _ct(tmp_path / "ts.dcm", PatientName=name)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = private_syntax
    ds.save_as(path)
    outcome = _outcome(path)
    assert outcome.reason.startswith("unsupported_encoding:") and "non-standard transfer syntax" in outcome.reason
    assert private_syntax not in outcome.reason


def test_rescale_slope_zero_or_non_finite_is_bad_header(tmp_path):
    assert _reason(_ct(tmp_path / "zero.dcm", RescaleSlope=0)) == ("bad_header", "RescaleSlope is 0 (every pixel "
                                                                                "would have the same value)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "NaN" is not a valid DS
        code, detail = _reason(_ct(tmp_path / "nan.dcm", RescaleIntercept="NaN"))
    assert code == "bad_header" and "not a finite number" in detail


def test_non_finite_spacing_is_left_out_and_metadata_json_is_strict(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "nan" is not a valid DS
        outcome = _outcome(_ct(tmp_path / "nan.dcm", PixelSpacing=["nan", "0.5"]))
    assert outcome.status == "ingested" and outcome.samples[0].meta["spacing_mm"] is None
    with pytest.raises(ValueError):
        write_shard(tmp_path / "s.tar", [Sample("k", b"", {"spacing_mm": [float("nan"), 1.0]})])


# --- quick fuzz -----------------------------------------------------------------------------------

def _mutants(rng: random.Random, data: bytes, n: int):
    for _ in range(n):
        d = bytearray(data)
        if rng.random() < 0.3:
            d = d[: rng.randrange(1, len(d))]
        else:
            for _ in range(rng.choice([1, 3, 10])):
                d[rng.randrange(len(d))] = rng.randrange(256)
        yield bytes(d)


def test_mutated_files_never_end_in_internal_error(tmp_path):
    seeds = [TEST_FILES / n for n in ("MR_small_RLE.dcm", "image_dfl.dcm", "MR_small.dcm", "JPEG2000.dcm")]
    (tmp_path / "seeds").mkdir()
    seeds += list(_write_every_format(tmp_path / "seeds").values())
    rng = random.Random(0)
    codes = {}
    for seed in seeds:
        for i, data in enumerate(_mutants(rng, seed.read_bytes(), 12)):
            path = tmp_path / f"{i}_{seed.name}"
            path.write_bytes(data)
            outcome = _outcome(path)  # must not raise, whatever the bytes
            code = outcome.status if outcome.status == "ingested" else outcome.reason.split(":")[0]
            codes[code] = codes.get(code, 0) + 1
            assert code != "internal_error", (path.name, outcome.reason)
    assert sum(codes.values()) == 12 * len(seeds) and len(codes) > 3


def test_tiff_sample_layouts_beyond_grey_and_rgb_are_unsupported_with_an_honest_reason(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c5.tif", img, photometric="minisblack", planarconfig="contig")
    assert _reason(tmp_path / "c5.tif") == ("unsupported_encoding", "TIFF page 0 has 5 samples per pixel "
                                                                    "(1, 3 or 4 supported)")
    tifffile.imwrite(tmp_path / "cmyk.tif", img[..., :4], photometric="separated")
    assert _reason(tmp_path / "cmyk.tif")[0] == "unsupported_encoding"
    tifffile.imwrite(tmp_path / "rgba.tif", img[..., :4], photometric="rgb", extrasamples=["unassalpha"])
    src = read_image(tmp_path / "rgba.tif")
    assert src.photometric == "RGB" and next(src.frames).pixels.shape == (16, 16, 3)


@pytest.mark.parametrize("name, marker, offset", [("JPEG2000.dcm", b"\xff\x4f\xff\x51", 12),  # J2K SIZ: Ysiz
                                                  ("JPGExtended.dcm", b"\xff\xc1", 5)])  # JPEG SOF1: Y
def test_codestream_declaring_more_than_the_dicom_header_is_refused_before_decoding(tmp_path, monkeypatch,
                                                                                    name, marker, offset):
    data = bytearray((TEST_FILES / name).read_bytes())
    at = data.index(marker, data.index(b"\xe0\x7f\x10\x00"))  # in the first frame of the pixel data
    size = 4 if marker.endswith(b"\x51") else 2
    data[at + offset: at + offset + size] = b"\xff" * size  # the decoder would allocate for this many rows
    (tmp_path / name).write_bytes(bytes(data))
    import medssl.io.dicom as dicom

    monkeypatch.setattr(dicom, "pixel_array", lambda *a, **k: pytest.fail("decoded before the codestream check"))
    code, detail = _reason(tmp_path / name)
    assert code == "decode_failed" and "the codestream of frame 0 declares" in detail


@pytest.mark.parametrize("box", [b"\x00\x00\x00\x00ftyp", b"\x00\x00\x00\x03ftyp", b"\x00\x00\x00\x01ftyp"])
def test_jp2_box_chain_that_would_loop_pydicom_is_rejected_at_once(tmp_path, box):
    """A JP2 box of length 0 made pydicom's get_j2k_parameters loop forever: ingest lost a worker's whole
    file_timeout_s per file, and medssl serve held its upload lock for 60 s."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm")
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + box + b"\0" * 8 + struct.pack(">I", 8 + len(codestream)) + b"jp2c"
    ds.PixelData = encapsulate([jp2 + codestream])
    ds.save_as(tmp_path / "jp2.dcm")
    assert _reason(tmp_path / "jp2.dcm")[0] == "decode_failed"
    assert "JP2 box 'ftyp'" in _reason(tmp_path / "jp2.dcm")[1]
    outcome = process_file(FileTask(0, str(tmp_path / "jp2.dcm"), "ab" * 32), IngestConfig(file_timeout_s=20), SALT)
    assert outcome.reason.startswith("decode_failed")


def test_a_valid_jp2_box_chain_passes_the_check():
    from medssl.io.codestream import jp2_box_error

    ftyp = b"jp2 " + b"\0\0\0\0" + b"jp2 "
    head = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I", 8 + len(ftyp)) + b"ftyp" + ftyp
    assert jp2_box_error(head + b"\x00\x00\x00\x00jp2c" + b"\xff\x4f\xff\x51") is None  # last box: to the end
    assert jp2_box_error(head + b"\x00\x00\x00\x01jp2c" + struct.pack(">Q", 20) + b"\xff\x4f") is None
    xl = b"\x00\x00\x00\x01free" + struct.pack(">Q", 24) + b"\0" * 8
    assert jp2_box_error(head + xl + b"\x00\x00\x00\x00jp2c") is None
    assert jp2_box_error(b"\xff\x4f\xff\x51") is None  # a bare codestream: no boxes
    assert "no codestream box" in jp2_box_error(head)
