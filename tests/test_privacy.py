"""No patient identifier reaches any byte of any output: shards, manifest, report, logs, console."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image

from helpers import shard_samples, write_ct_dicom

IDENTIFIERS = {
    "PatientName": "Quizzlewick^Albertina",
    "PatientID": "PID-7318264",
    "PatientBirthDate": "19230517",
    "AccessionNumber": "ACC8812345",
    "InstitutionName": "Saint Nowhere Infirmary",
    "ReferringPhysicianName": "Grumblethorpe^Doctor",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.73182641",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.73182642",
    "StudyDate": "20190230",
}
NEEDLES = [v.encode() for v in IDENTIFIERS.values()] + [b"Quizzlewick", b"Albertina", b"Grumblethorpe"]


def _all_output_bytes(out):
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            yield str(path), data
            if path.suffix == ".tar":
                with tarfile.open(path) as tar:
                    for m in tar.getmembers():
                        member = tar.extractfile(m).read()
                        yield f"{path}:{m.name}", member
                        if m.name.endswith(".png"):  # the decompressed pixels, too
                            yield f"{path}:{m.name}:pixels", np.asarray(Image.open(io.BytesIO(member))).tobytes()


def test_identifiers_never_written(tmp_path):
    src = tmp_path / "archive"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write_ct_dicom(src / f"img{i}.dcm", rng.normal(40, 20, (64, 64)), **IDENTIFIERS)
    # a broken file carrying the same identifiers: its error path must not leak them either
    write_ct_dicom(src / "broken.dcm", rng.normal(40, 20, (64, 64)), **IDENTIFIERS)
    data = (src / "broken.dcm").read_bytes()
    (src / "broken.dcm").write_bytes(data[:-2000])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", str(src), "--out", str(out), "--workers", "1"],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    outputs = list(_all_output_bytes(out)) + [("stdout", proc.stdout), ("stderr", proc.stderr)]
    assert any("/manifest/chunk-" in name for name, _ in outputs)
    for name, data in outputs:
        for needle in NEEDLES:
            assert needle not in data, f"{needle!r} found in {name}"
    # linkage survives as a salted hash: all four images share one patient hash
    metas = [m for _, m in shard_samples(out).values()]
    assert len(metas) == 3
    assert len({m["linkage"]["patient"] for m in metas}) == 1
    assert all(len(m["linkage"]["patient"]) == 16 for m in metas)


def test_redact_paths(tmp_path):
    src = tmp_path / "Quizzlewick_Albertina"  # PACS exports often name folders after the patient
    src.mkdir()
    write_ct_dicom(src / "PID-7318264.dcm", np.random.default_rng(0).normal(40, 20, (32, 32)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", str(src), "--out", str(out),
                           "--workers", "1", "--set", "redact_paths=true"], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    for name, data in list(_all_output_bytes(out)) + [("stdout", proc.stdout), ("stderr", proc.stderr)]:
        if name in ("stdout", "stderr"):
            data = data.replace(str(out).encode(), b"")  # the output folder the user chose is printed
        for needle in (b"Quizzlewick", b"PID-7318264"):
            assert needle not in data, f"{needle!r} found in {name}"
