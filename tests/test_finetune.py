"""Downstream training end to end: every mode from a tiny pretraining run and from scratch, the hybrid loss, the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import medssl
from helpers import write_blob_task
from medssl.cli import main
from medssl.config import ConfigError, FinetuneConfig, PretrainConfig
from medssl.downstream import finetune, load_classifier, prepare_task
from medssl.downstream.images import to_input
from medssl.downstream.metrics import macro_auc
from medssl.downstream.model import build_networks
from medssl.downstream.training import TrainingDiverged
from medssl.train.checkpoint import load_checkpoint
from medssl.train.pretrain import pretrain

PRETRAIN = {"backbone": "resnet18", "batch_size": 4, "proj_hidden": 64, "proj_dim": 32, "n_prototypes": 16,
            "workers": 0, "shuffle_buffer": 8, "warmup_steps": 1, "freeze_prototypes_steps": 1,
            "augment": {"global_size": 32, "local_size": 16, "n_local": 2}}
# Small everything: 32-px inputs, 2 epochs of 3 steps, few bootstrap resamples.
FAST = {"input_size": 32, "epochs": 2, "batch_size": 8, "ssl_batch_size": 4, "bootstrap": 50,
        "scratch_ssl": {"proj_hidden": 32, "proj_dim": 16, "n_prototypes": 8,
                        "augment": {"global_size": 32, "local_size": 16, "n_local": 2}}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_shards):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    return pretrain(PretrainConfig(shards=[tiny_shards], out=out, max_steps=2, **PRETRAIN), show_progress=False)


@pytest.fixture(scope="module")
def blob_task(tmp_path_factory):
    """32 images, half with a bright blob (the label), as PNG and CT DICOM, two per patient group."""
    return write_blob_task(tmp_path_factory.mktemp("blobs"))


def _check_run(out, metrics, mode):
    """metrics.json follows the contract, and the reported test score is what best.pt predicts."""
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["mode"] == mode and metrics["config"]["mode"] == mode
    lo, hi = metrics["test_auc_ci"]
    assert 0 <= lo <= metrics["test_auc"] <= hi <= 1
    assert set(metrics["test_auc_per_label"]) == {"clear"}  # binary: one output, the second class in sorted order
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert all(set(h) >= {"epoch", "step", "train_loss", "val_auc"} for h in history)
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_auc"] <= 1 for h in history)
    assert [h["step"] for h in history] == sorted({h["step"] for h in history})
    best = max(history, key=lambda h: h["val_auc"])
    assert metrics["best_val_auc"] == best["val_auc"] and metrics["best_step"] == best["step"]

    model, record = load_classifier(out)
    assert record["step"] == metrics["best_step"] and record["outputs"] == ["clear"]
    with open(out / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["task"]["images"]["test"]
    task = prepare_task(metrics["config"]["task"], input_size=metrics["config"]["input_size"])
    test = task.rows("test")
    assert [r["path"] for r in rows] == [task.table.paths[i] for i in test]
    with torch.no_grad():
        probs = model(to_input(task.images[test], task.is_ct[test], (40.0, 400.0))).sigmoid().numpy()
    np.testing.assert_allclose(probs[:, 0], [float(r["prob_clear"]) for r in rows], rtol=1e-4, atol=1e-5)
    assert macro_auc(task.table.targets[test], probs) == pytest.approx(metrics["test_auc"], abs=1e-3)
    return model


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_linear_probe_keeps_the_pretrained_encoder(tmp_path, blob_task, tiny_run):
    metrics = finetune(blob_task, init=str(tiny_run), mode="linear", out=tmp_path / "lin", probe_lrs=[1e-3, 1e-1],
                       **FAST)
    model = _check_run(tmp_path / "lin", metrics, "linear")
    # The learning rate is the best on validation of those tried (each an ordinary run folder).
    tried = {t["value"]: t["best_val_auc"] for t in metrics["sweep"]["tried"]}
    assert set(tried) == {1e-3, 1e-1} and tried[metrics["sweep"]["chosen"]] == max(tried.values())
    assert metrics["best_val_auc"] == max(tried.values())
    assert metrics["init"]["init"] == str(tiny_run) and metrics["init"]["pretrain_steps"] == 2
    pretrained = _state(medssl.load_encoder(tiny_run))
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, pretrained[k], rtol=0, atol=0, msg=k)


def test_finetune_trains_the_encoder_with_layer_decay(tmp_path, blob_task, tiny_run):
    metrics = finetune(blob_task, init=str(tiny_run), mode="finetune", out=tmp_path / "ft", layer_decay=0.75,
                       **FAST)
    model = _check_run(tmp_path / "ft", metrics, "finetune")
    pretrained = _state(medssl.load_encoder(tiny_run))
    changed = [k for k, v in model.backbone.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, pretrained[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed


def test_hybrid_from_a_run_uses_unlabeled_images(tmp_path, blob_task, tiny_run):
    metrics = finetune(blob_task, init=str(tiny_run), mode="hybrid", label_fraction=0.5, out=tmp_path / "hy", **FAST)
    _check_run(tmp_path / "hy", metrics, "hybrid")
    images = metrics["task"]["images"]
    assert metrics["task"]["labeled_train"] + metrics["task"]["unlabeled_train"] == images["train"]
    assert 0 < metrics["task"]["unlabeled_train"] < images["train"]
    assert all(h["train_ssl_loss"] > 0 for h in metrics["history"])


def test_hybrid_from_scratch(tmp_path, blob_task):
    metrics = finetune(blob_task, init="scratch", mode="hybrid", out=tmp_path / "scratch", **FAST)
    _check_run(tmp_path / "scratch", metrics, "hybrid")
    assert metrics["init"] == {"init": "scratch", "architecture": "resnet18"}


def test_hybrid_rebuilds_the_pretrained_heads(blob_task, tiny_run):
    nets = build_networks(FinetuneConfig(task=blob_task, init=str(tiny_run), mode="hybrid", **FAST), n_outputs=1)
    saved = load_checkpoint(tiny_run / "checkpoint.pt")["model"]
    for k, v in nets.ssl.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    assert nets.classifier.backbone is nets.ssl.backbone
    assert nets.ssl_views.global_size == 32 and nets.ssl_views.n_local == 2  # the run's own views


def test_hybrid_loss_includes_the_weighted_ssl_term(tmp_path, blob_task, tiny_run):
    task = prepare_task(blob_task, input_size=32)  # decoded once, used by every run
    fast = {k: v for k, v in FAST.items() if k != "input_size"}
    runs = {(scale, w): finetune(task, init=str(tiny_run), mode="hybrid", max_steps=1, ssl_weight=w, ssl_scale=scale,
                                 out=tmp_path / f"{scale}-{w}", **fast)
            for scale in ("none", "start") for w in (0.5, 2.0)}
    first = {k: m["history"][0] for k, m in runs.items()}
    a, b = first["none", 0.5], first["none", 2.0]
    # One step, same seed: identical supervised and SSL parts, totals that differ by the weight only.
    for h in first.values():
        assert h["train_sup_loss"] == pytest.approx(a["train_sup_loss"], rel=1e-6)
        assert h["train_ssl_loss"] == pytest.approx(a["train_ssl_loss"], rel=1e-6)
    assert a["train_ssl_loss"] > 0.1
    for w in (0.5, 2.0):
        raw = first["none", w]
        assert raw["train_loss"] == pytest.approx(raw["train_sup_loss"] + w * raw["train_ssl_loss"], rel=1e-5)
        # Scaled: at the first step the SSL term is exactly w x the supervised loss, whatever its raw size.
        scaled = first["start", w]
        assert scaled["train_loss"] == pytest.approx((1 + w) * scaled["train_sup_loss"], rel=1e-5)
        factor = runs["start", w]["ssl_scale_factor"]
        assert factor == pytest.approx(a["train_sup_loss"] / a["train_ssl_loss"], rel=1e-5)
        assert runs["none", w]["ssl_scale_factor"] == 1.0
    assert b["train_loss"] - a["train_loss"] == pytest.approx(1.5 * a["train_ssl_loss"], rel=1e-5)


def test_hybrid_auto_weight_is_chosen_on_validation(tmp_path, blob_task, tiny_run):
    out = tmp_path / "auto"
    metrics = finetune(blob_task, init=str(tiny_run), mode="hybrid", ssl_weight="auto", ssl_weight_grid=[0.1, 1.0],
                       out=out, **FAST)
    sweep = metrics["sweep"]
    assert sweep["setting"] == "ssl_weight" and [t["value"] for t in sweep["tried"]] == [0.1, 1.0]
    best = max(sweep["tried"], key=lambda t: t["best_val_auc"])  # first of equals, as the sweep picks
    assert sweep["chosen"] == best["value"]
    chosen = json.loads((out / "sweep" / f"ssl_weight-{best['value']:g}" / "metrics.json").read_text())
    assert metrics["test_auc"] == chosen["test_auc"] and metrics["config"]["ssl_weight"] == "auto"
    _check_run(out, metrics, "hybrid")
    # One classifier on disk: the chosen one, moved up; the others' are deleted (45 MB each for a ResNet-18).
    assert [str(p.relative_to(out)) for p in out.rglob("best.pt")] == ["best.pt"]
    # Rerun: the sweep is finished with these settings, so nothing is trained again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert finetune(blob_task, init=str(tiny_run), mode="hybrid", ssl_weight="auto", ssl_weight_grid=[0.1, 1.0],
                    out=out, **FAST)["sweep"] == sweep
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_prepared_task_must_match_the_settings(blob_task, tmp_path):
    task = prepare_task(blob_task, input_size=32)
    with pytest.raises(ConfigError, match="input_size: task prepared with 32, config has 64"):
        finetune(task, input_size=64, out=tmp_path / "x")


def test_cli_with_convergence_target(tmp_path, blob_task, tiny_run, capsys):
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    code = main(["finetune", "--task", str(blob_task), "--init", str(tiny_run), "--mode", "linear", "--seed", "1",
                 "--out", str(tmp_path / "a"), "--quiet", *sets])
    assert code == 0 and "test AUC" in capsys.readouterr().out
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert first["seed"] == 1 and first["target_auc"] is None and first["steps_to_target"] is None

    code = main(["finetune", "--task", str(blob_task), "--init", str(tiny_run), "--mode", "linear", "--seed", "1",
                 "--target-from", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--quiet", *sets])
    assert code == 0
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    # Same seed and settings: the same run again, so it reaches the first run's best exactly at its best step.
    assert second["target_auc"] == first["best_val_auc"]
    assert second["steps_to_target"] == min(h["step"] for h in first["history"]
                                            if h["val_auc"] >= first["best_val_auc"])


def _nan_loss_from_call(monkeypatch, first_bad):
    """Every task kind's supervised loss turns NaN from call ``first_bad`` on."""
    from dataclasses import replace

    from medssl.downstream.kinds import KINDS

    calls = []

    def nan_from(real):
        def loss(logits, targets):
            calls.append(1)
            value = real(logits, targets)
            return value * float("nan") if len(calls) >= first_bad else value
        return loss

    for name, kind in list(KINDS.items()):
        monkeypatch.setitem(KINDS, name, replace(kind, loss=nan_from(kind.loss)))


def test_a_diverged_finetune_stops_and_reports_the_best_checkpoint_before_it(tmp_path, blob_task, tiny_run,
                                                                             monkeypatch):
    """FAST: 3 steps per epoch. The loss of step 4 is NaN: training stops there, status 'diverged', and the test
    score is that of the best evaluation before it (epoch 1), never one computed from NaN scores."""
    _nan_loss_from_call(monkeypatch, 4)
    metrics = finetune(blob_task, init=str(tiny_run), mode="linear", out=tmp_path / "div", probe_lrs=[], **FAST)
    assert metrics["status"] == "diverged"
    assert metrics["diverged"] == {"after_step": 3, "epoch": 2, "what": "training loss"}
    assert [h["epoch"] for h in metrics["history"]] == [1] and metrics["steps"] == 3
    assert metrics["best_step"] == 3 and 0 <= metrics["test_auc"] <= 1
    assert json.loads((tmp_path / "div" / "metrics.json").read_text()) == metrics


def test_a_finetune_diverged_before_any_evaluation_fails_clearly(tmp_path, blob_task, tiny_run, monkeypatch):
    _nan_loss_from_call(monkeypatch, 1)
    with pytest.raises(TrainingDiverged, match="non-finite at step 1 .*lower lr"):
        finetune(blob_task, init=str(tiny_run), mode="finetune", out=tmp_path / "div", **FAST)
    assert not (tmp_path / "div" / "metrics.json").exists()


def test_a_sweep_whose_every_value_diverged_fails_clearly(tmp_path, blob_task, tiny_run, monkeypatch):
    _nan_loss_from_call(monkeypatch, 1)
    with pytest.raises(TrainingDiverged, match=r"every head_lr tried \(0.001, 0.1\) diverged .* at 0.001: the "
                                               "training loss was non-finite at step 1"):
        finetune(blob_task, init=str(tiny_run), mode="linear", probe_lrs=[1e-3, 1e-1], out=tmp_path / "div", **FAST)
    assert not (tmp_path / "div" / "metrics.json").exists()


def _cli_args(blob_task, tiny_run, out):
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return ["finetune", "--task", str(blob_task), "--init", str(tiny_run), "--mode", "linear", "--out", str(out),
            "--quiet", "--set", "probe_lrs=[]", *sets]  # one head_lr: one run, not a sweep


def test_cli_finetune_diverged_before_any_evaluation_is_a_one_line_error(tmp_path, blob_task, tiny_run, monkeypatch,
                                                                           capsys):
    _nan_loss_from_call(monkeypatch, 1)
    assert main(_cli_args(blob_task, tiny_run, tmp_path / "div")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the training loss was non-finite at step 1") and "lower lr" in err
    assert err.count("\n") == 1


def test_cli_pretrain_diverged_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import medssl.train.pretrain as pretraining

    def diverged(cfg, show_progress=True):
        raise pretraining.TrainingDiverged("3 consecutive non-finite losses at step 7; lower lr")

    monkeypatch.setattr(pretraining, "pretrain", diverged)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text("{}")
    assert main(["pretrain", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--quiet"]) == 1
    assert capsys.readouterr().err == ("error: pretraining diverged: 3 consecutive non-finite losses at step 7; "
                                       "lower lr\n")


def test_cli_finetune_warns_when_the_run_diverged_after_an_evaluation(tmp_path, blob_task, tiny_run, monkeypatch,
                                                                       capsys):
    """FAST: 3 steps per epoch; the loss of step 4 is NaN, so the run is reported from epoch 1, with a warning."""
    _nan_loss_from_call(monkeypatch, 4)
    assert main(_cli_args(blob_task, tiny_run, tmp_path / "div")) == 0
    captured = capsys.readouterr()
    assert "test AUC" in captured.out
    assert [line for line in captured.err.splitlines() if line.startswith("warning:")] == [
        "warning: training diverged after step 3 (epoch 2: non-finite training loss); the results are those of "
        "the best evaluation before it (step 3): lower lr / head_lr (or raise warmup_steps)"]


def test_cli_finetune_without_a_test_auc_says_so(tmp_path, blob_task, tiny_run, monkeypatch, capsys):
    """Finite validation but non-finite test scores: metrics.json has test_auc null; the summary line says so."""
    import medssl.downstream.training as training

    real, calls = training.predict, []

    def predict(*args, **kwargs):
        calls.append(1)
        probs = real(*args, **kwargs)
        return probs * np.nan if len(calls) == 3 else probs  # 2 validations of a linear probe, then the test

    monkeypatch.setattr(training, "predict", predict)
    assert main(_cli_args(blob_task, tiny_run, tmp_path / "nan")) == 0
    assert json.loads((tmp_path / "nan" / "metrics.json").read_text())["test_auc"] is None
    assert "test AUC none (the best classifier's test scores are not finite)" in capsys.readouterr().out


def test_non_finite_validation_scores_end_the_run_as_diverged(tmp_path, blob_task, tiny_run, monkeypatch):
    import medssl.downstream.training as training

    real, calls = training.predict, []

    def predict(*args, **kwargs):
        calls.append(1)
        probs = real(*args, **kwargs)
        return probs * np.nan if len(calls) == 2 else probs  # the 2nd validation of a linear probe

    monkeypatch.setattr(training, "predict", predict)
    metrics = finetune(blob_task, init=str(tiny_run), mode="linear", out=tmp_path / "div", probe_lrs=[],
                       **{**FAST, "epochs": 3})  # one head_lr: the run itself, not a sweep's choice among runs
    assert metrics["status"] == "diverged"
    assert metrics["diverged"] == {"after_step": 6, "epoch": 2, "what": "validation scores"}
    assert [h["val_auc"] is None for h in metrics["history"]] == [False, True]
    assert metrics["best_epoch"] == 1 and 0 <= metrics["test_auc"] <= 1


def test_out_naming_a_file_is_a_usage_error(tmp_path, blob_task, capsys):
    """Found before any image is decoded, as a one-line usage error (exit 2), not a traceback after training."""
    taken = tmp_path / "taken"
    taken.write_text("")
    for out in (taken, taken / "sub"):
        assert main(["finetune", "--task", str(blob_task), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and f"{taken} is a file" in err and err.count("\n") == 1
    assert main(["evaluate", str(tmp_path), "--robustness", "--out", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path} is a folder; name the file to write\n"


def test_api_out_naming_a_file_is_a_config_error(tmp_path, blob_task):
    """The same check as the CLI's, not a FileExistsError from creating the folder after the images are decoded."""
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(ConfigError, match=f"^out {taken} is a file; name the folder to write$"):
        finetune(blob_task, out=taken, **FAST)
    with pytest.raises(ConfigError, match=f"^out {taken / 'sub'}: {taken} is a file, not a folder$"):
        finetune(prepare_task(blob_task, input_size=32), out=taken / "sub", **FAST)
