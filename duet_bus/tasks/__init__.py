"""Tasks: what differs between sequential recommendation and image classification.

A `Task` supplies, once, the parts that really differ: its datasets and how
they become per-device sessions, its backbones, how a model of each method
is trained and how a session is scored (AUC/NDCG/HR vs accuracy/log-loss),
and the columns its results show. Everything else (the seeds loop and the
results document of `duet evaluate`, the generator, the bus) is shared and
asks the task; nothing else branches on which task it runs.

`task_for(dataset)` finds the task of a dataset name.
"""

from duet_bus.tasks.base import TASKS, SeedResult, Task, register_task, task_for, task_named
from duet_bus.tasks import recommendation, vision  # noqa: F401  (each registers itself)

__all__ = ["TASKS", "SeedResult", "Task", "register_task", "task_for", "task_named"]
