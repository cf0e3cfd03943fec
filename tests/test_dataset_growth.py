"""A dataset at archive scale: a streamed listing in a fixed order, a plan in parts that resumes mid-listing,
duplicates resolved the same way whatever order units finish in, and incremental ingest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from helpers import manifest, shard_samples, write_ct_dicom
from medssl.config import IngestConfig
from medssl.data.stream import ShardStream, list_shards
from medssl.ingest import ingest
from medssl.ingest.listing import Entry, entry_key, scan, unseen
from medssl.ingest.plan import load_unit, open_plan, planned_units, unit_path


def _tree(root):
    """Files and folders whose names sort differently as strings and as path components."""
    for rel in ["a.dcm", "a/x", "a/y/z", "a-b/q", "b", "a/y.dcm", "c/d/e/f", "c/d/e.dcm", "é/n"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode())
    (root / "empty").mkdir()


def test_listing_is_sorted_by_path_components_and_resumes_after_any_entry(tmp_path):
    _tree(tmp_path / "in")
    full = list(scan([tmp_path / "in"], tmp_path / "out"))
    keys = [entry_key(e.root, e.rel) for e in full]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == 9
    # a folder before its siblings "a-b", "a.dcm"
    assert [e.rel for e in full][:4] == ["a/x", "a/y/z", "a/y.dcm", "a-b/q"]
    for k in range(len(full)):
        assert list(scan([tmp_path / "in"], tmp_path / "out", after=keys[k])) == full[k + 1:]


def test_unseen_merges_listings_in_constant_memory():
    def listing(rels):
        return [Entry(0, r, None) for r in sorted(rels, key=lambda r: entry_key(0, r))]

    new = listing(["a/1", "a/2", "b/1", "c", "d/9"])
    seen = [iter(listing(["a/1", "c"])), iter(listing(["b/1", "z"]))]
    assert [e.rel for e in unseen(new, seen)] == ["a/2", "d/9"]


def _archive(folder, n, start=0, series=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        (folder / f"s{i % series}").mkdir(exist_ok=True)
        write_ct_dicom(folder / f"s{i % series}" / f"img{i:03d}.dcm", rng.normal(40, 20, (16, 16)),
                       SeriesInstanceUID=f"1.2.3.{i % series}")


def _cfg(src, out, **kw):
    return IngestConfig(inputs=[src], out=out, files_per_chunk=3, workers=1, **kw)


def test_an_interrupted_listing_resumes_with_the_same_units(tmp_path):
    _archive(tmp_path / "in", 10)
    reference, out = tmp_path / "ref", tmp_path / "out"
    cfg = _cfg(tmp_path / "in", reference, mix_units=2)  # blocks of 2 units x 3 files
    plan, _ = open_plan(cfg, reference, b"salt")
    expected = [(u.chunk, u.indexes, u.entries) for u in planned_units(plan, reference)]
    assert [e[1] for e in expected] == [[0, 2, 4], [1, 3, 5], [6, 8], [7, 9]]  # dealt within each block
    assert all(any(e.rel.startswith("s0/") for e in u[2]) for u in expected[:2])  # a series spreads over units

    cfg = cfg.model_copy(update={"out": out})
    plan, _ = open_plan(cfg, out, b"salt")
    units = planned_units(plan, out)
    next(units), next(units)  # the run dies after the first block's units were handed out
    units.close()
    assert unit_path(out, 1).exists() and not unit_path(out, 2).exists()
    # ... and while saving the second block (unit 2 saved, unit 3 not): that block is planned again
    (out / "plan" / "chunk-000002.json").write_bytes((reference / "plan" / "chunk-000002.json").read_bytes())

    plan, mode = open_plan(cfg, out, b"salt")
    assert mode == "resume" and plan.current.chunks is None
    assert [(u.chunk, u.indexes, u.entries) for u in planned_units(plan, out)] == expected
    assert plan.current.chunks == 4 and plan.current.files == 10
    assert load_unit(out, 3).entries == expected[3][2]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_duplicates_across_units_do_not_depend_on_which_unit_finishes_first(tmp_path):
    src = tmp_path / "in"
    _archive(src, 6)
    shutil.copy(src / "s1" / "img001.dcm", src / "s3" / "copy-of-1.dcm")   # a later unit than the original
    shutil.copy(src / "s3" / "img003.dcm", src / "s0" / "a-copy-of-3.dcm")  # an earlier unit than the original
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        report = ingest(IngestConfig(inputs=[src], out=out, files_per_chunk=1, workers=workers),
                        show_progress=False).report
        runs[workers] = out
        if workers == 1:  # units in listing order: the later copy is never decoded, the earlier one always
            assert report["throughput"]["samples_written"] == 6
    rows = {r["path"]: r for r in manifest(runs[1])}
    assert rows["in/s3/copy-of-1.dcm"]["status"] == "duplicate"
    assert rows["in/s3/copy-of-1.dcm"]["reason"] == "duplicate: same content as in/s1/img001.dcm"
    # listed first, so the copy is the original and the file in its own series the duplicate
    assert rows["in/s3/img003.dcm"]["reason"] == "duplicate: same content as in/s0/a-copy-of-3.dcm"
    assert manifest(runs[1]) == manifest(runs[2])
    assert shard_samples(runs[1]) == shard_samples(runs[2])
    assert (runs[1] / "index.json").read_text() == (runs[2] / "index.json").read_text()
    assert len(shard_samples(runs[1])) == 6


def test_a_second_ingest_adds_only_the_new_files(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _archive(src, 20)
    first = ingest(_cfg(src, out), show_progress=False).report
    old_shards = {p.name: _digest(p) for p in (out / "shards").glob("*.tar")}
    assert first["this_run"] == {"mode": "new", "files": 20, "samples": 20,
                                 "bytes_read": first["this_run"]["bytes_read"]}

    _archive(src, 2, start=20)                                         # 10% new files
    shutil.copy(src / "s2" / "img002.dcm", src / "s1" / "resent.dcm")  # an ingested image, sent again
    second = ingest(_cfg(src, out), show_progress=False).report
    assert second["this_run"]["mode"] == "add" and second["this_run"]["files"] == 3
    assert second["throughput"]["files_processed"] == 3
    assert second["throughput"]["samples_written"] == 2  # the resent image was hashed, not decoded again
    assert second["files"] == 23 and second["status"] == {"ingested": 22, "duplicate": 1}
    assert {p.name: _digest(p) for p in (out / "shards").glob("*.tar") if p.name in old_shards} == old_shards
    rows = manifest(out)
    assert sorted(r["index"] for r in rows) == list(range(23))
    assert {r["path"] for r in rows if r["index"] >= 20} == {"in/s0/img020.dcm", "in/s1/img021.dcm", "in/s1/resent.dcm"}
    assert rows[[r["path"] for r in rows].index("in/s1/resent.dcm")]["status"] == "duplicate"
    # readers see old and new samples: one pretraining epoch streams all 22 (batches of 2, 1 rank)
    assert sum(s.samples for s in list_shards([out])) == 22 == second["samples"] == len(shard_samples(out))
    streamed = [x["key"] for x in ShardStream(out, batch_size=2, seed=0)]
    assert sorted(streamed) == sorted(shard_samples(out))
    new_keys = {k for r in rows if r["index"] >= 20 and r["status"] == "ingested" for k in r["samples"]}
    assert len(new_keys) == 2 and new_keys <= set(streamed)

    third = ingest(_cfg(src, out), show_progress=False).report  # nothing new: nothing processed
    assert third["this_run"]["files"] == 0 and third["files"] == 23 and third["samples"] == 22


def test_redacted_datasets_keep_no_paths_and_refuse_additions(tmp_path):
    src, out = tmp_path / "Pat_Name", tmp_path / "out"
    _archive(src, 3)
    ingest(_cfg(src, out, redact_paths=True), show_progress=False)
    assert b"Pat_Name" not in (out / "plan" / "dataset.json").read_bytes()
    assert not list((out / "plan").glob("chunk-*.json"))
    try:
        ingest(_cfg(src, out, redact_paths=True), show_progress=False)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        assert "redact-paths" in str(e) and str(out) in str(e)
    else:
        raise AssertionError("adding files to a redacted dataset was not refused")
    assert os.listdir(out / "manifest")


def test_a_seen_content_cache_that_cannot_answer_costs_decodes_not_files(tmp_path):
    from medssl.ingest.dedup import SeenContent

    broken = tmp_path / "seen.sqlite"
    broken.write_bytes(b"not a database" * 100)
    seen = SeenContent(broken, None)
    assert seen.earlier("ab" * 32, 5) is False and seen.earlier("ab" * 32, 6) is False
    seen.close()
    working = SeenContent(tmp_path / "ok.sqlite", None)
    assert working.earlier("cd" * 32, 5) is False and working.earlier("cd" * 32, 6) is True
    assert working.earlier("cd" * 32, 2) is False and working.earlier("cd" * 32, 5) is True
    working.close()


def test_a_unit_keeps_one_copy_of_a_content_even_without_the_cache(tmp_path):
    from medssl.ingest.chunk import ChunkJob, part_path, run_chunk

    _archive(tmp_path / "in", 2)
    first = tmp_path / "in" / "s0" / "img000.dcm"
    shutil.copy(first, tmp_path / "in" / "s0" / "zcopy.dcm")
    files = [(i, str(p), f"in/{p.name}", None) for i, p in enumerate([first, tmp_path / "in" / "s1" / "img001.dcm",
                                                                       tmp_path / "in" / "s0" / "zcopy.dcm"])]
    out = tmp_path / "out"
    job = ChunkJob(0, files, IngestConfig(), str(out), b"salt", "/nonexistent/seen.sqlite", None)  # no cache
    summary = run_chunk(job)
    rows = [json.loads(line) for line in part_path(out, 0).read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ingested", "ingested", "duplicate"]
    assert summary.samples == 2 and len(shard_samples(out)) == 2


def test_files_that_could_not_be_hashed_are_not_duplicates_of_each_other(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a").write_bytes(b"")
    (src / "b").write_bytes(b"")  # two empty files in one unit: each is its own rejection
    report = ingest(_cfg(src, tmp_path / "out"), show_progress=False).report
    assert report["status"] == {"rejected": 2} and report["rejections_by_code"] == {"empty_file": 2}
