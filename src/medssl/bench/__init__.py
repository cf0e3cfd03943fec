"""``medssl bench``: the paper's three claims (accuracy, convergence, robustness) measured on your tasks.

    from medssl.bench import run_bench
    from medssl.config import BenchConfig, load_config
    summary = run_bench(load_config(BenchConfig, "benchmarks/paper.yaml"))
"""

from medssl.bench.run import run_bench

__all__ = ["run_bench"]
