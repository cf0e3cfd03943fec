"""Every command, and every flag combination the README shows, run end to end through the real entry point
(the ``medssl`` console script) on a tiny archive, so that a refactor cannot break a command silently
(``medssl probe`` failed on every call, and no test ran it through the CLI).

``PIPELINE`` builds the shared artefacts (dataset, pretraining run, fine-tuning run, embeddings) with the
CLI itself; ``CASES`` are the other invocations, one test each. ``test_readme_commands_are_all_run`` reads
every ``medssl`` line of the README's code blocks and fails if no invocation here (or in ``ELSEWHERE``,
tests of other modules that run that combination) uses the same command with at least its flags; it also
validates every README ``--set`` against the command's typed config.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medssl.config import BenchConfig, CurateConfig, FinetuneConfig, IngestConfig, PretrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("medssl")
ENTRY = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "medssl.cli"]

TINY_PRETRAIN = ["backbone=resnet18", "batch_size=8", "proj_hidden=32", "proj_dim=16", "n_prototypes=8",
                 "workers=0", "log_every=1", "warmup_steps=1", "freeze_prototypes_steps=1", "max_steps=4",
                 "snapshot_every=2", "augment={global_size: 32, local_size: 16, n_local: 2}"]
TINY_FINETUNE = ["input_size=32", "epochs=2", "batch_size=8", "ssl_batch_size=4", "bootstrap=50", "probe_lrs=[0.01]"]


def _sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def run_cli(argv: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY, *argv], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """The shared artefacts, made through the CLI (``PIPELINE``)."""
    import os

    from medssl.demo import generate_demo_archive

    root = tmp_path_factory.mktemp("cli")
    os.environ.setdefault("MEDSSL_SALT_FILE", str(root / "salt"))  # never the user's ~/.medssl/salt
    demo = generate_demo_archive(root / "demo", n_patients=6, size=32)
    nifti = root / "nifti"
    nifti.mkdir()
    volume = np.random.default_rng(0).normal(300, 60, (24, 24, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), nifti / "v.nii.gz")
    w = {"root": root, "archive": demo.archive, "nifti": nifti, "task": demo.tasks["ct-hemorrhage"],
         "shards": root / "shards", "run": root / "run", "ft": root / "ft-ssl", "scratch": root / "ft-scratch",
         "emb": root / "emb"}
    for argv in PIPELINE:
        proc = run_cli(_fill(argv, w))
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
    return w


def _fill(argv: list, w: dict) -> list[str]:
    """The workspace's paths for {name} placeholders (other braces, as in YAML values, stay); callables of
    the workspace for what must be made first."""
    return [a(w) if callable(a) else re.sub(r"\{(\w+)\}", lambda m: str(w.get(m.group(1), m.group(0))), a)
            for a in argv]


PIPELINE = [
    ["ingest", "{archive}", "{nifti}", "--out", "{shards}", "--quiet", "--workers", "1",
     "--set", "files_per_chunk=32", "--set", "samples_per_shard=32"],
    ["pretrain", "{shards}", "--out", "{run}", "--quiet", *_sets(TINY_PRETRAIN)],
    ["finetune", "--task", "{task}", "--init", "{run}", "--mode", "finetune", "--out", "{ft}", "--quiet",
     "--set", "ct_window=[40,80]", *_sets(TINY_FINETUNE)],
    ["finetune", "--task", "{task}", "--init", "scratch", "--mode", "finetune", "--out", "{scratch}", "--quiet",
     *_sets(TINY_FINETUNE)],
    ["embed", "{shards}", "--run", "{run}", "--out", "{emb}", "--quiet"],
]


def _weights(w: dict) -> str:
    """A foreign weights file: a timm ResNet-18 with an RGB stem, as a user's ImageNet weights would be."""
    import timm
    from safetensors.torch import save_file

    path = w["root"] / "resnet18-rgb.safetensors"
    if not path.exists():
        save_file(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    return str(path)


def _first_key(w: dict) -> str:
    from medssl.retrieval.embed import read_embeddings

    return read_embeddings(w["emb"]).column("key")[0].as_py()


def _bench_yaml(w: dict) -> str:
    path = w["root"] / "bench.yaml"
    tiny = dict(v.split("=", 1) for v in TINY_PRETRAIN if not v.startswith(("augment", "snapshot")))
    path.write_text(yaml.safe_dump({
        "tasks": [{"name": "ct", "csv": str(w["task"]), "settings": {"ct_window": [40, 80]}}],
        "unlabeled": [str(w["archive"])], "ingest": {"workers": 1},
        "pretrain": {**{k: yaml.safe_load(v) for k, v in tiny.items()},
                     "augment": {"global_size": 32, "local_size": 16, "n_local": 2}},
        "finetune": {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in TINY_FINETUNE)},
        "arms": [{"name": "scratch-finetune", "init": "scratch", "mode": "finetune"},
                 {"name": "ssl-finetune", "init": "ssl", "mode": "finetune"}],
        "label_fractions": [1.0], "robustness_fractions": [1.0], "robustness_levels": {"rotation": [15]}}))
    return str(path)


def _ingest_yaml(w: dict) -> str:
    path = w["root"] / "ingest.yaml"
    path.write_text(yaml.safe_dump({"workers": 1, "max_side": 64, "files_per_chunk": 64}))
    return str(path)


# (id, argv with {placeholders} of the workspace or callables of it, expected exit code, a check of the output)
CASES = [
    ("ingest-workers", ["ingest", "{archive}", "--out", "{root}/i-workers", "--workers", "2", "--quiet"], 0, None),
    ("ingest-sets", ["ingest", "{archive}", "--out", "{root}/i-sets", "--quiet", "--workers", "1",
                     "--set", "max_side=24", "--set", "planes=[axial,coronal]"], 0, None),
    ("ingest-config", ["ingest", "{archive}", "--out", "{root}/i-config", "--config", _ingest_yaml, "--quiet"], 0,
     None),
    ("ingest-ray", ["ingest", "{nifti}", "--out", "{root}/i-ray", "--engine", "ray", "--workers", "1", "--quiet"],
     0, None),
    ("ingest-strict", ["ingest", "{archive}", "--out", "{root}/i-strict", "--strict", "--workers", "1", "--quiet"],
     0, None),
    ("curate", ["curate", "{shards}", "--out", "{root}/curated", "--quiet"], 0, "kept"),
    ("curate-two", ["curate", "{shards}", "{root}/i-sets", "--out", "{root}/curated2", "--threshold", "6",
                    "--set", "ct_window=[40,80]", "--quiet"], 0, "kept"),
    ("pretrain-two", ["pretrain", "{shards}", "{root}/curated", "--out", "{root}/run2", "--quiet",
                      *_sets(TINY_PRETRAIN[:-2]), "--set", "max_steps=1", "--set", "crops=swav",
                      "--set", "augment={global_size: 32, local_size: 16, n_local: 1}"], 0, "encoder:"),
    ("finetune-linear", ["finetune", "--task", "{task}", "--init", "{run}", "--mode", "linear", "--out",
                         "{root}/ft-linear", "--quiet", *_sets(TINY_FINETUNE)], 0, "test AUC"),
    ("finetune-knn", ["finetune", "--task", "{task}", "--init", "{run}", "--mode", "knn", "--out", "{root}/ft-knn",
                      "--quiet", *_sets(TINY_FINETUNE)], 0, "test AUC"),
    ("finetune-weights", ["finetune", "--task", "{task}", "--init", _weights, "--set", "backbone=resnet18",
                          "--out", "{root}/ft-weights", "--quiet", *_sets(TINY_FINETUNE)], 0, "test AUC"),
    ("finetune-hybrid", ["finetune", "--task", "{task}", "--init", "{run}", "--mode", "hybrid", "--label-fraction",
                         "0.5", "--seed", "1", "--target-from", "{scratch}", "--out", "{root}/ft-hybrid",
                         "--set", "ct_window=[40,80]", "--quiet", *_sets(TINY_FINETUNE)], 0, "validation AUC"),
    ("finetune-target", ["finetune", "--task", "{task}", "--out", "{root}/ft-target", "--target-auc", "0.6",
                         "--skip-bad", "--quiet", *_sets(TINY_FINETUNE)], 0, "validation AUC 0.6000"),
    ("evaluate", ["evaluate", "{ft}", "--robustness", "--levels", "rotation=15", "--levels", "scaling=0.8",
                  "--levels", "ct_window_shift=20", "--levels", "gamma=1.5", "--levels", "contrast=0.8",
                  "--levels", "brightness=0.1", "--levels", "noise=0.05", "--quiet"], 0, "clean test AUC"),
    ("evaluate-only", ["evaluate", "{ft}", "--robustness", "--only", "rotation", "--levels", "rotation=10,45",
                       "--out", "{root}/rot.json", "--quiet"], 0, "rotation"),
    ("probe", ["probe", "{run}", "--task", "{task}", "--out", "{root}/probe", "--label-fractions", "1", "--seeds",
               "0", "--set", "input_size=32", "--set", "probe_lrs=[0.01]", "--quiet"], 0, "figure:"),
    ("bench", ["bench", "--config", _bench_yaml, "--out", "{root}/bench", "--workers", "1", "--set", "seeds=[0]",
               "--quiet"], 0, "results:"),
    ("report-run", ["report", "{ft}", "--quiet"], 0, "report:"),
    ("report-out", ["report", "{root}", "--out", "{root}/all.html", "--quiet"], 0, "report:"),
    ("report-task", ["report", "{root}", "--task", "{task}", "--embed-samples", "40", "--quiet"], 0, "report:"),
    ("export-timm", ["export", "{run}", "--format", "timm", "--out", "{root}/x-timm", "--license", "cc-by-nc-4.0"],
     0, "timm export"),
    ("export-onnx", ["export", "{run}", "--format", "onnx", "--out", "{root}/x-onnx", "--check-images", "2"], 0,
     "onnx export"),
    ("embed-files", ["embed", "{nifti}", "--run", "{run}", "--out", "{root}/emb-files", "--batch-size", "4",
                     "--ct-window", "40,80", "--device", "cpu", "--quiet"], 0, "images embedded"),
    ("search-key", ["search", "--index", "{emb}", "--key", _first_key, "-k", "10"], 0, "distance"),
    ("search-image", ["search", "--index", "{emb}", "--image", "{nifti}/v.nii.gz"], 0, "distance"),
    ("search-build", ["search", "--index", "{emb}", "--build"], 0, "index:"),
    *[(f"help-{c}", [c, "--help"], 0, "usage:") for c in ("ingest", "pretrain", "finetune", "probe", "bench",
                                                          "evaluate", "demo", "report", "export", "embed",
                                                          "search", "serve", "curate")],
    ("help", ["--help"], 0, "usage:"),
    ("version", ["--version"], 0, "medssl "),
]

# Flag combinations of the README run by tests of other modules (module, test function, argv of the run).
ELSEWHERE = [
    ("test_ray_cluster", "test_ingest_on_a_two_node_ray_cluster_from_and_into_object_storage",
     ["ingest", "s3://bucket/archive", "--out", "s3://bucket/dataset", "--quiet", "--engine", "ray",
      "--ray-address", "ADDRESS", "--set", "files_per_chunk=4"]),
    ("test_serve_limits", "test_the_server_printed_no_traceback",
     ["serve", "--index", "EMB", "--port", "0", "--max-upload-mb", "1"]),
]


@pytest.mark.slow  # ~3 min in all: a process per command
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_command(ws, case):
    _, argv, code, expect = case
    proc = run_cli(_fill(argv, ws), timeout=900)
    assert proc.returncode == code, proc.stderr[-3000:]
    if expect:
        assert expect in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # builds the workspace (~30 s) when run alone
def test_probe_through_the_cli_writes_its_curve(ws):
    """medssl probe failed on every call (prepare_task got the task twice)."""
    out = ws["root"] / "probe-check"
    proc = run_cli(["probe", str(ws["run"]), "--task", str(ws["task"]), "--out", str(out), "--label-fractions",
                    "1", "--seeds", "0", "--set", "input_size=32", "--set", "probe_lrs=[0.01]", "--quiet"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((out / "curve.json").read_text())
    assert {p["step"] for p in curve["points"]} == {0, 2, 4}  # random init, the snapshot, the end


DEMO = ["demo", "--quick", "--workers", "1", "--keep-weights", "--quiet"]


@pytest.mark.slow  # ~30 s
def test_demo_through_the_entry_point(tmp_path):
    """`medssl demo --quick` as the console script runs it: exit 0, the report written and named."""
    proc = run_cli([*DEMO, "--out", str(tmp_path / "demo-out")], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and "Traceback" not in proc.stderr
    assert (tmp_path / "demo-out" / "report.html").is_file()
    assert (tmp_path / "demo-out" / "pretrain" / "encoder.safetensors").is_file()  # --keep-weights


def test_every_command_has_a_case():
    from medssl.cli import COMMANDS

    covered = ({argv[0] for _, argv, _, _ in CASES} | {argv[0] for argv in PIPELINE} | {a[0] for *_, a in ELSEWHERE}
               | {DEMO[0]})
    assert set(COMMANDS) <= covered, f"no end-to-end case for {sorted(set(COMMANDS) - covered)}"


def _readme_commands() -> list[list[str]]:
    """Every ``medssl ...`` line of the README's code blocks (continuation lines joined, comments cut)."""
    lines, block, pending = [], False, ""
    for raw in (REPO / "README.md").read_text().splitlines():
        if raw.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        text = pending + raw.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if text.startswith("medssl "):
            lines.append(shlex.split(text, comments=True)[1:])
    return lines


_CONFIGS = {"ingest": IngestConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "probe": FinetuneConfig,
            "curate": CurateConfig, "bench": BenchConfig}


def _flags(argv: list[str]) -> set[str]:
    return {a for a in argv if isinstance(a, str) and re.fullmatch(r"--?[a-z][a-z-]*", a)}


def test_readme_commands_are_all_run():
    runs = [argv for _, argv, _, _ in CASES] + PIPELINE + [a for *_, a in ELSEWHERE]
    readme = _readme_commands()
    assert len(readme) > 30, "the README's commands were not found"
    for argv in readme:
        command, flags = argv[0], _flags(argv)
        assert any(r[0] == command and flags <= _flags(r) for r in runs), f"no test runs: medssl {shlex.join(argv)}"
        if command in _CONFIGS:  # the README's settings exist and take the values shown
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            if command == "bench":  # a bench needs a task to validate
                load_config(BenchConfig, None, {"tasks": [{"name": "t", "csv": "t.csv"}]}, sets)
            else:
                load_config(_CONFIGS[command], None, {}, sets)
    for module, test, _ in ELSEWHERE:
        assert hasattr(importlib.import_module(module), test), f"{module}.{test} is gone"


def test_the_readme_bench_preset_loads():
    """`medssl bench --config benchmarks/paper.yaml` is too long to run here; its config must still load."""
    cfg = load_config(BenchConfig, REPO / "benchmarks" / "paper.yaml", {}, [])
    assert cfg.tasks and all(t.csv.suffix == ".csv" for t in cfg.tasks)


@pytest.mark.slow  # ~25 s: set-up check and the quick demo
def test_the_readme_demo_script_runs(tmp_path):
    """The README's main command, `bash scripts/demo.sh`, with --quick (the full demo is the demo benchmark)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--quick", "--out", str(tmp_path / "demo"),
                           "--workers", "1"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "demo" / "report.html").is_file() and "report:" in proc.stdout
    page = (tmp_path / "demo" / "report.html").read_text()
    # The answer first: the verdict lines come before any other section (they sat ~6,900 px down).
    assert page.index("In short") < page.index('id="bench"') and "ssl-finetune" in page.split("In short")[1][:2000]
    assert "against scratch-finetune" in page and ("intervals overlap" in page or "intervals are apart" in page)
    predictions = (tmp_path / "demo" / "ct-hemorrhage" / "ssl-finetune-f1-s0" / "test_predictions.csv").read_text()
    assert predictions.splitlines()[0].endswith(",prob_hemorrhage")  # the finding is the positive class (ROC)
    assert "4 steps" in page  # steps trained, not lines logged (log_every=2: 2 lines)
    assert "all of the labels" in page or "all labels" in page
    # Only what a user looks at or reuses is left (the full demo left 724 MB).
    assert not list((tmp_path / "demo").rglob("best.pt"))
    assert not (tmp_path / "demo" / "pretrain" / "checkpoint.pt").exists()
    assert (tmp_path / "demo" / "pretrain" / "encoder.safetensors").is_file() and "removed " in proc.stdout
    assert "demo: pretrain (" in proc.stderr and "min left" in proc.stderr
    shutil.rmtree(tmp_path / "demo")
