"""Keeping patient identifiers out of everything medssl writes.

Identifiers are never written. Where images must be linked (a patient's images stay on one side of a
train/test split), we write a keyed hash: HMAC-SHA256 with a secret salt that lives outside the
output folder, so that someone holding the shards cannot test guesses of patient ids against it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

DEFAULT_SALT_FILE = Path("~/.medssl/salt")

# DICOM attributes that identify a patient, a visit, a place or a person; collected by the DICOM
# reader only to hash them (linkage) and to scrub them from messages.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate",
    "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "MilitaryRank", "EthnicGroup", "AccessionNumber", "StudyID", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "StudyTime", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingPhysician",
    "DeviceSerialNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID", "MediaStorageSOPInstanceUID",
)


def load_salt(salt_file: Path | None = None) -> bytes:
    """Read the secret salt, creating it (mode 0600) on first use. Override with MEDSSL_SALT_FILE."""
    path = Path(salt_file or os.environ.get("MEDSSL_SALT_FILE") or DEFAULT_SALT_FILE).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    salt = path.read_text().strip().encode()
    if len(salt) < 16:
        raise ValueError(f"salt file {path} holds fewer than 16 characters; use a long random secret")
    return salt


def keyed_hash(value: str, salt: bytes, length: int = 16) -> str:
    """Salted, non-reversible stand-in for an identifier (same value + same salt -> same hash)."""
    # surrogateescape: file names that are not UTF-8 hash by their bytes, so distinct names stay distinct
    return hmac.new(salt, value.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:length]


_QUOTED = re.compile(r"(['\"]).*?\1")


def scrub(message: str, identifiers: dict[str, str] | None = None) -> str:
    """Remove identifier values and any quoted header value from a library's error message."""
    for value in sorted((identifiers or {}).values(), key=len, reverse=True):
        if len(value) >= 3:
            message = message.replace(value, "[redacted]")
    return _QUOTED.sub("'…'", message)
