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
