"""The command-line front: parse, load the typed config, call one function per command."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import textwrap
from pathlib import Path

from medssl import __version__, storage
from medssl.config import (
    BenchConfig,
    ConfigError,
    CurateConfig,
    FinetuneConfig,
    IngestConfig,
    PretrainConfig,
    load_config,
)

_SETTINGS = "settings (--set KEY=VALUE, or KEY: VALUE in a --config YAML file):"


def _settings_epilog(model, flags) -> str:
    """The --help list of a config's settings that have no flag of their own: what each means (the typed
    config's description) and its default, one per line."""
    lines = [_SETTINGS]
    for name, field in model.model_fields.items():
        if name in flags:
            continue
        text = f"{field.description}; " if field.description else ""
        lines += textwrap.wrap(f"{text}default {field.get_default(call_default_factory=True)!r}", width=96,
                               initial_indent=f"  {name:<24}", subsequent_indent=" " * 26)
    return "\n".join(lines)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual; keeps the lines of the settings list."""

    def _fill_text(self, text, width, indent):
        return text if text.startswith(_SETTINGS) else super()._fill_text(text, width, indent)


def _setting(p: argparse.ArgumentParser, model, name: str, *flags: str, **kwargs) -> None:
    """An argument for the setting ``name`` of ``model`` (a positional without ``flags``): its help is the
    typed config's description and default, so neither is written twice. argparse's own default stays
    None (or [] for a list), which ``_config_values`` leaves out: a YAML file or --set may still give it."""
    field = model.model_fields[name]
    default = field.get_default(call_default_factory=True)
    text = field.description or name.replace("_", " ")
    if not (default is None or default is False or default == [] or default == {}):
        text += f" (default {default})"
    if flags:
        p.add_argument(*flags, dest=name, help=text, **({"default": None} | kwargs))
    else:
        p.add_argument(name, help=text, **kwargs)
    p.set_defaults(config_fields=(*(p.get_default("config_fields") or ()), name), config_model=model)


def _config_values(args) -> dict:
    """The values the command line gave to config settings (``_setting``); the rest is left to the config."""
    return {k: v for k in args.config_fields if (v := getattr(args, k)) not in (None, [])}


def _finish_config_parser(p: argparse.ArgumentParser) -> None:
    """The --config / --set options and the list of the settings that have no flag of their own."""
    p.epilog = _settings_epilog(p.get_default("config_model"), p.get_default("config_fields"))
    _add_config_args(p)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file of settings (keys as in --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set max_side=256 (repeatable; values parsed as YAML)")


def _ingest_parser(sub) -> None:
    p = sub.add_parser(
        "ingest", help="turn folders of DICOM / NIfTI / PNG / JPEG / TIFF into training shards",
        description="Read every file under the inputs (format detected from content), map intensities per "
                    "modality, cut volumes into 2D slices, resize, and write WebDataset tar shards plus "
                    "a manifest (manifest/*.jsonl, one row per input file), index.json and report.md. Rerun "
                    "the same command to resume an interrupted run; on a finished dataset it adds the files "
                    "the inputs gained since (new shards; the ingested ones are not read again).",
    )
    _setting(p, IngestConfig, "inputs", nargs="*", type=storage.location)
    _setting(p, IngestConfig, "out", "--out", type=storage.location)
    _setting(p, IngestConfig, "workers", "--workers", type=int)
    _setting(p, IngestConfig, "engine", "--engine", choices=["local", "ray"])
    _setting(p, IngestConfig, "ray_address", "--ray-address")
    _setting(p, IngestConfig, "strict", "--strict", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _finish_config_parser(p)


def _run_ingest(args) -> int:
    from medssl.ingest import ingest
    from medssl.ingest.run import IngestUnfinished

    cfg = load_config(IngestConfig, args.config, _config_values(args), args.overrides)
    try:
        summary = ingest(cfg, show_progress=not args.quiet)
    except IngestUnfinished as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    r = summary.report
    print(f"{r['files']} files: " + ", ".join(f"{n} {s}" for s, n in sorted(r["status"].items()))
          + f"; {r['samples']} images in {r['shards']} shards"
          + (f" ({r['this_run']['files']} files new in this run)" if r["generations"] > 1 else ""))
    print(f"report:   {storage.join(summary.out, 'report.md')}")
    print(f"manifest: {storage.join(summary.out, 'manifest')}/ (one JSON-lines part per work unit)")
    code = summary.exit_code(cfg.strict)
    if code:
        print("error: " + ("nothing could be ingested" if summary.ingested == 0 else
                           f"{summary.rejected_for_faults} files rejected (--strict)"), file=sys.stderr)
    return code


def _pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="self-supervised pretraining on shards (SwAV clustering + InfoNCE, multi-crop)",
        description="Train an encoder without labels on the shards of `medssl ingest`. Rerun the same command to "
                    "resume from the run folder's checkpoint. Multi-GPU / multi-node: launch with torchrun, e.g. "
                    "`torchrun --nproc_per_node 8 -m medssl.cli pretrain ...`.",
    )
    _setting(p, PretrainConfig, "shards", nargs="*", type=storage.location)
    _setting(p, PretrainConfig, "out", "--out", type=storage.location)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _finish_config_parser(p)


def _run_pretrain(args) -> int:
    from medssl.artifacts import TrainingDiverged
    from medssl.train.pretrain import pretrain

    cfg = load_config(PretrainConfig, args.config, _config_values(args), args.overrides)
    if not cfg.shards or cfg.out is None:
        raise ConfigError("pretrain needs shard folders and --out RUN_DIR")
    for folder in cfg.shards:
        if not storage.exists(storage.join(folder, "index.json")):
            raise ConfigError(f"{folder} has no index.json: pass folders written by `medssl ingest`")
    try:
        run = pretrain(cfg, show_progress=not args.quiet)
    except TrainingDiverged as e:
        print(f"error: pretraining diverged: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"encoder: {storage.join(run, 'encoder.safetensors')} (load with medssl.load_encoder({str(run)!r}))")
    return 0


def _finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="train and evaluate on a labeled task (kNN, linear probe, fine-tuning or hybrid) from a run, a weights "
             "file or scratch",
        description="Train a classifier on a task CSV (path,label[,split][,group]) from a pretrained run folder or "
                    "from scratch, pick the epoch with the best validation AUC, and report the test AUC with a "
                    "bootstrap 95% interval. Writes metrics.json, best.pt and test_predictions.csv to --out.",
    )
    _setting(p, FinetuneConfig, "task", "--task", type=Path)
    _setting(p, FinetuneConfig, "init", "--init")
    _setting(p, FinetuneConfig, "mode", "--mode", choices=["knn", "linear", "finetune", "hybrid"])
    _setting(p, FinetuneConfig, "label_fraction", "--label-fraction", type=float)
    _setting(p, FinetuneConfig, "seed", "--seed", type=int)
    _setting(p, FinetuneConfig, "out", "--out", type=Path)
    _setting(p, FinetuneConfig, "target_auc", "--target-auc", type=float)
    _setting(p, FinetuneConfig, "target_from", "--target-from", type=Path)
    _setting(p, FinetuneConfig, "skip_bad", "--skip-bad", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _finish_config_parser(p)


def _test_auc_text(m: dict) -> str:
    if m["test_auc"] is None:
        return "test AUC none (the best classifier's test scores are not finite)"
    lo, hi = m["test_auc_ci"] or (float("nan"), float("nan"))
    return f"test AUC {m['test_auc']:.4f} (95% CI {lo:.4f}-{hi:.4f}, {m['task']['images']['test']} images)"


def _diverged_warning(m: dict) -> str:
    d = m["diverged"]
    return (f"warning: training diverged after step {d['after_step']} (epoch {d['epoch']}: non-finite {d['what']}); "
            f"the results are those of the best evaluation before it (step {m['best_step']}): lower lr / head_lr "
            "(or raise warmup_steps)")


def _run_finetune(args) -> int:
    from medssl.artifacts import METRICS, TrainingDiverged
    from medssl.downstream import TaskError
    from medssl.downstream.api import check_out
    from medssl.downstream.training import run_finetune

    cfg = load_config(FinetuneConfig, args.config, _config_values(args), args.overrides)
    if cfg.task is None or cfg.out is None:
        raise ConfigError("finetune needs --task TASK.csv and --out DIR")
    check_out(Path(cfg.out), "folder", "--out")
    try:
        m = run_finetune(cfg, show_progress=not args.quiet).model_dump()
    except (TaskError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{_test_auc_text(m)}; best validation AUC {m['best_val_auc']:.4f} at step {m['best_step']} of {m['steps']}")
    if m["status"] == "diverged":
        print(_diverged_warning(m), file=sys.stderr)
    if m["task"]["skipped"]:
        print(f"skipped {len(m['task']['skipped'])} unusable images (listed in metrics.json under task.skipped)")
    if m["target_auc"] is not None:
        reached = m["steps_to_target"]
        print(f"validation AUC {m['target_auc']:.4f} "
              + (f"reached at step {reached}" if reached is not None else "never reached"))
    print(f"metrics: {Path(cfg.out) / METRICS}")
    return 0


def _probe_parser(sub) -> None:
    p = sub.add_parser(
        "probe", help="how pretraining length pays off: kNN and linear probes on every saved encoder of a run",
        description="Score the encoder of a pretraining run at each of its snapshots (pretrain with "
                    "--set snapshot_every=N), at step 0 (random initialisation) and at its end with the frozen-encoder "
                    "protocols (kNN, k=20, and a linear probe whose learning rate is chosen on validation) on a task "
                    "CSV. Writes curve.json and pretraining-length.png (test AUC against pretraining steps) to --out; "
                    "rerunning resumes.",
        epilog="finetune settings of the probes (--set KEY=VALUE or YAML), e.g. input_size, epochs, probe_lrs, knn_k, "
               "ct_window.",
    )
    p.add_argument("run", help="a `medssl pretrain` run folder")
    p.add_argument("--task", type=Path, required=True, help="task CSV")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--label-fractions", default="0.01,0.1,1", help="comma-separated (default 0.01,0.1,1)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(p)


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _run_probe(args) -> int:
    from medssl.downstream.api import check_out, prepare_task
    from medssl.downstream.curve import PLOT, mean_curves, probe_curve
    from medssl.downstream.tasks import TASK_SETTINGS

    fractions = _numbers(args.label_fractions, float, "--label-fractions")
    seeds = _numbers(args.seeds, int, "--seeds")
    settings = load_config(FinetuneConfig, args.config, {"task": args.task}, args.overrides).model_dump()
    check_out(args.out, "folder", "--out")
    # The CSV is prepare_task's first argument; the other task settings go by name.
    task = prepare_task(args.task, show_progress=not args.quiet,
                        **{k: settings[k] for k in TASK_SETTINGS if k != "task"})
    probe_settings = {k: v for k, v in settings.items() if k not in ("init", "mode", "label_fraction", "seed", "out")}
    curve = probe_curve(storage.location(args.run), task, args.out, fractions, seeds, probe_settings,
                        show_progress=not args.quiet)
    for (mode, fraction), line in sorted(mean_curves(curve["points"]).items()):
        print(f"{mode:6s} labels {fraction:<5g} " + "  ".join(f"step {s}: {auc:.3f}" for s, auc in line))
    print(f"figure: {args.out / PLOT}")
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="the paper's claims on your tasks: pretrain, then scratch against SSL at several label fractions",
        description="Pretrain on an unlabeled pool (the tasks' training splits, plus `unlabeled` folders; never their "
                    "validation or test images, compared by content), then train every task with every arm (scratch, "
                    "SSL fine-tune, SSL hybrid, ...) at each label fraction and seed, score robustness, and write "
                    "results.md / results.json, plots/ and report.html. Rerun the same command to resume. "
                    "Example: medssl bench --config benchmarks/paper.yaml",
    )
    _setting(p, BenchConfig, "out", "--out", type=Path)
    _setting(p, BenchConfig, "workers", "--workers", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _finish_config_parser(p)


def _run_bench(args) -> int:
    from medssl.artifacts import TrainingDiverged
    from medssl.bench import report_task, run_bench
    from medssl.downstream import TaskError
    from medssl.report import build_report

    cfg = load_config(BenchConfig, args.config, _config_values(args), args.overrides)
    try:
        command = shlex.join(["medssl", *args.argv])  # recorded in results.md
        summary = run_bench(cfg, show_progress=not args.quiet, command=command)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:  # the pretraining stage; a diverged downstream run is a failed run (error.txt)
        print(f"error: pretraining diverged: {e}", file=sys.stderr)
        return 1
    out = Path(cfg.out)
    report = build_report(out, task=report_task(cfg), log=lambda message: None)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.md'} ({out / 'results.json'})")
    print(f"report:  {Path(report).resolve()}")
    if summary["failures"]:
        print(f"error: {len(summary['failures'])} run(s) failed (see results.md and their error.txt)", file=sys.stderr)
        return 1
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="re-score a finetune run's test split under perturbations (--robustness)",
        description="Re-score the best classifier of a `medssl finetune` output folder on its test split (rebuilt "
                    "from the run's settings). --robustness: clean and under sweeps of rotation, scaling, CT window "
                    "shift, gamma, contrast, brightness and noise, one at a time; the AUC at every level and its "
                    "drop from clean go to RUN_DIR/robustness.json, which `medssl report` draws.",
        epilog="sweeps: rotation, scaling, ct_window_shift, gamma, contrast, brightness, noise (default levels in "
               "the README and medssl.downstream.robustness.SWEEPS; the neutral level is always added)",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a `medssl finetune` output folder (holds best.pt)")
    p.add_argument("--robustness", action="store_true", help="run the robustness sweeps (the one evaluation so far)")
    p.add_argument("--only", action="append", metavar="NAME", help="run only this sweep (repeatable; default all)")
    p.add_argument("--levels", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="levels of one sweep instead of its defaults, e.g. rotation=10,20 (repeatable)")
    p.add_argument("--out", type=Path, help="JSON file to write (default RUN_DIR/robustness.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_levels(items: list[str]) -> dict[str, list[float]]:
    levels = {}
    for item in items:
        name, _, raw = item.partition("=")
        try:
            levels[name.strip()] = [float(v) for v in raw.split(",")]
        except ValueError:
            raise ConfigError(f"--levels expects NAME=V1,V2,..., e.g. rotation=10,20; got {item!r}") from None
    return levels


def _run_evaluate(args) -> int:
    from medssl.artifacts import ROBUSTNESS, TrainingDiverged
    from medssl.downstream import TaskError, evaluate_robustness
    from medssl.downstream.api import check_out

    if not args.robustness:
        raise ConfigError("evaluate needs --robustness (the test AUC under perturbations, the one evaluation so "
                          "far; the clean test AUC is already in the run's metrics.json)")
    if args.out is not None:
        check_out(args.out, "file", "--out")
    try:
        r = evaluate_robustness(args.run_dir, sweeps=_parse_levels(args.levels), only=args.only, out=args.out,
                                show_progress=not args.quiet)
    except (TaskError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"clean test AUC {r['clean_auc']:.4f} ({r['test_images']} images)")
    print(f"{'sweep':<16} {'worst level':>11} {'AUC':>7} {'drop':>8}")
    for name, worst in r["worst"].items():
        if worst["auc"] is None:
            print(f"{name:<16} {worst['level']:>11g} {'n/a':>7} {'(non-finite scores)':>8}")
        else:
            print(f"{name:<16} {worst['level']:>11g} {worst['auc']:>7.4f} {worst['drop']:>+8.4f}")
    for name, why in r["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"robustness: {args.out or args.run_dir / ROBUSTNESS}")
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole system on built-in phantoms: ingest, pretrain, scratch vs SSL, robustness, report",
        description="Generate a phantom archive (CT, radiographs, MR, ultrasound as DICOM of several encodings and "
                    "NIfTI, with lesion labels; nothing is downloaded), ingest it, pretrain briefly, train the head-CT "
                    "hemorrhage task from scratch and from the pretrained encoder, sweep robustness and write one "
                    "HTML report. About 5 minutes on 2 CPU cores. Rerun to resume.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="a one-minute run of the same pipeline on a tiny archive with tiny budgets, to check an "
                        "installation (its numbers mean nothing); use another --out than the full demo's")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep every run's classifier (best.pt) and the pretraining checkpoint (about 0.6 GB); by "
                        "default only what the report and a user need are kept: metrics, predictions and the encoder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_demo(args) -> int:
    from medssl.demo.run import run_demo

    summary = run_demo(args.out, args.workers, show_progress=not args.quiet, quick=args.quick,
                       keep_weights=args.keep_weights)
    print((Path(args.out) / "results.md").read_text())
    files, size = summary["tidied"]
    if files:
        print(f"removed {files} files ({size / 2**20:.0f} MB): each run's classifier (best.pt) and the pretraining "
              "checkpoint; the encoder, metrics and predictions are kept (--keep-weights keeps everything)")
    print(f"report: {Path(summary['report']).resolve()} (open it in a browser; it needs no network)")
    return 1 if summary["failures"] else 0


def _report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML page with plots about an ingest output, a run or a bench folder",
        description="Find the artefacts in DIR and its sub-folders (two levels down): ingest outputs, pretraining "
                    "runs, downstream runs. Write one HTML file with embedded plots (no external references, opens "
                    "offline): ingest summary, pretraining loss and throughput, an embedding map of the encoder's "
                    "features, ROC, convergence, label-efficiency and robustness curves. What is absent is named.",
    )
    p.add_argument("dir", type=Path, help="an ingest output, a pretraining run, a downstream run, or a folder of them")
    p.add_argument("--out", type=Path, help="HTML file to write (default DIR/report.html)")
    p.add_argument("--task", type=Path,
                   help="task CSV whose labels colour the embedding map (images matched by content)")
    p.add_argument("--embed-samples", type=int, help="shard images in the embedding map (default 300)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def _run_report(args) -> int:
    from medssl.report import ReportError, build_report

    options = {"embed_samples": args.embed_samples} if args.embed_samples is not None else {}
    if args.quiet:
        options["log"] = lambda message: None
    try:
        out = build_report(args.dir, out=args.out, task=args.task, **options)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {out}")
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="a run's encoder for other tools: a timm / Hugging Face folder or an ONNX file, with its card",
        description="Write the encoder of a `medssl pretrain` run into an empty folder, with README.md (model card), "
                    "model_card.json and sources.sha256 (the SHA-256 of every source file of the pretraining pool, "
                    "read from the ingest manifests; the card holds counts and hashes, never paths). timm: "
                    "config.json + model.safetensors, opened offline by timm.create_model(\"local-dir:DIR\", "
                    "pretrained=True) and ready to push to a model hub. onnx: model.onnx (features out, any batch "
                    "size). Each export is checked on images of the run's shards before it is declared done: timm "
                    "must give medssl's features, onnxruntime must stay within 1e-4 of torch.",
    )
    p.add_argument("run", type=storage.location, help="a `medssl pretrain` run folder (local or s3://bucket/prefix)")
    p.add_argument("--format", required=True, choices=["timm", "onnx"], help="timm folder or ONNX file")
    p.add_argument("--out", required=True, type=Path,
                   help="folder to write: absent, empty, or an earlier export of the same format")
    p.add_argument("--license", help="licence of the weights, e.g. cc-by-nc-4.0 (default: unspecified)")
    p.add_argument("--shards", nargs="+", type=storage.location, metavar="DIR",
                   help="the pretraining's ingest outputs, if they moved since the run (default: as its card names "
                        "them)")
    p.add_argument("--check-images", type=int, default=8, help="shard images the export is checked on (default 8)")


def _run_export(args) -> int:
    from medssl.models.card import DEFAULT_LICENSE
    from medssl.publish import ExportError, export_run

    try:
        card = export_run(args.run, args.format, args.out, license=args.license or DEFAULT_LICENSE,
                          shards=args.shards, check_images=args.check_images)
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = card["data"]
    print(f"{args.format} export of {card['architecture']} ({card['feature_dim']} features): {args.out}")
    print(f"lineage: {data['source_files']} source files, {data['images']} images (sources.sha256); "
          f"licence: {card['license']}")
    print("check: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in card["checks"].items()))
    return 0


def _ct_window(text: str) -> tuple[float, float]:
    values = _numbers(text, float, "--ct-window")
    if len(values) != 2 or values[1] <= 0:
        raise ConfigError(f"--ct-window expects LEVEL,WIDTH in HU with WIDTH > 0, e.g. 40,400; got {text!r}")
    return values[0], values[1]


def _embed_parser(sub) -> None:
    p = sub.add_parser(
        "embed", help="the encoder's features of every image of a dataset (or of image files) into Parquet",
        description="Run a pretrained encoder over every sample of a `medssl ingest` output (or over image files and "
                    "folders, read by medssl's readers: the middle frame of a volume) in batches, and write the "
                    "features to Parquet parts under --out (parts/*.parquet: key, source_sha256, modality, frame, a "
                    "thumbnail reference, embedding). Inputs are prepared as for fine-tuning. Rerun the same command "
                    "to resume: finished parts are kept. Then: medssl search --index OUT, medssl serve --index OUT.",
    )
    p.add_argument("inputs", nargs="+", type=storage.location, metavar="DATASET_OR_FILES",
                   help="one ingest output folder (local or s3://), or image files and folders")
    p.add_argument("--run", required=True, type=storage.location, help="a `medssl pretrain` run folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (new, or an earlier embed to resume)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--ct-window", default="40,400", help="CT level,width in HU as the encoder sees it (default 40,400)")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_embed(args) -> int:
    from medssl.retrieval.embed import embed

    try:
        summary = embed(args.inputs, args.run, args.out, batch_size=args.batch_size,
                        ct_window=_ct_window(args.ct_window), device=args.device, show_progress=not args.quiet)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{summary.rows} images embedded in {summary.parts_written} new parts"
          + (f" ({summary.parts_skipped} parts already done)" if summary.parts_skipped else "") + f": {args.out}")
    for r in summary.rejected[:5]:
        print(f"rejected {r['path']}: {r['reason']}", file=sys.stderr)
    if len(summary.rejected) > 5:
        print(f"... {len(summary.rejected) - 5} more rejected files", file=sys.stderr)
    return 0


def _search_parser(sub) -> None:
    p = sub.add_parser(
        "search", help="the nearest cases of an archive sample or an image file, from a nearest-neighbour index",
        description="Query the nearest-neighbour index of a `medssl embed` output folder by sample key or by image "
                    "file (cosine distance of the encoder's features; 0 = same). The index (faiss) is built inside the "
                    "folder on first use, and rebuilt when the folder gained parts.",
    )
    p.add_argument("--index", required=True, type=Path, metavar="DIR", help="a `medssl embed` output folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--key", help="a sample key of the index (as in the shards)")
    what.add_argument("--image", type=Path, help="an image file (PNG, JPEG, TIFF, DICOM, NIfTI)")
    what.add_argument("--build", action="store_true", help="only build (or rebuild) the index")
    p.add_argument("-k", type=int, default=10, help="neighbours (default 10)")


def _run_search(args) -> int:
    from medssl.io import Rejected
    from medssl.retrieval.embed import Encoder
    from medssl.retrieval.index import build_index, open_index

    try:
        if args.build:
            print(f"index: {build_index(args.index)}")
            return 0
        index = open_index(args.index, log=lambda m: print(m, file=sys.stderr))
        row = None
        if args.key is not None:
            row = index.find_key(args.key)
            if row is None:
                print(f"error: no sample with key {args.key!r} in {args.index}", file=sys.stderr)
                return 1
            vector = index.vector(row)
            print(f"query: {_shown_source(index.row(row))}")
        else:
            m = index.manifest
            _, vector = Encoder(m["run"], tuple(m["ct_window"])).encode_file(args.image)
            print(f"query: {args.image}")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Rejected as r:
        print(f"error: {args.image}: not readable as an image ({r.code}): {r.detail}", file=sys.stderr)
        return 1
    print(f"{'rank':>4}  {'distance':>8}  {'modality':<8}  source (frame; key)")
    for rank, n in enumerate(index.neighbours(vector, args.k, query_row=row), 1):
        r = index.row(n.row)
        print(f"{rank:>4}  {n.distance:>8.4f}  {r['modality']:<8}  {_shown_source(r)}")
        for copy in n.copies:  # the same image in another file (another encoding, a second export)
            print(f"{'':>4}  {'':>8}  {'':<8}  same image: {_shown_source(index.row(copy))}")
    return 0


def _shown_source(r: dict) -> str:
    """A row's source file as its dataset names it (embeddings made before paths were kept: the key only)."""
    return f"{r['path']} (frame {r['frame']}; {r['key']})" if r.get("path") else f"frame {r['frame']}; {r['key']}"


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="a local web page: pick or upload an image, see its nearest cases with thumbnails",
        description="Serve a page where a user picks an archive image or uploads one (PNG, JPEG, TIFF, DICOM, NIfTI) "
                    "and sees its nearest cases: thumbnails rendered from the shards' pixels, modality and distance. "
                    "Bound to 127.0.0.1 (this machine only) unless --host says otherwise.",
    )
    p.add_argument("--index", required=True, type=Path, metavar="DIR", help="a `medssl embed` output folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest upload accepted (default 32 MB)")
    p.add_argument("--quiet", action="store_true", help="no request log")


def _run_serve(args) -> int:
    from medssl.retrieval.index import open_index
    from medssl.retrieval.server import make_server

    try:
        index = open_index(args.index)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    server = make_server(index, args.host, args.port, args.max_upload_mb, quiet=args.quiet)
    host, port = server.server_address[:2]
    print(f"serving {index.count} images of {args.index} on "
          f"http://{'localhost' if host == '127.0.0.1' else host}:{port}/ (Ctrl-C stops)", flush=True)
    # Ctrl-C must stop it even when started by a process that ignores SIGINT (Python then leaves SIGINT
    # ignored in its children: a server started so would never stop on it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _curate_parser(sub) -> None:
    p = sub.add_parser(
        "curate", help="drop near-duplicate slices of ingest outputs before pretraining (perceptual hash)",
        description="Hash every sample of the ingest outputs (64-bit DCT perceptual hash of the image as displayed, "
                    "CT through --set ct_window) and write a new dataset under --out holding the samples that are "
                    "not near-identical (at most --threshold bits apart) to a sample kept before them: near-copies "
                    "among the slices of one series and copies across the archive go. Same shard format; pretrain "
                    "on --out. report.md / report.json count what went, by reason, modality and series (no "
                    "identifiers); drops.jsonl lists the dropped sample keys. Rerun the same command to finish an "
                    "interrupted run.",
    )
    _setting(p, CurateConfig, "shards", nargs="*", type=storage.location, metavar="SHARDS")
    _setting(p, CurateConfig, "out", "--out", type=Path)
    _setting(p, CurateConfig, "threshold", "--threshold", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _finish_config_parser(p)


def _run_curate(args) -> int:
    from medssl.curate import curate

    cfg = load_config(CurateConfig, args.config, _config_values(args), args.overrides)
    r = curate(cfg, show_progress=not args.quiet)
    print(f"{r['read']} images: {r['kept']} kept, {r['dropped']} dropped ("
          + ", ".join(f"{n} {reason}" for reason, n in r["by_reason"].items() if n) + ")")
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_HelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medssl", description="Self-supervised learning from large medical image archives.")
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _ingest_parser(sub)
    _pretrain_parser(sub)
    _finetune_parser(sub)
    _probe_parser(sub)
    _bench_parser(sub)
    _evaluate_parser(sub)
    _demo_parser(sub)
    _report_parser(sub)
    _export_parser(sub)
    _embed_parser(sub)
    _search_parser(sub)
    _serve_parser(sub)
    _curate_parser(sub)
    return parser


COMMANDS = {"ingest": _run_ingest, "pretrain": _run_pretrain, "finetune": _run_finetune, "probe": _run_probe,
            "bench": _run_bench,
            "evaluate": _run_evaluate, "demo": _run_demo, "report": _run_report, "export": _run_export,
            "embed": _run_embed, "search": _run_search, "serve": _run_serve, "curate": _run_curate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # the command line as given, for the records
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except storage.StorageError as e:  # one line naming the operation and the object, not a chained traceback
        print(f"error: {e}; rerun the same command to resume once the store is reachable", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
