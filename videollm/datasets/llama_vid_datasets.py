"""LLaMA-VID's training data: LLaVA-style JSON with images, videos, feature files or text only.

Builder ``llama_vid_json`` (``build_info.anno_path`` = the JSON list; ``image_dir`` /
``video_dir`` = the original's ``--image_folder`` / ``--video_folder``). An entry is ::

    {"id": ..., "image": "coco/train2017/x.jpg"}                    # or
    {"id": ..., "video": "activitynet/v_x.mp4"}                     # or a feature file:
    {"id": ..., "video": "movienet/tt0012345.pkl"}                  # or neither (text only)
     + "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", ...}]

``<image>`` marks the medium for videos too (LLaMA-VID's files; ``convert_video_chatgpt_to_llava.py``
rewrites ``<video>``). Processing is LazySupervisedDataset's (``train.py``): images through the CLIP
processor of ``image_size``, first padded square with the mean colour when
``image_aspect_ratio: pad``; videos decoded at ``video_fps`` (step ``round(avg_fps / video_fps)``),
every sampled frame kept, CLIP processor per frame, no padding; a ``.pkl`` is read as a feature
file (:mod:`videollm.long_video`; CLS dropped, as the original's loader). This builder exists next
to ``llava_json`` (Video-LLaVA's format: ``<video>`` takes a ``video`` path, frames unprocessed)
because LLaMA-VID's entries pair ``video`` with ``<image>`` and need its 1-fps sampling and feature
files.

Samples: ``{"media": Media | None, "conversations", "path"}``; batches (``collater``): ``media``,
``conversations``, ``paths`` (lists), ``conv_type="multi"``, ``bad_samples``, ``num_samples``. The
model's processor (:class:`videollm.models.llama_vid.LLaMAVIDProcessor`) tokenises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch
from torch.utils.data import Dataset

from videollm.datasets.bad_samples import (
    DEFAULT_MAX_PIXELS,
    BadInput,
    check_conversations,
    empty_batch,
    guarded,
    open_image,
    resolve_under,
    split_bad,
)
from videollm.datasets.base import BaseDatasetBuilder, BuildInfo, DatasetConfig
from videollm.datasets.instruct_datasets import read_json_list
from videollm.errors import ConfigError, DataError, VideoDecodeError
from videollm.models.base import Media
from videollm.registry import registry


class LLaMAVIDJsonDataset(Dataset):
    """Entries of a LLaMA-VID JSON list -> processed media + conversations (see the module doc)."""

    def __init__(self, ann_path: str, image_dir: str = "", video_dir: str = "", *, image_size: int = 224,
                 image_aspect_ratio: str = "pad", video_fps: float = 1.0, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 allow_outside_root: bool = False, timeout: Optional[float] = 30.0) -> None:
        from videollm.processors.clip_image import CLIPImageProcessor

        self.ann_path = str(ann_path)
        self.annotation = read_json_list(ann_path, "LLaMA-VID JSON")
        self.image_dir, self.video_dir = image_dir, video_dir
        self.processor = CLIPImageProcessor(image_size)
        self.pad = image_aspect_ratio == "pad"
        self.video_fps, self.max_pixels = video_fps, max_pixels
        self.allow_outside_root, self.timeout = allow_outside_root, timeout

    def __len__(self) -> int:
        return len(self.annotation)

    def _image(self, path: str) -> Media:
        from videollm.processors.clip_image import expand2square

        image = open_image(path, self.max_pixels)
        if self.pad:
            image = expand2square(image, self.processor.background)
        return Media("image", self.processor(image), {"path": path})

    def _video(self, path: str) -> Media:
        if path.endswith(".pkl"):
            from videollm.long_video import read_feature_file

            try:
                feats, inputs = read_feature_file(path)
            except DataError as exc:
                raise BadInput("corrupt", str(exc)) from None
            return Media("features", torch.from_numpy(feats[:, 1:].copy()), {"path": path, "inputs": inputs})
        from videollm.models.llama_vid import load_video_fps

        try:
            frames, _ = load_video_fps(path, self.video_fps, timeout=self.timeout)
        except VideoDecodeError as exc:
            raise BadInput("corrupt", str(exc)) from None
        return Media("video", self.processor(frames).permute(1, 0, 2, 3), {"path": path})

    def __getitem__(self, index: int) -> Any:
        entry = self.annotation[index]
        where = f"{self.ann_path}#{index}"

        def load() -> Dict[str, Any]:
            if not isinstance(entry, dict):
                raise BadInput("bad_annotation", f"entry is a {type(entry).__name__}, not a mapping")
            convs = check_conversations(entry.get("conversations"))
            medium = None
            if entry.get("image") is not None:
                medium = self._image(resolve_under(self.image_dir, str(entry["image"]), allow_outside=self.allow_outside_root))
            elif entry.get("video") is not None:
                medium = self._video(resolve_under(self.video_dir, str(entry["video"]), allow_outside=self.allow_outside_root))
            return {"media": medium, "conversations": convs, "path": medium.meta["path"] if medium else where}

        return guarded(where, load)

    def collater(self, samples: Sequence[Any]) -> Dict[str, Any]:
        good, bad = split_bad(samples)
        if not good:
            return empty_batch(bad)
        return {"media": [s["media"] for s in good], "conversations": [s["conversations"] for s in good],
                "paths": [s["path"] for s in good], "conv_type": "multi", "bad_samples": bad,
                "num_samples": len(good)}


@dataclass
class LLaMAVIDJsonBuildInfo(BuildInfo):
    anno_path: str = ""
    image_dir: str = ""
    video_dir: str = ""
    image_size: int = 224
    image_aspect_ratio: str = "pad"
    video_fps: float = 1.0
    timeout: Optional[float] = 30.0


@dataclass
class LLaMAVIDJsonConfig(DatasetConfig):
    data_type: str = "mixed"
    build_info: LLaMAVIDJsonBuildInfo = field(default_factory=LLaMAVIDJsonBuildInfo)


@registry.register_builder("llama_vid_json")
class LLaMAVIDJsonBuilder(BaseDatasetBuilder):
    name = "llama_vid_json"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/llama_vid_json/defaults.yaml"}
    config_schema = LLaMAVIDJsonConfig

    def build(self) -> Dict[str, Dataset]:
        info = self.config.build_info
        if not info.anno_path:
            raise ConfigError("datasets.llama_vid_json.build_info.anno_path: empty; give the JSON list of entries")
        if info.image_aspect_ratio not in ("pad", "square", "none"):
            raise ConfigError(f"datasets.llama_vid_json.build_info.image_aspect_ratio: {info.image_aspect_ratio!r}; "
                              "use pad or none")
        if info.video_fps <= 0:
            raise ConfigError(f"datasets.llama_vid_json.build_info.video_fps: {info.video_fps} must be > 0")
        return {"train": LLaMAVIDJsonDataset(info.anno_path, info.image_dir, info.video_dir, image_size=info.image_size,
                                             image_aspect_ratio=info.image_aspect_ratio, video_fps=info.video_fps,
                                             max_pixels=self.config.max_pixels,
                                             allow_outside_root=self.config.allow_outside_root, timeout=info.timeout)}
