"""Robustness of a trained classifier: its test AUC as the test images are perturbed step by step.

Ghesu et al. (2022) report that self-supervised initialisation makes models more robust to intensity
variation, rotation and scaling. To measure that, a ``medssl finetune`` output folder's best
classifier re-scores its own test split (the split rebuilt from the run's config, so it is the one
``metrics.json`` scored) clean and then under sweeps of one perturbation at a time:

- geometry, on the stored image (CT still in HU) before windowing, bilinear, the area that comes in
  from outside filled with the image's own minimum (air, black): ``rotation`` by 5-30 degrees (each
  image turned by +angle or -angle, the sign drawn once per image, so every angle turns an image the
  same way) and ``scaling`` by 0.8-1.2 (zoom about the centre, size kept; > 1 enlarges);
- ``ct_window_shift``: the CT window level moved by -40 to +40 HU (scanner calibration, protocols);
  left out, with the reason under "skipped", when no test image is CT;
- intensity, on the encoder input in [0, 1] after windowing, clamped to [0, 1]: ``gamma`` (x ** g),
  ``contrast`` (scaled about each image's mean), ``brightness`` (added), ``noise`` (Gaussian, std).

Every sweep also holds its neutral level (0 degrees, scale 1, ...), which leaves the images exactly
as they are, so its AUC is the clean AUC and each curve passes through it. Random parts (rotation
signs, noise) come from generators seeded with the run's seed; a noise sweep adds one noise field,
scaled by each level. Results go to ``robustness.json`` in the run folder, which ``medssl report``
draws as curves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from medssl.artifacts import ROBUSTNESS, RobustnessReport, TrainingDiverged
from medssl.config import ConfigError, FinetuneConfig
from medssl.downstream.images import to_input
from medssl.downstream.metrics import auc_difference_ci, macro_auc
from medssl.downstream.model import load_classifier, predict, resolve_device
from medssl.downstream.tasks import Task, TaskError, check_task, load_task

# Default levels of each sweep; the neutral level is added to every sweep.
SWEEPS: dict[str, tuple[float, ...]] = {
    "rotation": (5.0, 10.0, 15.0, 20.0, 30.0),          # degrees
    "scaling": (0.8, 0.9, 1.1, 1.2),                    # zoom factor
    "ct_window_shift": (-40.0, -20.0, 20.0, 40.0),      # HU added to the window level
    "gamma": (0.5, 0.67, 1.5, 2.0),                     # exponent
    "contrast": (0.5, 0.75, 1.25, 1.5),                 # factor about the image mean
    "brightness": (-0.2, -0.1, 0.1, 0.2),               # offset in [0, 1] units
    "noise": (0.02, 0.05, 0.1),                         # Gaussian std in [0, 1] units
}
NEUTRAL: dict[str, float] = {"rotation": 0.0, "scaling": 1.0, "ct_window_shift": 0.0, "gamma": 1.0,
                             "contrast": 1.0, "brightness": 0.0, "noise": 0.0}


def sweep_levels(overrides: dict[str, Iterable[float]] | None = None,
                 only: Iterable[str] | None = None) -> dict[str, list[float]]:
    """Sweep name -> sorted levels with the neutral one: the defaults, ``overrides`` replacing some,
    restricted to the sweeps named in ``only`` (all when None). Unknown names are a ``ConfigError``."""
    overrides = dict(overrides or {})
    names = list(SWEEPS) if only is None else list(dict.fromkeys(only))
    unknown = sorted(set(names) - set(SWEEPS)) + sorted(set(overrides) - set(SWEEPS))
    if unknown:
        raise ConfigError(f"unknown robustness sweep(s) {', '.join(unknown)}; known: {', '.join(SWEEPS)}")
    levels = {}
    for name in names:
        values = [float(v) for v in overrides.get(name, SWEEPS[name])]
        bad = [v for v in values if not math.isfinite(v)
               or (name in ("gamma", "scaling") and v <= 0) or (name == "noise" and v < 0)]
        if bad:
            raise ConfigError(f"robustness sweep {name}: levels {bad} are not valid (gamma and scaling need "
                              "levels > 0, noise >= 0, all finite)")
        levels[name] = sorted({*values, NEUTRAL[name]})
    return levels


def _resample(images: Tensor, theta: Tensor) -> Tensor:
    """Images (N, S, S) through affine maps ``theta`` (N, 2, 3; output -> source, coordinates in [-1, 1])."""
    low = images.amin(dim=(1, 2), keepdim=True)
    grid = F.affine_grid(theta, [len(images), 1, *images.shape[1:]], align_corners=False)
    # grid_sample pads with zeros: sampling the image less its minimum fills the outside with that minimum.
    out = F.grid_sample((images - low).unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1) + low


def _rotate(images: Tensor, degrees: float, seed: int) -> Tensor:
    signs = torch.randint(0, 2, (len(images),), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    angle = signs * math.radians(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(len(images))
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _resample(images, theta)


def _zoom(images: Tensor, factor: float) -> Tensor:
    theta = torch.tensor([[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]]).expand(len(images), 2, 3)
    return _resample(images, theta)


def perturb(images: Tensor, is_ct: Tensor, window: tuple[float, float], sweep: str, level: float,
            seed: int = 0) -> Tensor:
    """Stored images (N, S, S) -> encoder inputs (N, 1, S, S) in [0, 1] under one level of one sweep."""
    if sweep not in SWEEPS:
        raise ConfigError(f"unknown robustness sweep {sweep}; known: {', '.join(SWEEPS)}")
    if level == NEUTRAL[sweep]:
        # The clean inputs themselves: an identity resampling or scaling would still round a little.
        return to_input(images, is_ct, window)
    if sweep == "rotation":
        return to_input(_rotate(images, level, seed), is_ct, window)
    if sweep == "scaling":
        return to_input(_zoom(images, level), is_ct, window)
    if sweep == "ct_window_shift":
        return to_input(images, is_ct, (window[0] + level, window[1]))
    x = to_input(images, is_ct, window)
    if sweep == "gamma":
        x = x.pow(level)
    elif sweep == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + (x - mean) * level
    elif sweep == "brightness":
        x = x + level
    else:  # noise
        x = x + level * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x.clamp(0, 1)


def _run_config(run_dir: Path, record: dict) -> FinetuneConfig:
    try:
        return FinetuneConfig.model_validate(record["config"])
    except ValidationError as e:
        raise ConfigError(f"{run_dir}: the settings stored in its best.pt are not valid for this medssl "
                          f"version:\n{e}") from None


def evaluate_robustness(run_dir: Path | str, *, task: Task | None = None,
                        sweeps: dict[str, Iterable[float]] | None = None, only: Iterable[str] | None = None,
                        out: Path | str | None = None, batch_size: int = 64, device: str = "auto",
                        show_progress: bool = False, split: Literal["test", "val"] = "test") -> dict:
    """Score a finetune run's best classifier on its test split, clean and perturbed; write ``robustness.json``.

    ``split``: "val" scores the validation split instead, for choices (e.g. of an augmentation) that must not
    look at the test images; write it elsewhere with ``out``.

    ``task``: the run's task already prepared with ``prepare_task`` (it must match the run's image and
    split settings); by default it is rebuilt from the run's config. ``sweeps``: sweep name -> levels,
    replacing those sweeps' defaults (``SWEEPS``); ``only``: the sweeps to run (default all).
    ``out``: the JSON file (default ``run_dir/robustness.json``). ``device``: auto, cpu or cuda.
    Returns the dict written: ``clean_auc``, ``sweeps`` {name: [{level, auc, drop}]}, ``worst``
    {name: the point of lowest AUC}, ``test_images`` (the images scored), ``split``, ``task``, ``run``,
    ``skipped`` {name: why}, ``seed``.
    """
    run_dir = Path(run_dir)
    levels = sweep_levels(sweeps, only)
    try:
        model, record = load_classifier(run_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    cfg = _run_config(run_dir, record)
    if task is None:
        task = load_task(cfg, show_progress)
    else:
        check_task(task, cfg)
    if task.table.outputs != record["outputs"]:
        raise TaskError(f"{task.table.csv} now gives the outputs {task.table.outputs}, the run was trained for "
                        f"{record['outputs']}: the task CSV changed since training")

    dev = resolve_device(device)
    model.to(dev)
    rows = task.rows(split)
    images, is_ct, targets = task.images[rows], task.is_ct[rows], task.table.targets[rows]
    window = tuple(record["preprocess"]["ct_window"])
    skipped = {}
    if "ct_window_shift" in levels and not bool(is_ct.any()):
        del levels["ct_window_shift"]
        skipped["ct_window_shift"] = "no test image is CT (the window applies to CT only)"

    def scores(inputs: Tensor) -> np.ndarray:
        return predict(model, inputs, record["kind"], batch_size, dev)

    clean_scores = scores(to_input(images, is_ct, window))
    # None only for non-finite scores: load_task checks that the test split has both classes.
    clean = macro_auc(targets, clean_scores)
    if clean is None:
        raise TrainingDiverged(f"the classifier of {run_dir} gives non-finite scores on the clean test images "
                               "(a diverged run): there is no clean AUC to measure robustness against")
    results: dict[str, list[dict]] = {}
    bar = tqdm(total=sum(map(len, levels.values())), desc="robustness", unit="level", disable=not show_progress)
    for name, values in levels.items():
        results[name] = []
        for level in values:
            perturbed = scores(perturb(images, is_ct, window, name, level, cfg.seed))
            score = macro_auc(targets, perturbed)
            # A perturbation that makes the scores non-finite is the worst case: AUC 0 for the summary.
            # drop_ci: paired bootstrap on the same test images, so a reader can tell an effect from the
            # noise of a small test set (a rise of 0.09 on 36 images can be either).
            results[name].append({"level": level, "auc": score, "drop": None if score is None else clean - score,
                                  "drop_ci": auc_difference_ci(targets, clean_scores, perturbed, cfg.bootstrap,
                                                               cfg.seed)})
            bar.update(1)
    bar.close()

    report = {
        "clean_auc": clean,
        "sweeps": results,
        "worst": {name: min(points, key=lambda p: p["auc"] if p["auc"] is not None else 0.0)
                  for name, points in results.items()},
        "test_images": len(rows),
        "split": split,
        "task": str(task.table.csv),
        "run": str(run_dir),
        "skipped": skipped,
        "seed": cfg.seed,
    }
    record = RobustnessReport.model_validate(report)
    record.write(Path(out) if out is not None else run_dir / ROBUSTNESS)
    return record.model_dump()
