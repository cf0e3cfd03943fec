#!/usr/bin/env python
"""medssl's scratch arm against a plain torchvision recipe, on the same split, labels and seeds (issue 26).

Every SSL gain we report is a difference to training from scratch; it is only as honest as that baseline.
This runs, per task, label fraction and seed:

- medssl: ``medssl.downstream.finetune(init="scratch", mode="finetune")`` with its defaults (or ``--set``
  overrides), ``epochs`` and ``batch_size`` as below.
- plain: a 60-line recipe a user would write, for comparison only: torchvision ResNet-18 from random weights
  (grey repeated to 3 channels), each image read with PIL and stretched to SIZE x SIZE,
  RandomResizedCrop(scale 0.7-1) + horizontal flip, AdamW lr 3e-4 wd 1e-4 at a constant rate, and the epoch
  with the best validation AUC kept for the test.

Both get the rows medssl's task gives (its train / validation / test split, and its stratified label subset of
the fraction and seed), batches of 32 (a last batch of one image dropped: batch norm needs two), and the same
number of epochs, so the same number of steps: ``--epochs`` at 100% of the labels, ``--epochs-low`` below.
The AUC is the macro AUC of ``medssl.downstream.metrics`` for both. The plain recipe reads raster files
(PNG, JPEG, TIFF) only.

Run from the repository root:
  .venv/bin/python benchmarks/scratch_baseline.py [--tasks head-ct,brain-mri] [--json out.json]
  .venv/bin/python benchmarks/scratch_baseline.py --tiny      (CI: a 60-image head-CT subset, 1 epoch, 32 px)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import models, transforms

from medssl.downstream import finetune, prepare_task
from medssl.downstream.decode import resolve_path
from medssl.downstream.metrics import macro_auc
from medssl.downstream.tasks import Task, label_subset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TASKS = {"head-ct": SHARED / "head-ct-hemorrhage" / "task.csv", "brain-mri": SHARED / "brain-tumor-mri" / "task.csv"}
BATCH = 32


def plain_images(task: Task, size: int) -> torch.Tensor:
    """Every task image as the plain recipe reads it: 8-bit grey, stretched to size x size, uint8 (N, size, size)."""
    folder = Path(task.table.csv).parent
    out = np.zeros((len(task.table), size, size), np.uint8)
    for i, raw in enumerate(task.table.paths):
        path, _ = resolve_path(folder, raw)
        out[i] = np.asarray(Image.open(path).convert("L").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(out)


def plain_run(task: Task, images: torch.Tensor, labeled: np.ndarray, epochs: int, seed: int) -> dict:
    """The plain recipe; returns its best validation AUC, the test AUC of that epoch's model, and its steps."""
    torch.manual_seed(seed)
    size = images.shape[-1]
    kind, targets = task.table.kind, torch.from_numpy(task.table.targets)
    model = models.resnet18(num_classes=targets.shape[1])
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
    augment = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
                                  transforms.RandomHorizontalFlip()])

    def inputs(rows: np.ndarray, train: bool) -> torch.Tensor:
        x = images[rows].unsqueeze(1).float() / 255
        if train:
            x = torch.stack([augment(img) for img in x])
        return x.expand(-1, 3, -1, -1)

    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if kind == "multiclass":
            return nn.functional.cross_entropy(logits, y.argmax(1))
        return nn.functional.binary_cross_entropy_with_logits(logits, y)

    @torch.no_grad()
    def scores(rows: np.ndarray) -> np.ndarray:
        model.eval()
        logits = torch.cat([model(inputs(rows[i:i + 64], False)) for i in range(0, len(rows), 64)])
        return (logits.softmax(1) if kind == "multiclass" else logits.sigmoid()).numpy()

    rng = np.random.default_rng(seed)
    val, test = task.rows("val"), task.rows("test")
    best, best_state, steps = -math.inf, None, 0
    for _ in range(epochs):
        model.train()
        order = rng.permutation(labeled)
        batches = [order[i:i + BATCH] for i in range(0, len(order), BATCH)]
        for rows in batches[:-1] if len(batches) > 1 and len(batches[-1]) == 1 else batches:  # as medssl batches
            loss = loss_of(model(inputs(rows, True)), targets[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
        auc = macro_auc(task.table.targets[val], scores(val))
        if auc is not None and auc > best:
            best, best_state = auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"val_auc": best, "test_auc": macro_auc(task.table.targets[test], scores(test)), "steps": steps}


def medssl_run(task: Task, fraction: float, seed: int, epochs: int, overrides: dict, out: Path) -> dict:
    m = finetune(task, init="scratch", mode="finetune", label_fraction=fraction, seed=seed, epochs=epochs,
                 batch_size=BATCH, bootstrap=100, out=out, **overrides)
    return {"val_auc": m["best_val_auc"], "test_auc": m["test_auc"], "steps": m["steps"]}


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def tiny_task(folder: Path) -> Path:
    """The first 30 images of each class of the head-CT task, as a CSV beside a link to its images."""
    source = TASKS["head-ct"]
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f))
    picked = []
    for label in sorted({r["label"] for r in rows}):
        picked += [r for r in rows if r["label"] == label][:30]
    (folder / "images").symlink_to(source.parent / "images")
    with (folder / "task.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)
    return folder / "task.csv"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", default="head-ct,brain-mri", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--fractions", default="0.1,1", help="label fractions (default 0.1,1)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=128, help="input size in pixels (default 128)")
    p.add_argument("--epochs", type=int, default=20, help="epochs at 100%% of the labels (default 20)")
    p.add_argument("--epochs-low", type=int, default=60, help="epochs below 100%% of the labels (default 60)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a FinetuneConfig setting of medssl's arm (repeatable), e.g. --set lr=3e-4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="CI size: 60 head-CT images, 1 seed, 1 epoch, 32 px")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    work = Path(tempfile.mkdtemp(prefix="scratch-baseline-"))
    if args.tiny:
        tasks = {"head-ct-tiny": tiny_task(work)}
        fractions, seeds, size, epochs, epochs_low = [1.0], [0], 32, 1, 1
    else:
        tasks = {name: TASKS[name] for name in args.tasks.split(",")}
        fractions = [float(f) for f in args.fractions.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        size, epochs, epochs_low = args.size, args.epochs, args.epochs_low

    runs, t0 = [], time.perf_counter()
    for name, csv_path in tasks.items():
        task = prepare_task(csv_path, input_size=size, **{k: v for k, v in overrides.items() if k == "resize"})
        images = plain_images(task, size)
        for fraction in fractions:
            n_epochs = epochs if fraction >= 1 else epochs_low
            for seed in seeds:
                labeled = label_subset(task.table, task.rows("train"), fraction, seed)
                ours = medssl_run(task, fraction, seed, n_epochs, {k: v for k, v in overrides.items() if k != "resize"},
                                  work / name / f"f{fraction:g}-s{seed}")
                plain = plain_run(task, images, labeled, n_epochs, seed)
                runs.append({"task": name, "fraction": fraction, "seed": seed, "labeled": len(labeled),
                             "epochs": n_epochs, "medssl": ours, "plain": plain,
                             "diff": None if None in (ours["test_auc"], plain["test_auc"])
                             else ours["test_auc"] - plain["test_auc"]})
                print(f"{name} f={fraction:g} seed={seed}: medssl {ours['test_auc']:.3f} (val {ours['val_auc']:.3f}, "
                      f"{ours['steps']} steps)  plain {plain['test_auc']:.3f} (val {plain['val_auc']:.3f}, "
                      f"{plain['steps']} steps)", flush=True)

    print("\n| task | labels | medssl scratch test AUC | plain recipe test AUC | Δ (medssl − plain) | steps |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in tasks:
        for fraction in fractions:
            rows = [r for r in runs if r["task"] == name and r["fraction"] == fraction]
            mean = {k: statistics.mean(r[k]["test_auc"] for r in rows) for k in ("medssl", "plain")}
            print(f"| {name} | {fraction:g} | {mean['medssl']:.3f} | {mean['plain']:.3f} | "
                  f"{mean['medssl'] - mean['plain']:+.3f} | {rows[0]['medssl']['steps']} |")
    summary = {"command": shlex.join([sys.executable, *sys.argv]), "settings": overrides, "size": size,
               "seconds": round(time.perf_counter() - t0, 1), "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
