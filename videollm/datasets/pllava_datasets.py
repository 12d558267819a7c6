"""Datasets in PLLaVA's training format (builders ``videochat2_instruct`` and ``synthetic_videochat``).

* ``videochat2_instruct``: VideoChat2-IT records as PLLaVA trains on them ("magic_jsons"):
  ``build_info.anno_dir`` is one json file (a list of ``{"video" | "image": path relative to
  videos_dir, "QA": [{"i": instruction (optional), "q": question, "a": answer}, ...],
  "start"/"end": seconds (optional)}``). Videos: ``n_frms`` frames of the processor's sampling
  (``rand`` in training: a random frame per segment, ``middle`` at test) inside ``[start, end]``
  when given, at full resolution, then the processor's transform (``pllava_video_train``: the 7B/13B
  scripts' crop/flip/ImageNet statistics). Images: one frame, the model repeats it to ``num_frames``.
  QA order is kept (the scripts set ``random_shuffle False``).
* ``synthetic_videochat``: the synthetic clips of :mod:`videollm.synthetic` rendered on the fly
  (clip ``i`` is the one ``synthetic_clips`` draws for index ``i``) with VideoChat-style questions
  about them (the same pool ``python -m videollm.synthetic`` writes): the tiny PLLaVA's data.

Samples: ``{"image": (3, T, S, S) | (3, S, S), "kind": "video" | "image", "conversations":
[{"from": "human" | "gpt", "value"}] (the first question prefixed with ``<video>`` / ``<image>``),
"instruction": qa[0]["i"], "path"}``; batches: ``images`` (stacked when the shapes agree) or
``media`` (a list), ``media_kinds``, ``conversations``, ``instructions``, ``paths``,
``conv_type="multi"``, ``bad_samples``, ``num_samples``. The model's batch processor
(:class:`videollm.models.pllava.PllavaBatchProcessor`) writes the prompt and the labels.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from videollm import synthetic
from videollm.datasets.bad_samples import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    check_qa,
    empty_batch,
    field_of,
    guarded,
    load_video_sample,
    open_image,
    resolve_under,
    split_bad,
)
from videollm.datasets.base import BaseDatasetBuilder, BuildInfo, DatasetConfig
from videollm.datasets.instruct_datasets import read_json_list
from videollm.errors import ConfigError
from videollm.processors import pllava_processors as pp
from videollm.registry import registry

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # as synthetic_clips: clip i is the same clip in both builders


def qa_turns(qa: Sequence[Dict[str, str]], kind: str) -> List[Dict[str, str]]:
    """``QA`` pairs -> human/gpt turns, the first question prefixed with the ``<video>``/``<image>`` marker."""
    turns: List[Dict[str, str]] = []
    for i, pair in enumerate(qa):
        turns.append({"from": "human", "value": (f"<{kind}>" if i == 0 else "") + str(pair.get("q", ""))})
        turns.append({"from": "gpt", "value": str(pair["a"])})
    return turns


def collate_pllava(samples: Sequence[Any]) -> Dict[str, Any]:
    good, bad = split_bad(samples)
    if not good:
        return empty_batch(bad)
    media = [s["image"] for s in good]
    out: Dict[str, Any] = {
        "media_kinds": [s["kind"] for s in good],
        "conversations": [s["conversations"] for s in good],
        "instructions": [s.get("instruction", "") for s in good],
        "paths": [s.get("path", "") for s in good],
        "conv_type": "multi",
        "bad_samples": bad,
        "num_samples": len(good),
    }
    if all(m.shape == media[0].shape for m in media):
        out["images"] = torch.stack(media)
    else:
        out["media"] = media
    return out


class VideoChat2InstructDataset(Dataset):
    """VideoChat2-IT records (see the module docstring)."""

    def __init__(self, vis_processor: Any, vis_root: str, ann_path: str, data_type: str = "video",
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, allow_outside_root: bool = False) -> None:
        for key in ("transform", "n_frms", "sampling"):
            if not hasattr(vis_processor, key):
                raise ConfigError(f"datasets.videochat2_instruct.vis_processor.train: {type(vis_processor).__name__} "
                                  f"has no {key!r}; use pllava_video_train or pllava_video_eval")
        if data_type not in ("video", "image"):
            raise ConfigError(f"datasets.videochat2_instruct.data_type: {data_type!r}; use video or image")
        self.vis_processor = vis_processor
        self.vis_root, self.ann_path = vis_root, str(ann_path)
        self.annotation = read_json_list(ann_path, "VideoChat2-IT")
        self.data_type = data_type
        self.max_pixels = max_pixels
        self.allow_outside_root = allow_outside_root

    def __len__(self) -> int:
        return len(self.annotation)

    def _video(self, path: str, entry: Dict[str, Any]) -> torch.Tensor:
        clip = None
        if "start" in entry and "end" in entry:
            try:
                clip = (float(entry["start"]), float(entry["end"]))
            except (TypeError, ValueError):
                raise BadInput("bad_annotation", f"start/end {entry.get('start')!r}/{entry.get('end')!r} are not numbers") from None
        proc = self.vis_processor

        def decode(p: str) -> torch.Tensor:
            frames, _, _ = pp.load_frames(p, proc.n_frms, proc.sampling, backend=getattr(proc, "backend", "auto"),
                                          timeout=getattr(proc, "timeout", 30.0), clip=clip)
            return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()

        # the project's checks and reason codes (missing, empty, corrupt, too_large, decode_timeout, ...)
        return proc.transform(load_video_sample(path, decode, None, self.max_pixels))

    def __getitem__(self, index: int) -> Any:
        entry = self.annotation[index]
        kind = "image" if isinstance(entry, dict) and "image" in entry and "video" not in entry else "video"

        def media_path() -> str:
            return resolve_under(self.vis_root, field_of(entry, kind, str), allow_outside=self.allow_outside_root)

        try:
            path = media_path()
        except BadInput:
            path = f"{self.ann_path}#{index}"

        def load() -> Dict[str, Any]:
            media_path()
            qa = check_qa(field_of(entry, "QA", list))
            if kind == "video":
                data = self._video(path, entry)
            else:
                img = np.asarray(open_image(path, self.max_pixels))
                one = torch.from_numpy(img.copy()).permute(2, 0, 1).unsqueeze(1).float()  # (3, 1, H, W)
                data = self.vis_processor.transform(one)[:, 0]
            return {"image": data, "kind": kind, "conversations": qa_turns(qa, kind),
                    "instruction": str(qa[0].get("i", "") or ""), "path": path}

        return guarded(path, load)

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        return collate_pllava(samples)


class SyntheticVideoChatDataset(Dataset):
    """``num_clips`` synthetic clips rendered on demand, each with VideoChat-style QA."""

    def __init__(self, vis_processor: Any, *, num_clips: int = 1_000_000, seed: int = 0, width: int = 64,
                 height: int = 64, fps: float = 8.0, duration: float = 2.0) -> None:
        if num_clips <= 0:
            raise ConfigError(f"datasets.synthetic_videochat.build_info.num_clips: {num_clips} must be positive")
        self.vis_processor = vis_processor
        self.num_clips, self.seed = int(num_clips), int(seed)
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self.num_frames = int(round(duration * fps))

    def __len__(self) -> int:
        return self.num_clips

    def spec(self, index: int) -> synthetic.ClipSpec:
        rng = random.Random(self.seed * SEED_STRIDE + int(index))
        return synthetic.ClipSpec(name=f"synthetic_{index}", shape=rng.choice(synthetic.SHAPES),
                                  color=rng.choice(tuple(synthetic.COLORS)), direction=rng.choice(synthetic.DIRECTIONS),
                                  speed=rng.choice(tuple(synthetic.SPEEDS)), seed=rng.randrange(1 << 30))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= int(index) < self.num_clips:
            raise IndexError(f"synthetic_videochat: index {index} out of range [0, {self.num_clips})")
        spec = self.spec(index)
        rendered = list(synthetic.render_frames(spec, width=self.width, height=self.height, fps=self.fps,
                                                num_frames=self.num_frames, seed=spec.seed))
        keep = pp.frame_indices(self.num_frames, int(self.vis_processor.n_frms), self.vis_processor.sampling)
        clip = torch.from_numpy(np.stack([rendered[i] for i in keep])).permute(3, 0, 1, 2).float()
        qa = synthetic._videochat_qa(random.Random(self.seed * SEED_STRIDE + int(index) + 1), spec)
        return {"image": self.vis_processor.transform(clip), "kind": "video", "conversations": qa_turns(qa, "video"),
                "instruction": "", "path": spec.name}

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        return collate_pllava(samples)


@dataclass
class VideoChat2BuildInfo(BuildInfo):
    anno_dir: str = ""
    videos_dir: str = ""


@dataclass
class VideoChat2Config(DatasetConfig):
    build_info: VideoChat2BuildInfo = field(default_factory=VideoChat2BuildInfo)


@registry.register_builder("videochat2_instruct")
class VideoChat2InstructBuilder(BaseDatasetBuilder):
    name = "videochat2_instruct"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/videochat2_instruct/defaults.yaml"}
    config_schema = VideoChat2Config

    def build(self) -> Dict[str, Dataset]:
        c = self.config
        return {"train": VideoChat2InstructDataset(
            self.require_vis_processor("train"), self.require_build_info("videos_dir"),
            self.require_build_info("anno_dir"), c.data_type, c.max_pixels, c.allow_outside_root)}


@dataclass
class SyntheticVideoChatBuildInfo(BuildInfo):
    num_clips: int = 1_000_000
    seed: int = 0
    width: int = 64
    height: int = 64
    fps: float = 8.0
    duration: float = 2.0


@dataclass
class SyntheticVideoChatConfig(DatasetConfig):
    build_info: SyntheticVideoChatBuildInfo = field(default_factory=SyntheticVideoChatBuildInfo)


@registry.register_builder("synthetic_videochat")
class SyntheticVideoChatBuilder(BaseDatasetBuilder):
    name = "synthetic_videochat"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/synthetic_videochat/defaults.yaml"}
    config_schema = SyntheticVideoChatConfig

    def build(self) -> Dict[str, Dataset]:
        i = self.config.build_info
        return {"train": SyntheticVideoChatDataset(self.require_vis_processor("train"), num_clips=i.num_clips,
                                                   seed=i.seed, width=i.width, height=i.height, fps=i.fps,
                                                   duration=i.duration)}
