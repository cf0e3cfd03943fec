"""Task CSVs: task type and multi-label parsing, group-aware seeded splits, label subsets, image loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_ct_dicom
from medssl.cli import main
from medssl.config import FinetuneConfig
from medssl.downstream.images import to_input
from medssl.downstream.tasks import TaskError, assign_splits, label_subset, load_task, read_task_csv


def _csv(path, header, rows):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _png(path, value=100, shape=(20, 30)):
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    Image.fromarray(np.clip(value + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)).save(path)


def test_multilabel_parsing(tmp_path):
    table = read_task_csv(_csv(tmp_path / "t.csv", "path,label",
                               [("a.png", "effusion|nodule"), ("b.png", "nodule"), ("c.png", ""),
                                ("d.png", " mass | effusion")]))
    assert table.kind == "multilabel" and table.classes == ["effusion", "mass", "nodule"] == table.outputs
    np.testing.assert_array_equal(table.targets, [[1, 0, 1], [0, 0, 1], [0, 0, 0], [1, 1, 0]])


def test_binary_and_multiclass_detection(tmp_path):
    binary = read_task_csv(_csv(tmp_path / "b.csv", "path,label", [("a", "normal"), ("b", "bleed"), ("c", "normal")]))
    assert binary.kind == "binary" and binary.outputs == ["normal"]  # default positive: second in sorted order
    np.testing.assert_array_equal(binary.targets[:, 0], [1, 0, 1])
    chosen = read_task_csv(tmp_path / "b.csv", positive_class="bleed")
    np.testing.assert_array_equal(chosen.targets[:, 0], [0, 1, 0])
    multi = read_task_csv(_csv(tmp_path / "m.csv", "path,label", [("a", "x"), ("b", "y"), ("c", "z")]))
    assert multi.kind == "multiclass" and multi.targets.sum(1).tolist() == [1, 1, 1]


def test_csv_problems_are_listed_together(tmp_path):
    csv = _csv(tmp_path / "t.csv", "path,label,split", [("a", "x", "train"), ("", "y", "train"), ("c", "", "dev")])
    with pytest.raises(TaskError) as e:
        read_task_csv(csv)
    text = str(e.value)
    assert "line 3: empty path" in text and "line 4: empty label" in text and "'dev' is not one of" in text
    with pytest.raises(TaskError, match="no column path or label"):
        read_task_csv(_csv(tmp_path / "h.csv", "file,class", [("a", "x")]))


def _grouped_table(tmp_path, n_groups=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "pos" if g % 3 == 0 else "neg"
        rows += [(f"img{g}_{k}.png", label, f"patient{g}") for k in range(int(rng.integers(1, 5)))]
    return read_task_csv(_csv(tmp_path / "t.csv", "path,label,group", rows))


def test_carved_splits_keep_groups_whole_and_are_stratified(tmp_path):
    table = _grouped_table(tmp_path)
    split, origin = assign_splits(table, 0.15, 0.15, seed=0)
    assert origin == {"val": "carved", "test": "carved"}
    for g in set(table.groups):
        assert len({s for s, gg in zip(split, table.groups) if gg == g}) == 1, f"{g} cut across splits"
    n = len(table)
    for name in ("val", "test"):
        part = table.targets[split == name, 0]
        assert 0.05 * n < len(part) < 0.3 * n
        assert 0 < part.sum() < len(part), f"{name} lacks a class"


def test_carve_out_is_seeded(tmp_path):
    table = _grouped_table(tmp_path)
    a, _ = assign_splits(table, 0.15, 0.15, seed=3)
    b, _ = assign_splits(table, 0.15, 0.15, seed=3)
    c, _ = assign_splits(table, 0.15, 0.15, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_given_splits_are_kept_and_missing_val_is_carved_from_train(tmp_path):
    rows = [(f"{i}.png", "pos" if i % 2 else "neg", "test" if i < 6 else "train") for i in range(40)]
    table = read_task_csv(_csv(tmp_path / "t.csv", "path,label,split", rows))
    split, origin = assign_splits(table, 0.2, 0.2, seed=0)
    assert origin == {"val": "carved", "test": "csv"}
    assert list(split[:6]) == ["test"] * 6 and "test" not in split[6:]
    val = table.targets[split == "val", 0]
    assert (val == 1).sum() == (val == 0).sum() == 3  # 20% of each class's 17 training rows: 3.4, rounded


def test_a_group_crossing_given_splits_is_an_error(tmp_path):
    rows = [("a.png", "x", "train", "p1"), ("b.png", "y", "test", "p1"), ("c.png", "x", "val", "p2"),
            ("d.png", "y", "val", "p3"), ("e.png", "y", "train", "p4"), ("f.png", "x", "test", "p5")]
    table = read_task_csv(_csv(tmp_path / "t.csv", "path,label,split,group", rows))
    with pytest.raises(TaskError, match=r"group 'p1' is in test, train"):
        assign_splits(table, 0.15, 0.15, seed=0)


def test_label_subset_is_stratified_and_seeded(tmp_path):
    table = read_task_csv(_csv(tmp_path / "t.csv", "path,label", [(f"{i}", "a" if i < 30 else "b") for i in range(40)]))
    rows = np.arange(40)
    sub = label_subset(table, rows, 0.1, seed=1)
    assert (sub < 30).sum() == 3 and (sub >= 30).sum() == 1
    np.testing.assert_array_equal(sub, label_subset(table, rows, 0.1, seed=1))
    assert not np.array_equal(sub, label_subset(table, rows, 0.1, seed=2))
    np.testing.assert_array_equal(label_subset(table, rows, 1.0, seed=1), rows)


@pytest.fixture
def task_with_bad_files(tmp_path):
    rows = []
    for i in range(20):
        _png(tmp_path / f"ok{i}.png", 60 if i % 2 else 160)
        rows.append((f"ok{i}.png", "pos" if i % 2 else "neg"))
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "flat.png")
    rows += [("gone1.png", "pos"), ("sub/gone2.dcm", "neg"), ("notes.png", "pos"), ("empty.png", "neg"),
             ("flat.png", "pos")]
    return _csv(tmp_path / "task.csv", "path,label", rows)


def test_unusable_images_give_one_error_listing_all(task_with_bad_files):
    with pytest.raises(TaskError) as e:
        load_task(FinetuneConfig(task=task_with_bad_files, input_size=16))
    text = str(e.value)
    assert text.startswith("5 of 25 images")
    for line in ("gone1.png: missing", "sub/gone2.dcm: missing", "notes.png: not_an_image", "empty.png: empty_file",
                 "flat.png: empty: the image is constant", "--skip-bad"):
        assert line in text


def test_skip_bad_drops_and_reports(task_with_bad_files):
    task = load_task(FinetuneConfig(task=task_with_bad_files, input_size=16, skip_bad=True))
    assert len(task.table) == 20 and task.images.shape == (20, 16, 16)
    assert sorted(s["path"] for s in task.skipped) == ["empty.png", "flat.png", "gone1.png", "notes.png",
                                                       "sub/gone2.dcm"]
    assert all(p.startswith("ok") for p in task.table.paths)
    assert task.summary()["images"]["train"] + task.summary()["images"]["val"] + task.summary()["images"]["test"] == 20


def test_cli_reports_bad_images_and_exits_1(task_with_bad_files, tmp_path, capsys):
    code = main(["finetune", "--task", str(task_with_bad_files), "--out", str(tmp_path / "o"), "--quiet",
                 "--set", "input_size=16"])
    assert code == 1
    err = capsys.readouterr().err
    assert "5 of 25 images" in err and "gone1.png" in err and "notes.png" in err


def test_ct_stays_in_hu_and_goes_through_the_window(tmp_path):
    hu = np.full((40, 20), -1000.0)
    hu[10:30, 5:15] = 60.0  # a soft-tissue block in air
    write_ct_dicom(tmp_path / "ct.dcm", hu)
    _png(tmp_path / "xr.png", 128)
    csv = _csv(tmp_path / "t.csv", "path,label,split", [("ct.dcm", "a", "train"), ("xr.png", "b", "train"),
                                                         ("ct.dcm", "a", "val"), ("xr.png", "b", "val"),
                                                         ("ct.dcm", "a", "test"), ("xr.png", "b", "test")])
    task = load_task(FinetuneConfig(task=csv, input_size=20))
    assert task.is_ct.tolist() == [True, False] * 3
    ct = task.images[0]
    assert ct.shape == (20, 20) and ct.min() == -1000 and abs(float(ct.max()) - 60) < 1  # aspect kept, air padding
    x = to_input(task.images[:2], task.is_ct[:2], (40.0, 80.0))  # brain window: 0..80 HU
    assert x.shape == (2, 1, 20, 20) and x.min() >= 0 and x.max() <= 1
    assert float(x[0, 0, 10, 10]) == pytest.approx(0.75) and float(x[0, 0, 0, 0]) == 0.0
    torch.testing.assert_close(x[1, 0], task.images[1])  # non-CT images pass unchanged


def test_frame_spec_picks_a_volume_slice(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((12, 10, 6), np.float32)
    for z in range(6):
        volume[2:10, 2:8, z] = 100 + 50 * z  # slice z has a block of brightness 100 + 50 z over zero
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    from medssl.downstream.decode import decode_image, resolve_path

    cfg = FinetuneConfig(input_size=12, nifti_modality="CT")  # CT: values stay as stored (HU), easy to compare
    for raw, z in (("vol.nii.gz#4", 4), ("vol.nii.gz", 3)):  # no spec: the middle slice
        path, frame = resolve_path(tmp_path, raw)
        values, is_ct = decode_image(path, frame, cfg)
        assert is_ct and float(values.max()) == pytest.approx(100 + 50 * z)


# Files that are not CSV text: each must give one line naming the file and the problem, never a traceback.
NOT_CSV_TEXT = {
    "latin-1": (b"path,label\na.png,caf\xe9\nb.png,x\n", "is not UTF-8 text (line 2)"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "is not UTF-8 text (line 1)"),
    "nul-bytes": (b"path,label\n\x00\x00\x00\n", "holds NUL bytes: it is a binary file, not a CSV"),
    "huge-field": (b"path,label\n" + b"a" * 140_000 + b",x\nb.png,y\n",
                   "line 2 cannot be read as CSV (field larger than field limit (131072))"),
}


@pytest.mark.parametrize("kind", NOT_CSV_TEXT)
def test_a_file_that_is_not_csv_text_is_one_line_naming_it(tmp_path, kind):
    content, problem = NOT_CSV_TEXT[kind]
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    with pytest.raises(TaskError) as e:
        read_task_csv(path)
    assert str(e.value).startswith(f"{path} {problem}") and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", NOT_CSV_TEXT)
def test_cli_finetune_on_a_file_that_is_not_csv_text_exits_1(tmp_path, capsys, kind):
    path = tmp_path / "t.csv"
    path.write_bytes(NOT_CSV_TEXT[kind][0])
    assert main(["finetune", "--task", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} {NOT_CSV_TEXT[kind][1]}") and err.count("\n") == 1


def test_bench_and_report_read_task_csvs_the_same_way(tmp_path):
    from medssl.bench.pool import write_task_csv
    from medssl.config import BenchTask
    from medssl.report import ReportError
    from medssl.report.task_labels import TaskLabels

    path = tmp_path / "t.csv"
    path.write_bytes(NOT_CSV_TEXT["latin-1"][0])
    with pytest.raises(TaskError, match=r"^task t: .*t\.csv is not UTF-8 text \(line 2\)"):
        write_task_csv(BenchTask(name="t", csv=path), tmp_path / "bench")
    with pytest.raises(ReportError, match=r"^--task .*t\.csv is not UTF-8 text \(line 2\)"):
        TaskLabels(path)


def test_rows_naming_a_fifo_or_a_folder_say_so(tmp_path):
    """Both were reported as "missing"; the FIFO must also never be opened (it would block)."""
    import os

    rows = []
    for i in range(12):
        _png(tmp_path / f"ok{i}.png", 60 if i % 2 else 160)
        rows.append((f"ok{i}.png", "pos" if i % 2 else "neg"))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    csv = _csv(tmp_path / "task.csv", "path,label", [*rows, ("pipe.png", "pos"), ("folder.png", "neg")])
    with pytest.raises(TaskError) as e:
        load_task(FinetuneConfig(task=csv, input_size=16))
    assert "pipe.png: not_a_regular_file: a FIFO (named pipe); not opened" in str(e.value)
    assert "folder.png: not_a_file: a folder, not an image file" in str(e.value)


def test_task_given_a_folder_says_it_is_a_folder(tmp_path, capsys):
    code = main(["finetune", "--task", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "is a folder" in err and "does not exist" not in err


def test_a_binary_csvs_error_does_not_quote_kilobytes(tmp_path):
    (tmp_path / "t.csv").write_text("\x7f" * 2500 + "," + "\x01" * 2500 + "\npath,label\n")
    with pytest.raises(TaskError) as e:
        read_task_csv(tmp_path / "t.csv")
    assert "no column path or label" in str(e.value) and len(str(e.value)) - len(str(tmp_path)) < 300


@pytest.mark.parametrize("raw", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.png"])
def test_csv_paths_stay_in_the_csvs_folder_unless_allowed(tmp_path, raw):
    """`../../etc/passwd` was opened, then rejected as not_an_image."""
    rows = [(f"ok{i}.png", "pos" if i % 2 else "neg") for i in range(4)]
    csv = _csv(tmp_path / "task.csv", "path,label", [*rows, (raw, "pos")])
    with pytest.raises(TaskError, match="leads outside the CSV's folder"):
        read_task_csv(csv)
    assert read_task_csv(csv, paths_outside_csv=True).paths[-1] == raw
    assert read_task_csv(_csv(tmp_path / "ok.csv", "path,label", [*rows, ("sub/../ok1.png", "pos")])).paths
