"""``medssl demo``: the whole system on built-in phantoms in a few minutes on a laptop CPU.

generate phantoms (DICOM of several encodings, NIfTI; CT, radiographs, MR, ultrasound) -> ingest them
-> pretrain briefly -> train the head-CT hemorrhage task from scratch and from the pretrained encoder
(fine-tune, hybrid) at two label fractions -> robustness sweeps -> one HTML report. It is a small
``medssl bench`` (``demo_config`` shows its settings), so the demo folder has the bench's layout and
the comparison of SSL against scratch is reported as measured, whatever it shows.

Rerunning the command resumes: an existing phantom archive is reused, finished stages are kept.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from medssl.artifacts import BEST, CHECKPOINT
from medssl.bench import report_task, run_bench
from medssl.config import BenchConfig
from medssl.demo.archive import generate_demo_archive
from medssl.report import build_report

TASK = "ct-hemorrhage"
# Head CT patients of the phantom archive (other modalities in proportion: ~1,100 files). Half have a
# small haematoma spanning 1-2 slices: ~100 positive slices and as many normal ones, so that the test
# split holds ~35 slices and a 25% label subset ~25.
PATIENTS = 128
# ``medssl demo --quick``: the same pipeline on a tiny archive with tiny budgets, to check an installation in
# about a minute; its numbers mean nothing.
QUICK_PATIENTS, QUICK_SIZE = 6, 32
QUICK = {"pretrain": {"max_steps": 4, "batch_size": 8, "n_prototypes": 8, "proj_hidden": 32, "proj_dim": 16,
                      "warmup_steps": 1, "freeze_prototypes_steps": 1, "checkpoint_every": 2, "log_every": 2,
                      "augment": {"global_size": 32, "local_size": 16, "n_local": 2}},
         "finetune": {"input_size": 32, "epochs": 2, "batch_size": 8, "ssl_batch_size": 4, "bootstrap": 50},
         "label_fractions": [1.0], "seeds": [0], "robustness_levels": {"rotation": [15], "gamma": [1.5]}}


def demo_config(out: Path, task_csv: Path, archive: Path, workers: int = 2, quick: bool = False) -> BenchConfig:
    """The demo's bench: sized for ~5 minutes on 2 CPU cores (``quick``: a minute, numbers meaningless).

    30 fine-tuning epochs: with 25% of the labels an epoch is 2 steps, and training from scratch was
    still improving on validation after 15 epochs (with all labels it peaked near epoch 10).
    """
    settings = {
        "out": out,
        # Brain window; the positive class is the finding (sorted order would score "normal").
        "tasks": [{"name": TASK, "csv": task_csv, "settings": {"ct_window": [40, 80], "positive_class": "hemorrhage"}}],
        "unlabeled": [archive],  # every modality goes into pretraining (held-out test slices are left out)
        "ingest": {"workers": workers},
        "pretrain": {"max_steps": 150, "epochs": 1000, "batch_size": 32, "n_prototypes": 30, "queue_length": 0,
                     "warmup_steps": 15, "freeze_prototypes_steps": 15, "checkpoint_every": 50, "log_every": 5,
                     "augment": {"global_size": 64, "local_size": 32}, "workers": min(workers, 2)},
        "finetune": {"input_size": 64, "epochs": 30, "batch_size": 16, "ssl_batch_size": 8, "lr": 3e-4,
                     "bootstrap": 500},
        "arms": [{"name": "scratch-finetune", "init": "scratch", "mode": "finetune"},
                 {"name": "ssl-finetune", "init": "ssl", "mode": "finetune"},
                 {"name": "ssl-hybrid", "init": "ssl", "mode": "hybrid"}],
        "label_fractions": [0.25, 1.0],
        "seeds": [0, 1],
        "robustness_fractions": [1.0],
        "workers": workers,
    }
    if quick:
        for key, value in QUICK.items():
            settings[key] = {**settings[key], **value} if isinstance(value, dict) and key in settings else value
    return BenchConfig.model_validate(settings)


# Seconds each phase took in the full demo on 2 idle cores (BENCHMARKS.md, "The demo"): the estimate of
# what is left that the demo prints. A busy machine takes longer (two heavy jobs at once: 4-5x).
PHASE_SECONDS = {"archive": 25, "tasks": 5, "ingest": 20, "pretrain": 60, "runs": 195, "figures": 25}


class _Phases:
    """Prints each phase as it starts, with a rough estimate of the time left (stderr; not with --quiet)."""

    def __init__(self, quick: bool, show: bool):
        self.scale, self.show, self.started = (0.15 if quick else 1.0), show, time.monotonic()

    def __call__(self, name: str) -> None:
        if not self.show or name not in PHASE_SECONDS:
            return
        names = list(PHASE_SECONDS)
        left = self.scale * sum(PHASE_SECONDS[n] for n in names[names.index(name):])
        elapsed = time.monotonic() - self.started
        print(f"demo: {name} ({names.index(name) + 1}/{len(names)}; {elapsed / 60:.1f} min so far, about "
              f"{max(1, round(left / 60))} min left on 2 idle cores)", file=sys.stderr, flush=True)


def tidy(out: Path) -> tuple[int, int]:
    """Delete what a finished demo no longer needs: each run's classifier (best.pt, 43 MB each at the demo's
    size) and the pretraining checkpoint (only a resume reads it). Kept: metrics, predictions, robustness,
    the report and the pretrained encoder. Returns (files, bytes) removed."""
    files = [*out.glob(f"*/*/{BEST}"), *out.glob(f"*/*/sweep/*/{BEST}"), out / "pretrain" / CHECKPOINT]
    removed = [(p, p.stat().st_size) for p in files if p.is_file()]
    for path, _ in removed:
        path.unlink()
    return len(removed), sum(size for _, size in removed)


def run_demo(out: Path | str = "demo-out", workers: int = 2, show_progress: bool = True, quick: bool = False,
             keep_weights: bool = False) -> dict:
    """Run (or resume) the demo in ``out``; returns the bench summary (``summary["report"]``: the HTML and
    ``summary["tidied"]``: files and bytes removed by ``tidy`` unless ``keep_weights``).
    ``quick``: a tiny archive and budgets (``QUICK``), to check an installation."""
    out = Path(out)
    data = out / "data"
    task_csv = data / f"task-{TASK}.csv"
    phases = _Phases(quick, show_progress)
    if not task_csv.is_file():
        phases("archive")
        # The task CSVs are written last: without them an earlier generation was cut short; start it afresh.
        shutil.rmtree(data / "archive", ignore_errors=True)
        generate_demo_archive(data, **({"n_patients": QUICK_PATIENTS, "size": QUICK_SIZE} if quick else
                                       {"n_patients": PATIENTS}))
    cfg = demo_config(out, task_csv, data / "archive", workers, quick)
    summary = run_bench(cfg, show_progress, command=f"medssl demo --out {out}" + (" --quick" if quick else ""),
                        phase=phases)
    report = str(build_report(out, task=report_task(cfg), log=lambda message: None))
    tidied = (0, 0) if keep_weights or summary["failures"] else tidy(out)
    return {**summary, "report": report, "tidied": tidied}
