"""The optimizer of a run: AdamW over the trainable parameters, in two weight-decay groups.

The original Video-LLaMA (LAVIS) rule: a parameter gets ``weight_decay`` unless it has fewer than
2 dimensions or its name contains ``"bias"``, ``"ln"`` or ``"bn"``. We keep that rule and also
exempt every parameter of a normalisation module (by type: LayerNorm, RMSNorm, GroupNorm,
BatchNorm, or any module class whose name ends in ``Norm``). :func:`param_groups` reports the
parameters on which the two rules disagree, so a reader can see whether the extra rule changed
anything (on Video-LLaMA it does not: every norm parameter is 1-D).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

NO_DECAY_NAME_PARTS = ("bias", "ln", "bn")
_NORM_TYPES: Tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


def is_norm_module(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def name_rule_no_decay(name: str, param: torch.Tensor) -> bool:
    """The original's rule: no decay for ndim < 2 or a name containing bias/ln/bn."""
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS)


@dataclass
class ParamGroupReport:
    """What :func:`param_groups` decided."""

    decay: List[str] = field(default_factory=list)
    no_decay: List[str] = field(default_factory=list)
    num_trainable: int = 0
    # names where the name rule and the module-type rule disagree: (name, name_rule, type_rule)
    disagreements: List[Tuple[str, bool, bool]] = field(default_factory=list)


def param_groups(model: nn.Module, weight_decay: float) -> Tuple[List[Dict[str, Any]], ParamGroupReport]:
    """Two AdamW groups over the ``requires_grad`` parameters of ``model`` (see module doc)."""
    norm_params = set()
    for module in model.modules():
        if is_norm_module(module):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    report = ParamGroupReport()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        by_name = name_rule_no_decay(name, p)
        by_type = id(p) in norm_params
        if by_type and not by_name:
            report.disagreements.append((name, by_name, by_type))
        if by_name or by_type:
            no_decay.append(p)
            report.no_decay.append(name)
        else:
            decay.append(p)
            report.decay.append(name)
        report.num_trainable += p.numel()
    if report.disagreements:
        logger.info(
            "weight decay: %d parameter(s) exempted only by the norm-module rule (the original would "
            "decay them): %s", len(report.disagreements), [d[0] for d in report.disagreements][:10]
        )
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return _split_lr_groups(model, groups), report


def _split_lr_groups(model: nn.Module, groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A model with ``lr_scales()`` ({parameter-name prefix: lr multiplier}, e.g. Video-LLaVA's
    projector lr) gets those parameters in groups of their own with ``lr_scale``; the scheduler
    multiplies its lr by it. Models without it keep the two groups unchanged."""
    scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
    if not scales:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}
    out: List[Dict[str, Any]] = []
    for g in groups:
        by_scale: Dict[float, List[torch.Tensor]] = {}
        for p in g["params"]:
            scale = next((float(v) for k, v in scales.items() if names.get(id(p), "").startswith(k)), 1.0)
            by_scale.setdefault(scale, []).append(p)
        for scale, params in by_scale.items():
            out.append({**g, "params": params, **({"lr_scale": scale} if scale != 1.0 else {})})
    return out


def build_optimizer(model: nn.Module, run_cfg: Any) -> Tuple[torch.optim.Optimizer, ParamGroupReport]:
    """AdamW(lr=init_lr, betas=(0.9, beta2)) over :func:`param_groups`; logs the trainable names."""
    groups, report = param_groups(model, float(run_cfg.weight_decay))
    if report.num_trainable == 0:
        from videollm.errors import ConfigError

        raise ConfigError(
            "no trainable parameter: every part of the model is frozen; unfreeze one "
            "(e.g. model.frozen_video_Qformer=false, model.frozen_llama_proj=false)"
        )
    logger.info("trainable parameters: %d (%d tensors with weight decay, %d without)",
                report.num_trainable, len(report.decay), len(report.no_decay))
    logger.debug("trainable: %s", report.decay + report.no_decay)
    optimizer = torch.optim.AdamW(
        groups,
        lr=float(run_cfg.init_lr),
        weight_decay=float(run_cfg.weight_decay),
        betas=(0.9, float(run_cfg.get("beta2", 0.999))),
    )
    return optimizer, report
