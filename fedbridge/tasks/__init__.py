"""Tasks: datasets, label sets, partitioning into silos, and metrics."""

from fedbridge.tasks.metrics import classification_metrics
from fedbridge.tasks.partition import Federation, SiloData, SiloFile, load_federation, partition, silo_from_file
from fedbridge.tasks.task import BUILTIN_TASKS, Examples, Task, load_task

__all__ = ["BUILTIN_TASKS", "Examples", "Federation", "SiloData", "SiloFile", "Task", "classification_metrics",
           "load_federation", "load_task", "partition", "silo_from_file"]
