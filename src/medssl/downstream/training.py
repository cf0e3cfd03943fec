"""The downstream training loop: kNN and linear probing, fine-tuning and the hybrid regime on one task.

- ``knn``: the encoder is frozen; the labeled images' features vote for each validation / test image
  (``probes.py``). Nothing is trained.
- ``linear``: the encoder is frozen; its features of the un-augmented images are computed once and a
  linear head is trained on them (the usual linear-probe protocol, and far cheaper than a forward
  pass per step), once per learning rate of ``probe_lrs``, the best on validation kept (``sweep.py``).
- ``finetune``: encoder and head are trained together (encoder at ``lr``, optionally with
  layer-wise decay; head at ``head_lr``), on augmented labeled images.
- ``hybrid`` (Ghesu et al. 2022, "optional supervision"): finetune's supervised loss plus
  ``ssl_weight`` x the self-supervised hybrid loss (SwAV + InfoNCE) of multi-crop views of a batch
  of training images drawn from all of them, labeled or not (those left out by ``label_fraction``).
  With ``ssl_scale: start`` the SSL loss is first scaled by supervised / SSL loss at the first step: in
  raw units it is ~10x the cross-entropy and swamps it (BENCHMARKS.md, "The hybrid regime"), so
  ``ssl_weight`` is its size relative to the supervised term. ``ssl_weight: auto`` trains each weight of
  ``ssl_weight_grid`` and keeps the best on validation (``sweep.py``).

Structure, as in pretraining: ``build`` makes the networks, optimiser and the mode's train / validation
functions (one ``Finetuning``); ``train_step`` is one optimisation step; ``run_finetune`` is the loop
around them (epochs, evaluation, the best checkpoint, the results).

Validation AUC is measured after every epoch; the best one's classifier is saved (``best.pt``,
atomically) and the test score is computed from it.

Divergence: training stops at the first non-finite training loss (before its update, so no NaN reaches
the weights) or after an evaluation whose validation scores are not finite. Skipping such steps, as
pretraining does, would not help here: on a small labeled set a non-finite loss means the learning rate
is too high, and every later step would fail the same way. The run is then reported from its best
evaluation before the divergence, with ``status: "diverged"`` and ``diverged`` (where and what) in
metrics.json; if no evaluation before it gave a validation AUC, the run fails with ``TrainingDiverged``
(a RuntimeError) that says so, and no metrics.json is written. Non-finite scores never give an AUC
(``metrics.py``).

Randomness: ``seed`` fixes initialisation, the label subset, batch order and augmentation; the
supervised and the self-supervised parts draw from separate generators, so finetune and hybrid runs with
one seed see the same labeled batches.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from medssl import __version__
from medssl.artifacts import METRICS, PREDICTIONS, DownstreamMetrics, TrainingDiverged
from medssl.atomic import atomic_write_text
from medssl.config import ConfigError, FinetuneConfig, dump_config
from medssl.data.augment import MultiCrop
from medssl.downstream.convergence import best_val_auc, steps_to_target
from medssl.downstream.images import to_input
from medssl.downstream.kinds import KINDS, accuracy
from medssl.downstream.metrics import auc_report, macro_auc
from medssl.downstream.model import (
    BEST,
    Networks,
    build_networks,
    build_optimizer,
    load_classifier,
    optimizer_groups,
    predict,
    resolve_device,
    save_classifier,
)
from medssl.downstream.probes import encoder_features, knn_probabilities
from medssl.downstream.sweep import run_sweep, sweep_of
from medssl.downstream.tasks import Task, TaskError, check_task, label_subset, load_task
from medssl.train.schedule import warmup_cosine


def _semantics(task: Task, i: int) -> str:
    return "hounsfield" if task.is_ct[i] else "normalized"


def _augmented(task: Task, rows: np.ndarray, crop: MultiCrop, g: torch.Generator) -> Tensor:
    """One augmented view per image: (B, 1, S, S) in [0, 1], CT through the task's window (jittered)."""
    return torch.stack([crop(task.images[i], _semantics(task, i), generator=g)[0] for i in rows])


def _ssl_views(task: Task, rows: np.ndarray, crop: MultiCrop, g: torch.Generator) -> list[Tensor]:
    """Multi-crop views as pretraining made them: one (B, 1, s, s) tensor per view, global views first."""
    per_image = [crop(task.images[i], _semantics(task, i), generator=g) for i in rows]
    return [torch.stack(view) for view in zip(*per_image)]


def _epoch_batches(rows: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches; a last batch of one image is dropped (batch norm needs two; the order changes each epoch)."""
    order = rng.permutation(rows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) == 1 else batches


def _cycle(rows: np.ndarray, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of ``size`` rows, reshuffled after each pass."""
    while True:
        order = rng.permutation(rows)
        for i in range(0, len(order) - size + 1, size):
            yield order[i:i + size]


def _predictions_csv(task: Task, rows: np.ndarray, probs: np.ndarray) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "group", "label", *[f"prob_{name}" for name in task.table.outputs]])
    for i, p in zip(rows, probs):
        writer.writerow([task.table.paths[i], task.table.groups[i], task.table.labels[i], *[f"{v:.6g}" for v in p]])
    return buf.getvalue()


def _diverged_text(diverged: dict) -> str:
    if diverged["what"] == "training loss":
        return f"the training loss was non-finite at step {diverged['after_step'] + 1} (epoch {diverged['epoch']})"
    return f"the validation scores were non-finite after step {diverged['after_step']} (epoch {diverged['epoch']})"


@dataclass
class Finetuning:
    """What one downstream run trains with (made by ``build``); ``train_logits`` and ``val_probs`` differ
    between a linear probe (on precomputed features) and fine-tuning (on images)."""

    cfg: FinetuneConfig
    task: Task
    device: torch.device
    nets: Networks
    optimizer: torch.optim.Optimizer
    labeled: np.ndarray  # training rows with labels (label_fraction)
    targets: Tensor
    train_logits: Callable[[np.ndarray], Tensor]
    val_probs: Callable[[], np.ndarray]
    total_steps: int
    ssl_views: Callable[[], list[Tensor]] | None = None  # hybrid: the next batch of SSL views
    ssl_factor: float | None = None  # hybrid: the self-supervised loss's scale, fixed at the first step
    step: int = 0


def build(cfg: FinetuneConfig, task: Task, features: Tensor | None, labeled: np.ndarray) -> Finetuning:
    """Networks, optimiser and the train / validation functions of one run (its seed set by the caller)."""
    device = resolve_device(cfg.device)
    kind = task.table.kind
    nets = build_networks(cfg, len(task.table.outputs)).to(device)
    optimizer = build_optimizer(optimizer_groups(nets, cfg), cfg)
    sup_crop, sup_gen = MultiCrop(cfg.finetune_augment()), torch.Generator().manual_seed(cfg.seed)
    val_rows = task.rows("val")
    if cfg.mode == "linear":
        nets.classifier.backbone.requires_grad_(False).eval()
        features = features.to(device)

        def train_logits(rows: np.ndarray) -> Tensor:
            return nets.classifier.head(features[rows])

        def val_probs() -> np.ndarray:
            return predict(nets.classifier.head, features[val_rows], kind, cfg.eval_batch_size, device)
    else:
        val_inputs = to_input(task.images[val_rows], task.is_ct[val_rows], cfg.ct_window)

        def train_logits(rows: np.ndarray) -> Tensor:
            x = (_augmented(task, rows, sup_crop, sup_gen) if cfg.train_augment
                 else to_input(task.images[rows], task.is_ct[rows], cfg.ct_window))
            return nets.classifier(x.to(device))

        def val_probs() -> np.ndarray:
            return predict(nets.classifier, val_inputs, kind, cfg.eval_batch_size, device)

    ssl_views = None
    if nets.ssl is not None:
        train_rows = task.rows("train")
        ssl_crop, ssl_gen = MultiCrop(nets.ssl_views), torch.Generator().manual_seed(cfg.seed + 1)
        ssl_batches = _cycle(train_rows, min(cfg.ssl_batch_size, len(train_rows)), np.random.default_rng([cfg.seed, 1]))

        def ssl_views() -> list[Tensor]:
            return [v.to(device) for v in _ssl_views(task, next(ssl_batches), ssl_crop, ssl_gen)]

    steps_per_epoch = len(_epoch_batches(labeled, cfg.batch_size, np.random.default_rng(0)))
    return Finetuning(cfg, task, device, nets, optimizer, labeled, torch.from_numpy(task.table.targets),
                      train_logits, val_probs, min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf),
                      ssl_views)


def train_step(ft: Finetuning, rows: np.ndarray) -> dict[str, float] | None:
    """One step on the labeled ``rows`` (plus, in hybrid mode, a batch of SSL views): the losses, or None
    when the training loss is not finite (then nothing is updated: the run has diverged)."""
    cfg, nets = ft.cfg, ft.nets
    factor = warmup_cosine(ft.step, ft.total_steps, 1.0, 0.0, cfg.warmup_steps)
    for group in ft.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    sup = KINDS[ft.task.table.kind].loss(ft.train_logits(rows), ft.targets[rows].to(ft.device))
    loss, losses = sup, {}
    if ft.ssl_views is not None and cfg.ssl_weight > 0:
        views = ft.ssl_views()
        nets.ssl.normalize_prototypes()  # SwAV keeps prototypes on the unit sphere
        embeddings, scores = nets.ssl(views)
        ssl, _ = nets.ssl_loss(embeddings, scores, nets.ssl.prototypes)
        if ft.ssl_factor is None:
            ft.ssl_factor = _ssl_factor(cfg.ssl_scale, sup.item(), ssl.item())
        loss = sup + cfg.ssl_weight * ft.ssl_factor * ssl
        losses["train_ssl_loss"] = ssl.item()
    if not torch.isfinite(loss):
        return None
    ft.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ft.optimizer.step()
    ft.step += 1
    return {"train_loss": loss.item(), "train_sup_loss": sup.item(), **losses}


def run_finetune(cfg: FinetuneConfig, task: Task | None = None, show_progress: bool = True,
                 features: Tensor | None = None) -> DownstreamMetrics:
    """Train and evaluate one run; writes ``metrics.json``, ``best.pt``, ``test_predictions.csv`` under ``cfg.out``.

    ``task``: a Task already prepared with ``load_task(cfg)`` (to decode the images once for many runs).
    ``features``: the frozen encoder's features of every task image (knn and linear modes), when the caller
    has them. Returns the record written to ``metrics.json``.
    """
    if cfg.out is None:
        raise ConfigError("finetune needs an output folder (--out DIR)")
    target = best_val_auc(cfg.target_from) if cfg.target_from is not None else cfg.target_auc
    if task is None:
        task = load_task(cfg, show_progress)
    else:
        check_task(task, cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mode in ("knn", "linear") and features is None:
        # Once per run: a linear probe's learning rates, and every step, share them.
        features = encoder_features(cfg, task)
    sweep = sweep_of(cfg)
    if sweep is not None:
        return run_sweep(cfg, *sweep, lambda sub: run_finetune(sub, task, show_progress, features))

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_rows, val_rows, test_rows = task.rows("train"), task.rows("val"), task.rows("test")
    labeled = label_subset(task.table, train_rows, cfg.label_fraction, cfg.seed)
    if len(labeled) < 2:
        raise TaskError(f"{len(labeled)} labeled training image(s) at label_fraction={cfg.label_fraction}; "
                        "training needs at least 2: raise label_fraction or add images")
    if cfg.mode == "knn":
        return _run_knn(cfg, task, features, labeled)

    ft = build(cfg, task, features, labeled)
    nets = ft.nets
    record_base = {"kind": task.table.kind, "outputs": task.table.outputs, "classes": task.table.classes,
                   "config": dump_config(cfg),
                   "preprocess": {k: task.settings[k]
                                  for k in ("input_size", "resize", "percentiles", "nifti_modality", "raster_modality")}
                                 | {"ct_window": list(cfg.ct_window)}}
    history: list[dict] = []
    best = {"val_auc": -math.inf}
    epoch, stale, stopped_early = 0, 0, False
    diverged: dict | None = None  # where training diverged: {"after_step", "epoch", "what"}
    t0 = time.perf_counter()
    bar = tqdm(total=ft.total_steps, desc=f"{cfg.mode} ({cfg.init})", unit="step", disable=not show_progress)
    while ft.step < ft.total_steps and not stopped_early and diverged is None:
        epoch += 1
        nets.classifier.train(cfg.mode != "linear")
        if nets.ssl is not None:
            nets.ssl.train()
        sums = {"train_loss": 0.0, "train_sup_loss": 0.0, "train_ssl_loss": 0.0}
        n_steps = 0
        for rows in _epoch_batches(labeled, cfg.batch_size, rng):
            losses = train_step(ft, rows)
            if losses is None:
                diverged = {"after_step": ft.step, "epoch": epoch, "what": "training loss"}
                break
            n_steps += 1
            for k, v in losses.items():
                sums[k] += v
            bar.update(1)
            if ft.step >= ft.total_steps:
                break

        if diverged is not None:
            break  # the steps of this epoch before it are not evaluated: the best so far stands
        probs = ft.val_probs()
        if not np.isfinite(probs).all():
            diverged = {"after_step": ft.step, "epoch": epoch, "what": "validation scores"}
        val_auc = macro_auc(task.table.targets[val_rows], probs)  # None for non-finite scores
        entry = {"epoch": epoch, "step": ft.step, "train_loss": sums["train_loss"] / n_steps, "val_auc": val_auc,
                 "elapsed_s": round(time.perf_counter() - t0, 3)}
        if nets.ssl is not None:
            entry |= {"train_sup_loss": sums["train_sup_loss"] / n_steps,
                      "train_ssl_loss": sums["train_ssl_loss"] / n_steps}
        history.append(entry)
        if val_auc is not None and val_auc > best["val_auc"]:
            best = {"val_auc": val_auc, "epoch": epoch, "step": ft.step}
            save_classifier(out / BEST, nets, {**record_base, **best})
            stale = 0
        else:
            stale += 1
            stopped_early = cfg.patience is not None and stale >= cfg.patience
        bar.set_postfix(loss=f"{entry['train_loss']:.3f}", val_auc="none" if val_auc is None else f"{val_auc:.3f}",
                        best=f"{best['val_auc']:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - t0
    if "step" not in best and diverged is not None:
        raise TrainingDiverged(f"{_diverged_text(diverged)}, before any evaluation gave a validation AUC: "
                               "lower lr / head_lr (or raise warmup_steps)")
    if "step" not in best:  # also keeps a stale best.pt of an earlier run in this folder from being reported
        raise RuntimeError(f"no evaluation gave a validation AUC: no output has both classes among the "
                           f"{len(val_rows)} validation images")

    # The test score comes from the saved best checkpoint, through the path evaluation will use.
    classifier, _ = load_classifier(out)
    test_inputs = to_input(task.images[test_rows], task.is_ct[test_rows], cfg.ct_window)
    test_probs = predict(classifier.to(ft.device), test_inputs, task.table.kind, cfg.eval_batch_size, ft.device)
    return _write_results(cfg, task, test_probs, labeled, nets.init, ft.device, {
        "best_val_auc": best["val_auc"],
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "target_auc": target,
        "steps_to_target": None if target is None else steps_to_target(
            [(h["step"], h["val_auc"]) for h in history if h["val_auc"] is not None], target),
        "steps": ft.step,
        "epochs": epoch,
        "stopped_early": stopped_early,
        "status": "completed" if diverged is None else "diverged",
        "diverged": diverged,
        "train_seconds": round(train_seconds, 3),
        "history": history,
        "ssl_scale_factor": ft.ssl_factor,
        "files": {"checkpoint": BEST, "predictions": PREDICTIONS},
    })


def _ssl_factor(scale: str, sup: float, ssl: float) -> float:
    """``start``: sup / ssl at the first step, so that ssl_weight is the SSL term's size relative to the
    supervised loss (raw, the SSL loss of SwAV + InfoNCE is ~7-8 against a cross-entropy of ~0.7, and would
    swamp it at weight 1). 1 where that ratio is not a positive number (then the step's loss shows it)."""
    if scale == "none":
        return 1.0
    ratio = sup / ssl if ssl != 0 else math.nan
    return ratio if math.isfinite(ratio) and ratio > 0 else 1.0


def _run_knn(cfg: FinetuneConfig, task: Task, features: Tensor, labeled: np.ndarray) -> DownstreamMetrics:
    """kNN on frozen features: nothing is trained; validation AUC is reported as the single evaluation."""
    t0 = time.perf_counter()
    bank, bank_targets = features[labeled], torch.from_numpy(task.table.targets[labeled])

    def probs(rows: np.ndarray) -> np.ndarray:
        return knn_probabilities(bank, bank_targets, features[rows], cfg.knn_k, cfg.knn_temperature).cpu().numpy()

    val_auc = macro_auc(task.table.targets[task.rows("val")], probs(task.rows("val")))
    if val_auc is None:
        raise RuntimeError(f"no validation AUC: no output has both classes among the {len(task.rows('val'))} "
                           "validation images")
    test_probs = probs(task.rows("test"))
    init = {"init": cfg.init}
    return _write_results(cfg, task, test_probs, labeled, init, features.device, {
        "best_val_auc": val_auc, "best_epoch": 0, "best_step": 0, "target_auc": None, "steps_to_target": None,
        "steps": 0, "epochs": 0, "stopped_early": False, "status": "completed", "diverged": None,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "history": [{"epoch": 0, "step": 0, "val_auc": val_auc}],
        "knn": {"k": min(cfg.knn_k, len(labeled)), "temperature": cfg.knn_temperature},
        "files": {"predictions": PREDICTIONS},
    })


def _write_results(cfg: FinetuneConfig, task: Task, test_probs: np.ndarray, labeled: np.ndarray, init: dict,
                   device: torch.device, fields: dict) -> DownstreamMetrics:
    """Test AUC with its bootstrap interval, ``test_predictions.csv`` and ``metrics.json`` (written last)."""
    out, outputs = Path(cfg.out), task.table.outputs
    test_rows, train_rows = task.rows("test"), task.rows("train")
    test_targets = task.table.targets[test_rows]
    report = auc_report(test_targets, test_probs, outputs, cfg.bootstrap, seed=cfg.seed)
    atomic_write_text(out / PREDICTIONS, _predictions_csv(task, test_rows, test_probs))
    metrics = DownstreamMetrics.model_validate({
        "test_auc": report["auc"],
        "test_auc_ci": report["auc_ci"],
        "test_auc_per_label": report["per_label"],
        "test_auc_per_label_ci": report["per_label_ci"],
        "test_accuracy": accuracy(task.table.kind, test_targets, test_probs),
        **fields,
        "mode": cfg.mode,
        "init": init,
        "label_fraction": cfg.label_fraction,
        "seed": cfg.seed,
        "task": {**task.summary(), "labeled_train": len(labeled), "unlabeled_train": len(train_rows) - len(labeled)},
        "bootstrap_resamples": report["bootstrap"],
        "device": str(device),
        "medssl_version": __version__,
        "config": dump_config(cfg),
    })
    metrics.write(out / METRICS)
    return metrics
