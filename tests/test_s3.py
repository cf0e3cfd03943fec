"""Object storage: shards streamed from, and run folders written to, a real S3 server (moto) on 127.0.0.1;
a pretraining run killed with SIGKILL and resumed there ends as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import s3fs
import torch
from safetensors.torch import load

import medssl
from medssl import storage
from medssl.atomic import atomic_open
from medssl.config import IngestConfig
from medssl.data.stream import ShardStream, list_shards
from medssl.ingest import ingest
from medssl.ingest.report import read_manifest
from medssl.shard_format import Sample, read_shard, write_shard
from medssl.train.checkpoint import load_checkpoint
from test_pretrain import TINY


def _dataset_on_s3(local_dataset, url: str) -> str:
    """``medssl ingest`` from object storage into object storage: the archive behind the local dataset
    ``local_dataset`` (tests/conftest.py ``tiny_shards``) is uploaded, then ingested from there to ``url``
    with the same settings."""
    archive = f"{url.rpartition('/')[0]}/archive"
    s3fs.S3FileSystem().put(str(local_dataset.parent / "archive"), archive, recursive=True)
    ingest(IngestConfig(inputs=[archive], out=url, workers=1, files_per_chunk=10, samples_per_shard=10),
           show_progress=False)
    return url


def test_ingest_reads_and_writes_object_storage_and_adds_new_objects(tiny_shards, s3_bucket):
    dataset = _dataset_on_s3(tiny_shards, f"{s3_bucket}/ds")
    report = json.loads(storage.read_text(f"{dataset}/report.json"))
    local = json.loads((tiny_shards / "report.json").read_text())
    assert report["status"] == local["status"] == {"ingested": 40} and report["samples"] == 40
    assert sorted(storage.listdir(f"{dataset}/shards")) == sorted(
        p.name for p in (tiny_shards / "shards").glob("*.tar"))
    rows = sorted(read_manifest(dataset), key=lambda r: r["index"])
    assert [r["path"] for r in rows] == [r["path"]
                                         for r in sorted(read_manifest(tiny_shards), key=lambda r: r["index"])]
    assert report["this_run"]["bytes_read"] == sum(p.stat().st_size for p in (tiny_shards.parent / "archive").iterdir())
    assert storage.exists(f"{dataset}/content.sqlite") and storage.exists(f"{dataset}/ingest.log")
    old = {name: storage.read_bytes(f"{dataset}/shards/{name}") for name in storage.listdir(f"{dataset}/shards")}

    fs = s3fs.S3FileSystem()
    fs.pipe(f"{s3_bucket}/archive/new/late.png", (tiny_shards.parent / "archive" / "xr0.png").read_bytes()[:-1] + b"\0")
    fs.pipe(f"{s3_bucket}/archive/new/resent.png", (tiny_shards.parent / "archive" / "xr2.png").read_bytes())
    again = ingest(IngestConfig(inputs=[f"{s3_bucket}/archive"], out=dataset, workers=1, files_per_chunk=10,
                                samples_per_shard=10), show_progress=False).report
    assert again["this_run"]["files"] == 2 and again["files"] == 42
    assert again["status"]["duplicate"] == 1  # resent.png: same bytes as xr2.png
    assert {name: storage.read_bytes(f"{dataset}/shards/{name}") for name in old} == old


def test_shards_stream_from_s3_as_from_disk(tiny_shards, s3_bucket):
    dataset = _dataset_on_s3(tiny_shards, f"{s3_bucket}/ds")
    remote, local = list_shards([dataset]), list_shards([tiny_shards])
    assert [s.samples for s in remote] == [s.samples for s in local]
    assert all(str(s.path).startswith(f"{dataset}/shards/") for s in remote)
    first = [(s.key, s.pixels) for s in read_shard(remote[0].path)]
    assert first == [(s.key, s.pixels) for s in read_shard(local[0].path)]

    def keys(root):
        return [x["key"] for x in ShardStream(root, batch_size=4, seed=3, shuffle_buffer=8)]

    assert keys(dataset) == keys(tiny_shards)


def test_a_shard_on_s3_streams_in_blocks_not_whole(s3_bucket):
    url, png = f"{s3_bucket}/big.tar", os.urandom(2**20)
    write_shard(url, [Sample(f"k{i:02d}", png, {"i": i}) for i in range(3 * storage.READ_BLOCK // 2**20)])
    with storage.open_read(url) as f:
        first = next(read_shard(f))
        fetched = f.cache.total_requested_bytes
    assert first.key == "k00" and first.pixels == png
    assert fetched <= storage.READ_BLOCK + 2**20 + 4096  # the first sample and one block ahead of it


def test_object_writes_are_whole_or_absent(s3_bucket):
    with pytest.raises(RuntimeError):
        with atomic_open(f"{s3_bucket}/x/failed.bin") as f:
            f.write(b"partial")
            raise RuntimeError("the writer dies mid-way")
    assert not storage.exists(f"{s3_bucket}/x/failed.bin")
    size = write_shard(f"{s3_bucket}/x/shard.tar", [])
    assert storage.read_bytes(f"{s3_bucket}/x/shard.tar") == bytes(size)  # an empty tar: end-of-archive zeros
    assert storage.listdir(f"{s3_bucket}/x") == ["shard.tar"]


def _command(shards: str, out: str, steps: int) -> list[str]:
    # timm's 0.4M-parameter test network: resnet18's ~90 MB checkpoint per step would make the upload the test.
    sets = [f"{k}={json.dumps(v)}" for k, v in {**TINY, "backbone": "test_resnet"}.items()]
    sets += [f"max_steps={steps}", "checkpoint_every=1", "deterministic=true", "workers=1"]
    return [sys.executable, "-m", "medssl.cli", "pretrain", shards, "--out", out, "--quiet",
            *[a for s in sets for a in ("--set", s)]]


# three pretraining processes, as the local test_pretrain.py::test_sigkill_resume_equals_uninterrupted
@pytest.mark.slow
def test_pretrain_on_s3_killed_and_resumed_equals_uninterrupted(tiny_shards, s3_bucket):
    dataset = _dataset_on_s3(tiny_shards, f"{s3_bucket}/ds")
    steps, straight, killed = 8, f"{s3_bucket}/straight", f"{s3_bucket}/killed"
    done = subprocess.run(_command(dataset, straight, steps), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(_command(dataset, killed, steps), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = f"{killed}/metrics.jsonl"  # uploaded just before each checkpoint
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (storage.exists(metrics)
                                               and len(storage.read_text(metrics).splitlines()) >= 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= load_checkpoint(f"{killed}/checkpoint.pt")["step"] < steps, "the run was not interrupted mid-way"
    resumed = subprocess.run(_command(dataset, killed, steps), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def losses(run):
        return [(m["step"], m["loss"]) for m in map(json.loads, storage.read_text(f"{run}/metrics.jsonl").splitlines())]

    assert losses(killed) == losses(straight) and len(losses(straight)) == steps
    a, b = (load(storage.read_bytes(f"{run}/encoder.safetensors")) for run in (straight, killed))
    assert a.keys() == b.keys()
    for k in a:  # bit-exact, as on local disk: fp32 with deterministic kernels on one machine
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    encoder = medssl.load_encoder(killed)
    assert encoder.model_card["steps"] == steps and encoder.model_card["data"]["samples"] == 40
    with torch.no_grad():
        assert encoder(torch.rand(2, 1, 32, 32)).shape == (2, encoder.model_card["feature_dim"])
    assert "tensorboard" not in storage.listdir(killed)  # not written to object storage


def test_finetune_starts_from_a_run_folder_on_s3(tmp_path, tiny_shards, s3_bucket):
    from helpers import write_blob_task
    from medssl.config import PretrainConfig
    from medssl.downstream import finetune
    from medssl.train.pretrain import pretrain
    from test_finetune import FAST, PRETRAIN

    run = f"{s3_bucket}/run"
    pretrain(PretrainConfig(shards=[tiny_shards], out=run, max_steps=2, **PRETRAIN), show_progress=False)
    # hybrid: the encoder and the checkpoint's projection head and prototypes both come from object storage
    metrics = finetune(write_blob_task(tmp_path / "task"), init=run, mode="hybrid", out=tmp_path / "ft", **FAST)
    assert metrics["config"]["init"] == run and metrics["init"]["pretrain_steps"] == 2
    assert 0 <= metrics["test_auc"] <= 1
