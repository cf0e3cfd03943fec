"""The bench's results: the three claims of Ghesu et al. 2022, answered from the runs' own files.

1. Accuracy: test AUC per task, arm and label fraction (mean and spread over seeds, the bootstrap
   95% interval averaged over seeds), and the difference to the scratch baseline paired by seed.
2. Convergence: for every run, the first evaluated step at which its validation AUC reaches the best
   validation AUC of the scratch baseline with the same task, fraction and seed; "steps saved" is
   1 - that step / the step at which the baseline reached its best (the paper's "fewer training steps").
3. Robustness: the AUC drop from clean at the worst level of each perturbation sweep.

The scratch baseline of an arm is the scratch arm with the same mode, else the first scratch arm.
Nothing here is tuned or selected: every run of the matrix is reported, failed ones included. A run that
diverged (``status: "diverged"`` in its metrics.json) is reported from its best evaluation before it, with
a note; one without a test AUC (its best classifier's test scores are not finite) is shown as such and left
out of the means and of the differences to scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.artifacts import DownstreamMetrics, DownstreamResult, RobustnessReport, is_downstream, read_downstream
from medssl.bench.runs import RunSpec
from medssl.config import BenchConfig
from medssl.downstream.convergence import steps_to_target
from medssl.downstream.curve import mean_curves

# Arms whose encoder is not trained: no convergence comparison.
FROZEN_MODES = ("knn", "linear")


@dataclass
class RunResult:
    """A run of the matrix: where it sits in it, and what it wrote (``artifacts.read_downstream``)."""
    spec: RunSpec
    run: DownstreamResult

    @property
    def metrics(self) -> DownstreamMetrics:
        return self.run.metrics

    @property
    def robustness(self) -> RobustnessReport | None:
        return self.run.robustness


def load_results(cfg: BenchConfig, specs: list[RunSpec]) -> list[RunResult]:
    """The finished runs of the matrix (a run without metrics.json failed or has not run)."""
    folders = [(spec, Path(cfg.out) / spec.folder) for spec in specs]
    return [RunResult(spec, read_downstream(folder)) for spec, folder in folders if is_downstream(folder)]


def baseline_arm(cfg: BenchConfig, arm: str) -> str:
    mode = next(a.mode for a in cfg.arms if a.name == arm)
    scratch = [a for a in cfg.arms if a.init == "scratch"]
    return next((a.name for a in scratch if a.mode == mode), scratch[0].name)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _sd(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarise(cfg: BenchConfig, results: list[RunResult]) -> dict:
    """Rows of (task, arm, label fraction) with accuracy, convergence and robustness over seeds."""
    by_key = {(r.spec.task, r.spec.arm, r.spec.label_fraction, r.spec.seed): r for r in results}
    rows = []
    for task in cfg.tasks:
        for fraction in cfg.label_fractions:
            for arm in cfg.arms:
                runs = [by_key[k] for s in cfg.seeds if (k := (task.name, arm.name, fraction, s)) in by_key]
                if not runs:
                    continue
                base_name = baseline_arm(cfg, arm.name)
                aucs = [r.metrics.test_auc for r in runs]
                row = {"task": task.name, "arm": arm.name, "init": arm.init, "mode": arm.mode,
                       "label_fraction": fraction, "seeds": [r.spec.seed for r in runs],
                       "test_auc": aucs, "test_auc_mean": _mean(aucs), "test_auc_sd": _sd(aucs),
                       "test_auc_ci_mean": [_mean([(r.metrics.test_auc_ci or [None, None])[i] for r in runs])
                                            for i in (0, 1)],
                       "best_step": [r.metrics.best_step for r in runs], "steps": [r.metrics.steps for r in runs],
                       "train_seconds_mean": _mean([r.metrics.train_seconds for r in runs]),
                       "labeled_train": runs[0].metrics.task["labeled_train"],
                       "test_images": runs[0].metrics.task["images"]["test"], "baseline": base_name,
                       "diverged": [d.model_dump() if (d := r.metrics.diverged) else None for r in runs]}
                row |= _against_baseline(runs, by_key, task.name, base_name, fraction, arm.mode in FROZEN_MODES)
                row["robustness"] = _robustness([r.robustness for r in runs if r.robustness])
                rows.append(row)
    return {"rows": rows}


def _against_baseline(runs: list[RunResult], by_key: dict, task: str, base: str, fraction: float,
                      frozen: bool) -> dict:
    """Δ AUC paired by seed; steps to the baseline's best, except for frozen-encoder arms and against a kNN
    baseline (kNN trains nothing, a linear probe's steps train a head alone: neither compares with fine-tuning
    steps)."""
    diffs, saved, reached_at, base_steps = [], [], [], []
    for r in runs:
        b = by_key.get((task, base, fraction, r.spec.seed))
        if b is None:
            continue
        if r.metrics.test_auc is not None and b.metrics.test_auc is not None:  # paired only where both scored
            diffs.append(r.metrics.test_auc - b.metrics.test_auc)
        if frozen or not b.metrics.best_step:  # a kNN baseline trains nothing: no steps to compare with
            continue
        target = b.metrics.best_val_auc
        reached = steps_to_target(r.metrics.val_curve(), target)
        reached_at.append(reached)
        base_steps.append(b.metrics.best_step)
        saved.append(None if reached is None else 1 - reached / b.metrics.best_step)
    return {"auc_diff": diffs, "auc_diff_mean": _mean(diffs), "seeds_better": sum(d > 0 for d in diffs),
            "steps_to_baseline_best": reached_at, "baseline_best_step": base_steps,
            "steps_saved": saved, "steps_saved_mean": _mean(saved),
            "seeds_reached": sum(s is not None for s in saved)}


def _robustness(records: list[RobustnessReport]) -> dict:
    """Per sweep: clean AUC minus AUC at each level, averaged over seeds; and the worst level's mean drop."""
    sweeps: dict[str, dict] = {}
    for name in sorted({n for r in records for n in r.sweeps}):
        levels: dict[float, list[float]] = {}
        for r in records:
            for p in r.sweeps.get(name, []):
                levels.setdefault(p.level, []).append(r.clean_auc - p.auc)
        drops = {lvl: _mean(v) for lvl, v in sorted(levels.items())}
        worst = max(drops, key=lambda lvl: drops[lvl])
        sweeps[name] = {"mean_drop_by_level": [{"level": lvl, "drop": d} for lvl, d in drops.items()],
                        "worst_level": worst, "worst_drop": drops[worst]}
    return sweeps


def _f(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


ACCURACY_LEGEND = ("Test AUC: mean ± sd over seeds [mean bootstrap 95% interval]; runs without a test AUC (non-finite "
                   "test scores) are left out of it and of Δ (scored/seeds), \"diverged\" or \"n/a\" if none has one; "
                   "Δ: against the scratch baseline, paired by seed (seeds better); steps saved: 1 - (first step "
                   "reaching the baseline's best validation AUC) / (step of the baseline's best), mean over the seeds "
                   "that reached it (reached/seeds).")
ROBUSTNESS_LEGEND = ("AUC drop from clean at each sweep's worst level (mean over seeds; the level in brackets; "
                     "\"no drop\": no level lowered the AUC).")


def setup_lines(summary: dict) -> list[str]:
    """Command, machine, time, pool and pretraining of a bench, one sentence each."""
    m, sec = summary["machine"], summary["seconds"]
    lines = [f"Command: {summary['command']}",
             # results.json of benches before medssl.machine had cores / cuda / torch at the top level
             f"Machine: {m.get('cpu')}, {m.get('usable_cores', m.get('cores'))} cores, {m.get('ram_gib', '?')} GiB RAM"
             + (f", GPU {m.get('gpu') or m['cuda']}" if m.get("gpu") or m.get("cuda") else "")
             + f"; torch {m.get('versions', {}).get('torch', m.get('torch'))}",
             f"Wall time of this invocation: {sec['total'] / 60:.1f} min (pool ingest {sec['ingest']:.0f} s, "
             f"pretraining {sec['pretrain']:.0f} s, probing its snapshots {sec.get('probe', 0):.0f} s, "
             f"downstream runs {sec['runs']:.0f} s)"]
    p, pool = summary["pretrain"], summary["pool"]
    if p is None:
        return lines + ["No pretraining: no arm starts from the pretrained encoder."]
    sources = "; ".join(f"{k}: {v['pooled']} of {v['files']} files, {v['held_out_copies']} copies of held-out "
                        "images left out" for k, v in pool["sources"].items())
    return lines + [f"Pretraining pool: {pool['files']} files -> {pool['images']} images ({sources}).",
                    f"Pretraining: {p['architecture']}, {p['steps']} steps of {p['batch_size']} images, "
                    f"loss {_f(p['loss_first'], 2)} -> {_f(p['loss_last'], 2)}."]


def _diverged(row: dict) -> list:
    """Per seed of a row, its metrics.json's ``diverged`` record or None (results.json of older versions: none)."""
    return row.get("diverged") or [None] * len(row["seeds"])


def _auc_cell(row: dict) -> str:
    scored = sum(a is not None for a in row["test_auc"])
    if not scored:
        return "diverged" if any(_diverged(row)) else "n/a"
    ci = row["test_auc_ci_mean"]
    cell = f"{_f(row['test_auc_mean'])} ± {_f(row['test_auc_sd'])} [{_f(ci[0])}–{_f(ci[1])}]"
    return cell if scored == len(row["test_auc"]) else f"{cell} ({scored}/{len(row['test_auc'])} seeds)"


def run_notes(summary: dict) -> list[str]:
    """One note per run that diverged or has no test AUC, naming it by its row and seed."""
    notes = []
    for row in summary["rows"]:
        for seed, auc, diverged in zip(row["seeds"], row["test_auc"], _diverged(row)):
            run = f"{row['task']} / {row['arm']} / labels {row['label_fraction']:g} / seed {seed}"
            if diverged is not None:
                notes.append(f"{run}: training diverged after step {diverged['after_step']} "
                             f"(epoch {diverged['epoch']}: non-finite {diverged['what']}); reported from its best "
                             "evaluation before it.")
            if auc is None:
                notes.append(f"{run}: no test AUC (its best classifier's test scores are not finite); left out of the "
                             "means and of Δ vs scratch.")
    return notes


def accuracy_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["task", "arm", "labels", "train images", "test AUC", "Δ vs scratch", "steps saved",
               "steps (best / run)"]
    rows = []
    for r in summary["rows"]:
        auc = _auc_cell(r)
        is_base = r["arm"] == r["baseline"]
        diff = ("baseline" if is_base
                else f"{_f(r['auc_diff_mean'], sign=True)} ({r['seeds_better']}/{len(r['auc_diff'])})")
        if is_base or r["mode"] in FROZEN_MODES:
            saved = "—"
        elif r["steps_saved_mean"] is None:
            saved = f"never reached (0/{len(r['steps_saved'])})"
        else:
            saved = f"{r['steps_saved_mean'] * 100:.0f}% ({r['seeds_reached']}/{len(r['steps_saved'])})"
        steps = f"{np.mean(r['best_step']):.0f} / {np.mean(r['steps']):.0f}"
        rows.append([r["task"], r["arm"], f"{r['label_fraction']:g}", str(r["labeled_train"]), auc, diff, saved, steps])
    return headers, rows


def robustness_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    robust = [r for r in summary["rows"] if r["robustness"]]
    sweeps = sorted({s for r in robust for s in r["robustness"]})
    rows = [[r["task"], r["arm"], f"{r['label_fraction']:g}", *[_drop_cell(r["robustness"].get(s)) for s in sweeps]]
            for r in robust]
    return ["task", "arm", "labels", *sweeps], rows


CURVE_LEGEND = ("Frozen probes on the pretraining run's encoder as it was saved every few steps (step 0: random "
                "initialisation): test AUC, mean over seeds; the linear probe's learning rate chosen on validation.")


def curve_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per task, probe and label fraction; one column per pretraining step."""
    curves = {task: mean_curves(points) for task, points in (summary.get("curves") or {}).items()}
    steps = sorted({step for lines in curves.values() for line in lines.values() for step, _ in line})
    rows = []
    for task, lines in curves.items():
        for (mode, fraction), line in sorted(lines.items()):
            at = dict(line)
            rows.append([task, mode, f"{fraction:g}", *[_f(at.get(s)) for s in steps]])
    return ["task", "probe", "labels", *[f"step {s}" for s in steps]], rows


def _drop_cell(sweep: dict | None) -> str:
    if sweep is None:
        return "—"
    if sweep["worst_drop"] <= 0:
        return "no drop"  # no level lowered the AUC
    return f"{_f(sweep['worst_drop'])} ({sweep['worst_level']:g})"


def _md_table(headers: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Markdown table; columns from ``left`` on are right-aligned."""
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    return ["| " + " | ".join(line) + " |" for line in (headers, align, *rows)]


def _fraction_text(fraction: float) -> str:
    return "all labels" if fraction == 1 else f"{fraction:g} of the labels"


def _with_interval(row: dict) -> str:
    lo, hi = row.get("test_auc_ci_mean") or (None, None)
    interval = f" [{lo:.3f}-{hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{row['test_auc_mean']:.3f}{interval}"


def verdict_lines(summary: dict) -> list[str]:
    """The answer first: per task and label fraction, each arm against its scratch baseline, with the mean
    bootstrap 95% intervals and what they mean (a difference is claimed only when they are apart)."""
    rows = {(r["task"], r["arm"], r["label_fraction"]): r for r in summary["rows"] if r["test_auc_mean"] is not None}
    lines = []
    for (task, arm, fraction), row in sorted(rows.items(), key=lambda kv: (kv[0][0], -kv[0][2], kv[0][1])):
        base = rows.get((task, row.get("baseline"), fraction))
        if base is None or base is row:
            continue
        (lo, hi), (base_lo, base_hi) = row.get("test_auc_ci_mean") or (None, None), \
            base.get("test_auc_ci_mean") or (None, None)
        diff = row["test_auc_mean"] - base["test_auc_mean"]
        if None in (lo, hi, base_lo, base_hi):
            reading = "no interval to judge it by"
        elif lo > base_hi:
            reading = f"{arm} better: the intervals are apart"
        elif base_lo > hi:
            reading = f"{base['arm']} better: the intervals are apart"
        else:
            reading = "no clear difference: the intervals overlap"
        seeds = len(row["test_auc"])
        lines.append(f"{task}, {_fraction_text(fraction)}: {arm} {_with_interval(row)} against {base['arm']} "
                     f"{_with_interval(base)}, {diff:+.3f} AUC (mean of {seeds} seed{'s' * (seeds != 1)}, "
                     f"{row['test_images']} test images): {reading}.")
    return lines


VERDICT_LEGEND = ("Test AUC, mean over seeds [mean bootstrap 95% interval]. A difference is claimed only when "
                  "the intervals are apart; overlapping intervals mean the test set cannot tell the two apart.")


def markdown(summary: dict) -> str:
    """results.md, from results.json's content."""
    setup = setup_lines(summary)
    lines = [f"# Bench results: {summary['name']}", "", f"Command: `{summary['command']}`  ",
             *[f"{line}  " for line in setup[1:]], ""]
    verdicts = verdict_lines(summary)
    if verdicts:
        lines += ["## In short", "", VERDICT_LEGEND, "", *[f"- {v}" for v in verdicts], ""]
    lines += ["## Accuracy and convergence", "", ACCURACY_LEGEND, "", *_md_table(*accuracy_table(summary), left=2)]
    headers, rows = robustness_table(summary)
    if rows:
        lines += ["", "## Robustness", "", ROBUSTNESS_LEGEND, "", *_md_table(headers, rows, left=2)]
    headers, rows = curve_table(summary)
    if rows:
        lines += ["", "## Pretraining length", "", CURVE_LEGEND, "", *_md_table(headers, rows, left=2)]
    if summary["failures"]:
        lines += ["", "## Failed runs", ""] + [f"- {f['run']}: {f['error']}" for f in summary["failures"]]
    notes = summary["notes"] + run_notes(summary)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
