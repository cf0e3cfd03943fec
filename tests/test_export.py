"""`medssl export`: timm and onnxruntime open the exported encoder offline and give medssl's features; the
card carries lineage (source hashes, counts) and no paths."""

from __future__ import annotations

import hashlib
import json
import socket

import numpy as np
import pytest
import torch

import medssl
from medssl.cli import main
from medssl.config import FinetuneConfig, PretrainConfig
from medssl.downstream.decode import decode_image
from medssl.downstream.images import to_input
from medssl.publish import ExportError, export_run
from medssl.train.pretrain import pretrain
from test_pretrain import TINY

# Real DICOM files of several modalities and encodings (pydicom's test files), decoded by medssl.
REAL_IMAGES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "liver_1frame.dcm", "MR_small_RLE.dcm")
SIZE = TINY["augment"]["global_size"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_shards):
    out = tmp_path_factory.mktemp("export") / "run"
    return pretrain(PretrainConfig(shards=[tiny_shards], out=out, max_steps=1, **TINY), show_progress=False)


def _refuse_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test (and Hugging Face's client is told it is offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    """Both formats, offline, the ONNX one through the command line."""
    root = tmp_path_factory.mktemp("exported")
    with pytest.MonkeyPatch.context() as mp:
        _refuse_network(mp)
        export_run(run, "timm", root / "timm", license="cc-by-nc-4.0")
        assert main(["export", str(run), "--format", "onnx", "--out", str(root / "onnx")]) == 0
    return root


@pytest.fixture
def no_network(monkeypatch):
    _refuse_network(monkeypatch)


@pytest.fixture(scope="module")
def real_images(pydicom_test_files):
    """(N, 1, SIZE, SIZE) encoder inputs from real DICOM files, through medssl's own decode and CT window."""
    cfg = FinetuneConfig(input_size=SIZE)
    decoded = [decode_image(pydicom_test_files / name, None, cfg) for name in REAL_IMAGES]
    images = torch.from_numpy(np.stack([values for values, _ in decoded]))
    is_ct = torch.tensor([ct for _, ct in decoded])
    assert is_ct.any() and not is_ct.all()
    return to_input(images, is_ct, cfg.ct_window)


def test_timm_loads_the_folder_offline_with_medssl_features(exports, run, real_images, no_network):
    import timm
    from timm.data import resolve_data_config

    folder = exports / "timm"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                                  "model_card.json", "sources.sha256"}
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    reference = medssl.load_encoder(run)
    with torch.no_grad():
        torch.testing.assert_close(model(real_images), reference(real_images), rtol=0, atol=1e-6)
    assert model.num_classes == 0 and model.conv1.in_channels == 1
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (1, SIZE, SIZE) and list(data["mean"]) == [0.0] and list(data["std"]) == [1.0]
    assert model.pretrained_cfg["license"] == "cc-by-nc-4.0" and model.pretrained_cfg["tag"] == "medssl"
    card = json.loads((folder / "model_card.json").read_text())
    assert card["checks"]["timm_local_dir_max_abs_diff"] <= 1e-6
    # The README's metadata block is what a model hub reads when the folder is pushed as it is.
    from huggingface_hub import ModelCard

    hub = ModelCard.load(folder / "README.md").data
    assert hub.license == "cc-by-nc-4.0" and hub.library_name == "timm"
    assert hub.pipeline_tag == "image-feature-extraction"


def test_onnxruntime_matches_torch_on_real_images(exports, run, real_images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(exports / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = medssl.load_encoder(run)(real_images).numpy()
    got = session.run(["features"], {"image": real_images.numpy()})[0]  # a batch size other than the export's 2
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    card = json.loads((exports / "onnx" / "model_card.json").read_text())
    assert card["format"] == "onnx" and card["checks"]["onnxruntime_max_abs_diff"] <= 1e-4


def test_lineage_lists_every_source_file_and_no_path(exports, tiny_shards):
    archive = tiny_shards.parent / "archive"
    expected = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in archive.iterdir())
    for fmt in ("timm", "onnx"):
        folder = exports / fmt
        assert (folder / "sources.sha256").read_text().splitlines() == expected
        card = json.loads((folder / "model_card.json").read_text())
        assert card["data"]["source_files"] == 40 and card["data"]["images"] == 40
        assert card["data"]["by_modality"] == {"CT": {"files": 20, "images": 20}, "OT": {"files": 20, "images": 20}}
        assert card["license"].startswith("unspecified") if fmt == "onnx" else card["license"] == "cc-by-nc-4.0"
        for name in ("model_card.json", "README.md", *(["config.json"] if fmt == "timm" else [])):
            text = (folder / name).read_text()
            for leak in (str(tiny_shards.parent), str(exports), "/tmp", "archive", ".dcm", ".png"):
                assert leak not in text, f"{name} holds {leak!r}"


def test_export_refuses_a_dataset_that_changed_since_pretraining(run, tmp_path):
    moved = tmp_path / "run"
    moved.mkdir()
    (moved / "encoder.safetensors").write_bytes((run / "encoder.safetensors").read_bytes())
    card = json.loads((run / "model_card.json").read_text())
    card["data"]["samples"] += 1
    (moved / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ExportError, match="card 41: the data changed since pretraining"):
        export_run(moved, "onnx", tmp_path / "out")
    assert not (tmp_path / "out" / "model_card.json").exists()


def test_export_refuses_a_folder_with_other_files(run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_bytes(b"stale")
    assert main(["export", str(run), "--format", "timm", "--out", str(tmp_path / "out")]) == 1
    assert "holds other files (model.onnx)" in capsys.readouterr().err


def test_a_failed_onnx_check_is_loud_and_leaves_no_card(exports, run, tmp_path, monkeypatch):
    """Re-exporting into an earlier export's folder: a failed check must not leave the old card vouching."""
    import shutil

    from medssl.models import onnx_export

    folder = tmp_path / "onnx"
    shutil.copytree(exports / "onnx", folder)
    monkeypatch.setattr(onnx_export, "onnx_max_abs_diff", lambda *args: 0.01)
    with pytest.raises(ExportError, match=r"differ from torch's by up to 0\.01 \(> 0\.0001\)"):
        export_run(run, "onnx", folder)
    assert not (folder / "model_card.json").exists() and not (folder / "README.md").exists()


def _relative_run(root, tiny_shards):
    """A run made as a user makes one: `medssl pretrain work/shards --out work/run` inside ``root``."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(tiny_shards, root / "work" / "shards")
    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()] + ["max_steps=1"]
    proc = subprocess.run([sys.executable, "-m", "medssl.cli", "pretrain", "work/shards", "--out", "work/run",
                           "--quiet", *[a for s in sets for a in ("--set", s)]], cwd=root, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return root / "work"


def _export(run_dir, out, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "medssl.cli", "export", str(run_dir), "--format", "timm", "--out",
                           str(out), "--check-images", "1"], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow  # ~25 s: a pretraining and three exports, each a process
def test_export_works_from_another_folder_and_after_a_move(tmp_path, tiny_shards):
    """The card recorded "work/shards" relative to where pretrain ran: export from elsewhere failed, saying
    the shards had moved when they had not."""
    work = _relative_run(tmp_path / "a", tiny_shards)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _export(work / "run", tmp_path / "x1", elsewhere)
    assert proc.returncode == 0, proc.stderr
    moved = tmp_path / "b" / "moved"
    moved.parent.mkdir()
    work.rename(moved)  # run and dataset moved together
    proc = _export(moved / "run", tmp_path / "x2", elsewhere)
    assert proc.returncode == 0, proc.stderr
    (moved / "shards").rename(tmp_path / "b" / "gone")
    proc = _export(moved / "run", tmp_path / "x3", elsewhere)
    assert proc.returncode == 1
    assert "is not where its card says: looked at" in proc.stderr and "--shards" in proc.stderr
    assert str(moved / "shards") in proc.stderr


def test_a_card_from_before_locations_were_recorded_is_still_exported_from_elsewhere(tmp_path, tiny_shards):
    work = _relative_run(tmp_path / "a", tiny_shards)
    card_path = work / "run" / "model_card.json"
    card = json.loads(card_path.read_text())
    del card["data"]["shard_locations"]
    card_path.write_text(json.dumps(card))
    proc = _export(work / "run", tmp_path / "x", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "x" / "model_card.json").read_text())["data"]["images"] == 40
