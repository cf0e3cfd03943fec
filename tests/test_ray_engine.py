"""``--engine ray`` runs the same per-file function on a (local) Ray instance, with the same result."""

from __future__ import annotations

import pytest

from helpers import manifest, shard_samples
from medssl.config import IngestConfig
from medssl.ingest import ingest


@pytest.mark.slow
def test_ray_engine_matches_local(tmp_path, pydicom_test_files):
    ray = pytest.importorskip("ray")
    inputs = [pydicom_test_files / "dicomdirtests"]
    common = dict(inputs=inputs, workers=2, files_per_chunk=8)
    ingest(IngestConfig(out=tmp_path / "local", **common), show_progress=False)
    try:
        ingest(IngestConfig(out=tmp_path / "ray", engine="ray", **common), show_progress=False)
    finally:
        ray.shutdown()
    local, distributed = shard_samples(tmp_path / "local"), shard_samples(tmp_path / "ray")
    assert len(local) > 10
    assert {k: v[0] for k, v in distributed.items()} == {k: v[0] for k, v in local.items()}
    assert [(r["path"], r["status"]) for r in manifest(tmp_path / "ray")] == \
        [(r["path"], r["status"]) for r in manifest(tmp_path / "local")]
