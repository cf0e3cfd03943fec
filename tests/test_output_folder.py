"""The output folder of an ingest: only empty folders or medssl datasets are written, only medssl's own
temporary files are deleted, inputs and output never overlap, and one writer at a time holds a dataset."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medssl.config import ConfigError
from medssl.ingest.listing import scan
from medssl.lease import LeaseHeld, lease


def _ingest(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", *map(str, args), "--workers", "1", "--quiet"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def one_file(tmp_path, pydicom_test_files) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pydicom_test_files / "MR_small.dcm", src)
    return src


def test_a_folder_of_the_users_is_refused_and_nothing_in_it_deleted(tmp_path, one_file):
    """The probe's reproduction: --out naming a folder with a user's notes.tmp deleted that file."""
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "sub" / "notes.tmp").write_text("draft")
    (home / "top.123.tmp").write_text("looks like ours, is not")
    proc = _ingest(one_file, "--out", home)
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr and "not a medssl dataset" in proc.stderr and "Traceback" not in proc.stderr
    assert (home / "sub" / "notes.tmp").read_text() == "draft"
    assert (home / "top.123.tmp").exists()
    assert sorted(p.name for p in home.iterdir()) == ["sub", "top.123.tmp"]  # nothing written


def test_a_dataset_loses_only_its_own_stale_temporary_files(tmp_path, one_file):
    out = tmp_path / "ds"
    assert _ingest(one_file, "--out", out).returncode == 0
    assert (out / "medssl-dataset.json").is_file()
    (out / "shards" / "chunk-000000-000.tar.4242.tmp").write_bytes(b"partial")  # as a killed run leaves them
    (out / "index.json.77.tmp").write_text("{")
    (out / "notes.tmp").write_text("mine")                                     # not atomic_open's name
    (out / "shards" / "keep").mkdir()
    (out / "shards" / "keep" / "x.1.tmp").write_text("below the folders ingest writes")
    proc = _ingest(one_file, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "shards" / "chunk-000000-000.tar.4242.tmp").exists()
    assert not (out / "index.json.77.tmp").exists()
    assert (out / "notes.tmp").read_text() == "mine"
    assert (out / "shards" / "keep" / "x.1.tmp").exists()


def test_a_dataset_from_before_the_mark_is_still_one(tmp_path, one_file):
    out = tmp_path / "ds"
    assert _ingest(one_file, "--out", out).returncode == 0
    (out / "medssl-dataset.json").unlink()  # as written by medssl before the mark existed
    (one_file / "more.dcm").write_bytes((one_file / "MR_small.dcm").read_bytes()[:-2] + b"\0\0")
    proc = _ingest(one_file, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "1 files new" in proc.stdout and (out / "medssl-dataset.json").is_file()


@pytest.mark.parametrize("where", ["same", "out_inside_input", "input_inside_out"])
def test_inputs_and_output_never_overlap(tmp_path, one_file, where):
    """--out equal to the input made the dataset's own ingest.log and plan inputs of a rerun."""
    if where == "same":
        src, out = one_file, one_file
    elif where == "out_inside_input":
        src, out = one_file, one_file / "shards"
    else:
        src, out = tmp_path / "ds" / "in", tmp_path / "ds"
        shutil.copytree(one_file, src)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = _ingest(src, "--out", out)
    assert proc.returncode == 2, proc.stdout
    assert "inside" in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_out_naming_a_file_is_a_clear_error(tmp_path, one_file):
    (tmp_path / "file").write_text("x")
    proc = _ingest(one_file, "--out", tmp_path / "file")
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr


_HOLD = ("import sys, time; from medssl.lease import lease\n"
         "with lease(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")


def test_a_second_writer_is_refused_and_a_dead_holders_lease_is_free(tmp_path, one_file):
    out = tmp_path / "ds"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _ingest(one_file, "--out", out)
        assert proc.returncode == 2
        assert len(proc.stderr.splitlines()) == 1 and "being written by another ingest" in proc.stderr
        assert f"process {holder.pid} on " in proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    proc = _ingest(one_file, "--out", out)  # the holder died: its lock went with it
    assert proc.returncode == 0, proc.stderr


def test_two_ingests_at_once_one_runs_one_is_refused(tmp_path, pydicom_test_files):
    """Two runs at once crashed one of them with a FileNotFoundError traceback in 3 of 6 trials."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "MR_small_RLE.dcm"):
        shutil.copy(pydicom_test_files / name, src)
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "medssl.cli", "ingest", str(src), "--out", str(out), "--workers", "1", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all("Traceback" not in err for _, err in results), results
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # [0, 0]: the second started after the first ended
    assert json.loads((out / "report.json").read_text())["files"] == 5


def test_lease_on_object_storage(s3_bucket):
    url = f"{s3_bucket}/ds"
    with lease(url, ttl_s=60):
        with pytest.raises(LeaseHeld, match="being written by another ingest"):
            with lease(url, ttl_s=60):
                pass
    with lease(url, ttl_s=60):  # given back at the end of the block
        pass


def test_a_stale_lease_on_object_storage_is_taken_over(s3_bucket):
    """A holder that died leaves its lease object; once not renewed for ttl_s, the next writer takes it."""
    import s3fs

    url = f"{s3_bucket}/ds"
    dead = {"host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00+00:00", "token": "dead", "ttl_s": 1.0}
    s3fs.S3FileSystem().pipe_file("bucket/ds/ingest.lease", json.dumps(dead).encode())
    with pytest.raises(LeaseHeld, match="process 1 on elsewhere"):
        with lease(url, ttl_s=30):
            pass
    time.sleep(2.1)  # the store's clock has a resolution of one second
    with lease(url, ttl_s=2) as held:
        held.check()
        body = json.loads(s3fs.S3FileSystem().cat_file("bucket/ds/ingest.lease"))
        assert body["token"] != "dead"


def test_ingest_holds_the_lease_on_object_storage(s3_bucket, one_file):
    url = f"{s3_bucket}/ds"
    with lease(url, ttl_s=60):
        proc = _ingest(one_file, "--out", url)
    assert proc.returncode == 2 and "being written by another ingest" in proc.stderr, proc.stderr
    proc = _ingest(one_file, "--out", url)
    assert proc.returncode == 0, proc.stderr


def test_claim_refuses_a_non_dataset_prefix(s3_bucket):
    import s3fs

    from medssl.ingest.output import check_output

    s3fs.S3FileSystem().pipe_file("bucket/mine/notes.txt", b"x")
    with pytest.raises(ConfigError, match="not a medssl dataset"):
        check_output(f"{s3_bucket}/mine", [Path("/nonexistent")])


def test_listing_a_deep_tree_resolves_no_plain_folder(tmp_path, monkeypatch):
    """Path.resolve() per folder made listing a tree cubic in its depth (33 s at depth 1,200)."""
    deep = tmp_path / "in"
    path = deep
    for i in range(60):
        path = path / f"d{i}"
    path.mkdir(parents=True)
    (path / "leaf.dcm").write_bytes(b"x")
    calls = []
    real = Path.resolve
    monkeypatch.setattr(Path, "resolve", lambda self, *a, **k: calls.append(self) or real(self, *a, **k))
    entries = list(scan([deep], tmp_path / "out"))
    assert [e.rel.rsplit("/", 1)[-1] for e in entries] == ["leaf.dcm"]
    assert len(calls) <= 2  # the roots and the output, once each


def test_a_dataset_made_again_at_the_same_url_starts_clean(s3_bucket, one_file, tmp_path, pydicom_test_files):
    """The local copy of content.sqlite outlived a dataset deleted from the store: the new dataset at the
    same URL called its files duplicates of files it never held."""
    import s3fs

    url = f"{s3_bucket}/ds"
    assert _ingest(one_file, "--out", url).returncode == 0
    s3fs.S3FileSystem().rm("bucket/ds", recursive=True)
    other = tmp_path / "other"
    shutil.copytree(one_file, other)
    shutil.copy(pydicom_test_files / "CT_small.dcm", other / "0.dcm")  # listed first: MR_small gets index 1
    proc = _ingest(other, "--out", url)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(s3fs.S3FileSystem().cat_file("bucket/ds/report.json"))
    assert report["status"] == {"ingested": 2}
