"""The ingest fuzz campaign (benchmarks/fuzz_ingest.py) at test size: 300 mutated inputs through the real CLI.

The inputs are the harness's own (seed 0): byte flips, truncations, absurd DICOM / NIfTI / PNG / TIFF / JPEG
headers, corrupted compressed streams, decompression bombs, FIFOs and links, names that are not UTF-8.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _harness():
    if str(REPO / "benchmarks") not in sys.path:  # the harness imports its sibling benchmarks/machine.py
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("fuzz_ingest", REPO / "benchmarks" / "fuzz_ingest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_300_fuzzed_inputs_each_get_one_specific_row(tmp_path):
    fuzz = _harness()
    # A per-file time limit well under the per-run one, so that a slow decoder shows as a `timeout` row, not a
    # hang; work units of 50 files, so that both workers get some of each batch.
    opts = fuzz.parse_args(["--inputs", "300", "--batch", "150", "--workers", "2", "--timeout", "300",
                            "--set", "file_timeout_s=30", "--set", "files_per_chunk=50", "--no-isolate",
                            "--out", str(tmp_path / "fuzz")])
    summary = fuzz.campaign(opts, "tests/test_fuzz_ingest.py")
    t = summary["totals"]

    found = {k: t[k] for k in ("crashed_runs", "hung_runs", "inputs_without_row", "inputs_with_several_rows",
                               "rows_matching_no_input", "internal_error", "header_value_leaks", "invalid_json")
             if t[k]}
    examples = {k: v[:3] for k, v in summary["examples"].items() if k != "by_reason" and v}
    assert not found, f"{found}; examples: {examples}"
    assert t["inputs"] == 300 and sum(summary["status"].values()) == 300
    # Both outcomes were exercised: the campaign is not all garbage, nor all valid files.
    assert summary["status"].get("ingested", 0) >= 30 and summary["status"].get("rejected", 0) >= 100
    assert t["memory_budget_mb"] and t["worker_peak_rss_mb"] is not None
    assert t["worker_peak_rss_mb"] < t["memory_budget_mb"] and not t["safety_net_reached"]
