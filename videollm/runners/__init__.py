"""Runners and learning-rate schedules; importing this package registers ``runner_iter``,
``linear_warmup_cosine_lr`` and ``linear_warmup_step_lr``."""

from videollm.runners.lr_sched import (
    LinearWarmupCosineLRScheduler,
    LinearWarmupStepLRScheduler,
    build_lr_scheduler,
)
from videollm.runners import lr_sched_floor  # noqa: F401 - registers warmup_cosine_floor_lr
from videollm.runners.optim import build_optimizer, param_groups
from videollm.runners.runner_iter import RESUME_NAME, RunnerIter

__all__ = [
    "LinearWarmupCosineLRScheduler",
    "LinearWarmupStepLRScheduler",
    "RESUME_NAME",
    "RunnerIter",
    "build_lr_scheduler",
    "build_optimizer",
    "param_groups",
]
