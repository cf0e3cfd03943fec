"""An ingest killed with SIGKILL and rerun ends with exactly the samples of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

from helpers import manifest, shard_samples

N_VOLUMES = 16


def _corpus(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_VOLUMES):
        # noise compresses badly, so each of the 48 slices costs real encoding time: a run lasts seconds
        vol = rng.normal(300, 80, size=(256, 256, 48)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), folder / f"vol{i:02d}.nii")


def _command(src, out):
    return [sys.executable, "-m", "medssl.cli", "ingest", str(src), "--out", str(out), "--workers", "1", "--quiet",
            "--set", "files_per_chunk=1", "--set", "samples_per_shard=20", "--set", "nifti_modality=MR"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    src = tmp_path / "archive"
    _corpus(src)
    reference = tmp_path / "reference"
    subprocess.run(_command(src, reference), check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(src, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = out / "manifest"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = len(list(parts.glob("*.jsonl"))) if parts.exists() else 0
        if done >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("*.jsonl")))
    assert 3 <= done_before < N_VOLUMES, "the run was not interrupted mid-way"
    assert not (out / "report.json").exists()

    rerun = subprocess.run(_command(src, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.rglob("*.tmp"))

    expected, got = shard_samples(reference), shard_samples(out)
    assert sorted(got) == sorted(expected)  # same keys, none duplicated (shard_samples checks), none lost
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in expected.items()}  # same pixels
    rows = manifest(out)
    assert len(rows) == N_VOLUMES and all(r["status"] == "ingested" for r in rows)
    assert {r["path"]: r["samples"] for r in rows} == {r["path"]: r["samples"] for r in manifest(reference)}
