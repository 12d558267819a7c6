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

Resuming with a changed schedule: the schedule of the resumed run's config applies. A scheduler's
state holds its hyper-parameters and its position; :meth:`load_state_dict` restores only the
position and keeps the hyper-parameters it was built with (from the new config), and logs a
warning that lists every setting that differs from the checkpoint's (``run.init_lr: 0.001 ->
0.0001``). The step counter is kept: the runner continues at the saved global iteration, so a
resume with a lower ``run.init_lr`` continues on the new curve at the same step. (The original,
LAVIS, rebuilds the scheduler from the config on resume too, but saves no position.)
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Tuple

import torch

from videollm.registry import registry

logger = logging.getLogger(__name__)

# The run settings behind each scheduler attribute, for the notice of a changed schedule.
RUN_KEYS = {
    "init_lr": "run.init_lr", "min_lr": "run.min_lr", "max_epoch": "run.max_epoch",
    "iters_per_epoch": "run.iters_per_epoch", "warmup_steps": "run.warmup_steps",
    "warmup_start_lr": "run.warmup_lr (warm-up start)", "decay_rate": "run.lr_decay_rate",
}
_POSITION_KEYS = ("last_lr", "last_position", "schedule")


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
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: a model's own group (optim.py)
        self.last_lr = lr
        return lr

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        raise NotImplementedError

    def step(self, cur_epoch: int, cur_step: int) -> float:
        """Set and return the lr for iteration ``cur_step`` of epoch ``cur_epoch``."""
        self.last_position = (cur_epoch, cur_step)
        return self._set(self.lr_at(cur_epoch, cur_step))

    def hyper_parameters(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("optimizer",) + _POSITION_KEYS}

    def state_dict(self) -> Dict[str, Any]:
        # The schedule is a pure function of its hyper-parameters and the position; the state
        # records both so that a resume with changed hyper-parameters is detected and reported.
        return {"schedule": type(self).__name__, **self.hyper_parameters(),
                "last_lr": self.last_lr, "last_position": self.last_position}

    def load_state_dict(self, state: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
        """Restore the position of ``state``; keep this scheduler's own hyper-parameters (those of
        the current config) and report the ones that differ from the saved ones.

        Returns:
            ``{run setting: (saved value, value now in force)}`` for every difference (also logged
            as a warning); empty when the schedule is unchanged.
        """
        self.last_position = tuple(state.get("last_position", self.last_position))
        mine = self.hyper_parameters()
        saved = {k: v for k, v in state.items() if k not in _POSITION_KEYS}
        changes: Dict[str, Tuple[Any, Any]] = {}
        kind = state.get("schedule")
        if (kind is not None and kind != type(self).__name__) or (kind is None and set(saved) != set(mine)):
            changes["run.lr_sched"] = (kind or "another schedule", type(self).__name__)
        for key in sorted(set(saved) & set(mine)):
            if saved[key] != mine[key]:
                changes[RUN_KEYS.get(key, key)] = (saved[key], mine[key])
        if changes:
            logger.warning(
                "resume: the learning-rate schedule differs from the checkpoint's; the new one applies "
                "from the saved position on (%s)", "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items()))
        epoch, step = self.last_position
        if step >= 0:
            self._set(self.lr_at(epoch, step))
        return changes


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
