"""Shared fixtures: real DICOM corpora from pydicom / pydicom-data, the shared data folder, a test salt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _salt(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.medssl/salt from tests; one salt per test session."""
    salt = tmp_path_factory.getbasetemp() / "salt"
    if not salt.exists():
        salt.write_text("test-salt-0123456789abcdef0123456789")
    monkeypatch.setenv("MEDSSL_SALT_FILE", str(salt))


@pytest.fixture(scope="session")
def pydicom_data_dir() -> Path:
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    return Path(os.path.dirname(data_store.__file__)) / "data"


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    import pydicom.data

    return Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it sits beside the repository on the team's machines and in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards of 40 small synthetic images (ellipses on noise, CT DICOM and PNG), made by medssl ingest."""
    import numpy as np
    from PIL import Image

    from helpers import write_ct_dicom
    from medssl.config import IngestConfig
    from medssl.ingest import ingest

    root = tmp_path_factory.mktemp("tiny")
    src = root / "archive"
    src.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(40):
        cy, cx, r = rng.integers(16, 48, 2).tolist() + [int(rng.integers(6, 16))]
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(float)
        if i % 2:
            write_ct_dicom(src / f"ct{i}.dcm", -800 + 850 * blob + rng.normal(0, 20, (64, 64)))
        else:
            Image.fromarray(np.clip(60 + 150 * blob + rng.normal(0, 10, (64, 64)), 0, 255).astype(np.uint8)).save(
                src / f"xr{i}.png")
    out = root / "shards"
    ingest(IngestConfig(inputs=[src], out=out, workers=1, files_per_chunk=10, samples_per_shard=10),
           show_progress=False)
    return out


@pytest.fixture
def s3_bucket(monkeypatch) -> str:
    """A real S3 server (moto's server mode) on 127.0.0.1 with one empty bucket, yielded as "s3://bucket".

    The standard AWS variables point at it, so medssl here and in subprocesses finds it with no flags."""
    import socket
    import urllib.request

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # fsspec reuses a file system per set of arguments, which would keep an earlier test's endpoint.
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    try:
        yield "s3://bucket"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # moto keeps its buckets per process, not per server: empty them for the next test.
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
        server.stop()
