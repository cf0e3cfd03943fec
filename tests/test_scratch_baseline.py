"""benchmarks/scratch_baseline.py through its own entry point, at CI size (--tiny, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAD_CT = REPO.parent / "shared" / "data" / "head-ct-hemorrhage" / "task.csv"


@pytest.mark.skipif(not HEAD_CT.is_file(), reason="needs ../shared/data/head-ct-hemorrhage beside the repository")
def test_the_scratch_baseline_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "baseline.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scratch_baseline.py"), "--tiny", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| head-ct-tiny | 1 |" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["medssl"]["steps"] == run["plain"]["steps"] > 0  # the same number of training steps
    for arm in ("medssl", "plain"):
        assert 0 <= run[arm]["test_auc"] <= 1 and 0 <= run[arm]["val_auc"] <= 1
