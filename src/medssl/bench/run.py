"""``run_bench``: pool -> ingest -> pretrain -> downstream runs -> results and plots (the callers, `medssl bench`
and `medssl demo`, then build report.html from the folder with ``medssl.report.build_report``).

Layout of the bench folder (every stage an ordinary medssl output, so each can be inspected alone):

    bench.yaml            the settings this bench ran with
    tasks/<task>.csv      each task CSV as used (absolute paths, relabelled)
    pool.json             the pretraining pool: which files, and the held-out copies left out
    shards/               `medssl ingest` of the pool
    curated/              `medssl curate` of shards/ (with a curate: setting): what pretraining reads
    pretrain/             `medssl pretrain` run on those shards
    probe/<task>/          `medssl probe` of the pretraining run's snapshots (with pretrain.snapshot_every)
    <task>/<arm>-f<fraction>-s<seed>/   `medssl finetune` outputs (+ robustness.json)
    results.json, results.md, plots/*.png, report.html

Rerunning the same command resumes: ingest and pretraining continue from their own state, finished
downstream runs with unchanged settings are kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from medssl.artifacts import CARD, CHECKPOINT, METRICS_LOG, RESULTS, SNAPSHOTS, BenchResults, ModelCard
from medssl.atomic import atomic_write_text
from medssl.bench import plots
from medssl.bench.pool import pretraining_pool, write_task_csv
from medssl.bench.results import load_results, markdown, summarise
from medssl.bench.runs import execute, finetune_settings, pending_job, run_matrix, task_settings
from medssl.config import BenchConfig, ConfigError, CurateConfig, IngestConfig, PretrainConfig, dump_config
from medssl.downstream.api import prepare_task
from medssl.downstream.curve import PLOT, probe_curve
from medssl.downstream.tasks import Task
from medssl.machine import machine_facts


def _pool_stage(cfg: BenchConfig, tasks: dict[str, Task], out: Path, show_progress: bool) -> dict:
    from medssl.ingest import ingest

    pool = pretraining_pool(tasks, cfg.unlabeled)
    if not pool.files:
        raise ConfigError("the pretraining pool is empty: the tasks' train splits hold no usable file")
    record = {"files": [str(f) for f in pool.files], "sources": pool.summary}
    pool_file = out / "pool.json"
    if ((out / "shards").exists() and pool_file.is_file()
            and json.loads(pool_file.read_text())["files"] != record["files"]):
        raise ConfigError(f"{out}: the pretraining pool differs from the one its shards/ and pretrain/ were made from "
                          "(tasks, splits or unlabeled inputs changed); choose another --out or delete those folders")
    atomic_write_text(pool_file, json.dumps(record, indent=1))
    summary = ingest(IngestConfig.model_validate({**cfg.ingest, "inputs": pool.files, "out": out / "shards"}),
                     show_progress)
    return {"files": len(pool.files), "images": summary.report["samples"], "sources": pool.summary,
            "rejected": summary.report["status"].get("rejected", 0)}


def _curate_stage(cfg: BenchConfig, out: Path, show_progress: bool) -> dict:
    """Near-duplicate slices of the pool's shards dropped into curated/ (counts of the curate report)."""
    from medssl.curate import curate

    report = curate(CurateConfig.model_validate({**cfg.curate, "shards": [out / "shards"], "out": out / "curated"}),
                    show_progress)
    return {k: report[k] for k in ("settings", "read", "kept", "dropped", "by_reason", "by_modality")}


def _pretrain_stage(cfg: BenchConfig, out: Path, show_progress: bool) -> dict:
    from medssl.train.pretrain import pretrain

    shards = out / ("curated" if cfg.curate is not None else "shards")
    pcfg = PretrainConfig.model_validate({**cfg.pretrain, "shards": [shards], "out": out / "pretrain"})
    run = out / "pretrain"
    if not ((run / CARD).is_file() and not (run / CHECKPOINT).exists()):
        run = pretrain(pcfg, show_progress)  # (else: finished, and its checkpoint removed to save space)
    card = ModelCard.read(run / CARD)
    losses = [r["loss"] for r in map(json.loads, (run / METRICS_LOG).read_text().splitlines()) if "loss" in r]
    return {"run": str(run), "architecture": card.architecture, "steps": card.steps,
            "batch_size": pcfg.batch_size, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None}


def _has_snapshots(run: Path) -> bool:
    return (run / SNAPSHOTS).is_dir()


def _curve_stage(cfg: BenchConfig, tasks: dict[str, Task], out: Path, show_progress: bool) -> dict[str, list[dict]]:
    """The frozen probes on every snapshot of the pretraining run, per task: how pretraining length pays off."""
    curves = {}
    for t in cfg.tasks:
        curve = probe_curve(out / "pretrain", tasks[t.name], out / "probe" / t.name, cfg.label_fractions, cfg.seeds,
                            task_settings(cfg, t), name=t.name, show_progress=show_progress)
        curves[t.name] = curve["points"]
    return curves


def run_bench(cfg: BenchConfig, show_progress: bool = True, command: str | None = None,
              phase: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) a bench; returns the summary also written to ``<out>/results.json``.
    ``phase(name)`` is called as each stage starts (tasks, ingest, curate, pretrain, probe, runs, figures: those
    the bench has); the demo prints them with an estimate of what is left."""
    phase = phase or (lambda name: None)
    if cfg.out is None:
        raise ConfigError("bench needs an output folder (--out DIR or out: in the config)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.yaml", yaml.safe_dump(dump_config(cfg), sort_keys=False))
    t0 = time.perf_counter()
    seconds = {}

    tasks: dict[str, Task] = {}
    phase("tasks")
    for t in cfg.tasks:
        allow = {**cfg.finetune, **t.settings}.get("paths_outside_csv", False)
        csv = write_task_csv(t, out / "tasks", allow)
        tasks[t.name] = prepare_task(csv, show_progress=show_progress, **task_settings(cfg, t))

    needs_encoder = any(a.init == "ssl" for a in cfg.arms)
    pool, pre = None, None
    if needs_encoder:
        t = time.perf_counter()
        phase("ingest")
        pool = _pool_stage(cfg, tasks, out, show_progress)
        seconds["ingest"] = time.perf_counter() - t
        if cfg.curate is not None:
            t = time.perf_counter()
            phase("curate")
            pool["curated"] = _curate_stage(cfg, out, show_progress)
            seconds["curate"] = time.perf_counter() - t
        t = time.perf_counter()
        phase("pretrain")
        pre = _pretrain_stage(cfg, out, show_progress)
        seconds["pretrain"] = time.perf_counter() - t

    curves = {}
    if pre is not None and _has_snapshots(out / "pretrain"):
        t = time.perf_counter()
        phase("probe")
        curves = _curve_stage(cfg, tasks, out, show_progress)
        seconds["probe"] = time.perf_counter() - t

    specs = run_matrix(cfg)
    jobs = [job for spec in specs
            if (job := pending_job(spec,
                                   finetune_settings(cfg, spec, out / "tasks" / f"{spec.task}.csv", out / "pretrain"),
                                   cfg.robustness_levels))]
    t = time.perf_counter()
    phase("runs")
    outcomes = execute(jobs, tasks, cfg, show_progress)
    seconds["runs"] = time.perf_counter() - t
    failures = [o for o in outcomes if not o["ok"]]

    results = load_results(cfg, specs)
    summary = {"name": out.resolve().name, "command": command or "run_bench(...)", "machine": machine_facts(),
               "pool": pool, "pretrain": pre, "runs": {"planned": len(specs), "run_now": len(jobs),
                                                        "finished": len(results), "failed": len(failures)},
               "failures": [{"run": f["run"], "error": f["error"]} for f in failures],
               "notes": _notes(pool), **summarise(cfg, results), "curves": curves, "config": dump_config(cfg)}
    phase("figures")
    seconds["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(seconds.get(k, 0.0), 1) for k in ("ingest", "curate", "pretrain", "probe", "runs",
                                                                     "total")}
    summary["plots"] = [str(p.relative_to(out)) for p in plots.bench_plots(cfg, results, out / "plots")]
    summary["plots"] += [f"probe/{name}/{PLOT}" for name in curves]
    for o in outcomes:  # a failure's traceback goes to a file, not into the summary; a success clears it
        if o["ok"]:
            (out / o["run"] / "error.txt").unlink(missing_ok=True)
        else:
            atomic_write_text(out / o["run"] / "error.txt", o["traceback"])
    record = BenchResults.model_validate(summary)  # the file's contract, checked before it is written
    record.write(out / RESULTS)
    summary = record.model_dump()
    atomic_write_text(out / "results.md", markdown(summary))
    return summary


def report_task(cfg: BenchConfig) -> Path:
    """The task CSV whose labels colour the report's embedding map (the report takes one): the first task's."""
    return Path(cfg.out) / "tasks" / f"{cfg.tasks[0].name}.csv"


def _notes(pool: dict | None) -> list[str]:
    notes = []
    for source, counts in (pool or {}).get("sources", {}).items():
        if source.startswith("task ") and counts["held_out_copies"]:
            notes.append(f"{source}: {counts['held_out_copies']} file(s) are byte-identical copies of validation/test "
                         "images; they were kept out of pretraining, but the supervised runs train on them (the data "
                         "set's own split), which flatters every arm's test AUC alike.")
    return notes

