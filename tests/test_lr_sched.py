"""LR schedules: hand-computed values of the original Video-LLaMA (LAVIS) formulas."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from videollm.registry import registry
from videollm.runners.lr_sched import (
    LinearWarmupCosineLRScheduler,
    LinearWarmupStepLRScheduler,
    build_lr_scheduler,
)


def _opt(groups: int = 2) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    return torch.optim.AdamW(params, lr=0.123)


def test_registered_names():
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_lr") is LinearWarmupCosineLRScheduler
    assert registry.get_lr_scheduler_class("linear_warmup_step_lr") is LinearWarmupStepLRScheduler


def test_cosine_vl_stage1_values():
    # VL stage 1: init 1e-4, min 8e-5, warmup_lr 1e-6, 5 epochs x 2500 iterations, 2500 warm-up steps.
    opt = _opt()
    s = LinearWarmupCosineLRScheduler(opt, max_epoch=5, iters_per_epoch=2500, min_lr=8e-5, init_lr=1e-4,
                                      warmup_steps=2500, warmup_start_lr=1e-6)
    assert s.step(0, 0) == pytest.approx(1e-6)
    assert s.step(0, 1250) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 1250 / 2500)
    assert s.step(0, 2499) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 2499 / 2500)
    # Right after warm-up the cosine is measured from step 0: already decayed to ~9.8e-5.
    after = 8e-5 + (1e-4 - 8e-5) * 0.5 * (1 + math.cos(math.pi * 2500 / 12500))
    assert s.step(1, 0) == pytest.approx(after)
    assert after == pytest.approx(9.809e-5, rel=1e-3)
    last = 8e-5 + (1e-4 - 8e-5) * 0.5 * (1 + math.cos(math.pi * 12499 / 12500))
    assert s.step(4, 2499) == pytest.approx(last)
    # every parameter group gets the value
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(last)] * 2


def test_cosine_warmup_uses_in_epoch_step():
    # warmup_steps (5000) > iters_per_epoch (2500): the ramp restarts in epoch 1 (the original's quirk).
    s = LinearWarmupCosineLRScheduler(_opt(), max_epoch=5, iters_per_epoch=2500, min_lr=8e-5, init_lr=1e-4,
                                      warmup_steps=5000, warmup_start_lr=1e-6)
    assert s.step(1, 10) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 10 / 5000)
    # global step 5000 is past warm-up
    assert s.step(2, 0) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi * 5000 / 12500)))


def test_cosine_no_warmup_and_negative_warmup_lr():
    s = LinearWarmupCosineLRScheduler(_opt(), max_epoch=2, iters_per_epoch=10, min_lr=0.0, init_lr=1.0,
                                      warmup_steps=0, warmup_start_lr=-1)
    assert s.step(0, 0) == pytest.approx(1.0)
    assert s.step(1, 0) == pytest.approx(0.5)  # half way: cos(pi/2) = 0
    s = LinearWarmupCosineLRScheduler(_opt(), max_epoch=2, iters_per_epoch=10, min_lr=0.0, init_lr=1.0,
                                      warmup_steps=4, warmup_start_lr=-1)
    assert s.step(0, 2) == pytest.approx(1.0)  # warmup_lr < 0: start at init_lr


def test_step_schedule():
    s = LinearWarmupStepLRScheduler(_opt(), max_epoch=4, min_lr=1e-5, init_lr=1e-3, decay_rate=0.5,
                                    warmup_start_lr=1e-4, warmup_steps=10)
    assert s.step(0, 0) == pytest.approx(1e-4)
    assert s.step(0, 5) == pytest.approx(1e-4 + 9e-4 * 0.5)
    assert s.step(0, 50) == pytest.approx(1e-3)  # capped at init_lr
    assert s.step(1, 0) == pytest.approx(5e-4)
    assert s.step(2, 7) == pytest.approx(2.5e-4)
    s2 = LinearWarmupStepLRScheduler(_opt(), max_epoch=20, min_lr=1e-4, init_lr=1e-3, decay_rate=0.5)
    assert s2.step(10, 0) == pytest.approx(1e-4)  # floored at min_lr
    s3 = LinearWarmupStepLRScheduler(_opt(), max_epoch=3, min_lr=0.0, init_lr=1e-3, decay_rate=None)
    assert s3.step(2, 0) == pytest.approx(1e-3)  # unset decay rate: constant


def test_state_dict_round_trip_and_builder():
    run = OmegaConf.create({"lr_sched": "linear_warmup_cosine_lr", "max_epoch": 3, "iters_per_epoch": 7,
                            "min_lr": 1e-5, "init_lr": 1e-3, "warmup_lr": 1e-6, "warmup_steps": 5})
    opt = _opt()
    s = build_lr_scheduler(run, opt)
    assert isinstance(s, LinearWarmupCosineLRScheduler)
    assert (s.warmup_start_lr, s.warmup_steps, s.max_epoch, s.iters_per_epoch) == (1e-6, 5, 3, 7)
    s.step(1, 3)
    state = s.state_dict()
    opt2 = _opt()
    s2 = build_lr_scheduler(run, opt2)
    s2.load_state_dict(state)
    assert s2.last_lr == s.last_lr and opt2.param_groups[0]["lr"] == s.last_lr
    assert s2.last_position == (1, 3)
    assert s2.step(2, 1) == s.step(2, 1)
