"""Object-storage outages during an ingest, against moto's real S3 server behind a proxy that goes down: a
fault of the store never turns a good file into a rejection, never ends a run in a traceback, and the
rerun finishes the same dataset an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FaultProxy, manifest, shard_samples

pytestmark = pytest.mark.slow  # outages of a real S3 server: ~35 s

FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg.dcm", "liver_1frame.dcm")


def _ingest(inputs, out, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", str(inputs), "--out", str(out),
                           "--workers", "1", "--quiet", "--set", "files_per_chunk=2"],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def archive(tmp_path, pydicom_test_files) -> Path:
    src = tmp_path / "archive"
    src.mkdir()
    for name in FILES:
        shutil.copy(pydicom_test_files / name, src)
    return src


def _through(proxy: FaultProxy) -> dict:
    return {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "MEDSSL_STORAGE_RETRY_S": "2"}


def _moto_port() -> int:
    return int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])


def test_an_outage_while_reading_leaves_files_unfinished_not_rejected(tmp_path, s3_bucket, archive):
    """A 40 s outage turned good files into permanent unreadable_file rejections and a rerun said
    "0 files new"."""
    import s3fs

    s3fs.S3FileSystem().put(str(archive) + "/", "bucket/archive/", recursive=True)
    straight = tmp_path / "straight"
    assert _ingest(f"{s3_bucket}/archive", straight, dict(os.environ)).returncode == 0

    # Down at the first read of an object (after the listing): HEAD or GET of a key, not a prefix listing.
    proxy = FaultProxy(_moto_port(), trigger=r"(GET|HEAD) /bucket/archive/[^?\s]+ HTTP")
    out = tmp_path / "ds"
    proc = _ingest(f"{s3_bucket}/archive", out, _through(proxy))
    assert proxy.tripped.is_set()
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "left unfinished" in proc.stderr and "None was rejected" in proc.stderr
    assert not [r for r in manifest(out) if r["status"] == "rejected"]

    proxy.up()
    proc = _ingest(f"{s3_bucket}/archive", out, _through(proxy))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == len(FILES) and report["status"] == json.loads(
        (straight / "report.json").read_text())["status"]
    assert "unreadable_file" not in json.dumps(report)
    assert shard_samples(out).keys() == shard_samples(straight).keys()


def test_an_outage_while_writing_is_one_line_and_resumable(tmp_path, s3_bucket, archive):
    """An outage while writing ended the run with a 235-line chained traceback whose last exception
    (uploading ingest.log) hid the cause."""
    import s3fs

    straight = tmp_path / "straight"
    assert _ingest(archive, straight, dict(os.environ)).returncode == 0
    proxy = FaultProxy(_moto_port(), trigger=r"PUT /bucket/ds/shards/")
    proc = _ingest(archive, f"{s3_bucket}/ds", _through(proxy))
    assert proxy.tripped.is_set()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: cannot write s3://bucket/ds/shards/shard-") and "after retrying" in lines[0]

    proxy.up()
    proc = _ingest(archive, f"{s3_bucket}/ds", _through(proxy))
    assert proc.returncode == 0, proc.stderr
    fs = s3fs.S3FileSystem()
    report = json.loads(fs.cat_file("bucket/ds/report.json"))
    assert report["status"] == json.loads((straight / "report.json").read_text())["status"]
    index = json.loads(fs.cat_file("bucket/ds/index.json"))
    assert index["samples"] == json.loads((straight / "index.json").read_text())["samples"]
