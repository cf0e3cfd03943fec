"""Typed configs: YAML + flags + --set, in that order of precedence, with errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medssl.config import ConfigError, IngestConfig, load_config


def test_precedence_yaml_flags_set(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("max_side: 256\nworkers: 3\nplanes: [axial, coronal]\n")
    cfg = load_config(IngestConfig, cfg_file, {"workers": 5, "out": None}, ["max_side=128", "percentiles=[1, 99]"])
    assert cfg.max_side == 128 and cfg.workers == 5 and cfg.planes == ["axial", "coronal"]
    assert cfg.percentiles == (1.0, 99.0) and cfg.out is None


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="max_sidee"):
        load_config(IngestConfig, None, None, ["max_sidee=3"])


def test_invalid_value_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"percentiles.*0 <= low < high"):
        load_config(IngestConfig, None, None, ["percentiles=[99, 1]"])
    with pytest.raises(ConfigError, match="planes"):
        load_config(IngestConfig, None, None, ["planes=[oblique]"])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(IngestConfig, bad)


def test_cli_help_lists_commands_and_settings():
    top = subprocess.run([sys.executable, "-m", "medssl.cli", "--help"], capture_output=True, text=True)
    assert top.returncode == 0 and "ingest" in top.stdout
    sub = subprocess.run([sys.executable, "-m", "medssl.cli", "ingest", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and "max_side" in sub.stdout and "--engine" in sub.stdout


def test_resume_with_changed_settings_is_refused(tmp_path, pydicom_test_files):
    args = [sys.executable, "-m", "medssl.cli", "ingest", str(pydicom_test_files / "CT_small.dcm"),
            "--out", str(tmp_path / "out"), "--quiet", "--workers", "1"]
    assert subprocess.run(args, capture_output=True).returncode == 0
    again = subprocess.run(args + ["--set", "max_side=64"], capture_output=True, text=True)
    assert again.returncode == 2 and "max_side: 512 -> 64" in again.stderr
