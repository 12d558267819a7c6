"""``warmup_cosine_floor_lr``: the VideoChat2 / PLLaVA cosine schedule (``utils/scheduler.py`` of
magic-research/PLLaVA, ``get_cosine_schedule_with_warmup`` with ``min_lr_multi``).

With ``m = min_lr / init_lr`` (PLLaVA: 0.25) and ``w = warmup_steps`` (PLLaVA: 0.2 of the run)::

    step < w:  lr = init_lr * max(m, step / w)                 (the warm-up starts at the floor)
    step >= w: lr = init_lr * max(m, 0.5 * (1 + cos(pi * (step - w) / (total - w))))

so the cosine runs over the steps after the warm-up and is clipped at the floor rather than
rescaled to end there (unlike ``linear_warmup_cosine_lr``). ``total = max_epoch * iters_per_epoch``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from videollm.errors import ConfigError
from videollm.registry import registry
from videollm.runners.lr_sched import _Scheduler


def floor_cosine_multiplier(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return max(floor, step / max(1, warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(floor, 0.5 * (1.0 + math.cos(math.pi * progress)))


@registry.register_lr_scheduler("warmup_cosine_floor_lr")
class WarmupCosineFloorLRScheduler(_Scheduler):
    def __init__(self, optimizer: torch.optim.Optimizer, max_epoch: int, iters_per_epoch: int, min_lr: float,
                 init_lr: float, warmup_steps: int = 0, **_: Any) -> None:
        super().__init__(optimizer)
        self.max_epoch, self.iters_per_epoch = int(max_epoch), int(iters_per_epoch)
        self.init_lr, self.min_lr, self.warmup_steps = float(init_lr), float(min_lr), int(warmup_steps)
        if not 0 <= self.min_lr <= self.init_lr:
            raise ConfigError(f"run.min_lr: {min_lr}; warmup_cosine_floor_lr needs 0 <= min_lr <= init_lr")

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        step = cur_epoch * self.iters_per_epoch + cur_step
        total = self.max_epoch * self.iters_per_epoch
        return self.init_lr * floor_cosine_multiplier(step, self.warmup_steps, total, self.min_lr / self.init_lr)
