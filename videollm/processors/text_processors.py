"""Text processors: caption cleaning for the caption (stage-1) datasets.

``blip_caption`` keeps the original Video-LLaMA name and behaviour (quirk A5, facts from its
``blip_processors.py``): lowercase; each of ``. ! " ( ) * # : ; ~`` becomes a space; every run
of two or more whitespace characters becomes one space (a single tab or newline is left as it
is, exactly like the original); trailing newlines and surrounding spaces are stripped; at most
``max_words`` space-separated words are kept; ``prompt`` is prefixed to the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from videollm.processors.transforms import BaseProcessor, config_values
from videollm.registry import registry

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Clean one caption as described in the module docstring (without the prompt)."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@dataclass
class BlipCaptionConfig:
    """Keys of ``text_processor.*`` for ``blip_caption``."""

    name: str = "blip_caption"
    prompt: str = ""
    max_words: int = 50


@registry.register_processor("blip_caption")
class BlipCaptionProcessor(BaseProcessor):
    """``prompt + pre_caption(caption)``."""

    config_schema = BlipCaptionConfig

    def __init__(self, prompt: str = "", max_words: int = 50) -> None:
        self.prompt = prompt
        self.max_words = int(max_words)

    def pre_caption(self, caption: str) -> str:
        return pre_caption(caption, self.max_words)

    def __call__(self, caption: str) -> str:
        if not isinstance(caption, str):
            raise TypeError(f"blip_caption: expected a caption string, got {type(caption).__name__}")
        return self.prompt + self.pre_caption(caption)

    @classmethod
    def from_config(cls, cfg: Optional[DictConfig] = None) -> "BlipCaptionProcessor":
        return cls(**config_values(cls, cfg))

    def __repr__(self) -> str:
        return f"BlipCaptionProcessor(prompt={self.prompt!r}, max_words={self.max_words})"
