"""The bench records the command line it was given, also when called as ``main(argv)`` from Python."""

from __future__ import annotations

import shlex
import sys

import pytest
import yaml

import medssl.bench
from medssl.cli import main


class _Stop(Exception):
    """Raised by the stand-in bench once it has seen its command, so that no work is done."""


def test_bench_records_the_arguments_given_to_main_not_sys_argv(tmp_path, monkeypatch):
    recorded = []

    def run_bench(cfg, show_progress=True, command=None):
        recorded.append(command)
        raise _Stop

    monkeypatch.setattr(medssl.bench, "run_bench", run_bench)
    monkeypatch.setattr(sys, "argv", ["pytest", "-k", "something else"])
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({"tasks": [{"name": "t", "csv": str(tmp_path / "t.csv")}]}))
    argv = ["bench", "--config", str(config), "--out", str(tmp_path / "my bench"), "--quiet"]
    with pytest.raises(_Stop):
        main(argv)
    assert recorded == [shlex.join(["medssl", *argv])]
