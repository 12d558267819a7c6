"""Registered parts; importing this package registers them.

Processors (``registry.get_processor_class(name).from_config(cfg)``): ``alpro_video_train``,
``alpro_video_eval``, ``blip2_image_train``, ``blip2_image_eval``, ``blip_caption``. Video
decoding: :func:`load_video` (backends ``pyav``, ``decord``, ``torchcodec``; see
:mod:`videollm.processors.video_loader`).
"""

from videollm.processors.audio import ImageBindAudioProcessor, NoAudioStreamError, load_and_transform_audio
from videollm.processors.image_processors import Blip2ImageEvalProcessor, Blip2ImageTrainProcessor, load_image
from videollm.processors.text_processors import BlipCaptionProcessor, pre_caption
from videollm.processors.transforms import CLIP_MEAN, CLIP_STD, BaseProcessor
from videollm.processors.video_loader import (
    SAMPLING_MODES,
    VideoBackend,
    available_backends,
    decode_video,
    load_video,
    register_backend,
    sample_indices,
)
from videollm.processors.video_processors import AlproVideoEvalProcessor, AlproVideoTrainProcessor

__all__ = [
    "ImageBindAudioProcessor",
    "NoAudioStreamError",
    "load_and_transform_audio",
    "AlproVideoEvalProcessor",
    "AlproVideoTrainProcessor",
    "BaseProcessor",
    "Blip2ImageEvalProcessor",
    "Blip2ImageTrainProcessor",
    "BlipCaptionProcessor",
    "CLIP_MEAN",
    "CLIP_STD",
    "SAMPLING_MODES",
    "VideoBackend",
    "available_backends",
    "decode_video",
    "load_image",
    "load_processor",
    "load_video",
    "pre_caption",
    "register_backend",
    "sample_indices",
]


def load_processor(name: str, cfg=None) -> BaseProcessor:
    """``registry.get_processor_class(name).from_config(cfg)``."""
    from videollm.registry import registry

    return registry.get_processor_class(name).from_config(cfg)
