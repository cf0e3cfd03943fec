"""Pretraining: a tiny run end to end, the encoder in one call, exact resume after SIGKILL, NaN guard."""

from __future__ import annotations

import json
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


def _command(shards, out, steps):
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    sets += [f"max_steps={steps}", "checkpoint_every=1", "deterministic=true", "workers=1"]
    return [sys.executable, "-m", "medssl.cli", "pretrain", str(shards), "--out", str(out), "--quiet",
            *[a for s in sets for a in ("--set", s)]]


def test_sigkill_resume_equals_uninterrupted(tmp_path, tiny_shards):
    steps = 8
    subprocess.run(_command(tiny_shards, tmp_path / "straight", steps), check=True, capture_output=True)

    proc = subprocess.Popen(_command(tiny_shards, tmp_path / "killed", steps), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"]
    assert 1 <= done < steps, "the run was not interrupted mid-way"
    resumed = subprocess.run(_command(tiny_shards, tmp_path / "killed", steps), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    # Every step's logged loss is the same (a resumed step logs again: later lines win).
    def losses(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m["loss"] for m in lines}

    assert losses("killed") == losses("straight")
    a = load_file(str(tmp_path / "straight" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "killed" / "encoder.safetensors"))
    assert a.keys() == b.keys()
    # Bit-exact: fp32 (the CPU default) with deterministic kernels on one machine.
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
