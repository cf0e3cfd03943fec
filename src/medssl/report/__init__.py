"""The HTML report: ``medssl report DIR`` / ``build_report(dir)``.

One self-contained page (inline CSS, plots as embedded PNGs, no scripts or external references) about
whatever artefacts a folder holds: ingest outputs, pretraining runs, downstream runs.

    from medssl.report import build_report
    path = build_report("demo-out")      # -> demo-out/report.html
"""

from medssl.report.build import REPORT_FILE, build_report
from medssl.report.collect import ReportError

__all__ = ["REPORT_FILE", "ReportError", "build_report"]
