"""``medssl bench``: the paper's three claims (accuracy, convergence, robustness) measured on your tasks.

    from medssl.bench import run_bench
    from medssl.config import BenchConfig, load_config
    summary = run_bench(load_config(BenchConfig, "benchmarks/paper.yaml"))

The HTML report of a bench folder is ``medssl.report.build_report(cfg.out, task=report_task(cfg))``.
"""

from medssl.bench.run import report_task, run_bench

__all__ = ["report_task", "run_bench"]
