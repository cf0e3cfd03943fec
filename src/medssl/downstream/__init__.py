"""Downstream work on labeled tasks: task CSVs, linear probing, fine-tuning, the hybrid regime, metrics,
robustness sweeps.

    from medssl.downstream import evaluate_robustness, finetune
    metrics = finetune("task.csv", init="runs/ct", mode="hybrid", label_fraction=0.1, seed=0, out="results/h")
    robustness = evaluate_robustness("results/h")   # also written to results/h/robustness.json
"""

import importlib

# Lazy, as in ``medssl/__init__``: the decode worker imports ``medssl.downstream.decode`` and must not pay
# for torch (about 3 s and a large share of its memory budget) through this package's exports.
_EXPORTS = {"finetune": "api", "prepare_task": "api", "Classifier": "model", "load_classifier": "model",
            "evaluate_robustness": "robustness", "Task": "tasks", "TaskError": "tasks"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medssl.downstream.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medssl.downstream' has no attribute {name!r}")
