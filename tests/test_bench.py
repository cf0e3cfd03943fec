"""`medssl bench` end to end on phantoms, the pretraining pool's exclusion of held-out images, task CSV rewriting."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

from helpers import downstream_metrics, manifest
from medssl.bench.pool import pretraining_pool, write_task_csv
from medssl.cli import main
from medssl.config import BenchConfig, BenchTask, ConfigError, FinetuneConfig, dump_config, load_config
from medssl.demo import generate_demo_archive
from medssl.downstream import TaskError, prepare_task
from medssl.ingest.pipeline import hash_file

TINY_PRETRAIN = {"max_steps": 2, "batch_size": 8, "workers": 0, "proj_hidden": 32, "proj_dim": 16, "n_prototypes": 8,
                 "warmup_steps": 1, "freeze_prototypes_steps": 1,
                 "augment": {"global_size": 32, "local_size": 16, "n_local": 2}}
TINY_FINETUNE = {"input_size": 32, "epochs": 2, "batch_size": 8, "ssl_batch_size": 4, "bootstrap": 50}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return generate_demo_archive(tmp_path_factory.mktemp("phantoms") / "demo", n_patients=12, size=48)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # ~45 s: a bench of 12 runs, twice
def test_bench_end_to_end_and_resume(tmp_path, phantoms):
    config = {"out": str(tmp_path / "bench"),
              "tasks": [{"name": "ct", "csv": str(phantoms.tasks["ct-hemorrhage"]),
                         "settings": {"ct_window": [40, 80]}}],
              "unlabeled": [str(phantoms.archive)], "ingest": {"workers": 1}, "pretrain": TINY_PRETRAIN,
              "finetune": TINY_FINETUNE, "label_fractions": [0.5, 1.0], "seeds": [0, 1],
              "robustness_fractions": [1.0], "robustness_levels": {"rotation": [15]}, "workers": 2}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(tmp_path / "bench.yaml"), "--quiet"]) == 0
    out = tmp_path / "bench"
    summary = json.loads((out / "results.json").read_text())
    assert summary["runs"] == {"planned": 12, "run_now": 12, "finished": 12, "failed": 0}
    rows = {(r["arm"], r["label_fraction"]): r for r in summary["rows"]}
    assert set(rows) == {(a, f) for a in ("scratch-finetune", "ssl-finetune", "ssl-hybrid") for f in (0.5, 1.0)}
    assert all(len(r["test_auc"]) == 2 and r["baseline"] == "scratch-finetune" for r in rows.values())
    assert rows[("scratch-finetune", 0.5)]["labeled_train"] < rows[("scratch-finetune", 1.0)]["labeled_train"]
    # Robustness only at fraction 1, with the level asked for (plus the clean point).
    assert (set(rows[("ssl-finetune", 1.0)]["robustness"]) >= {"rotation"}
            and not rows[("ssl-finetune", 0.5)]["robustness"])
    levels = [p["level"]
              for p in json.loads((out / "ct/ssl-finetune-f1-s0/robustness.json").read_text())["sweeps"]["rotation"]]
    assert levels == [0, 15]
    # The SSL runs started from the bench's own pretraining run, the scratch runs did not.
    assert json.loads((out / "ct/ssl-hybrid-f1-s1/metrics.json").read_text())["init"]["init"] == str(out / "pretrain")
    assert json.loads((out / "ct/scratch-finetune-f1-s1/metrics.json").read_text())["init"]["init"] == "scratch"

    # No validation or test image (nor a copy of one) reached pretraining.
    task = prepare_task(out / "tasks" / "ct.csv", input_size=32, ct_window=[40, 80], paths_outside_csv=True)
    held_out = {hash_file(task.table.paths[i])[1] for s in ("val", "test") for i in task.rows(s)}
    ingested = {row.get("sha256") for row in manifest(out / "shards")}
    assert held_out and not held_out & ingested
    assert summary["pool"]["sources"][f"unlabeled: {phantoms.archive}"]["held_out_copies"] >= len(held_out)

    assert {p.split("/")[-1] for p in summary["plots"]} == {"ct-convergence.png", "ct-label-efficiency.png",
                                                            "ct-robustness.png"}
    assert all((out / p).stat().st_size > 5000 for p in summary["plots"])
    md = (out / "results.md").read_text()
    assert "| ct | ssl-hybrid | 0.5 |" in md and "## Robustness" in md
    report = (out / "report.html").read_text()
    assert "Bench: SSL against scratch" in report and "ct-robustness" in report

    # Rerun: everything is kept; a changed setting reruns only what it concerns.
    assert main(["bench", "--config", str(tmp_path / "bench.yaml"), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"]["run_now"] == 0
    shutil.rmtree(out / "ct/ssl-finetune-f1-s0")
    (out / "ct/scratch-finetune-f1-s1/robustness.json").unlink()
    assert main(["bench", "--config", str(tmp_path / "bench.yaml"), "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["runs"]["run_now"] == 2 and again["runs"]["finished"] == 12


def test_pool_leaves_out_copies_of_held_out_images(tmp_path, phantoms):
    """A test image saved again under another name in train must not reach pretraining."""
    rows = _rows(phantoms.tasks["ct-hemorrhage"])
    test_row = next(r for r in rows if r["split"] == "test")
    copy = phantoms.root / "archive" / "copy-of-a-test-image.dcm"
    shutil.copyfile(phantoms.root / test_row["path"], copy)
    try:
        rows.append({**test_row, "path": "archive/copy-of-a-test-image.dcm", "split": "train", "group": "someone-else"})
        task_csv = phantoms.root / "task-with-a-copy.csv"  # CSV paths are relative to its folder
        with open(task_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written = write_task_csv(BenchTask(name="ct", csv=task_csv), tmp_path / "tasks")
        task = prepare_task(written, input_size=32, paths_outside_csv=True)  # the copy holds absolute paths
        pool = pretraining_pool({"ct": task}, [])
        assert copy.resolve() not in pool.files
        assert pool.summary["task ct: train split"]["held_out_copies"] == 1
        train_files = {r["path"] for r in _rows(written) if r["split"] == "train"}
        assert len(pool.files) == len(train_files) - 1
    finally:
        copy.unlink()
        (phantoms.root / "task-with-a-copy.csv").unlink(missing_ok=True)


def test_task_csv_is_rewritten_with_absolute_paths_and_merged_classes(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "task.csv").write_text("path,label,split\na.png,glioma,train\nb.png,none,test\n"
                                                "c.png,meningioma,train\n")
    out = write_task_csv(BenchTask(name="mr", csv=tmp_path / "data" / "task.csv",
                                   relabel={"glioma": "tumour", "meningioma": "tumour"}), tmp_path / "tasks")
    rows = _rows(out)
    assert [r["label"] for r in rows] == ["tumour", "none", "tumour"]
    assert rows[0]["path"] == str(tmp_path / "data" / "a.png") and rows[1]["split"] == "test"
    with pytest.raises(TaskError, match="pituitary"):
        write_task_csv(BenchTask(name="mr", csv=tmp_path / "data" / "task.csv", relabel={"pituitary": "tumour"}),
                       tmp_path / "tasks")


@pytest.mark.parametrize("change, message", [
    ({"arms": [{"name": "ssl", "init": "ssl", "mode": "finetune"}]}, "from scratch"),
    ({"finetune": {"seed": 3}}, "set by the bench"),
    ({"finetune": {"epochs": 0}}, "epochs"),
    ({"tasks": []}, "no tasks"),
    ({"arms": [{"name": "s", "init": "scratch", "mode": "finetune", "settings": {"mode": "linear"}}]},
     "set by the bench"),
    ({"arms": [{"name": "s", "init": "scratch", "mode": "finetune", "settings": {"ssl_weight": -1}}]}, "ssl_weight"),
    ({"label_fractions": [0.0, 1.0]}, r"\(0, 1\]"),
])
def test_bench_config_errors(tmp_path, change, message):
    settings = {"tasks": [{"name": "t", "csv": "t.csv"}], **change}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match=message):
        load_config(BenchConfig, tmp_path / "b.yaml")


def test_bench_paper_preset_is_valid():
    from conftest import REPO

    cfg = load_config(BenchConfig, REPO / "benchmarks" / "paper.yaml")
    assert {t.name for t in cfg.tasks} == {"head-ct-hemorrhage", "brain-mr-tumour"}
    assert len(cfg.seeds) >= 3 and cfg.label_fractions == [0.01, 0.1, 1.0]
    assert {a.mode for a in cfg.arms} == {"knn", "linear", "finetune", "hybrid"}
    assert cfg.pretrain["snapshot_every"] < cfg.pretrain["max_steps"]  # the pretraining-length curve has points
    # Scratch and SSL see the same input size, which is the pretraining crop size.
    assert cfg.finetune["input_size"] == cfg.pretrain["augment"]["global_size"]


def test_arm_settings_reach_only_that_arms_runs(tmp_path):
    from medssl.bench.runs import finetune_settings, run_matrix

    cfg = BenchConfig.model_validate({
        "out": tmp_path, "tasks": [{"name": "t", "csv": "t.csv", "settings": {"ssl_weight": 0.5, "epochs": 3}}],
        "finetune": {"ssl_weight": 0.9},
        "arms": [{"name": "scratch", "init": "scratch", "mode": "finetune"},
                 {"name": "hybrid-w0.1", "init": "ssl", "mode": "hybrid", "settings": {"ssl_weight": 0.1}}]})
    settings = {s.arm: finetune_settings(cfg, s, tmp_path / "t.csv", tmp_path / "pretrain") for s in run_matrix(cfg)}
    assert settings["hybrid-w0.1"]["ssl_weight"] == 0.1 and settings["scratch"]["ssl_weight"] == 0.5
    assert settings["hybrid-w0.1"]["epochs"] == 3 and settings["hybrid-w0.1"]["init"] == str(tmp_path / "pretrain")


def test_demo_is_a_valid_bench_on_the_generated_archive(tmp_path):
    from medssl.demo.run import TASK, demo_config

    cfg = demo_config(tmp_path / "demo", tmp_path / "data" / f"task-{TASK}.csv", tmp_path / "data" / "archive")
    assert [t.name for t in cfg.tasks] == [TASK] and cfg.unlabeled == [tmp_path / "data" / "archive"]
    assert {a.init for a in cfg.arms} == {"scratch", "ssl"} and cfg.robustness_fractions
    assert cfg.finetune["input_size"] == cfg.pretrain["augment"]["global_size"]


def _fake_bench(tmp_path, test_aucs: dict) -> BenchConfig:
    """A bench folder of fake finished runs: ``test_aucs[(arm, fraction, seed)]`` = (test AUC, diverged record);
    every run evaluated at steps 3 and 6 with its best (validation AUC 0.7) at step 6."""
    from medssl.bench.runs import run_matrix

    cfg = BenchConfig.model_validate({"out": tmp_path, "tasks": [{"name": "t", "csv": "t.csv"}],
                                      "label_fractions": [0.5, 1.0], "seeds": [0, 1]})
    for spec in run_matrix(cfg):
        auc, diverged = test_aucs.get((spec.arm, spec.label_fraction, spec.seed), (0.6 + 0.1 * spec.seed, None))
        metrics = downstream_metrics(
            test_auc=auc, test_auc_ci=None if auc is None else [auc - 0.1, auc + 0.05], best_val_auc=0.7, best_step=6,
            steps=6, train_seconds=1.0,
            history=[{"epoch": 1, "step": 3, "val_auc": 0.6}, {"epoch": 2, "step": 6, "val_auc": 0.7}],
            task={"labeled_train": 10, "images": {"test": 8}},
            status="completed" if diverged is None else "diverged", diverged=diverged)
        (tmp_path / spec.folder).mkdir(parents=True)
        (tmp_path / spec.folder / "metrics.json").write_text(json.dumps(metrics))
    return cfg


def test_runs_without_a_test_auc_are_shown_and_left_out_of_the_means(tmp_path):
    """A diverged run whose best classifier's test scores are not finite has test_auc null: the results must not
    fail on it (TypeError), show it, and leave it out of the means and of the paired differences to scratch."""
    from medssl.bench import plots
    from medssl.bench.results import load_results, markdown, summarise
    from medssl.bench.runs import run_matrix

    where = {"after_step": 3, "epoch": 2, "what": "training loss"}
    cfg = _fake_bench(tmp_path, {("ssl-finetune", 1.0, 0): (None, where), ("ssl-finetune", 1.0, 1): (0.9, where),
                                 ("ssl-hybrid", 1.0, 0): (None, where), ("ssl-hybrid", 1.0, 1): (None, None),
                                 ("scratch-finetune", 0.5, 1): (None, None)})
    results = load_results(cfg, run_matrix(cfg))
    summary = {"name": "fake", "command": "medssl bench", "pool": None, "pretrain": None, "failures": [], "notes": [],
               "machine": {"cpu": "cpu", "cores": 2}, "seconds": {"total": 60, "ingest": 0, "pretrain": 0, "runs": 60},
               **summarise(cfg, results)}
    rows = {(r["arm"], r["label_fraction"]): r for r in summary["rows"]}
    ssl = rows[("ssl-finetune", 1.0)]
    assert ssl["test_auc"] == [None, 0.9] and ssl["test_auc_mean"] == pytest.approx(0.9) and ssl["test_auc_sd"] is None
    assert ssl["auc_diff"] == [pytest.approx(0.2)] and ssl["seeds_better"] == 1  # seed 1 only: 0.9 - 0.7
    assert ssl["steps_to_baseline_best"] == [6, 6]  # convergence still counts both (validation AUCs are finite)
    hybrid = rows[("ssl-hybrid", 1.0)]
    assert hybrid["test_auc_mean"] is None and hybrid["auc_diff"] == [] and hybrid["test_auc_ci_mean"] == [None, None]
    assert rows[("ssl-finetune", 0.5)]["auc_diff"] == [pytest.approx(0.0)]  # its seed-1 baseline has no test AUC

    md = markdown(summary)
    assert "| t | ssl-finetune | 1 | 10 | 0.900 ± — [0.800–0.950] (1/2 seeds) |" in md
    assert "| t | ssl-hybrid | 1 | 10 | diverged |" in md
    assert "| t | scratch-finetune | 0.5 | 10 | 0.600 ± — [0.500–0.650] (1/2 seeds) | baseline |" in md
    notes = md.split("## Notes")[1]
    assert ("t / ssl-finetune / labels 1 / seed 0: training diverged after step 3 (epoch 2: non-finite training loss)"
            in notes)
    assert notes.count("no test AUC") == 4 and "t / ssl-hybrid / labels 1 / seed 1: no test AUC" in notes
    assert {p.name for p in plots.bench_plots(cfg, results, tmp_path / "plots")} == {"t-convergence.png",
                                                                                     "t-label-efficiency.png"}


def test_a_run_without_a_test_auc_gets_no_robustness_sweep_and_does_not_stop_the_bench(tmp_path, monkeypatch):
    from medssl.bench import runs

    cfg = _fake_bench(tmp_path, {("ssl-hybrid", 1.0, 0): (None, None)})
    spec = next(s for s in runs.run_matrix(cfg) if (s.arm, s.label_fraction, s.seed) == ("ssl-hybrid", 1.0, 0))
    settings = runs.finetune_settings(cfg, spec, tmp_path / "t.csv", tmp_path / "pretrain")
    metrics = json.loads((tmp_path / spec.folder / "metrics.json").read_text())
    metrics["config"] = dump_config(FinetuneConfig.model_validate(settings))  # done with these settings
    (tmp_path / spec.folder / "metrics.json").write_text(json.dumps(metrics))
    assert spec.robustness and runs.pending_job(spec, settings, {}) is None

    # The progress line of the run pool formats its outcome: no test AUC must not stop the bench there either.
    monkeypatch.setattr(runs, "_run_one", lambda job: {"run": job.spec.folder, "ok": True, "test_auc": None})
    outcomes = runs.execute([runs.Job(spec, settings, True, {})], {}, cfg.model_copy(update={"workers": 1}), True)
    assert outcomes == [{"run": spec.folder, "ok": True, "test_auc": None}]


def test_bench_with_a_diverged_pretraining_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import medssl.bench
    from medssl.train.pretrain import TrainingDiverged

    def run_bench(cfg, show_progress=True, command=None):
        raise TrainingDiverged("3 consecutive non-finite losses at step 7; lower lr, raise warmup_steps or check the "
                               "data")

    monkeypatch.setattr(medssl.bench, "run_bench", run_bench)
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({"tasks": [{"name": "t", "csv": str(tmp_path / "t.csv")}]}))
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "b"), "--quiet"]) == 1
    assert capsys.readouterr().err == ("error: pretraining diverged: 3 consecutive non-finite losses at step 7; lower "
                                       "lr, raise warmup_steps or check the data\n")


def test_a_finetune_diverged_before_any_evaluation_is_a_failed_run(tmp_path, monkeypatch):
    """No metrics.json: the run is reported under the failed runs (error.txt), the others go on."""
    import medssl.downstream
    from medssl.bench import runs
    from medssl.downstream.training import TrainingDiverged

    def diverged(task, **settings):
        raise TrainingDiverged("the training loss was non-finite at step 1 (epoch 1), before any evaluation gave a "
                               "validation AUC: lower lr / head_lr (or raise warmup_steps)")

    monkeypatch.setattr(medssl.downstream, "finetune", diverged)
    monkeypatch.setitem(runs._TASKS, "t", None)
    cfg = BenchConfig.model_validate({"out": tmp_path, "tasks": [{"name": "t", "csv": "t.csv"}]})
    spec = runs.run_matrix(cfg)[0]
    outcome = runs._run_one(runs.Job(spec, runs.finetune_settings(cfg, spec, tmp_path / "t.csv", tmp_path), True, {}))
    assert not outcome["ok"] and outcome["error"].startswith("TrainingDiverged: the training loss was non-finite")
    assert "lower lr" in outcome["error"] and "Traceback" in outcome["traceback"]


def test_a_finetune_arm_whose_only_scratch_baseline_is_knn_gets_no_steps_saved(tmp_path):
    """A kNN baseline trains nothing (best step 0): steps saved against it are undefined, not a division by 0."""
    from medssl.bench.results import load_results, summarise
    from medssl.bench.runs import run_matrix

    cfg = BenchConfig.model_validate({"out": tmp_path, "tasks": [{"name": "t", "csv": "t.csv"}],
                                      "label_fractions": [1.0], "seeds": [0],
                                      "arms": [{"name": "scratch-knn", "init": "scratch", "mode": "knn"},
                                               {"name": "ssl-finetune", "init": "ssl", "mode": "finetune"}]})
    for spec in run_matrix(cfg):
        knn = spec.arm == "scratch-knn"
        metrics = downstream_metrics(
            test_auc=0.6 if knn else 0.8, test_auc_ci=None, best_val_auc=0.6 if knn else 0.7, best_step=0 if knn else 6,
            steps=0 if knn else 6, train_seconds=1.0, history=[] if knn else [{"epoch": 1, "step": 6, "val_auc": 0.7}],
            task={"labeled_train": 10, "images": {"test": 8}}, status="completed", diverged=None)
        (tmp_path / spec.folder).mkdir(parents=True)
        (tmp_path / spec.folder / "metrics.json").write_text(json.dumps(metrics))
    rows = {r["arm"]: r for r in summarise(cfg, load_results(cfg, run_matrix(cfg)))["rows"]}
    ssl = rows["ssl-finetune"]
    assert ssl["baseline"] == "scratch-knn" and ssl["auc_diff"] == [pytest.approx(0.2)]
    assert ssl["steps_saved"] == [] and ssl["steps_saved_mean"] is None
