"""Frozen-encoder protocols (kNN, the pretraining-length curve) and encoders from a user's weights file."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import timm
import torch
from safetensors.torch import save_file

import medssl
from helpers import write_blob_task
from medssl.config import ConfigError, PretrainConfig
from medssl.downstream import finetune, prepare_task
from medssl.downstream.curve import PLOT, checkpoints, probe_curve
from medssl.downstream.probes import knn_probabilities
from medssl.models import create_backbone
from medssl.models.weights import load_backbone_weights
from medssl.train.pretrain import pretrain

PRETRAIN = {"backbone": "resnet18", "batch_size": 4, "proj_hidden": 64, "proj_dim": 32, "n_prototypes": 16,
            "workers": 0, "shuffle_buffer": 8, "warmup_steps": 1, "freeze_prototypes_steps": 1,
            "augment": {"global_size": 32, "local_size": 16, "n_local": 2}}
FAST = {"input_size": 32, "epochs": 2, "batch_size": 8, "bootstrap": 50}


@pytest.fixture(scope="module")
def blob_task(tmp_path_factory):
    return write_blob_task(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    """A timm ResNet-18 as users have them: 3 input channels and an ImageNet classifier, in both file formats."""
    torch.manual_seed(7)
    state = timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=1000).state_dict()
    folder = tmp_path_factory.mktemp("weights")
    save_file(state, folder / "resnet18.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, folder / "resnet18.pth")
    return folder, state


def test_rgb_weights_load_into_the_grey_backbone(rgb_weights):
    folder, state = rgb_weights
    for name in ("resnet18.safetensors", "resnet18.pth"):  # flat, and nested under state_dict with a DDP prefix
        backbone, _ = create_backbone("resnet18")
        counts = load_backbone_weights(backbone, folder / name)
        loaded = backbone.state_dict()
        torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
        torch.testing.assert_close(loaded["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
        assert counts == {"loaded": len(loaded), "left_out": 2}  # fc.weight, fc.bias


def test_weights_that_do_not_fit_or_need_unpickling_are_refused(tmp_path, rgb_weights):
    folder, _ = rgb_weights
    backbone, _ = create_backbone("resnet50")
    with pytest.raises(ConfigError, match="resnet18.safetensors does not fit this backbone"):
        load_backbone_weights(backbone, folder / "resnet18.safetensors")
    torch.save({"weights": Fraction(1, 3)}, tmp_path / "pickled.pt")  # only unpickling could rebuild it
    with pytest.raises(ConfigError, match="pickled.pt cannot be read as a state dict without unpickling"):
        load_backbone_weights(create_backbone("resnet18")[0], tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="missing.pt does not exist"):
        load_backbone_weights(create_backbone("resnet18")[0], tmp_path / "missing.pt")


def test_pretraining_continues_from_a_weights_file(tmp_path, tiny_shards, rgb_weights):
    folder, state = rgb_weights
    init = folder / "resnet18.safetensors"
    run = pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=1, init=str(init), lr=1e-4,
                                  **PRETRAIN), show_progress=False)
    trained = medssl.load_encoder(run).state_dict()["conv1.weight"].flatten()
    start = state["conv1.weight"].sum(1, keepdim=True).flatten()
    random = create_backbone("resnet18")[0].state_dict()["conv1.weight"].flatten()
    # One small step from the given weights: still those weights, not a random start.
    assert torch.nn.functional.cosine_similarity(trained, start, dim=0) > 0.99
    assert torch.nn.functional.cosine_similarity(trained, random, dim=0) < 0.2
    assert json.loads((run / "model_card.json").read_text())["config"]["init"] == str(init)


def test_finetuning_starts_from_a_weights_file(tmp_path, blob_task, rgb_weights):
    folder, state = rgb_weights
    init = folder / "resnet18.pth"
    metrics = finetune(blob_task, init=str(init), mode="linear", probe_lrs=[], out=tmp_path / "lin", **FAST)
    loaded = len(create_backbone("resnet18")[0].state_dict())
    assert metrics["init"] == {"init": str(init), "architecture": "resnet18", "loaded": loaded, "left_out": 2}
    best = torch.load(tmp_path / "lin" / "best.pt", weights_only=True)["model"]
    torch.testing.assert_close(best["backbone.conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    hybrid = finetune(blob_task, init=str(init), mode="hybrid", max_steps=1, out=tmp_path / "hy", **FAST,
                      scratch_ssl={"proj_hidden": 32, "proj_dim": 16, "n_prototypes": 8,
                                   "augment": {"global_size": 32, "local_size": 16, "n_local": 2}})
    assert hybrid["init"]["init"] == str(init) and hybrid["history"][0]["train_ssl_loss"] > 0


def test_knn_votes_are_similarity_weighted_shares():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    targets = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 1.0]])
    probs = knn_probabilities(bank, targets, queries, k=4, temperature=0.07)
    assert probs[0, 0] > 0.99 and probs[1, 0] < 0.01
    assert probs[2, 0] == pytest.approx(0.5, abs=1e-5)  # equidistant: the two classes' weights balance
    # k=1: the single nearest neighbour decides; shares stay in [0, 1] at any temperature.
    nearest = knn_probabilities(bank, targets, queries[:2], k=1, temperature=1e-4)
    assert nearest[:, 0].tolist() == [1.0, 0.0]
    # Multi-class one-hot targets give class probabilities that sum to 1.
    onehot = torch.eye(2)[[0, 0, 1, 1]]
    assert torch.allclose(knn_probabilities(bank, onehot, queries, 3, 0.1).sum(1), torch.ones(3))


def test_knn_mode_trains_nothing_and_reports_validation_and_test(tmp_path, blob_task):
    metrics = finetune(blob_task, init="scratch", mode="knn", knn_k=5, out=tmp_path / "knn", **FAST)
    assert metrics["steps"] == 0 and metrics["knn"] == {"k": 5, "temperature": 0.07}
    assert 0 <= metrics["best_val_auc"] <= 1 and 0 <= metrics["test_auc"] <= 1
    assert not (tmp_path / "knn" / "best.pt").exists() and (tmp_path / "knn" / "test_predictions.csv").is_file()


def test_probe_curve_scores_every_snapshot(tmp_path, tiny_shards, blob_task):
    run = pretrain(PretrainConfig(shards=[tiny_shards], out=tmp_path / "run", max_steps=3, snapshot_every=2,
                                  **PRETRAIN), show_progress=False)
    assert [step for step, _ in checkpoints(run)] == [0, 2, 3]
    snapshot = medssl.load_encoder(run / "snapshots" / "step-000002")
    assert snapshot.model_card["steps"] == 2
    task = prepare_task(blob_task, input_size=32)
    curve = probe_curve(run, task, tmp_path / "probe", [0.5, 1.0], [0], {"epochs": 2, "bootstrap": 50,
                                                                          "probe_lrs": [1e-2]}, show_progress=False)
    points = {(p["step"], p["mode"], p["label_fraction"]) for p in curve["points"]}
    assert points == {(s, m, f) for s in (0, 2, 3) for m in ("knn", "linear") for f in (0.5, 1.0)}
    assert all(0 <= p["test_auc"] <= 1 for p in curve["points"])
    assert (tmp_path / "probe" / PLOT).stat().st_size > 0
    assert not list((tmp_path / "probe").rglob("best.pt"))  # points keep their metrics, not 45-MB classifiers
    # Rerun: the finished points are read back, not trained again.
    again = probe_curve(run, task, tmp_path / "probe", [0.5, 1.0], [0], {"epochs": 2, "bootstrap": 50,
                                                                          "probe_lrs": [1e-2]}, show_progress=False)
    assert again["points"] == curve["points"]
