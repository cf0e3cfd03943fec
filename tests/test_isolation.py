"""The decode worker: a file that hangs, crashes or blows up its decoder costs that file, not the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from helpers import manifest, write_ct_dicom
from medssl.config import IngestConfig
from medssl.ingest.pipeline import FileTask, process_file_isolated
from medssl.io.isolation import Budget, IsolatedWorker

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SALT = b"0123456789abcdef0123"


def _panicking_rle(path: Path) -> None:
    """pylibjpeg-rle panics (a Rust PanicException, a BaseException) on this one-byte mutation."""
    data = bytearray((TEST_FILES / "MR_small_RLE.dcm").read_bytes())
    data[1544] = 0x7F
    path.write_bytes(bytes(data))


def _task(path: Path, index: int = 0) -> FileTask:
    return FileTask(index, str(path), "ab" * 32)


@pytest.fixture
def worker():
    w = IsolatedWorker(Budget(timeout_s=1.0, memory_bytes=1 << 30), "medssl.ingest.pipeline")
    yield w
    w.close()


def _good(tmp_path: Path) -> Path:
    path = tmp_path / "good.dcm"
    write_ct_dicom(path, np.random.default_rng(0).normal(40, 20, (32, 32)))
    return path


# Sagittal slices of a .nii.gz: nibabel decompresses the whole stream again for each one, so this
# 100 KB file takes several seconds to read: a stand-in for a decoder that never returns.
SLOW = IngestConfig(planes=["sagittal"])


def _slow_file(folder: Path) -> Path:
    import nibabel as nib

    volume = np.broadcast_to(np.arange(192, dtype=np.int16)[:, None, None], (192, 192, 192))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume), np.eye(4)), folder / "slow.nii.gz")
    return folder / "slow.nii.gz"


def test_a_file_that_never_returns_is_a_timeout_and_the_next_file_is_read(tmp_path, worker):
    started = time.monotonic()
    outcome = process_file_isolated(worker, _task(_slow_file(tmp_path)), SLOW, SALT)
    assert outcome.status == "rejected" and outcome.reason.startswith("timeout:"), outcome.reason
    assert time.monotonic() - started < 30
    good = process_file_isolated(worker, _task(_good(tmp_path), 1), SLOW, SALT)
    assert good.status == "ingested" and len(good.samples) == 1
    assert worker.starts == 2 and worker.faults == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGSEGV, "decoder_crash"), (signal.SIGABRT, "decoder_crash"),
                                       (signal.SIGKILL, "too_large")])
def test_a_worker_that_dies_rejects_its_file_and_is_replaced(tmp_path, worker, sig, code):
    slow = _slow_file(tmp_path)
    worker._ensure_started()
    pid = worker._proc.pid
    killer = threading.Timer(0.3, os.kill, (pid, sig))  # dies while decoding (the budget is 1 s)
    killer.start()
    outcome = process_file_isolated(worker, _task(slow), SLOW, SALT)
    killer.join()
    assert outcome.status == "rejected" and outcome.reason.split(":")[0] == code, outcome.reason
    assert process_file_isolated(worker, _task(_good(tmp_path), 1), IngestConfig(), SALT).status == "ingested"
    assert worker._proc.pid != pid


def test_a_native_panic_is_a_decoder_crash(tmp_path, worker):
    bad = tmp_path / "bad.dcm"
    _panicking_rle(bad)
    outcome = process_file_isolated(worker, _task(bad), IngestConfig(), SALT)
    assert outcome.status == "rejected" and outcome.reason.startswith("decoder_crash:"), outcome.reason
    assert "index out of bounds" not in outcome.reason  # the decoder's own words are not passed on


def test_memory_beyond_the_worker_budget_is_too_large_not_an_oom_kill(tmp_path):
    # The reader's header check allows 4 GiB (cfg), but the worker is capped at 64 MiB: decoding a
    # 4000 x 4000 16-bit PNG needs far more, so the allocation fails inside the worker.
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (4000, 4000), dtype=np.uint16)).save(path)
    small = IsolatedWorker(Budget(timeout_s=60.0, memory_bytes=64 << 20), "medssl.ingest.pipeline")
    try:
        outcome = process_file_isolated(small, _task(path), IngestConfig(), SALT)
        assert outcome.status == "rejected" and outcome.reason.startswith("too_large:"), outcome.reason
        assert process_file_isolated(small, _task(_good(tmp_path)), IngestConfig(), SALT).status == "ingested"
    finally:
        small.close()


def test_a_worker_serves_medssl_modules_only():
    with pytest.raises(ValueError, match="medssl modules only"):
        IsolatedWorker(Budget(), "os")


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_ingest_survives_a_panicking_decoder_and_every_file_has_a_row(tmp_path):
    src = tmp_path / "archive"
    src.mkdir()
    _panicking_rle(src / "bad.dcm")
    write_ct_dicom(src / "ok.dcm", np.random.default_rng(1).normal(40, 20, (32, 32)))
    out = tmp_path / "out"
    proc = _cli("ingest", src, "--out", out, "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in manifest(out)}
    assert rows["archive/ok.dcm"]["status"] == "ingested"
    assert rows["archive/bad.dcm"]["reason"].startswith("decoder_crash:")
    iso = json.loads((out / "report.json").read_text())["isolation"]
    assert iso["max_memory_mb"] == 4096 and 0 < iso["worker_peak_rss_mb"] < 4096


def test_finetune_skip_bad_survives_a_panicking_decoder(tmp_path):
    from medssl.config import FinetuneConfig
    from medssl.downstream.images import load_images

    _panicking_rle(tmp_path / "bad.dcm")
    write_ct_dicom(tmp_path / "ok.dcm", np.random.default_rng(1).normal(40, 20, (32, 32)))
    images, is_ct, failures = load_images(tmp_path, ["ok.dcm", "bad.dcm"], FinetuneConfig(input_size=16))
    assert [i for i, _ in failures] == [1] and failures[0][1].startswith("decoder_crash:")
    assert bool(is_ct[0]) and images[0].abs().sum() > 0


def _unbounded_jpeg(path: Path) -> None:
    """A 100 x 100 YBR JPEG DICOM whose frame is four copies of its JPEG stream with one byte zeroed (found
    by benchmarks/fuzz_ingest.py): the header-based estimate sees a small image, but libjpeg allocates
    without bound while decoding it (24 GB after 60 s outside a worker)."""
    import io
    import struct

    from pydicom.encaps import generate_fragments

    ds = pydicom.dcmread(TEST_FILES / "SC_rgb_dcmtk_+eb+cy+s4.dcm")
    offsets, frame = list(generate_fragments(ds.PixelData))
    item = lambda b: b"\xfe\xff\x00\xe0" + struct.pack("<I", len(b)) + b  # noqa: E731
    ds.PixelData = item(offsets) + item(frame) * 4
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = bytearray(buffer.getvalue())
    data[1852] = 0
    path.write_bytes(bytes(data))


def test_a_decoder_that_allocates_without_bound_stops_at_the_budget(tmp_path):
    bomb = tmp_path / "bomb.dcm"
    _unbounded_jpeg(bomb)
    budget = 256 << 20
    small = IsolatedWorker(Budget(timeout_s=60.0, memory_bytes=budget), "medssl.ingest.pipeline")
    cfg = IngestConfig(max_memory_mb=256)
    try:
        outcome = process_file_isolated(small, _task(bomb), cfg, SALT)
        # libjpeg reports its failed allocation as an error ("Out of free memory"), numpy raises MemoryError:
        # both are the budget's cap
        assert outcome.status == "rejected" and outcome.reason.startswith("too_large:"), outcome.reason
        assert small.peak_rss_bytes <= budget
        assert process_file_isolated(small, _task(_good(tmp_path), 1), cfg, SALT).status == "ingested"
    finally:
        small.close()
