"""Pretraining: a tiny run end to end, the encoder in one call, exact resume after SIGKILL, NaN guard."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import medssl
from medssl.config import PretrainConfig
from medssl.train.checkpoint import load_checkpoint
from medssl.train.pretrain import TrainingDiverged, pretrain

TINY = {"backbone": "resnet18", "batch_size": 4, "proj_hidden": 64, "proj_dim": 32, "n_prototypes": 16,
        "workers": 0, "log_every": 1, "shuffle_buffer": 8, "warmup_steps": 2, "freeze_prototypes_steps": 1,
        "augment": {"global_size": 32, "local_size": 16, "n_local": 2}}


def test_tiny_run_writes_a_loadable_encoder(tmp_path, tiny_shards):
    run = pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=3, **TINY), show_progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] > 0 and "swav" in m and "infonce" in m for m in metrics)
    assert any((run / "tensorboard").iterdir())
    encoder = medssl.load_encoder(run)
    card = encoder.model_card
    assert card["architecture"] == "resnet18" and card["in_chans"] == 1 and card["steps"] == 3
    assert card["data"]["samples"] == 40 and set(card["data"]["by_modality"]) == {"CT", "OT"}
    with torch.no_grad():
        features = encoder(torch.rand(2, 1, 32, 32))
    assert features.shape == (2, card["feature_dim"]) and torch.isfinite(features).all()


def test_feature_queue_is_checkpointed_and_resumed(tmp_path, tiny_shards):
    """With a queue the checkpoint holds its features and fill level, and a resumed run continues with them."""
    settings = {**TINY, "queue_length": 8}  # batch 4 x 2 global views: full after 2 steps
    pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=3, **settings), show_progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loss"][0]
    extra = next(v for k, v in state.items() if k.endswith("_extra_state"))
    assert extra == {"filled": 8}
    assert next(v for k, v in state.items() if k.endswith("features")).abs().sum() > 0
    pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=5, **settings), show_progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def _command(shards, out, steps, precision="auto"):
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    sets += [f"max_steps={steps}", "checkpoint_every=1", "deterministic=true", "workers=1", f"precision={precision}"]
    return [sys.executable, "-m", "medssl.cli", "pretrain", str(shards), "--out", str(out), "--quiet",
            *[a for s in sets for a in ("--set", s)]]


@pytest.mark.slow  # ~20 s each: three pretraining processes
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_resume_equals_uninterrupted(tmp_path, tiny_shards, precision):
    """Both precisions the default can resolve to (bf16 on CPUs with native bf16, see medssl.train.precision).
    The tiny crops give ResNet's last stage 1x1 inputs, the shape of the oneDNN bf16 fault that made bf16
    runs irreproducible before the guard."""
    steps = 8
    subprocess.run(_command(tiny_shards, tmp_path / "straight", steps, precision), check=True, capture_output=True)

    proc = subprocess.Popen(_command(tiny_shards, tmp_path / "killed", steps, precision), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"]
    assert 1 <= done < steps, "the run was not interrupted mid-way"
    resumed = subprocess.run(_command(tiny_shards, tmp_path / "killed", steps, precision), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # Every step is logged once (what was logged after the checkpoint is dropped), with the same loss.
    def losses(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"]) for m in lines]

    assert losses("killed") == losses("straight")
    a = load_file(str(tmp_path / "straight" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "killed" / "encoder.safetensors"))
    assert a.keys() == b.keys()
    # Bit-exact, in either precision, with deterministic kernels on one machine.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_non_finite_losses_are_skipped_then_stop(tmp_path, tiny_shards, monkeypatch):
    from medssl.ssl import HybridLoss

    real = HybridLoss.forward

    def poisoned(self, *args, **kwargs):
        total, parts = real(self, *args, **kwargs)
        return total * float("nan"), parts

    monkeypatch.setattr(HybridLoss, "forward", poisoned)
    cfg = PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=10, max_bad_steps=3, **TINY)
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite"):
        pretrain(cfg, show_progress=False)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["consecutive"] for e in events] == [1, 2, 3]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, tiny_shards):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = _command(tiny_shards, tmp_path / "ddp", 3)
    cmd = torchrun + cmd[1:]  # "-m medssl.cli pretrain ..."
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / "model_card.json").read_text())
    assert card["steps"] == 3
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["data"]["world_size"] == 2


def _nan_at_call(monkeypatch, bad_calls):
    """The model's outputs are NaN on the given forward calls (1-based): a batch that blows up."""
    from medssl.models.ssl_model import SSLModel

    real, calls = SSLModel.forward, []

    def forward(self, crops):
        calls.append(1)
        embeddings, scores = real(self, crops)
        if len(calls) in bad_calls:
            return [e * float("nan") for e in embeddings], [s * float("nan") for s in scores]
        return embeddings, scores

    monkeypatch.setattr(SSLModel, "forward", forward)


def _record_batches(monkeypatch):
    """(stream epoch, sample keys) of every batch the loop draws."""
    from medssl.data.stream import ShardLoader

    real, seen = ShardLoader.__iter__, []

    def iterate(self):
        for batch in real(self):
            seen.append((self.stream.epoch, tuple(batch["key"])))
            yield batch

    monkeypatch.setattr(ShardLoader, "__iter__", iterate)
    return seen


def _log(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_skipped_batch_does_not_poison_the_feature_queue(tmp_path, tiny_shards, monkeypatch):
    """The bad batch's NaN features must not enter the queue: the queue (full after 4 steps) would make
    every later code NaN and the run would stop after max_bad_steps."""
    _nan_at_call(monkeypatch, {6})
    cfg = PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=9, max_bad_steps=3,
                         **{**TINY, "queue_length": 16})
    pretrain(cfg, show_progress=False)
    log = _log(tmp_path / "run")
    assert [e["consecutive"] for e in log if "event" in e] == [1]
    assert [m["step"] for m in log if "loss" in m] == list(range(1, 10))
    assert all(math.isfinite(m["loss"]) for m in log if "loss" in m)
    queue = next(v for k, v in load_checkpoint(tmp_path / "run" / "checkpoint.pt")["loss"][0].items()
                 if k.endswith("features"))
    assert torch.isfinite(queue).all()


def test_a_skipped_batch_does_not_replay_the_epoch(tmp_path, tiny_shards, monkeypatch):
    """40 samples in batches of 4: 10 batches per epoch. One skipped batch must not make the loop go back
    to the start of epoch 0 (same samples, same crops) once epoch 0 is used up."""
    _nan_at_call(monkeypatch, {2})
    seen = _record_batches(monkeypatch)
    pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=12, **TINY), show_progress=False)
    assert len(seen) == 13  # 12 steps and the skipped batch
    assert [epoch for epoch, _ in seen] == [0] * 10 + [1] * 3
    assert sorted(k for _, keys in seen[:10] for k in keys) == sorted({k for _, keys in seen[:10] for k in keys})
    assert seen[10][1] != seen[0][1]


def test_resume_after_a_skipped_batch_continues_the_data_where_it_stopped(tmp_path, tiny_shards, monkeypatch):
    """Interrupted after epoch 0 ran out (with one batch skipped) and resumed, a run draws the batches an
    uninterrupted one draws."""
    _nan_at_call(monkeypatch, {2})
    straight = _record_batches(monkeypatch)
    pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "a", max_steps=12, **TINY), show_progress=False)

    monkeypatch.undo()
    _nan_at_call(monkeypatch, {2})
    resumed = _record_batches(monkeypatch)
    pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "b", max_steps=10, **TINY), show_progress=False)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["step"] == 10 and ckpt["data"]["epoch"] == 1 and ckpt["data"]["consumed"] == 4
    pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "b", max_steps=12, **TINY), show_progress=False)
    assert resumed == straight


def test_resume_drops_the_log_written_after_the_checkpoint(tmp_path, tiny_shards, monkeypatch):
    """Killed after steps 3 and 4 were logged but only step 2 checkpointed, the resumed run logs 3 and 4
    again: metrics.jsonl and TensorBoard must each hold every step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import medssl.train.pretrain as loop

    real, saves = loop.save_checkpoint, []

    def save_then_die(path, state):
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # the process dies before its second checkpoint is written
        real(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    settings = {**TINY, "checkpoint_every": 2}
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=6, **settings),
                 show_progress=False)
    assert [m["step"] for m in _log(tmp_path / "run")] == [1, 2, 3, 4]
    monkeypatch.undo()
    pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=6, **settings), show_progress=False)
    assert [m["step"] for m in _log(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("pretrain/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_queue_that_cannot_be_split_over_the_processes_is_a_config_error(tmp_path, tiny_shards, monkeypatch):
    import medssl.train.pretrain as loop
    from medssl.config import ConfigError
    from medssl.distributed import DistInfo

    monkeypatch.setattr(loop, "init_distributed", lambda device: DistInfo(0, 3, 0, torch.device("cpu")))
    cfg = PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=1, **{**TINY, "queue_length": 8})
    with pytest.raises(ConfigError, match="queue_length 8 .* 3 processes"):
        pretrain(cfg, show_progress=False)


def test_a_queue_without_the_swav_term_is_a_config_error():
    with pytest.raises(ValueError, match="queue_length"):
        PretrainConfig(queue_length=8, w_cluster=0)


def test_pretraining_lowers_the_loss_on_real_images(tmp_path, shared_data):
    """30 steps on 64 real head-CT images (../shared/data) with a fixed seed: the SwAV + InfoNCE loss of the
    last five steps is well below that of the first five (measured 9.05 -> 6.86)."""
    import shutil

    from medssl.config import IngestConfig
    from medssl.ingest import ingest

    src = tmp_path / "in"
    src.mkdir()
    for path in sorted((shared_data / "head-ct-hemorrhage" / "images").iterdir())[:64]:
        shutil.copy(path, src / path.name)
    ingest(IngestConfig(inputs=[src], out=tmp_path / "shards", workers=1, max_side=64), show_progress=False)
    settings = {**TINY, "batch_size": 16, "n_prototypes": 16, "shuffle_buffer": 64, "freeze_prototypes_steps": 2,
                "lr": 4.8, "seed": 0}  # lr for a global batch of 256: 0.3 at 16
    run = pretrain(PretrainConfig(shards=[tmp_path / "shards"], out=tmp_path / "run", max_steps=30, **settings),
                   show_progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
