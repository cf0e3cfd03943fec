"""The HTML report: built from real artefacts (an ingest output, a tiny pretraining run, downstream runs
written by hand to the finetune contract) and rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import downstream_metrics, robustness_record
from medssl.cli import main
from medssl.config import PretrainConfig
from medssl.report import ReportError, build_report
from medssl.train.pretrain import pretrain
from test_pretrain import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)   # matplotlib's first two colours: plot lines and bars


def _finetune_run(folder: Path, init: str, fraction: float, auc: float, seed: int = 0,
                  robustness: bool = False) -> None:
    """A downstream run folder as `medssl finetune` writes it: metrics.json and test_predictions.csv."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed + int(auc * 1000))
    history = [{"epoch": e, "step": 10 * e, "train_loss": 1 / e, "val_auc": auc - 0.3 / e, "elapsed_s": e}
               for e in range(1, 6)]
    reached = next((h["step"] for h in history if h["val_auc"] >= 0.7), None)
    metrics = downstream_metrics(
        test_auc=auc, test_auc_ci=[auc - 0.05, auc + 0.05], best_val_auc=history[-1]["val_auc"], target_auc=0.7,
        steps_to_target=reached, history=history, mode="finetune", init={"init": init, "architecture": "resnet18"},
        label_fraction=fraction, seed=seed,
        task={"csv": "data/lesion/task.csv", "type": "binary", "classes": ["lesion", "normal"], "outputs": ["lesion"]},
        config={"task": "data/lesion/task.csv", "init": init, "mode": "finetune", "label_fraction": fraction,
                "seed": seed})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    labels = rng.integers(0, 2, 60)
    scores = np.clip(labels * (auc - 0.5) * 2 + rng.normal(0.25, 0.3, 60), 0, 1)
    rows = ["path,group,label,prob_lesion"] + [f"img{i}.png,p{i},{'lesion' if y else 'normal'},{s:.4f}"
                                               for i, (y, s) in enumerate(zip(labels, scores))]
    (folder / "test_predictions.csv").write_text("\n".join(rows) + "\n")
    if robustness:
        (folder / "robustness.json").write_text(json.dumps(robustness_record(clean_auc=auc, sweeps={
            "gamma": [{"level": g, "auc": auc - abs(1 - g) * 0.3, "drop": abs(1 - g) * 0.3}
                      for g in (0.5, 0.7, 1.0, 1.5, 2.0)],
            "noise": [{"level": n, "auc": auc - n * 2, "drop": n * 2} for n in (0.0, 0.05, 0.1)]})))


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_shards) -> Path:
    """A demo-like folder: shards/ (ingest), pretrain/ (a real tiny run), finetune-*/ (scratch against SSL)."""
    root = tmp_path_factory.mktemp("bench")
    shutil.copytree(tiny_shards, root / "shards")
    pretrain(PretrainConfig(shards=[root / "shards"], out=root / "pretrain", max_steps=4, **TINY), show_progress=False)
    for fraction, scratch_auc, ssl_auc in ((0.1, 0.62, 0.74), (0.3, 0.70, 0.79), (1.0, 0.80, 0.86)):
        _finetune_run(root / f"finetune-scratch-{fraction:g}", "scratch", fraction, scratch_auc,
                      robustness=fraction == 1.0)
        _finetune_run(root / f"finetune-ssl-{fraction:g}", str(root / "pretrain"), fraction, ssl_auc,
                      robustness=fraction == 1.0)
    # Labels for the embedding map: the tiny archive's files, labeled independently of their modality.
    archive = tiny_shards.parent / "archive"
    rows = []
    for p in sorted(archive.iterdir()):
        number = int(re.sub(r"\D", "", p.name))   # ct1.dcm, xr2.png, ...
        rows.append(f"{os.path.relpath(p, root)},{'lesion' if number % 4 < 2 else 'normal'}")
    (root / "task.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return root


class _Links(HTMLParser):
    """Every image source and every other src/href in a page."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href"):
                (self.images if tag == "img" else self.links).append(value or "")


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    return int((np.abs(pixels.astype(int) - colour).max(axis=-1) <= tolerance).sum())


def test_report_renders_offline_in_chromium(bench, tmp_path):
    out = build_report(bench, out=tmp_path / "report.html", task=bench / "task.csv", log=lambda m: None)
    page = out.read_text()

    assert not re.search(r"https?://", page, re.IGNORECASE), "external reference in the page"
    parser = _Links()
    parser.feed(page)
    assert parser.links and all(link.startswith("#") for link in parser.links), parser.links  # table of contents
    # ingest summary + examples, pretraining curves + embedding map, ROC, convergence, label efficiency, robustness
    assert len(parser.images) == 8
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        width, height = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size
        assert width > 100 and height > 100
    for text in ("Ingest: shards", "Pretraining: pretrain", "Downstream: lesion/task.csv", "Labels from",
                 "SSL better (intervals apart)", "no clear difference (intervals overlap)"):
        assert text in page, text
    assert 'class="missing"' not in page, "a present artefact was reported missing"

    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; scripts/setup.sh does it as root)")
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,9000", out.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-3000:]
    # The page has no scripts: any console line (an error, a blocked resource) is a defect.
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert (pixels.min(axis=-1) < 240).mean() > 0.05, "the screenshot is (nearly) blank"
    packed = (pixels[..., 0].astype(np.uint32) << 16) | (pixels[..., 1].astype(np.uint32) << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 200, "too few colours for rendered plots"
    # Plot colours, not just text: bars, curves and scatter points in matplotlib's palette are on screen.
    assert _near(pixels, TAB_BLUE) > 2000 and _near(pixels, TAB_ORANGE) > 2000
    # Lower half too: the figures further down (downstream curves) rendered, not only the first ones.
    assert _near(pixels[pixels.shape[0] // 2:], TAB_BLUE) > 500


def test_the_embedding_map_shows_the_pools_modalities_also_with_task_labels(bench, tmp_path, monkeypatch):
    """With --task only the task's images were embedded: the modality panel had one colour."""
    from medssl.report import plots as report_plots

    seen = []
    real = report_plots.embedding_map
    monkeypatch.setattr(report_plots, "embedding_map", lambda coords, colourings, method: seen.append(colourings)
                        or real(coords, colourings, method))
    task = tmp_path / "task.csv"  # labels for the CT files only: one modality
    rows = [line for line in (bench / "task.csv").read_text().splitlines()[1:] if ".dcm" in line]
    task.write_text("path,label\n" + "\n".join(f"{os.path.relpath(bench / r.split(',')[0], tmp_path)},"
                                                 f"{r.split(',')[1]}" for r in rows) + "\n")
    build_report(bench, out=tmp_path / "report.html", task=task, log=lambda m: None)
    (modality, by_modality), (label, by_label) = seen[0]
    assert modality == "modality" and set(by_modality) == {"CT", "OT"}
    assert label == "task label" and "not in the task" in by_label and {"lesion", "normal"} <= set(by_label)


def test_missing_artefacts_are_named_not_fatal(tmp_path):
    run = tmp_path / "only-run"
    _finetune_run(run, "scratch", 1.0, 0.8)
    (run / "test_predictions.csv").unlink()
    page = build_report(run, log=lambda m: None).read_text()
    for text in ("No ingest output", "No pretraining run", "No predictions file", "No robustness.json",
                 "Label efficiency omitted", "No SSL-against-scratch comparison"):
        assert text in page, text
    assert page.count("<img ") == 1   # only the convergence curve can be drawn


def test_other_prediction_layouts_give_roc_curves(tmp_path):
    from medssl.report.predictions import read_predictions

    (tmp_path / "binary.csv").write_text("path,label,score\na,1,0.9\nb,0,0.2\nc,1,0.4\n")
    (tmp_path / "multi.csv").write_text("path,label_a,score_a,label_b,score_b\nx,1,0.8,0,0.1\ny,0,0.3,1,0.7\n")
    (tmp_path / "finetune.csv").write_text("path,group,label,prob_a,prob_b\nx,g,a|b,0.8,0.6\ny,g,b,0.1,0.9\n")
    targets, scores = read_predictions(tmp_path / "binary.csv")["positive"]
    assert targets.tolist() == [1, 0, 1] and scores.tolist() == [0.9, 0.2, 0.4]
    assert read_predictions(tmp_path / "multi.csv")["b"][0].tolist() == [0, 1]
    finetune = read_predictions(tmp_path / "finetune.csv")
    assert finetune["a"][0].tolist() == [1, 0] and finetune["b"][0].tolist() == [1, 1]


def test_cli(tmp_path, capsys):
    run = tmp_path / "run"
    _finetune_run(run, "scratch", 1.0, 0.8)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 1000
    assert str(tmp_path / "r.html") in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "holds no medssl artefact" in capsys.readouterr().err
    with pytest.raises(ReportError):
        build_report(tmp_path / "absent")
