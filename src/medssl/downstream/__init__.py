"""Downstream work on labeled tasks: task CSVs, linear probing, fine-tuning, the hybrid regime, metrics.

    from medssl.downstream import finetune
    metrics = finetune("task.csv", init="runs/ct", mode="hybrid", label_fraction=0.1, seed=0, out="results/h")
"""

from medssl.downstream.api import finetune, prepare_task
from medssl.downstream.model import Classifier, load_classifier
from medssl.downstream.tasks import Task, TaskError

__all__ = ["Classifier", "Task", "TaskError", "finetune", "load_classifier", "prepare_task"]
