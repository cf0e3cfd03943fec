"""Typed configs: YAML + flags + --set, in that order of precedence, with errors that name the key."""

from __future__ import annotations

import re
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


def test_a_short_run_on_the_default_schedule_is_refused():
    """--set max_steps=30 left the default warm-up (50) and frozen prototypes (100) covering the whole run."""
    from medssl.config import PretrainConfig

    with pytest.raises(ConfigError, match="max_steps=30 ends before the default warmup_steps=50 .* and the "
                                          "default freeze_prototypes_steps=100"):
        load_config(PretrainConfig, None, {}, ["max_steps=30"])
    cfg = load_config(PretrainConfig, None, {}, ["max_steps=30", "warmup_steps=3", "freeze_prototypes_steps=6"])
    assert cfg.warmup_steps == 3
    assert load_config(PretrainConfig, None, {}, ["max_steps=500"]).warmup_steps == 50


def test_pretrain_help_says_what_every_setting_means():
    from medssl.cli import build_parser
    from medssl.config import PretrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["pretrain"]
    text = sub.format_help()
    settings = text.split("settings (--set KEY=VALUE", 1)[1]
    names = [n for n in PretrainConfig.model_fields if n not in ("shards", "out")]
    starts = {line.split()[0] for line in settings.splitlines()[1:] if line.startswith("  ") and line[2] != " "}
    assert starts == set(names)
    assert len(re.findall(r";\s+default\s", settings)) == len(names)  # each has a description and its default
    assert "linear learning-rate warm-up" in settings and "SwAV prototypes" in settings


def test_flags_take_their_help_and_default_from_the_typed_config():
    """The CLI repeated config defaults by hand in 13 parser/runner pairs."""
    from medssl.cli import build_parser
    from medssl.config import BenchConfig, CurateConfig, FinetuneConfig, IngestConfig, PretrainConfig

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    models = {"ingest": IngestConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig, "bench": BenchConfig,
              "curate": CurateConfig}
    for command, model in models.items():
        parser = commands[command]
        fields = parser.get_default("config_fields")
        assert fields and parser.get_default("config_model") is model
        for action in parser._actions:
            if action.dest in fields:
                field = model.model_fields[action.dest]
                assert action.help.startswith(field.description), (command, action.dest)
                assert action.default in (None, []), "a flag's own default would hide the config's"
    assert "(default 0)" in commands["finetune"].format_help()  # seed: a falsy default is still shown
