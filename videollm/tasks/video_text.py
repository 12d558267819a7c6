"""The registered tasks. They share :class:`~videollm.tasks.base_task.BaseTask`'s step: the
model picks the caption or the instruction path from the batch itself."""

from __future__ import annotations

from videollm.registry import registry
from videollm.tasks.base_task import BaseTask


@registry.register_task("video_text_pretrain")
class VideoTextPretrainTask(BaseTask):
    """Stage-1 video-caption pre-training (WebVid + image captions); the original's name."""

    name = "video_text_pretrain"


@registry.register_task("image_text_pretrain")
class ImageTextPretrainTask(BaseTask):
    """Image-caption pre-training; the original's name."""

    name = "image_text_pretrain"


@registry.register_task("instruction_tuning")
class InstructionTuningTask(BaseTask):
    """Stage-2 instruction tuning (the original ran it under ``video_text_pretrain``)."""

    name = "instruction_tuning"
