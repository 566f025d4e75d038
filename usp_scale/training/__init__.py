"""Training: optimizer groups, LR schedules, EMA, task objects and the one trainer with its policies."""
from .ema import EMA
from .nonfinite import NonFiniteError
from .optim import LARS, build_optimizer, param_groups
from .schedule import LRSchedule, absolute_lr
from .tasks import TASKS, Task, build_task
from .trainer import Trainer, run

__all__ = ["EMA", "LARS", "build_optimizer", "param_groups", "LRSchedule", "absolute_lr", "TASKS", "Task",
           "build_task", "NonFiniteError", "Trainer", "run"]
