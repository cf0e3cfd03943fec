"""Robustness sweeps: the perturbations one by one, then `evaluate_robustness` and `medssl evaluate` on tiny runs."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import write_blob_task
from medssl.cli import main
from medssl.config import ConfigError
from medssl.downstream import evaluate_robustness, finetune, prepare_task
from medssl.downstream.images import to_input
from medssl.downstream.robustness import NEUTRAL, SWEEPS, perturb, sweep_levels
from medssl.report import build_report

# A run of two steps on 32-px images: enough for a classifier to score, not to be good.
TINY = {"input_size": 32, "epochs": 1, "max_steps": 2, "batch_size": 8, "bootstrap": 10, "seed": 3}
INTENSITY = ("gamma", "contrast", "brightness", "noise")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny batches: a second thread only adds OpenMP hand-offs, which cost 100x on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    finetune(write_blob_task(root / "images", with_ct=True), out=root / "run", **TINY)
    return root / "run"


@pytest.fixture(scope="module")
def png_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("png")
    finetune(write_blob_task(root / "images", with_ct=False), out=root / "run", **TINY)
    return root / "run"


def _images(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Even rows: CT in HU (-1000..1000, minimum -1000); odd rows: [0.25, 1] (minimum 0.25)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, size, size, generator=g)
    is_ct = torch.arange(n) % 2 == 0
    images = torch.where(is_ct.view(-1, 1, 1), images * 2000 - 1000, 0.25 + 0.75 * images)
    images[:, size // 2, size // 2] = torch.where(is_ct, -1000.0, 0.25)  # the minimum, away from the corners
    return images, is_ct


WIDE = (0.0, 4000.0)  # CT -1000 HU -> 0.25, +1000 HU -> 0.75: no clamping hides a wrong fill value


def test_neutral_levels_leave_the_inputs_unchanged():
    images, is_ct = _images()
    clean = to_input(images, is_ct, WIDE)
    for sweep, level in NEUTRAL.items():
        assert torch.equal(perturb(images, is_ct, WIDE, sweep, level, seed=5), clean), sweep
    levels = sweep_levels()
    assert list(levels) == list(SWEEPS)
    for sweep, values in levels.items():
        assert NEUTRAL[sweep] in values and values == sorted(values)


def test_rotation_turns_each_image_one_way_and_fills_with_its_minimum():
    images, is_ct = _images(n=8)
    out = perturb(images, is_ct, WIDE, "rotation", 30.0, seed=1)[:, 0]
    corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.equal(corners, torch.full_like(corners, 0.25))  # the image minimum, CT (-1000 HU) and others
    assert not torch.equal(out, to_input(images, is_ct, WIDE)[:, 0])
    assert torch.equal(out, perturb(images, is_ct, WIDE, "rotation", 30.0, seed=1)[:, 0])  # seeded

    # The same asymmetric image 8 times: the ones turned the same way agree, and both ways occur.
    same = images[1].expand(8, -1, -1).clone()
    turned = perturb(same, torch.zeros(8, dtype=torch.bool), WIDE, "rotation", 10.0, seed=1)
    assert 1 < sum(torch.equal(turned[i], turned[0]) for i in range(8)) < 8


def test_scaling_zooms_about_the_centre():
    images = torch.zeros(1, 32, 32)
    images[:, 12:20, 12:20] = 1.0  # an 8-px square in the middle of a black image
    is_ct = torch.zeros(1, dtype=torch.bool)
    bright = {f: (perturb(images, is_ct, WIDE, "scaling", f)[0, 0] > 0.5) for f in (0.8, 1.2)}
    assert bright[0.8].sum() < 64 < bright[1.2].sum()
    rows, cols = torch.nonzero(bright[1.2], as_tuple=True)
    assert rows.float().mean() == pytest.approx(15.5) and cols.float().mean() == pytest.approx(15.5)
    shrunk = perturb(torch.rand(1, 32, 32) * 0.5 + 0.5, is_ct, WIDE, "scaling", 0.8)[0, 0]
    assert shrunk[0, 0] >= 0.5 and shrunk[0, 0] == shrunk.min()  # the border comes in at the image minimum


def test_intensity_sweeps_stay_in_range_and_change_the_inputs():
    images, is_ct = _images()
    clean = to_input(images, is_ct, (40.0, 400.0))
    for sweep in INTENSITY:
        for level in SWEEPS[sweep]:
            x = perturb(images, is_ct, (40.0, 400.0), sweep, level, seed=2)
            assert x.shape == clean.shape and 0 <= x.min() and x.max() <= 1, (sweep, level)
            assert not torch.equal(x, clean), (sweep, level)
    darker = perturb(images, is_ct, WIDE, "gamma", 2.0)
    assert torch.all(darker <= to_input(images, is_ct, WIDE))


def test_ct_window_shift_moves_the_level_of_ct_only():
    images, is_ct = _images()
    clean = to_input(images, is_ct, WIDE)
    shifted = perturb(images, is_ct, WIDE, "ct_window_shift", 40.0)
    torch.testing.assert_close(shifted[is_ct], clean[is_ct] - 40.0 / 4000.0)  # a higher level shows HU darker
    assert torch.equal(shifted[~is_ct], clean[~is_ct])


def test_unknown_or_invalid_sweeps_are_config_errors():
    with pytest.raises(ConfigError, match="unknown robustness sweep.*blur.*known: rotation, scaling"):
        sweep_levels({"blur": [1.0]})
    with pytest.raises(ConfigError, match="unknown robustness sweep.*rotaton"):
        sweep_levels(only=["rotaton"])
    with pytest.raises(ConfigError, match="gamma"):
        sweep_levels({"gamma": [0.0]})
    assert sweep_levels({"rotation": [20, 10]}, only=["rotation"]) == {"rotation": [0.0, 10.0, 20.0]}


def test_robustness_json_of_a_ct_run_and_its_report(ct_run):
    result = evaluate_robustness(ct_run, device="cpu")
    assert json.loads((ct_run / "robustness.json").read_text()) == result
    metrics = json.loads((ct_run / "metrics.json").read_text())
    assert set(result) == {"format", "clean_auc", "sweeps", "worst", "test_images", "split", "task", "run", "skipped",
                           "seed"}
    assert result["split"] == "test"
    assert result["clean_auc"] == pytest.approx(metrics["test_auc"], abs=1e-6)
    assert result["test_images"] == metrics["task"]["images"]["test"]
    assert result["task"] == metrics["task"]["csv"] and result["run"] == str(ct_run) and result["seed"] == 3
    assert list(result["sweeps"]) == list(SWEEPS) and result["skipped"] == {}  # ct_window_shift included
    for sweep, points in result["sweeps"].items():
        assert [p["level"] for p in points] == sweep_levels()[sweep]
        neutral = next(p for p in points if p["level"] == NEUTRAL[sweep])
        assert neutral["auc"] == result["clean_auc"] and neutral["drop"] == 0, sweep
        for p in points:
            assert 0 <= p["auc"] <= 1 and p["drop"] == pytest.approx(result["clean_auc"] - p["auc"])
        assert result["worst"][sweep] == min(points, key=lambda p: p["auc"])

    html = build_report(ct_run, log=lambda message: None).read_text()
    assert 'alt="robustness curves"' in html and "No robustness.json" not in html


def test_a_prepared_task_must_match_the_run(ct_run, tmp_path):
    csv_path = json.loads((ct_run / "metrics.json").read_text())["config"]["task"]
    result = evaluate_robustness(ct_run, task=prepare_task(csv_path, input_size=32), only=["gamma"],
                                 out=tmp_path / "r.json", device="cpu")
    assert list(result["sweeps"]) == ["gamma"] and (tmp_path / "r.json").is_file()
    with pytest.raises(ConfigError, match="input_size: task prepared with 40, config has 32"):
        evaluate_robustness(ct_run, task=prepare_task(csv_path, input_size=40), out=tmp_path / "s.json")


def test_the_validation_split_can_be_scored_instead(ct_run, tmp_path):
    """For choices that must not look at the test images (e.g. an augmentation chosen for robustness)."""
    metrics = json.loads((ct_run / "metrics.json").read_text())
    result = evaluate_robustness(ct_run, only=["noise"], out=tmp_path / "val.json", split="val", device="cpu")
    assert result["split"] == "val" and result["test_images"] == metrics["task"]["images"]["val"]
    assert result["clean_auc"] == pytest.approx(metrics["best_val_auc"], abs=1e-6)  # best.pt's own validation AUC


def test_ct_window_shift_is_skipped_without_ct(png_run, tmp_path):
    result = evaluate_robustness(png_run, only=["ct_window_shift", "brightness"], out=tmp_path / "r.json")
    assert list(result["sweeps"]) == ["brightness"]
    assert "ct_window_shift" not in result["worst"] and "no test image is CT" in result["skipped"]["ct_window_shift"]


def test_cli(png_run, capsys):
    code = main(["evaluate", str(png_run), "--robustness", "--only", "rotation", "--levels", "rotation=10,20",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "rotation" in out and str(png_run / "robustness.json") in out
    written = json.loads((png_run / "robustness.json").read_text())
    assert [p["level"] for p in written["sweeps"]["rotation"]] == [0.0, 10.0, 20.0]

    assert main(["evaluate", str(png_run)]) == 2  # nothing asked for
    assert "--robustness" in capsys.readouterr().err
    assert main(["evaluate", str(png_run), "--robustness", "--levels", "rotation:10"]) == 2
    assert main(["evaluate", str(png_run.parent), "--robustness"]) == 2  # not a finetune folder
    assert "best.pt" in capsys.readouterr().err


def test_a_classifier_with_non_finite_scores_is_a_one_line_error(png_run, tmp_path, capsys):
    import shutil

    from medssl.train.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "diverged"
    shutil.copytree(png_run, run)
    ckpt = load_checkpoint(run / "best.pt")
    for value in ckpt["model"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    save_checkpoint(run / "best.pt", ckpt)
    assert main(["evaluate", str(run), "--robustness", "--only", "gamma", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "non-finite scores" in err and err.count("\n") == 1
