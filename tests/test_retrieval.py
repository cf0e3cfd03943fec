"""Similar-case search: `medssl embed` (keys, shapes, the fine-tuning preprocessing, resume), the index
(a sample finds itself first, exact and HNSW), `medssl search` and the server's API, on a small demo archive
ingested and pretrained for real."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import medssl
from medssl.cli import main
from medssl.config import ConfigError, IngestConfig, PretrainConfig
from medssl.demo import generate_demo_archive
from medssl.downstream.decode import fit_square
from medssl.downstream.images import to_input
from medssl.ingest import ingest
from medssl.retrieval import embed as embed_module
from medssl.retrieval.embed import DEFAULT_CT_WINDOW, embed, embedding_matrix, read_embeddings
from medssl.retrieval.index import SearchIndex, build_index, open_index
from medssl.retrieval.server import make_server
from medssl.shard_format import decode_pixels, read_shard
from medssl.train.pretrain import pretrain

TINY_PRETRAIN = {"max_steps": 2, "batch_size": 8, "workers": 0, "proj_hidden": 32, "proj_dim": 16, "n_prototypes": 8,
                 "warmup_steps": 1, "freeze_prototypes_steps": 1,
                 "augment": {"global_size": 32, "local_size": 16, "n_local": 2}}


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    """A small demo archive (all modalities), its shards (several per dataset), a 2-step pretraining run, and
    the embeddings of every shard sample."""
    root = tmp_path_factory.mktemp("retrieval")
    archive = generate_demo_archive(root / "demo", n_patients=6, size=32).archive
    ingest(IngestConfig(inputs=[archive], out=root / "shards", workers=1, files_per_chunk=16, samples_per_shard=16),
           show_progress=False)
    pretrain(PretrainConfig(shards=[root / "shards"], out=root / "run", **TINY_PRETRAIN), show_progress=False)
    embed([root / "shards"], root / "run", root / "embeddings", batch_size=16, show_progress=False)
    return {"archive": archive, "shards": root / "shards", "run": root / "run", "embeddings": root / "embeddings"}


def _shard_samples(shards: Path) -> dict:
    return {s.key: s for shard in sorted((shards / "shards").glob("*.tar")) for s in read_shard(shard)}


def test_embed_writes_every_sample_keyed_with_the_finetuning_inputs_features(demo):
    table = read_embeddings(demo["embeddings"])
    samples = _shard_samples(demo["shards"])
    index = json.loads((demo["shards"] / "index.json").read_text())
    assert table.num_rows == index["samples"] == len(samples)
    assert len(list((demo["embeddings"] / "parts").glob("*.parquet"))) == len(index["shards"]) > 1
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(samples)
    for row in table.select(["key", "source_sha256", "modality", "frame"]).to_pylist():
        meta = samples[row["key"]].meta
        assert row["source_sha256"] == meta["source"]["sha256"] and row["key"].startswith(row["source_sha256"][:20])
        assert (row["modality"], row["frame"]) == (meta["modality"], meta["source"]["frame"])
    assert {"CT", "MR", "US"} <= set(table.column("modality").to_pylist())

    features = embedding_matrix(table)
    encoder = medssl.load_encoder(demo["run"])
    assert features.shape == (len(samples), encoder.model_card["feature_dim"]) and np.isfinite(features).all()
    # The same input preparation as fine-tuning: fit_square, CT through the window, one channel in [0, 1].
    ct_row = table.column("modality").to_pylist().index("CT")
    sample = samples[keys[ct_row]]
    values = fit_square(decode_pixels(sample.pixels, sample.meta), encoder.model_card["input_size"])
    x = to_input(torch.from_numpy(values)[None], torch.tensor([True]), DEFAULT_CT_WINDOW)
    with torch.no_grad():
        expected = encoder(x)[0].numpy()
    np.testing.assert_allclose(features[ct_row], expected, rtol=1e-4, atol=1e-5)


def test_embed_resumes_after_a_crash_and_skips_finished_parts(demo, tmp_path, monkeypatch):
    real_write = embed_module._write_part
    calls = []

    def crash_on_second_part(path, *args):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_write(path, *args)

    monkeypatch.setattr(embed_module, "_write_part", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        embed([demo["shards"]], demo["run"], tmp_path / "emb", batch_size=16, show_progress=False)
    assert [p.name for p in (tmp_path / "emb" / "parts").iterdir()] == [calls[0]]  # no partial file left
    first = (tmp_path / "emb" / "parts" / calls[0]).stat().st_mtime_ns
    monkeypatch.setattr(embed_module, "_write_part", real_write)

    summary = embed([demo["shards"]], demo["run"], tmp_path / "emb", batch_size=16, show_progress=False)
    parts = len(json.loads((demo["shards"] / "index.json").read_text())["shards"])
    assert (summary.parts_skipped, summary.parts_written) == (1, parts - 1)
    assert (tmp_path / "emb" / "parts" / calls[0]).stat().st_mtime_ns == first
    resumed, straight = read_embeddings(tmp_path / "emb"), read_embeddings(demo["embeddings"])
    assert resumed.column("key").to_pylist() == straight.column("key").to_pylist()
    np.testing.assert_allclose(embedding_matrix(resumed), embedding_matrix(straight), rtol=1e-5, atol=1e-6)

    again = embed([demo["shards"]], demo["run"], tmp_path / "emb", batch_size=16, show_progress=False)
    assert (again.parts_skipped, again.parts_written, again.rows) == (parts, 0, 0)


def test_embed_refuses_a_folder_of_other_embeddings(demo, tmp_path):
    with pytest.raises(ConfigError, match="ct_window differ"):
        embed([demo["shards"]], demo["run"], demo["embeddings"], ct_window=(40.0, 80.0), show_progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        embed([demo["shards"]], demo["run"], tmp_path, show_progress=False)


def test_embed_of_image_files_matches_the_ingested_keys_and_names_rejected_files(demo, tmp_path):
    dicoms = sorted(demo["archive"].rglob("*.dcm"))[:3]
    (tmp_path / "notes.txt").write_text("not an image")
    summary = embed([*dicoms, tmp_path / "notes.txt"], demo["run"], tmp_path / "emb", show_progress=False)
    assert summary.rows == 3
    rejected = [(Path(r["path"]).name, r["reason"].split(":")[0]) for r in summary.rejected]
    assert rejected == [("notes.txt", "not_an_image")]
    table = read_embeddings(tmp_path / "emb")
    shard_keys = set(_shard_samples(demo["shards"]))
    assert set(table.column("key").to_pylist()) <= shard_keys   # same key as ingest gave the same file
    assert table.column("path").to_pylist() == [str(p.resolve()) for p in dicoms]


def _nearest_other(folder: Path) -> np.ndarray:
    """Each sample's cosine distance to its nearest other sample (float64)."""
    f = embedding_matrix(read_embeddings(folder)).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    d = 1.0 - f @ f.T
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def isolated_row(folder: Path) -> int:
    """The sample whose nearest other sample is farthest: the demo's 2-step encoder maps many images to
    nearly the same direction, and ties at distance 0 have no defined order."""
    return int(_nearest_other(folder).argmax())


def isolated_file(demo: dict) -> Path:
    """The single-image DICOM file of the archive whose sample is farthest from all others."""
    table = read_embeddings(demo["embeddings"], ["source_sha256"])
    hashes = table.column("source_sha256").to_pylist()
    nearest = _nearest_other(demo["embeddings"])
    single = {h: nearest[i] for i, h in enumerate(hashes) if hashes.count(h) == 1}
    files = {hashlib.sha256(f.read_bytes()).hexdigest(): f for f in demo["archive"].rglob("*.dcm")}
    return files[max((h for h in single if h in files), key=single.get)]


def _synthetic_embeddings(folder: Path, rows: int = 600, dim: int = 32) -> np.ndarray:
    """An embeddings folder of distinct random vectors in the format of `medssl embed` (two parts)."""
    vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    (folder / "parts").mkdir(parents=True)
    (folder / "embeddings.json").write_text(json.dumps({"encoder": {"feature_dim": dim}, "ct_window": [40, 400]}))
    for part, chunk in enumerate(np.array_split(np.arange(rows), 2)):
        table = pa.table({"key": [f"k{i}" for i in chunk], "source_sha256": [f"{i:064x}" for i in chunk],
                          "modality": ["CT"] * len(chunk), "frame": pa.array([0] * len(chunk), pa.int32()),
                          "shard": pa.array([None] * len(chunk), pa.string()),
                          "offset": pa.array([None] * len(chunk), pa.int64()),
                          "path": pa.array([None] * len(chunk), pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors[chunk].ravel()), dim)})
        pq.write_table(table, folder / "parts" / f"part-{part}.parquet")
    return vectors


@pytest.mark.parametrize("exact_below", [10**9, 0], ids=["exact", "hnsw"])
def test_every_vector_finds_itself_first(tmp_path, exact_below):
    vectors = _synthetic_embeddings(tmp_path)
    build_index(tmp_path, exact_below=exact_below)
    index = SearchIndex(tmp_path)
    assert index.record["kind"] == ("exact" if exact_below else "hnsw") and index.count == len(vectors)
    for row in range(index.count):
        found = index.search(vectors[row] * 3.0, k=5)  # any scale: cosine
        assert found[0][0] == row and found[0][1] < 1e-5, (row, found)
        assert len(found) == 5 and [d for _, d in found] == sorted(d for _, d in found) and found[1][1] > 1e-3
    assert index.find_key("k7") == 7 and index.find_key("missing") is None
    np.testing.assert_allclose(index.vector(7), vectors[7] / np.linalg.norm(vectors[7]), rtol=1e-5)


def test_an_index_is_rebuilt_when_the_folder_gains_parts(demo, tmp_path):
    folder = tmp_path / "emb"
    (folder / "parts").mkdir(parents=True)
    (folder / "embeddings.json").symlink_to(demo["embeddings"] / "embeddings.json")
    parts = sorted((demo["embeddings"] / "parts").glob("*.parquet"))
    (folder / "parts" / parts[0].name).symlink_to(parts[0])
    assert open_index(folder, log=lambda m: None).count == pq.read_metadata(parts[0]).num_rows
    (folder / "parts" / parts[1].name).symlink_to(parts[1])
    messages = []
    assert open_index(folder, log=messages.append).count == sum(pq.read_metadata(p).num_rows for p in parts[:2])
    assert messages and "building" in messages[0]


def test_search_command_by_key_and_by_image_file(demo, capsys):
    table = read_embeddings(demo["embeddings"], ["key", "modality"])
    row = isolated_row(demo["embeddings"])
    key = table.column("key")[row].as_py()
    assert main(["search", "--index", str(demo["embeddings"]), "--key", key, "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("query: ") and key in lines[0] and len(lines) == 5  # query, header, 3 neighbours
    assert not any(key in line for line in lines[2:])  # the query is not its own neighbour
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "3"]

    # An archive file finds its own ingested slice: the same pixels through the readers, not the shard.
    dicom = isolated_file(demo)
    assert main(["search", "--index", str(demo["embeddings"]), "--image", str(dicom), "-k", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[2]
    assert hashlib.sha256(dicom.read_bytes()).hexdigest()[:20] in first and float(first.split()[1]) < 1e-3
    assert main(["search", "--index", str(demo["embeddings"]), "--key", "nope"]) == 1
    assert "no sample with key 'nope'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(demo):
    srv = make_server(open_index(demo["embeddings"], log=lambda m: None), port=0, max_upload_mb=0.05, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _call(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    method = "POST" if data is not None else "GET"
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_server_answers_searches_uploads_and_thumbnails(server, demo):
    status, body = _call(f"{server}/api/samples?start=0&count=5&modality=CT")
    page = json.loads(body)
    assert status == 200 and len(page["rows"]) == 5 and {r["modality"] for r in page["rows"]} == {"CT"}
    row = isolated_row(demo["embeddings"])
    status, body = _call(f"{server}/api/search?row={row}&k=4")
    result = json.loads(body)
    assert status == 200 and len(result["neighbours"]) == 4
    nearest = result["neighbours"][0]
    assert nearest["row"] == result["query"]["row"] == row and nearest["distance"] < 1e-5
    status, thumbnail = _call(f"{server}{result['neighbours'][1]['thumbnail']}")
    image = Image.open(io.BytesIO(thumbnail))
    assert status == 200 and max(image.size) == 128 and np.asarray(image).std() > 5  # an image, not a blank

    dicom = min(demo["archive"].rglob("*.dcm"))
    status, body = _call(f"{server}/api/search?k=3", data=dicom.read_bytes())
    result = json.loads(body)
    assert status == 200, body
    assert result["query"]["thumbnail"].startswith("data:image/png;base64,")
    assert result["neighbours"][0]["distance"] < 1e-3


@pytest.mark.parametrize("data, status, message", [
    (b"plain text, not an image", 422, "could not be read as an image (not_an_image)"),
    (b"", 400, "the upload is empty"),
    (b"\0" * 60_000, 413, "the limit is 0.05 MB"),
])
def test_server_says_what_is_wrong_with_an_upload(server, data, status, message):
    got, body = _call(f"{server}/api/search", data=data)
    assert got == status and message in json.loads(body)["error"]


def test_server_refuses_other_hosts_and_unknown_rows(server):
    status, body = _call(f"{server}/api/info", headers={"Host": "evil.example:80"})
    assert status == 403 and "localhost only" in json.loads(body)["error"]
    assert _call(f"{server}/api/search?row=999999")[0] == 404
    assert _call(f"{server}/thumb/../../etc/passwd.png")[0] == 404
    assert _call(f"{server}/api/search?row=x")[0] == 400


def test_search_names_source_files_leaves_out_the_query_and_folds_copies(tmp_path, pydicom_test_files, capsys):
    """Results named only content hashes; the query itself took rank 1 or 2 (ties at distance 0); copies of
    one image in several encodings took a rank each."""
    import shutil

    import pydicom
    from pydicom.uid import RLELossless

    src = tmp_path / "in"
    src.mkdir()
    for name in ("MR_small.dcm", "CT_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg.dcm", "liver_1frame.dcm"):
        shutil.copy(pydicom_test_files / name, src / name)
    for name, syntax in (("ct_rle.dcm", RLELossless), ("ct_copy2.dcm", RLELossless)):
        ds = pydicom.dcmread(pydicom_test_files / "CT_small.dcm")
        ds.compress(syntax)
        if name == "ct_copy2.dcm":
            ds.SeriesDescription = "another export"  # another file, the same pixels
        ds.save_as(src / name)
    ingest(IngestConfig(inputs=[src], out=tmp_path / "shards", workers=1), show_progress=False)
    pretrain(PretrainConfig(shards=[tmp_path / "shards"], out=tmp_path / "run", **{**TINY_PRETRAIN, "batch_size": 4}),
             show_progress=False)
    embed([tmp_path / "shards"], tmp_path / "run", tmp_path / "emb", batch_size=8, show_progress=False)
    rows = read_embeddings(tmp_path / "emb").to_pylist()
    key = next(r["key"] for r in rows if r["path"].endswith("CT_small.dcm"))
    assert main(["search", "--index", str(tmp_path / "emb"), "--key", key, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("query: ") and "CT_small.dcm" in out[0]
    ranked = [line for line in out[2:] if line.split()[0].isdigit()]
    assert not any("CT_small.dcm" in line for line in ranked)       # the query itself is left out
    # The two re-encoded copies hold the query's pixels: one neighbour at distance 0, the other folded into it
    # (a 2-step encoder puts other images near 0 too, so their order among ties is not asserted).
    copies = [line for line in ranked if "ct_rle.dcm" in line or "ct_copy2.dcm" in line]
    folded = [line for line in out if "same image:" in line]
    assert len(copies) == 1 and "0.0000" in copies[0] and len(folded) == 1
    assert ("ct_rle.dcm" in folded[0]) != ("ct_rle.dcm" in copies[0])
    assert len(ranked) == 3
