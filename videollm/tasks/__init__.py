"""Tasks; importing this package registers ``video_text_pretrain``, ``image_text_pretrain`` and
``instruction_tuning``."""

from videollm.tasks.base_task import BaseTask, setup_task
from videollm.tasks.video_text import ImageTextPretrainTask, InstructionTuningTask, VideoTextPretrainTask
from videollm.tasks.boundary_captioning import BoundaryCaptioningTask  # noqa: F401

__all__ = ["BaseTask", "ImageTextPretrainTask", "InstructionTuningTask", "VideoTextPretrainTask", "setup_task"]
