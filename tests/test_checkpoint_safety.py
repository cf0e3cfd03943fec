"""Checkpoints are data, never code: a crafted checkpoint.pt / best.pt in a folder someone sent runs nothing.

Each loading path (resuming pretraining, hybrid fine-tuning from a run, loading a classifier for
evaluation) is given a pickle whose unpickling would create a marker file; the marker must stay absent
and the command must stop with a one-line error naming the file.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from helpers import write_blob_task
from medssl.cli import main
from medssl.config import PretrainConfig
from medssl.downstream import load_classifier
from medssl.train.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medssl.train.pretrain import pretrain

TINY = {"backbone": "resnet18", "batch_size": 4, "proj_hidden": 64, "proj_dim": 32, "n_prototypes": 16,
        "workers": 0, "shuffle_buffer": 8, "warmup_steps": 1, "freeze_prototypes_steps": 1,
        "augment": {"global_size": 32, "local_size": 16, "n_local": 2}}


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: code from the file runs, and leaves the marker behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path, marker, as_torch_zip=True):
    """A malicious checkpoint shaped like ours (the payload in place of the model weights)."""
    state = {"model": _Payload(marker), "step": 1, "config": {}, "architecture": "resnet18", "feature_dim": 512,
             "outputs": ["x"]}
    if as_torch_zip:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))


def _one_line_error(capsys, path):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert str(path) in err and "older medssl or is not a medssl checkpoint" in err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_shards):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    return pretrain(PretrainConfig(shards=[tiny_shards], out=out, max_steps=1, **TINY), show_progress=False)


def test_our_checkpoints_need_no_unpickling(tiny_run):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tiny_run / "checkpoint.pt") == []
    assert load_checkpoint(tiny_run / "checkpoint.pt")["step"] == 1


def test_rng_states_survive_a_safe_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both keep a cached Gaussian, part of the state
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(3).tolist())

    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert draws() == expected


@pytest.mark.parametrize("as_torch_zip", [True, False], ids=["torch-zip", "raw-pickle"])
def test_resuming_pretraining_runs_no_code(tmp_path, tiny_shards, tiny_run, capsys, as_torch_zip):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    _plant(run / "checkpoint.pt", marker, as_torch_zip)
    sets = [a for k, v in {**TINY, "max_steps": 2}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    code = main(["pretrain", str(tiny_shards), "--out", str(run), "--quiet", *sets])
    assert not marker.exists()
    assert code == 2
    _one_line_error(capsys, run / "checkpoint.pt")


def test_hybrid_finetune_from_a_run_runs_no_code(tmp_path, tiny_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    _plant(run / "checkpoint.pt", marker)
    task = write_blob_task(tmp_path / "task", with_ct=False)
    code = main(["finetune", "--task", str(task), "--init", str(run), "--mode", "hybrid", "--out", str(tmp_path / "ft"),
                 "--quiet", "--set", "input_size=32"])
    assert not marker.exists()
    assert code == 2
    _one_line_error(capsys, run / "checkpoint.pt")


def test_loading_a_classifier_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "best.pt", marker)
    with pytest.raises(CheckpointError, match="older medssl or is not a medssl checkpoint"):
        load_classifier(tmp_path)
    assert not marker.exists()
    code = main(["evaluate", str(tmp_path), "--robustness", "--quiet"])
    assert not marker.exists()
    assert code == 2
    _one_line_error(capsys, tmp_path / "best.pt")


def test_a_damaged_or_foreign_checkpoint_is_named(tmp_path):
    real = tmp_path / "real.pt"
    save_checkpoint(real, {"model": {"w": torch.zeros(3)}, "step": 4})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(real.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pt is truncated or not a medssl checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match=r"real.pt is not a medssl checkpoint of this kind \(no architecture\)"):
        load_checkpoint(real, keys=("model", "architecture"))
