"""Tasks: what a training step computes, and how a run builds its model and datasets.

The original Video-LLaMA (LAVIS design) registers ``video_text_pretrain`` and
``image_text_pretrain``; both inherit the base task unchanged. We add ``instruction_tuning``
(the stage-2 recipes; same step, since the model chooses its path from the batch). A task is
built from the whole config with :meth:`BaseTask.setup_task`; the runner calls
:meth:`BaseTask.forward_step` every micro-batch.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from videollm.errors import ConfigError
from videollm.registry import registry

logger = logging.getLogger(__name__)


class BaseTask:
    """Builds the model and the datasets of a config; defines the training step."""

    name = "base"

    @classmethod
    def setup_task(cls, cfg: DictConfig | None = None) -> "BaseTask":
        return cls()

    # ------------------------------------------------------------------ building
    def build_model(self, cfg: DictConfig) -> torch.nn.Module:
        """The model of ``cfg.model`` (registered ``arch``), with the run's grad-checkpointing switches.

        ``run.vit_grad_checkpointing`` sets ``model.use_grad_checkpoint`` (per-block recompute in the
        ViT; only useful when the ViT trains) and ``run.llm_grad_checkpointing`` sets
        ``model.llm_grad_checkpointing`` (transformers' gradient checkpointing of the LLM).
        """
        if "model" not in cfg:
            raise ConfigError("the config has no model: section")
        model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
        run = cfg.get("run", {}) or {}
        if run.get("vit_grad_checkpointing", False):
            model_cfg.use_grad_checkpoint = True
        if run.get("llm_grad_checkpointing", False):
            model_cfg.llm_grad_checkpointing = True
        model_cls = registry.get_model_class(str(model_cfg.arch))
        return model_cls.from_config(model_cfg)

    def build_datasets(self, cfg: DictConfig) -> Dict[str, Dict[str, Dataset]]:
        """``{dataset name: {split: Dataset}}`` for every entry of ``cfg.datasets``.

        Each train dataset gets ``.name`` and ``.sample_ratio`` attributes, as in the original.
        """
        from videollm.datasets import build_datasets_from_config

        datasets_cfg = cfg.get("datasets")
        if not datasets_cfg:
            raise ConfigError("the config has no datasets: section; at least one dataset is needed to train")
        datasets = build_datasets_from_config(datasets_cfg)
        for name, splits in datasets.items():
            for split in splits.values():
                try:
                    split.name = name
                    split.sample_ratio = float(datasets_cfg[name].get("sample_ratio", 1))
                except AttributeError:  # some dataset types refuse new attributes; not needed
                    pass
        return datasets

    # ------------------------------------------------------------------ steps
    def forward_step(self, model: torch.nn.Module, samples: Dict[str, Any]) -> Dict[str, Any]:
        """The model's output dict for one micro-batch: ``{"loss", "num_tokens", ...}``."""
        return model(samples)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module, datasets: Dict[str, Dict[str, Dataset]], run: Any,
                 device: torch.device) -> Dict[str, Any]:
        """Generate for every held-out split (``run.test_splits`` + ``run.valid_splits``, default
        ``val``/``test``) and score with the registered scorer ``run.eval_scorer``
        (``synthetic_attributes`` by default). Returns ``{"name/split": {"metrics", "samples", ...}}``."""
        from videollm.evaluation import evaluate_caption_dataset

        results: Dict[str, Any] = {}
        splits = list(run.get("test_splits", []) or []) + list(run.get("valid_splits", []) or [])
        splits = splits or ["val", "test"]
        scorer = str(run.get("eval_scorer", "synthetic_attributes"))
        for name, by_split in datasets.items():
            for split in splits:
                if split in by_split:
                    results[f"{name}/{split}"] = evaluate_caption_dataset(
                        model, by_split[split], batch_size=int(run.get("batch_size_eval", 1)),
                        max_new_tokens=int(run.get("eval_max_new_tokens", 16)), device=device, scorer=scorer,
                    )
        if not results:
            logger.warning("run.evaluate is true but no dataset has a split among %s (for webvid set "
                           "build_info.val_anno_dir); nothing evaluated", splits)
        return results


def setup_task(cfg: DictConfig) -> BaseTask:
    """The task named by ``cfg.run.task``."""
    name = str(cfg.run.get("task", "video_text_pretrain"))
    return registry.get_task_class(name).setup_task(cfg)
