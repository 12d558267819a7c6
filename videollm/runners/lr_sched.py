"""Learning-rate schedules with the original Video-LLaMA's (LAVIS's) exact semantics.

Both are driven by ``step(cur_epoch, cur_step)``, called every iteration BEFORE the forward
pass, with ``cur_step`` the iteration index inside the (iteration-based) epoch. They set the
lr of every parameter group of the optimizer.

``linear_warmup_cosine_lr`` (``s = cur_epoch * iters_per_epoch + cur_step``)::

    s <  warmup_steps: lr = min(init_lr, warmup_lr + (init_lr - warmup_lr) * cur_step / max(warmup_steps, 1))
    s >= warmup_steps: lr = min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * s / (max_epoch * iters_per_epoch)))

Note the warm-up uses the in-epoch ``cur_step``, not ``s``: with ``warmup_steps`` larger than
``iters_per_epoch`` the ramp restarts each epoch until ``s`` passes ``warmup_steps`` (the original's
behaviour, kept). The cosine runs from step 0, so right after warm-up the lr is already partly
decayed (9.8e-5 instead of 1e-4 in the VL stage-1 recipe).

``linear_warmup_step_lr``::

    cur_epoch == 0: the same linear warm-up (on cur_step)
    cur_epoch >= 1: lr = max(min_lr, init_lr * decay_rate ** cur_epoch)

``warmup_lr < 0`` means "start the warm-up at init_lr" (i.e. no warm-up), as in the original.
``decay_rate`` of None (``run.lr_decay_rate`` unset) is treated as 1 (constant lr after epoch 0);
the original crashed on it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

from videollm.registry import registry


def warmup_lr(step: int, max_step: int, start_lr: float, max_lr: float) -> float:
    """Linear ramp from ``start_lr`` towards ``max_lr`` over ``max_step`` steps, capped at ``max_lr``."""
    return min(max_lr, start_lr + (max_lr - start_lr) * step / max(max_step, 1))


def cosine_lr(step: int, max_step: int, init_lr: float, min_lr: float) -> float:
    """Half-cosine from ``init_lr`` (step 0) to ``min_lr`` (step ``max_step``)."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max_step)) + min_lr


def step_decay_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    return max(min_lr, init_lr * decay_rate**epoch)


class _Scheduler:
    """Shared parts: setting the lr, remembering the last value, (de)serialising."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.last_lr: Optional[float] = None
        self.last_position = (0, -1)

    def _set(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        return lr

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        raise NotImplementedError

    def step(self, cur_epoch: int, cur_step: int) -> float:
        """Set and return the lr for iteration ``cur_step`` of epoch ``cur_epoch``."""
        self.last_position = (cur_epoch, cur_step)
        return self._set(self.lr_at(cur_epoch, cur_step))

    def state_dict(self) -> Dict[str, Any]:
        # The schedule is a pure function of its hyper-parameters and the position; the state
        # records both so that a resume with changed hyper-parameters can be detected.
        return {k: v for k, v in vars(self).items() if k != "optimizer"}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, tuple(value) if key == "last_position" else value)
        if self.last_lr is not None:
            self._set(self.last_lr)


@registry.register_lr_scheduler("linear_warmup_cosine_lr")
class LinearWarmupCosineLRScheduler(_Scheduler):
    """Linear warm-up, then cosine decay over ``max_epoch * iters_per_epoch`` steps (see module doc)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epoch: int,
        iters_per_epoch: int,
        min_lr: float,
        init_lr: float,
        warmup_steps: int = 0,
        warmup_start_lr: float = -1,
        **_: Any,
    ) -> None:
        super().__init__(optimizer)
        self.max_epoch = int(max_epoch)
        self.iters_per_epoch = int(iters_per_epoch)
        self.min_lr = float(min_lr)
        self.init_lr = float(init_lr)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_lr = float(warmup_start_lr) if warmup_start_lr >= 0 else self.init_lr

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        total = cur_epoch * self.iters_per_epoch + cur_step
        if total < self.warmup_steps:
            return warmup_lr(cur_step, self.warmup_steps, self.warmup_start_lr, self.init_lr)
        return cosine_lr(total, self.max_epoch * self.iters_per_epoch, self.init_lr, self.min_lr)


@registry.register_lr_scheduler("linear_warmup_step_lr")
class LinearWarmupStepLRScheduler(_Scheduler):
    """Linear warm-up in epoch 0, then ``init_lr * decay_rate ** epoch`` floored at ``min_lr``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epoch: int,
        min_lr: float,
        init_lr: float,
        decay_rate: Optional[float] = 1,
        warmup_start_lr: float = -1,
        warmup_steps: int = 0,
        iters_per_epoch: Optional[int] = None,
        **_: Any,
    ) -> None:
        super().__init__(optimizer)
        self.max_epoch = int(max_epoch)
        self.iters_per_epoch = iters_per_epoch
        self.min_lr = float(min_lr)
        self.init_lr = float(init_lr)
        self.decay_rate = 1.0 if decay_rate is None else float(decay_rate)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_lr = float(warmup_start_lr) if warmup_start_lr >= 0 else self.init_lr

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        if cur_epoch == 0:
            return warmup_lr(cur_step, self.warmup_steps, self.warmup_start_lr, self.init_lr)
        return step_decay_lr(cur_epoch, self.init_lr, self.min_lr, self.decay_rate)


def build_lr_scheduler(run_cfg: Any, optimizer: torch.optim.Optimizer) -> _Scheduler:
    """The scheduler named by ``run.lr_sched``, with the original's argument mapping."""
    cls = registry.get_lr_scheduler_class(str(run_cfg.lr_sched))
    return cls(
        optimizer=optimizer,
        max_epoch=int(run_cfg.max_epoch),
        iters_per_epoch=int(run_cfg.iters_per_epoch),
        min_lr=float(run_cfg.min_lr),
        init_lr=float(run_cfg.init_lr),
        decay_rate=run_cfg.get("lr_decay_rate", None),
        warmup_start_lr=float(run_cfg.get("warmup_lr", -1)),
        warmup_steps=int(run_cfg.get("warmup_steps", 0)),
    )
