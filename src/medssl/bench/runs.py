"""The bench's downstream runs: every task x arm x label fraction x seed, run in parallel processes.

Each run is an ordinary ``finetune`` output folder (``<out>/<task>/<arm>-f<fraction>-s<seed>/``),
followed by ``evaluate_robustness`` where asked. Runs are independent: the convergence comparison
against scratch is made afterwards from the histories (``results.py``), so nothing waits for
anything. A finished run whose settings are unchanged is not run again: rerunning the bench
resumes it. A failing run is recorded and the others go on.

Processes: ``workers`` spawned processes with ``threads_per_worker`` torch threads each. On a small
CPU two single-threaded runs side by side do ~1.4x the work of one run on two threads (small
batches leave threads idle), and the tasks' decoded images are sent to each process once.
"""

from __future__ import annotations

import multiprocessing
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from medssl.artifacts import METRICS, ROBUSTNESS, DownstreamMetrics
from medssl.config import BenchConfig, BenchTask, FinetuneConfig
from medssl.downstream.sweep import finished
from medssl.downstream.tasks import Task


@dataclass(frozen=True)
class RunSpec:
    task: str
    arm: str
    init: str              # scratch | ssl | a weights file or run folder
    mode: str
    label_fraction: float
    seed: int
    robustness: bool

    @property
    def folder(self) -> str:
        return f"{self.task}/{self.arm}-f{self.label_fraction:g}-s{self.seed}"


def run_matrix(cfg: BenchConfig) -> list[RunSpec]:
    """Largest label fraction first: the long runs start early and the pool's tail is short ones."""
    # kNN has no classifier to perturb: no robustness sweep.
    specs = [RunSpec(t.name, a.name, a.init, a.mode, f, s, f in cfg.robustness_fractions and a.mode != "knn")
             for f in sorted(cfg.label_fractions, reverse=True) for t in cfg.tasks for s in cfg.seeds for a in cfg.arms]
    return specs


def task_settings(cfg: BenchConfig, task: BenchTask) -> dict[str, Any]:
    """The finetune settings of a task's runs. The bench's copy of the task CSV holds absolute paths, checked
    against the user's CSV folder when it was written (``pool.write_task_csv``), so the runs allow them."""
    return {**cfg.finetune, **task.settings, "paths_outside_csv": True}


def finetune_settings(cfg: BenchConfig, spec: RunSpec, task_csv: Path, pretrain_dir: Path) -> dict[str, Any]:
    task = next(t for t in cfg.tasks if t.name == spec.task)
    arm = next(a for a in cfg.arms if a.name == spec.arm)
    return {**task_settings(cfg, task), **arm.settings, "task": task_csv, "mode": spec.mode, "seed": spec.seed,
            "label_fraction": spec.label_fraction, "init": str(pretrain_dir) if spec.init == "ssl" else spec.init,
            "out": Path(cfg.out) / spec.folder}


def finetune_done(settings: dict[str, Any]) -> DownstreamMetrics | None:
    """The run folder's metrics if they are the results of exactly these settings."""
    return finished(FinetuneConfig.model_validate(settings))


@dataclass(frozen=True)
class Job:
    spec: RunSpec
    settings: dict[str, Any]
    finetune: bool                          # False: the run is done, only its robustness sweep is missing
    levels: dict[str, list[float]]          # robustness sweep levels overriding the defaults


def pending_job(spec: RunSpec, settings: dict[str, Any], levels: dict[str, list[float]]) -> Job | None:
    """What is left to do for a run, or None when it is complete (a run without a test AUC gets no robustness
    sweep: there is no clean AUC to measure a drop from)."""
    done = finetune_done(settings)
    if done is None:
        return Job(spec, settings, True, levels)
    if spec.robustness and not (Path(settings["out"]) / ROBUSTNESS).is_file() and done.test_auc is not None:
        return Job(spec, settings, False, levels)
    return None


# Set in each worker process by _init_worker: the prepared tasks, sent once rather than with every run.
_TASKS: dict[str, Task] = {}


def _init_worker(tasks: dict[str, Task], threads: int) -> None:
    torch.set_num_threads(threads)
    _TASKS.update(tasks)


def _run_one(job: Job) -> dict[str, Any]:
    spec, settings = job.spec, job.settings
    try:
        from medssl.downstream import evaluate_robustness, finetune

        task = _TASKS[spec.task]
        if job.finetune:
            (Path(settings["out"]) / ROBUSTNESS).unlink(missing_ok=True)  # it scored the previous model
            finetune(task, **{k: v for k, v in settings.items() if k != "task"})  # the prepared task is it
        auc = DownstreamMetrics.read(Path(settings["out"]) / METRICS).test_auc
        if spec.robustness and auc is not None:  # no test AUC: no clean AUC to measure a drop from
            evaluate_robustness(settings["out"], task=task, sweeps=job.levels or None)
        return {"run": spec.folder, "ok": True, "test_auc": auc}
    except Exception as e:  # one failing run (TrainingDiverged too) must not lose the others: it goes in the results
        return {"run": spec.folder, "ok": False, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def _outcome_text(outcome: dict[str, Any]) -> str:
    if not outcome["ok"]:
        return "FAILED"
    return "no test AUC" if outcome["test_auc"] is None else f"AUC {outcome['test_auc']:.3f}"


def execute(jobs: list[Job], tasks: dict[str, Task],
            cfg: BenchConfig, show_progress: bool) -> list[dict[str, Any]]:
    """Run the jobs (in ``cfg.workers`` processes); returns one outcome per job, in completion order."""
    if not jobs:
        return []
    bar = tqdm(total=len(jobs), desc="downstream runs", unit="run", disable=not show_progress)
    outcomes = []
    threads = None
    if cfg.workers == 1:  # in this process, e.g. under a debugger
        threads = torch.get_num_threads()
        _init_worker(tasks, cfg.threads_per_worker)
        results = map(_run_one, jobs)
        pool = None
    else:
        pool = multiprocessing.get_context("spawn").Pool(min(cfg.workers, len(jobs)), _init_worker,
                                                          (tasks, cfg.threads_per_worker), maxtasksperchild=None)
        results = pool.imap_unordered(_run_one, jobs)
    try:
        for outcome in results:
            outcomes.append(outcome)
            bar.update(1)
            bar.set_postfix_str(f"{outcome['run']}: {_outcome_text(outcome)}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if threads is not None:
            torch.set_num_threads(threads)
        bar.close()
    return outcomes
