"""Clips rendered on the fly: an endless caption dataset for the tiny recipes (builder ``synthetic_clips``).

Sample ``i`` of the train split is the clip that :mod:`videollm.synthetic` would draw for the
per-clip seed ``build_info.seed * 1_000_003 + i``: a random shape, colour, direction and speed
and a random start, rendered straight to frames (no encoding, no decoding), then the frames the
train processor samples, resized to its ``image_size`` and passed through its ``transform``
(random resized crop, normalisation). ``num_clips`` sets the length of an epoch; with the
default of a million no clip is seen twice in a tiny run, so a model cannot memorise the
training clips and has to learn the attributes.

The optional ``val`` split reads held-out clips from files, in the WebVid layout that
``python -m videollm.synthetic`` writes (``val_anno_dir`` + ``videos_dir``): evaluation decodes
real H.264 files, so the numbers include the gap between rendered and decoded frames.

Samples: ``{"image": (3, T, S, S) float, "text_input": str, "type": "video"}`` as ``webvid``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from videollm import synthetic
from videollm.datasets.base import BaseDatasetBuilder, BuildInfo, CaptionDatasetMixin, DatasetConfig
from videollm.datasets.caption_datasets import WebvidDataset
from videollm.errors import ConfigError
from videollm.processors.video_loader import sample_indices
from videollm.registry import registry

SEED_STRIDE = 1_000_003


class SyntheticClipDataset(CaptionDatasetMixin, Dataset):
    """``num_clips`` clips rendered on demand; the same index always gives the same clip.

    The processor's own randomness (crop, frame sampling) draws from torch's and Python's
    global generators, as for decoded clips, so it follows the runner's seeding.
    """

    def __init__(self, vis_processor: Any, text_processor: Any = None, *, num_clips: int = 1_000_000,
                 seed: int = 0, width: int = 64, height: int = 64, fps: float = 8.0, duration: float = 2.0) -> None:
        if num_clips <= 0:
            raise ConfigError(f"datasets.synthetic_clips.build_info.num_clips: {num_clips} must be positive")
        if width < 8 or height < 8 or width % 2 or height % 2:
            raise ConfigError(f"datasets.synthetic_clips.build_info: width={width}, height={height} must be even and >= 8")
        self.num_frames = int(round(duration * fps))
        if self.num_frames < 1:
            raise ConfigError(f"datasets.synthetic_clips.build_info: duration={duration} x fps={fps} gives no frame")
        for key in ("n_frms", "image_size", "transform"):
            if not hasattr(vis_processor, key):
                raise ConfigError(
                    f"datasets.synthetic_clips.vis_processor: {type(vis_processor).__name__} has no '{key}'; "
                    "use a video processor (alpro_video_train / alpro_video_eval)"
                )
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.num_clips, self.seed = int(num_clips), int(seed)
        self.width, self.height, self.fps = int(width), int(height), float(fps)

    def __len__(self) -> int:
        return self.num_clips

    def spec(self, index: int) -> synthetic.ClipSpec:
        """The attributes (and trajectory seed) of clip ``index``."""
        rng = random.Random(self.seed * SEED_STRIDE + int(index))
        return synthetic.ClipSpec(
            name=f"synthetic_{index}",
            shape=rng.choice(synthetic.SHAPES),
            color=rng.choice(tuple(synthetic.COLORS)),
            direction=rng.choice(synthetic.DIRECTIONS),
            speed=rng.choice(tuple(synthetic.SPEEDS)),
            seed=rng.randrange(1 << 30),
        )

    def frames(self, index: int) -> torch.Tensor:
        """The processor's frames of clip ``index`` before its transform: ``(3, T, S, S)`` 0..255."""
        return self._frames(self.spec(index))

    def _frames(self, spec: synthetic.ClipSpec) -> torch.Tensor:
        n = min(int(self.vis_processor.n_frms), self.num_frames)
        keep = sample_indices(self.num_frames, n, getattr(self.vis_processor, "sampling", "uniform"))
        rendered = list(synthetic.render_frames(spec, width=self.width, height=self.height, fps=self.fps,
                                                num_frames=self.num_frames, seed=spec.seed))
        clip = torch.from_numpy(np.stack([rendered[i] for i in keep])).permute(3, 0, 1, 2).float()  # (3, T, H, W)
        size = int(self.vis_processor.image_size)
        if (self.height, self.width) != (size, size):
            # The file path resizes while decoding (FFmpeg's bilinear scale); antialiased bilinear
            # is the closest plain-torch filter.
            clip = F.interpolate(clip, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            clip = clip.round().clamp_(0, 255)
        return clip

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= int(index) < self.num_clips:
            raise IndexError(f"synthetic_clips: index {index} out of range [0, {self.num_clips})")
        spec = self.spec(index)
        caption = synthetic.caption_for(spec)
        text = self.text_processor(caption) if self.text_processor is not None else caption
        return {"image": self.vis_processor.transform(self._frames(spec)), "text_input": text, "type": "video"}


@dataclass
class SyntheticClipsBuildInfo(BuildInfo):
    num_clips: int = 1_000_000
    seed: int = 0
    width: int = 64
    height: int = 64
    fps: float = 8.0
    duration: float = 2.0
    # held-out clips from files (WebVid layout of `python -m videollm.synthetic`)
    val_anno_dir: Optional[str] = None
    videos_dir: Optional[str] = None


@dataclass
class SyntheticClipsConfig(DatasetConfig):
    data_type: str = "video"
    build_info: SyntheticClipsBuildInfo = field(default_factory=SyntheticClipsBuildInfo)


@registry.register_builder("synthetic_clips")
class SyntheticClipsBuilder(BaseDatasetBuilder):
    name = "synthetic_clips"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/synthetic_clips/defaults.yaml"}
    config_schema = SyntheticClipsConfig

    def build(self) -> Dict[str, Dataset]:
        info = self.config.build_info
        out: Dict[str, Dataset] = {
            "train": SyntheticClipDataset(
                self.require_vis_processor("train"), self.text_processors.get("train"), num_clips=info.num_clips,
                seed=info.seed, width=info.width, height=info.height, fps=info.fps, duration=info.duration,
            )
        }
        if info.val_anno_dir:
            if not info.videos_dir:
                raise ConfigError("datasets.synthetic_clips.build_info.videos_dir: needed with val_anno_dir")
            out["val"] = WebvidDataset(self.require_vis_processor("eval"), self.text_processors.get("eval"),
                                       info.videos_dir, info.val_anno_dir, self.config.max_pixels,
                                       self.config.allow_outside_root)
        return out


# ----------------------------------------------------------------------------------------
# Conversations about clips and still images rendered on the fly (the tiny chat recipe)
# ----------------------------------------------------------------------------------------

# Question types and phrasings the tiny chat model is taught (several per type); the answers
# name the attribute so that a scorer can check them (videollm.evaluation.parse_attributes).
VIDEO_QUESTIONS: Dict[str, Tuple[str, ...]] = {
    "what": ("What is moving in the video?", "What do you see in the video?", "Describe the video."),
    "color": ("What color is the moving shape?", "What color is the shape?", "Which color does the shape have?"),
    "shape": ("What shape is moving in the video?", "What shape is it?", "Which shape do you see?"),
    "direction": ("Which direction is the shape moving?", "Where is the shape going?",
                  "In which direction does it move?"),
}
IMAGE_QUESTIONS: Dict[str, Tuple[str, ...]] = {
    "what": ("What is in the image?", "What do you see in the image?", "Describe the image."),
    "color": ("What color is the shape?", "What color is the shape in the image?", "Which color does the shape have?"),
    "shape": ("What shape is in the image?", "What shape is it?", "Which shape do you see?"),
}


def synthetic_answer(kind: str, question_type: str, shape: str, color: str, direction: str = "") -> str:
    """The answer the tiny chat model is taught for a question type."""
    if question_type == "what":
        return f"A {color} {shape} is moving {direction}." if kind == "video" else f"A {color} {shape}."
    if question_type == "color":
        return f"It is {color}."
    if question_type == "shape":
        return f"It is a {shape}."
    if question_type == "direction":
        return f"It is moving {direction}."
    raise ConfigError(f"unknown question type {question_type!r}")


class SyntheticChatDataset(Dataset):
    """Multi-turn conversations about one clip (or still image) rendered on the fly.

    Sample ``i``: the clip of :class:`SyntheticClipDataset` with the same seed and index (or a
    still image of a random shape and colour), and 1 to ``max_turns`` questions of different
    types (what is moving / colour / shape / direction; images: no direction) in a random order,
    each in one of several phrasings, with the answers of :func:`synthetic_answer`. The medium is
    marked the way the chat writes it: ``"<video> " + question`` (the model's processor adds the
    frame-time sentence, so the prompt is the chat's, double space included) or
    ``"<image>  " + question``. Samples are conversation samples (see
    :mod:`videollm.datasets.instruct_datasets`); the model tokenises them.
    """

    def __init__(self, vis_processor: Any, *, media: str = "video", num_samples: int = 1_000_000, seed: int = 0,
                 max_turns: int = 3, width: int = 64, height: int = 64, fps: float = 8.0, duration: float = 2.0,
                 fix_label_mask: bool = False, model_facts: Optional[Dict[str, Any]] = None) -> None:
        if media not in ("video", "image"):
            raise ConfigError(f"synthetic_chat: media {media!r}: expected video or image")
        if max_turns < 1:
            raise ConfigError(f"synthetic_chat: max_turns {max_turns} must be >= 1")
        self.media, self.num_samples, self.seed, self.max_turns = media, int(num_samples), int(seed), int(max_turns)
        self.vis_processor = vis_processor
        self.fix_label_mask = fix_label_mask
        self.model_facts = dict(model_facts or {})
        self.width, self.height = int(width), int(height)
        if media == "video":
            self.clips = SyntheticClipDataset(vis_processor, num_clips=num_samples, seed=seed, width=width,
                                              height=height, fps=fps, duration=duration)

    def __len__(self) -> int:
        return self.num_samples

    def _turns(self, rng: random.Random, shape: str, color: str, direction: str) -> List[Dict[str, str]]:
        table = VIDEO_QUESTIONS if self.media == "video" else IMAGE_QUESTIONS
        types = rng.sample(sorted(table), rng.randint(1, min(self.max_turns, len(table))))
        turns: List[Dict[str, str]] = []
        for j, qtype in enumerate(types):
            q = rng.choice(table[qtype])
            if j == 0:
                q = ("<video> " if self.media == "video" else "<image>  ") + q
            turns.append({"from": "human", "value": q})
            turns.append({"from": "gpt", "value": synthetic_answer(self.media, qtype, shape, color, direction)})
        return turns

    def __getitem__(self, index: int) -> Dict[str, Any]:
        from PIL import Image

        from videollm.processors.video_loader import video_message

        if not 0 <= int(index) < self.num_samples:
            raise IndexError(f"synthetic_chat: index {index} out of range [0, {self.num_samples})")
        rng = random.Random((self.seed * SEED_STRIDE + int(index)) ^ 0x5EED)
        if self.media == "video":
            spec = self.clips.spec(index)
            frames = self.clips._frames(spec)
            keep = sample_indices(self.clips.num_frames, frames.shape[1], getattr(self.vis_processor, "sampling", "uniform"))
            image, msg = self.vis_processor.transform(frames), video_message(keep, self.clips.fps)
            turns = self._turns(rng, spec.shape, spec.color, spec.direction)
        else:
            spec = synthetic.ImageSpec(name=f"synthetic_image_{index}", shape=rng.choice(synthetic.SHAPES),
                                       color=rng.choice(tuple(synthetic.COLORS)), seed=rng.randrange(1 << 30))
            pixels = synthetic.render_image(spec, size=(self.width, self.height))
            image, msg = self.vis_processor(Image.fromarray(pixels)), ""
            turns = self._turns(rng, spec.shape, spec.color, "")
        return {"image": image, "conversations": turns, "media_msg": msg, "path": f"synthetic_chat/{self.media}/{index}"}

    def collater(self, samples):
        from videollm.datasets.instruct_datasets import collate_conversations

        return collate_conversations(samples, self.fix_label_mask)


@dataclass
class SyntheticChatBuildInfo(BuildInfo):
    num_samples: int = 1_000_000
    seed: int = 0
    max_turns: int = 3
    width: int = 64
    height: int = 64
    fps: float = 8.0
    duration: float = 2.0


@dataclass
class SyntheticChatConfig(DatasetConfig):
    data_type: str = "video"
    fix_label_mask: bool = False
    # model facts the original's instruction YAMLs repeat: checked against the model when given
    num_video_query_token: Optional[int] = None
    model_type: Optional[str] = None
    build_info: SyntheticChatBuildInfo = field(default_factory=SyntheticChatBuildInfo)


@registry.register_builder("synthetic_chat")
class SyntheticChatBuilder(BaseDatasetBuilder):
    """Conversations about rendered clips (``synthetic_chat``) or still images (``synthetic_chat_images``)."""

    name = "synthetic_chat"
    media = "video"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/synthetic_clips/chat.yaml"}
    config_schema = SyntheticChatConfig

    def build(self) -> Dict[str, Dataset]:
        c, info = self.config, self.config.build_info
        facts = {k: getattr(c, k) for k in ("num_video_query_token", "model_type") if getattr(c, k) is not None}
        return {"train": SyntheticChatDataset(
            self.require_vis_processor("train"), media=self.media, num_samples=info.num_samples, seed=info.seed,
            max_turns=info.max_turns, width=info.width, height=info.height, fps=info.fps, duration=info.duration,
            fix_label_mask=c.fix_label_mask, model_facts=facts)}


@registry.register_builder("synthetic_chat_images")
class SyntheticChatImagesBuilder(SyntheticChatBuilder):
    name = "synthetic_chat_images"
    media = "image"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/synthetic_clips/chat_images.yaml"}
