"""The scan: every entry under the inputs gets a manifest row; only regular files are ever opened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers import manifest, write_ct_dicom
from medssl.ingest.chunk import shown_path
from medssl.ingest.listing import scan


def _ingest(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", str(src), "--out", str(out), "--workers", "1",
                           "--quiet"], capture_output=True, text=True, timeout=120)


def _image(path: Path, seed: int) -> None:
    write_ct_dicom(path, np.random.default_rng(seed).normal(40, 20, (16, 16)))


def test_special_files_links_and_loops_get_rows_without_being_opened(tmp_path):
    src = tmp_path / "archive"
    (src / "series").mkdir(parents=True)
    _image(src / "series" / "a.dcm", 0)
    os.mkfifo(src / "pipe")                        # opening it would block forever
    (src / "zero").symlink_to("/dev/zero")         # reading it would never end
    (src / "broken").symlink_to(src / "nowhere")
    (src / "series" / "up").symlink_to("..")       # a loop back to the root
    (src / "alias").symlink_to("series")           # a second path to one folder
    linked = tmp_path / "elsewhere"                # a symlinked folder outside the input: followed
    linked.mkdir()
    _image(linked / "b.dcm", 1)
    (src / "linked").symlink_to(linked)
    proc = _ingest(src, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: (r["status"], (r["reason"] or "").split(":")[0]) for r in manifest(tmp_path / "out")}
    assert rows == {
        "archive/alias": ("duplicate", "duplicate_folder"),
        "archive/broken": ("rejected", "unreadable_file"),
        "archive/linked/b.dcm": ("ingested", ""),
        "archive/pipe": ("rejected", "not_a_regular_file"),
        "archive/series/a.dcm": ("ingested", ""),
        "archive/series/up": ("duplicate", "duplicate_folder"),
        "archive/zero": ("rejected", "not_a_regular_file"),
    }


def test_an_unreadable_folder_gets_a_row(tmp_path, monkeypatch):
    # Permissions do not stop root (CI runs as root), so the listing error is injected at os.scandir.
    src = tmp_path / "archive"
    (src / "locked").mkdir(parents=True)
    (src / "open").mkdir()
    (src / "open" / "x").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert list(scan([src], tmp_path / "out")) == [
        (0, "locked", "unreadable_folder: cannot list the folder (Permission denied); its files are not ingested"),
        (0, "open/x", None),
    ]


def test_names_that_are_not_utf8_or_hold_table_characters_reach_every_output(tmp_path):
    src = tmp_path / "archive"
    src.mkdir()
    _image(src / "ok.dcm", 0)
    (src / "notes|x*.txt").write_text("not an image")
    raw = os.fsencode(src) + b"/\xff\xfename.txt"       # bytes that are no UTF-8
    with open(raw, "wb") as f:
        f.write(b"also not an image")
    (src / "two\nlines.txt").write_text("not an image either")
    out = tmp_path / "out"
    for _ in range(2):  # the rerun (resume of a finished run) must work as well
        proc = _ingest(src, out)
        assert proc.returncode == 0, proc.stderr
    paths = sorted(r["path"] for r in manifest(out))
    assert paths == sorted(["archive/notes|x*.txt", "archive/ok.dcm", "archive/two\\nlines.txt",
                            "archive/\\xff\\xfename.txt"])
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| archive/notes\\|x\\*.txt |" in report and "archive/\\\\xff\\\\xfename.txt" in report
    table = [line for line in report.splitlines() if line.startswith("| archive/")]
    assert all(line.count(" | ") == 1 for line in table)  # two cells each: no name broke the table
    assert "\\xff" in (out / "ingest.log").read_text(encoding="utf-8")
    json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_shown_path_is_reversible_and_printable():
    assert shown_path("plain/name.dcm") == "plain/name.dcm"
    assert shown_path("é/ü.dcm") == "é/ü.dcm"
    assert shown_path(os.fsdecode(b"a\xff")) == "a\\xff"
    assert shown_path("a\\xff") == "a\\\\xff"  # a literal backslash is doubled: no clash with the byte above
    assert shown_path("a\nb\tc\x1b") == "a\\nb\\tc\\u001b"
    assert shown_path("nbsp\u00a0") == "nbsp\\u00a0"
