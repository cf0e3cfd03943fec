"""`medssl curate`: near-duplicate slices of a series and copies across the archive are dropped, distinct
ones kept; every sample accounted for; a report of counts only; safe reruns; a bench that curates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers import shard_samples, write_ct_dicom
from medssl.cli import main
from medssl.config import ConfigError, CurateConfig, IngestConfig
from medssl.curate import curate
from medssl.curate.near import decide
from medssl.curate.phash import phash
from medssl.ingest import ingest
from medssl.models.lineage import run_lineage


def _field(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random image in [0, 1]: distinct seeds give hashes ~32 bits apart."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 6))
    from PIL import Image

    return np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((size, size), Image.Resampling.BICUBIC))


def _hu(image: np.ndarray) -> np.ndarray:
    """[0, 1] -> HU inside the hashing window 40/400."""
    return -150.0 + 380.0 * np.clip(image, 0, 1)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An ingested archive with known duplicates:

    - volume.nii.gz (one series, 6 axial slices): A, A (identical), A + faint noise (near), B, C, B (near,
      not adjacent);
    - volume2.nii.gz: H, and C again (another series);
    - series 1 (DICOM files of one series): D, E, I;
    - series 2: a copy of D with other file bytes (another series, identical pixels), F;
    - two PNGs: G and G with one pixel changed (other file bytes, near-identical).
    (NIfTI slices reach the shards reoriented, so C is copied between volumes, not to a DICOM file.)
    """
    import nibabel as nib
    from PIL import Image
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("curate")
    src = root / "archive"
    src.mkdir()
    rng = np.random.default_rng(1)
    a, b, c, d, e, f, g, h, i = (_field(s) for s in range(9))
    slices = [a, a, a + rng.normal(0, 0.003, a.shape), b, c, b + rng.normal(0, 0.003, b.shape)]
    volume = np.stack([_hu(s) for s in slices], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), src / "volume.nii.gz")
    volume2 = np.stack([_hu(h), _hu(c)], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(volume2, np.eye(4)), src / "volume2.nii.gz")
    s1, s2 = generate_uid(), generate_uid()
    for name, image, series in (("s1a", d, s1), ("s1b", e, s1), ("s1c", i, s1), ("s2a", d, s2), ("s2b", f, s2)):
        write_ct_dicom(src / f"{name}.dcm", _hu(image), SeriesInstanceUID=series, PatientID="PAT-SECRET-42",
                       PatientName="Doe^Jane")
    g8 = np.rint(g * 200 + 20).astype(np.uint8)
    Image.fromarray(g8).save(src / "g.png")
    g8[10, 10] ^= 1
    Image.fromarray(g8).save(src / "g-copy.png")
    shards = root / "shards"
    ingest(IngestConfig(inputs=[src], out=shards, workers=1, files_per_chunk=4, samples_per_shard=3,
                        nifti_modality="CT"),
           show_progress=False)
    return root, shards


def _keys_by_source(shards) -> dict[str, list[str]]:
    """source file name -> its sample keys, in frame order (from the input manifest)."""
    from helpers import manifest

    return {r["path"].rsplit("/", 1)[-1]: sorted(r["samples"]) for r in manifest(shards) if r.get("samples")}


@pytest.fixture(scope="module")
def curated(archive):
    root, shards = archive
    out = root / "curated"
    report = curate(CurateConfig(shards=[shards], out=out, threshold=4), show_progress=False)
    return out, report


def test_near_slices_of_a_series_and_archive_copies_go_distinct_ones_stay(archive, curated):
    _, shards = archive
    out, report = curated
    keys = _keys_by_source(shards)
    vol = keys["volume.nii.gz"]
    drops = {r["key"]: r for r in map(json.loads, (out / "drops.jsonl").read_text().splitlines())}
    kept = set(shard_samples(out))
    # The volume: slice 1 repeats slice 0 exactly, slice 2 nearly; slice 5 repeats slice 3 (not adjacent).
    assert [k in kept for k in vol[:4] + vol[5:]] == [True, False, False, True, False]
    assert drops[vol[1]]["reason"] == "series_identical" and drops[vol[1]]["kept"] == vol[0]
    assert drops[vol[2]]["reason"] in ("series_identical", "series_near") and drops[vol[2]]["kept"] == vol[0]
    assert drops[vol[5]]["kept"] == vol[3]
    # Across the archive: one of the two copies of D goes (series order decides which), one of the two
    # copies of C, one of the two PNGs.
    d_copies = keys["s1a.dcm"] + keys["s2a.dcm"]
    assert sum(k in kept for k in d_copies) == 1
    assert drops[next(k for k in d_copies if k not in kept)]["reason"] == "archive_identical"
    assert sum(k in kept for k in (vol[4], keys["volume2.nii.gz"][1])) == 1
    assert sum(k in kept for k in keys["g.png"] + keys["g-copy.png"]) == 1
    # Distinct images all stay.
    assert all(k in kept for name in ("s1b.dcm", "s1c.dcm", "s2b.dcm") for k in keys[name])
    assert keys["volume2.nii.gz"][0] in kept
    assert report["by_reason"]["series_identical"] + report["by_reason"]["series_near"] == 3
    assert report["by_reason"]["archive_identical"] + report["by_reason"]["archive_near"] == 3


def test_every_sample_is_accounted_for(archive, curated):
    _, shards = archive
    out, report = curated
    read = set(shard_samples(shards))
    kept = shard_samples(out)
    dropped = [json.loads(line)["key"] for line in (out / "drops.jsonl").read_text().splitlines()]
    assert report["read"] == len(read) == 15
    assert report["kept"] + report["dropped"] == report["read"]
    assert sum(report["by_reason"].values()) == report["dropped"] == len(dropped) == len(set(dropped))
    assert set(kept) | set(dropped) == read and not set(kept) & set(dropped)
    assert json.loads((out / "index.json").read_text())["samples"] == len(kept) == report["kept"]
    assert sum(m["read"] for m in report["by_modality"].values()) == report["read"]
    assert sum(m["samples"] for m in report["by_modality"].values()) == report["kept"]
    # Kept samples are copied byte for byte (pixels and metadata).
    originals = shard_samples(shards)
    assert all(kept[k] == originals[k] for k in kept)
    # The curated folder is a dataset like an ingest output: its manifest states what pretraining saw.
    assert run_lineage([out], report["kept"]).images == report["kept"]


def test_report_counts_series_and_holds_no_identifier(archive, curated):
    root, shards = archive
    out, report = curated
    s = report["series"]
    assert s["total"] == 6 and s["multi_slice"] == 4      # 2 volumes, DICOM series 1 and 2; two PNG files
    # The volume (3 or 4 slices), one D series, one PNG, and volume2 if it gave up its C.
    volume_kept_c = any(r["reason"].startswith("archive") and r["kept"] in _keys_by_source(shards)["volume.nii.gz"]
                        for r in map(json.loads, (out / "drops.jsonl").read_text().splitlines()))
    assert s["lost_slices"] == 3 + volume_kept_c
    assert s["by_slices_lost"] == {"1": 2 + volume_kept_c, "2-4": 1, "5-9": 0, "10-49": 0, "50+": 0}
    assert s["lost_all"] == 1                             # a PNG, copy of the other
    text = (out / "report.json").read_text() + (out / "report.md").read_text()
    samples = shard_samples(shards)
    secrets = ["PAT-SECRET-42", "Doe", "volume", ".dcm", ".png", str(root)]
    secrets += [k for k in samples] + [k.split("-")[0] for k in samples]
    secrets += [v for _, meta in samples.values() for v in meta.get("linkage", {}).values()]
    secrets += [meta["source"]["sha256"] for _, meta in samples.values()]
    assert not [x for x in secrets if x in text]


def test_rerun_is_safe_and_an_interrupted_run_finishes_the_same(archive, curated, tmp_path):
    _, shards = archive
    out, report = curated
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert curate(CurateConfig(shards=[shards], out=out, threshold=4), show_progress=False) == report
    # Interrupted after a shard was written: the index, the report and other shards are missing.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "work").mkdir()
    for name in ("curate.json",):
        (cut / name).write_bytes((out / name).read_bytes())
    for name in ("hashes.npz", "keys.bin"):
        (cut / "work" / name).write_bytes((out / "work" / name).read_bytes())
    (cut / "shards").mkdir()
    first = sorted(before)[0]
    (cut / "shards" / first).write_bytes(before[first])
    (cut / "shards" / "stale.tar.123.tmp").write_bytes(b"partial")
    again = curate(CurateConfig(shards=[shards], out=cut, threshold=4), show_progress=False)
    assert {p.name: p.read_bytes() for p in (cut / "shards").iterdir()} == before
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}
    # Other settings on the same folder: refused, not mixed.
    with pytest.raises(ConfigError, match="other settings"):
        curate(CurateConfig(shards=[shards], out=out, threshold=2), show_progress=False)
    with pytest.raises(ConfigError, match="one of the inputs"):
        curate(CurateConfig(shards=[shards], out=shards), show_progress=False)


def test_threshold_zero_keeps_near_copies_and_the_cli_runs(archive, tmp_path, capsys):
    _, shards = archive
    assert main(["curate", str(shards), "--out", str(tmp_path / "t0"), "--threshold", "0", "--quiet"]) == 0
    report = json.loads((tmp_path / "t0" / "report.json").read_text())
    assert report["by_reason"]["series_near"] == report["by_reason"]["archive_near"] == 0
    assert report["by_reason"]["series_identical"] >= 1 and report["by_reason"]["archive_identical"] >= 1
    assert "kept" in capsys.readouterr().out
    assert main(["curate", str(shards), "--out", str(tmp_path / "x"), "--threshold", "12"]) == 2


def test_hash_sees_likeness():
    a, b = _field(0, 128), _field(1, 128)
    ha, hb = phash(a), phash(b)
    assert (ha ^ phash(a + 0.002)).bit_count() <= 2
    assert (ha ^ phash(a.reshape(64, 2, 64, 2).mean(axis=(1, 3)))).bit_count() <= 1   # at half the size
    assert (ha ^ hb).bit_count() > 16


@pytest.mark.parametrize("threshold", [0, 3, 5, 9])
def test_greedy_with_the_band_index_equals_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    centres = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    # Clumps: each centre with copies that have 0-12 random bits flipped.
    hashes = []
    for c in centres.tolist():
        for _ in range(int(rng.integers(1, 8))):
            flips = rng.choice(64, int(rng.integers(0, 13)), replace=False)
            hashes.append(c ^ sum(1 << int(b) for b in flips))
    hashes = np.array(hashes, dtype=np.uint64)
    order = rng.permutation(len(hashes))
    duplicate_of, distance = decide(hashes, order, threshold)
    kept: list[int] = []
    for i in order.tolist():
        near = [(bin(int(hashes[i]) ^ int(hashes[k])).count("1"), k) for k in kept]
        near = [x for x in near if x[0] <= threshold]
        if near:
            assert duplicate_of[i] >= 0 and distance[i] == min(near)[0]
        else:
            assert duplicate_of[i] == -1
            kept.append(i)
    assert 0 < len(kept) < len(hashes)


def test_bench_curates_the_pool_before_pretraining(tmp_path):
    from medssl.demo import generate_demo_archive

    demo = generate_demo_archive(tmp_path / "demo", n_patients=6, size=32)
    config = {"out": str(tmp_path / "bench"),
              "tasks": [{"name": "ct", "csv": str(demo.tasks["ct-hemorrhage"])}],
              "unlabeled": [str(demo.archive)], "ingest": {"workers": 1}, "curate": {"threshold": 4},
              "pretrain": {"max_steps": 1, "batch_size": 8, "workers": 0, "proj_hidden": 16, "proj_dim": 8,
                           "n_prototypes": 4, "warmup_steps": 1, "freeze_prototypes_steps": 1,
                           "augment": {"global_size": 32, "local_size": 16, "n_local": 2}},
              "finetune": {"input_size": 32, "epochs": 1, "batch_size": 8, "bootstrap": 20},
              "arms": [{"name": "scratch", "init": "scratch", "mode": "knn"},
                       {"name": "ssl", "init": "ssl", "mode": "knn"}],
              "label_fractions": [1.0], "seeds": [0], "robustness_fractions": [], "workers": 1}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml"), "--quiet"]) == 0
    out = tmp_path / "bench"
    summary = json.loads((out / "results.json").read_text())
    curated = json.loads((out / "curated" / "report.json").read_text())
    assert summary["pool"]["curated"]["kept"] == curated["kept"] < curated["read"] == summary["pool"]["images"]
    card = json.loads((out / "pretrain" / "model_card.json").read_text())
    assert card["data"]["samples"] == curated["kept"]
    assert summary["runs"]["failed"] == 0


def test_flip_masks_cover_the_radius():
    from medssl.curate.near import _flip_masks

    masks = _flip_masks(16, 2)
    assert len(masks) == len(set(masks)) == 1 + 16 + 120
    assert {bin(m).count("1") for m in masks} == {0, 1, 2}
    assert all(m < 2**16 for m in masks)


def test_a_damaged_input_is_named(archive, tmp_path):
    import shutil

    _, shards = archive
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    index["shards"][0]["samples"] += 1
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{index['shards'][0]['name']} holds .* samples, its index.json lists"):
        curate(CurateConfig(shards=[copy], out=tmp_path / "out"), show_progress=False)
