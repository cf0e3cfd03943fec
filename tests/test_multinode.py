"""torchrun across nodes: two launchers joined by c10d rendezvous on 127.0.0.1 (two "nodes" on this
machine, gloo) train exactly as one launcher with the same number of processes; and a run resumed
with a different number of processes (or, mid-epoch, DataLoader workers) is refused with a one-line
error (exit 2, like a config error).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from medssl.config import ConfigError, PretrainConfig
from medssl.train.checkpoint import load_checkpoint
from medssl.train.pretrain import pretrain
from test_pretrain import TINY, _command

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pretrain_args(shards, out, steps) -> list[str]:
    """``-m medssl.cli pretrain ...`` of the tiny deterministic run, without DataLoader workers (fewer
    processes on a small CI machine; the rank layout is what is under test)."""
    return _command(shards, out, steps)[1:] + ["--set", "workers=0"]


def _losses(run) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["swav"], r["infonce"]) for r in rows]


@pytest.mark.slow  # ~25 s: two torchrun launches of two nodes
def test_two_nodes_train_like_one_node_with_the_same_processes(tmp_path, tiny_shards):
    steps = 3
    one = subprocess.run([*TORCHRUN, "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
                          *_pretrain_args(tiny_shards, tmp_path / "one", steps)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    # Both launchers name the same endpoint; the first to bind it hosts the c10d store, the other joins.
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "medssl-test",
                  "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--local-addr", "127.0.0.1", "--max-restarts", "0"]
    launchers = [subprocess.Popen([*TORCHRUN, *rendezvous, *_pretrain_args(tiny_shards, tmp_path / "two", steps)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for _ in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in launchers]
    finally:
        for p in launchers:
            p.kill()  # no-op for a launcher that has exited; ends one left waiting if the other failed
    for p, (_, err) in zip(launchers, results):
        assert p.returncode == 0, err[-3000:]

    ckpt = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert ckpt["step"] == steps and ckpt["data"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    # Same ranks, same data, same collectives: the same numbers to the last bit.
    assert _losses(tmp_path / "two") == _losses(tmp_path / "one")
    assert len(_losses(tmp_path / "one")) == steps


def test_resuming_with_another_process_count_or_mid_epoch_layout_is_refused(tmp_path, tiny_shards):
    """A 1-process run resumed by 2 processes: before, rank 1 failed on the checkpoint's single RNG state
    (an IndexError traceback); now every rank stops before training with the same one-line error. Then,
    mid-epoch, another DataLoader worker count (before: the stream's ValueError, a traceback)."""
    run = tmp_path / "run"
    settings = {**TINY, "deterministic": True, "checkpoint_every": 1}
    pretrain(PretrainConfig(shards=[tiny_shards], out=run, max_steps=2, **settings), show_progress=False)
    before = (run / "checkpoint.pt").read_bytes(), (run / "metrics.jsonl").read_text()

    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2",
                           *_pretrain_args(tiny_shards, run, 4)], capture_output=True, text=True, env=ENV, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    assert "processes 1 -> 2" in errors[0] and str(run / "checkpoint.pt") in errors[0]
    assert "relaunch with 1 process" in errors[0]
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary of the failed ranks
    assert ((run / "checkpoint.pt").read_bytes(), (run / "metrics.jsonl").read_text()) == before

    with pytest.raises(ConfigError, match=r"step 2, epoch 0, 8 samples per process into it\) with workers 0 -> 1: "):
        pretrain(PretrainConfig(shards=[tiny_shards], out=run, max_steps=4, **{**settings, "workers": 1}),
                 show_progress=False)


def test_after_the_last_batch_of_an_epoch_the_workers_may_change(tmp_path, tiny_shards):
    """40 samples in batches of 20: a checkpoint at step 2 closes epoch 0, so a resume with another worker
    count starts epoch 1 (before: the stream's ValueError, as the position was not 0)."""
    run, settings = tmp_path / "run", {**TINY, "batch_size": 20}
    pretrain(PretrainConfig(shards=[tiny_shards], out=run, max_steps=2, **settings), show_progress=False)
    assert load_checkpoint(run / "checkpoint.pt")["data"]["consumed"] == 40
    pretrain(PretrainConfig(shards=[tiny_shards], out=run, max_steps=3, **{**settings, "workers": 1}),
             show_progress=False)
    data = load_checkpoint(run / "checkpoint.pt")["data"]
    assert (data["epoch"], data["consumed"], data["num_workers"]) == (1, 20, 1)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
