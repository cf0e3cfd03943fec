"""Downstream work on labeled tasks: task CSVs, linear probing, fine-tuning, the hybrid regime, metrics,
robustness sweeps.

    from medssl.downstream import evaluate_robustness, finetune
    metrics = finetune("task.csv", init="runs/ct", mode="hybrid", label_fraction=0.1, seed=0, out="results/h")
    robustness = evaluate_robustness("results/h")   # also written to results/h/robustness.json
"""

from medssl.downstream.api import finetune, prepare_task
from medssl.downstream.model import Classifier, load_classifier
from medssl.downstream.robustness import evaluate_robustness
from medssl.downstream.tasks import Task, TaskError

__all__ = ["Classifier", "Task", "TaskError", "evaluate_robustness", "finetune", "load_classifier", "prepare_task"]
